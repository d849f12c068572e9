// Live refresh for the console: every 5 s the page is fetched again and its
// <main> swapped in, unless the tab is hidden or the operator is in a form.
// Nothing else depends on it: with JavaScript off, reloading does the same.
(function () {
  "use strict";
  var PERIOD = 5000;
  // What an action said is shown once: later refreshes leave it out.
  var url = new URL(window.location.href);
  if (url.searchParams.has("said")) {
    url.searchParams.delete("said");
    window.history.replaceState(null, "", url.pathname + url.search);
  }
  function refresh() {
    if (document.hidden) return;
    var active = document.activeElement;
    if (active && active.form) return;
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var fresh = new DOMParser().parseFromString(text, "text/html");
        ["main", "header .serial"].forEach(function (sel) {
          var now = document.querySelector(sel), next = fresh.querySelector(sel);
          if (now && next) now.replaceWith(next);
        });
      })
      .catch(function () { /* the next tick tries again */ });
  }
  window.setInterval(refresh, PERIOD);
})();
