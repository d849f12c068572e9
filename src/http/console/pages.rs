//! The console's pages: each reads what the server knows right now and
//! draws it. Numbers that a test or a script compares with `/admin/*` carry
//! an `id` (the exact value in `data-value` where the text rounds it).

use std::collections::HashMap;

use maud::{DOCTYPE, Markup, html};

use super::super::AppState;
use crate::events::{Phase, Severity};
use crate::repo::manifest::format_time;
use crate::state::unix_now;

pub struct Context<'a> {
    pub state: &'a AppState,
    pub csrf: String,
    pub said: Option<String>,
}

fn layout(ctx: &Context<'_>, here: &str, title: &str, content: Markup) -> Markup {
    let s = ctx.state;
    let role = if s.status.is_some() { "relay" } else { "origin" };
    let nav = [
        ("/console", "Overview"),
        ("/console/components", "Components"),
        ("/console/fleet", "Fleet"),
        ("/console/events", "Events"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · patchrelay" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body {
                header {
                    span.brand { "patchrelay" }
                    span.role { (role) }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) class=[(href == here).then_some("on")] { (label) }
                        }
                    }
                    span.serial { "serial " span #serial { (s.published.serial().map(|n| n.to_string()).unwrap_or_else(|| "none".into())) } }
                }
                main {
                    @if let Some(said) = &ctx.said {
                        p.said role="status" #said { (said) }
                    }
                    h1 { (title) }
                    (content)
                    p.foot { "Shown at " (format_time(std::time::SystemTime::now())) ". " noscript { "Reload to refresh." } }
                }
            }
        }
    }
}

/// A button that POSTs an action (with the CSRF token) and comes back here.
fn button(
    ctx: &Context<'_>,
    back: &str,
    action: &str,
    target: Option<(&str, &str)>,
    label: &str,
    id: Option<String>,
) -> Markup {
    html! {
        form.inline method="post" action="/console/action" {
            input type="hidden" name="csrf" value=(ctx.csrf);
            input type="hidden" name="action" value=(action);
            input type="hidden" name="back" value=(back);
            @if let Some((c, v)) = target {
                input type="hidden" name="component" value=(c);
                input type="hidden" name="version" value=(v);
            }
            button type="submit" id=[id] { (label) }
        }
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

fn ago(unix: u64) -> String {
    let d = unix_now().saturating_sub(unix);
    match d {
        0..=119 => format!("{d} s ago"),
        120..=7199 => format!("{} min ago", d / 60),
        7200..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86400),
    }
}

fn at(unix: u64) -> String {
    crate::alerts::rfc3339(unix)
}

pub fn overview(ctx: &Context<'_>) -> Markup {
    let s = ctx.state;
    let ready = super::super::routes::readiness(s);
    let cat = s.published.current();
    let relay = s.status.as_deref();
    let store = relay.map(|r| r.filler.store().clone()).or_else(|| s.deltas.as_ref().map(|d| d.store().clone()));
    let rates = s.traffic.rates();
    let content = html! {
        section.cards {
            div.card {
                h2 { "Manifest" }
                p { "Serial " b #overview-serial { (cat.as_ref().map(|c| c.serial().to_string()).unwrap_or_else(|| "none yet".into())) } }
                @if let Some(c) = &cat {
                    @let generated = c.generated_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    p { "Published " (at(generated)) " (" (ago(generated)) ")" }
                    p { (c.manifest.components.len()) " components, " (c.objects().count()) " objects" }
                }
            }
            div.card {
                h2 { "State" }
                p { span #status class=(format!("status {}", ready.status)) { (ready.status) } }
                @for r in &ready.reasons { p.reason { (r) } }
                @match s.published.last_good_sync() {
                    Some(t) => p { "Last good " (if relay.is_some() { "sync" } else { "reload" }) ": " (at(t)) " (" (ago(t)) ")" },
                    None => p { "No good sync yet." },
                }
                (button(ctx, "/console", "sync", None, if relay.is_some() { "Sync now" } else { "Reload now" }, Some("sync-now".into())))
            }
            div.card {
                h2 { "Store" }
                @if let Some(store) = &store {
                    @let (objects, used) = store.usage();
                    p { span #store-objects { (objects) } " objects, " span #store-bytes data-value=(used) { (bytes(used)) } }
                    @if let Some(budget) = store.budget() {
                        p { meter min="0" max=(budget) high=(budget / 10 * 9) value=(used) {} " of " (bytes(budget)) }
                    } @else {
                        p { "No budget (storage.max_size unset)." }
                    }
                } @else {
                    p { "An origin without [storage]: files are served from the repository." }
                }
            }
            div.card {
                h2 { "Traffic" }
                @match rates {
                    Some([r, b, l]) => {
                        p { span #rate-requests { (format!("{r:.1}")) } " requests/s" }
                        p { (bytes(b as u64)) "/s sent" }
                        p { span #rate-limited { (format!("{l:.1}")) } " refused by limits (429)/s" }
                    }
                    None => p { "Measuring (a few seconds after start)." },
                }
            }
        }
        @if let Some(relay) = relay {
            h2 { "Upstreams" }
            table #upstreams {
                thead { tr { th { "Name" } th { "URL" } th { "State" } th { "Latency" } th { "Failures" } th { "Integrity failures" } th { "Last OK" } th { "Last error" } } }
                tbody {
                    @for up in relay.filler.upstreams().list() {
                        @let h = up.health();
                        tr {
                            td { (up.name) }
                            td { (up.url.base) }
                            td { @if h.suspect { span.bad { "suspect" } } @else if h.available { span.good { "up" } } @else { span.bad { "backed off" } } }
                            td { (h.latency_ms.map(|l| format!("{l:.1} ms")).unwrap_or_else(|| "–".into())) }
                            td { (h.consecutive_failures) }
                            td { (h.integrity_failures) }
                            td { (h.last_ok.clone().unwrap_or_else(|| "never".into())) }
                            td.err { (h.last_error.clone().unwrap_or_default()) }
                        }
                    }
                }
            }
            @if relay.filler.upstreams().list().is_empty() {
                p { "An offline relay: `patchrelay import` brings new manifests." }
            }
            h2 { "Fills in flight" }
            @let fills = relay.filler.in_flight();
            @if fills.is_empty() { p #fills { "None." } } @else {
                table #fills {
                    thead { tr { th { "Object" } th { "Progress" } th { "Verified" } } }
                    tbody {
                        @for f in &fills {
                            tr { td { (f.path) } td { progress max=(f.len.max(1)) value=(f.verified) {} } td { (bytes(f.verified)) " of " (bytes(f.len)) } }
                        }
                    }
                }
            }
            h2 { "Kept ahead of agents" }
            p.hint { "Critical components' retained versions, and versions pinned here." }
            table #prefetch {
                thead { tr { th { "Component" } th { "Version" } th { "Size" } th { "State" } } }
                tbody {
                    @for p in relay.prefetcher.report() {
                        tr { td { (p.component) } td { (p.version) } td { (bytes(p.size)) }
                             td class=(p.state) { (p.state) @if let Some(e) = &p.error { " – " (e) } } }
                    }
                }
            }
        }
    };
    layout(ctx, "/console", "Overview", content)
}

pub fn components(ctx: &Context<'_>) -> Markup {
    let s = ctx.state;
    let back = "/console/components";
    let Some(cat) = s.published.current() else {
        return layout(ctx, back, "Components", html! { p { "No verified manifest yet." } });
    };
    let relay = s.status.as_deref();
    let held = relay.map(|r| r.prefetcher.held()).unwrap_or_default();
    let content = html! {
        p #components-count data-value=(cat.manifest.components.len()) { (cat.manifest.components.len()) " components." }
        @for (name, comp) in &cat.manifest.components {
            @let name = name.to_string();
            @let versions = newest_first(&comp.versions);
            @let index: HashMap<crate::digest::Digest, usize> = versions.iter().enumerate().map(|(i, v)| (v.sha256, i)).collect();
            @let deltas = s.deltas.as_ref().map(|d| d.between(&index)).unwrap_or_default();
            section.component id=(format!("component-{name}")) {
                h2 { (name) " " span.tag { (comp.kind.as_str()) } @if comp.critical { " " span.tag.critical { "critical" } } }
                @if let Some(d) = &comp.description { p { (d) } }
                p { "Latest: " b { (comp.latest) } ", " (versions.len()) " versions." }
                table {
                    thead { tr { th { "Version" } th { "Size" } th { "Published" } th { "Cached" } th { "Pinned" } th { "Deltas to it" } th { "" } } }
                    tbody {
                        @for v in &versions {
                            @let version = v.version.to_string();
                            @let cached = relay.is_none_or(|r| r.filler.store().contains(&v.sha256));
                            @let pinned = relay.is_some_and(|r| r.filler.store().is_pinned(&v.sha256));
                            @let by_hand = held.contains(&(name.clone(), version.clone()));
                            @let to_here: Vec<_> = deltas.iter().filter(|(_, t, _)| versions.get(*t).is_some_and(|x| x.sha256 == v.sha256)).collect();
                            tr data-version=(version) {
                                td { (version) }
                                td data-value=(v.size) { (bytes(v.size)) }
                                td { (v.published_at.clone().unwrap_or_default()) }
                                td class=(if cached { "good" } else { "" }) { @if relay.is_none() { "in repository" } @else if cached { "yes" } @else { "no" } }
                                td { @if by_hand { "by hand" } @else if pinned { "critical" } @else { "–" } }
                                td {
                                    @for (f, _, info) in &to_here {
                                        @if let Some(from) = versions.get(*f) { span.delta { (from.version) " → " (bytes(info.size)) } " " }
                                    }
                                }
                                td.actions {
                                    @if relay.is_some() {
                                        @if !cached { (button(ctx, back, "prefetch", Some((&name, &version)), "Prefetch", None)) }
                                        @if by_hand { (button(ctx, back, "unpin", Some((&name, &version)), "Unpin", None)) }
                                        @else if !pinned { (button(ctx, back, "pin", Some((&name, &version)), "Pin", None)) }
                                        @if cached && !pinned && !comp.critical { (button(ctx, back, "purge", Some((&name, &version)), "Purge", None)) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, back, "Components", content)
}

fn newest_first(versions: &[crate::repo::manifest::VersionEntry]) -> Vec<&crate::repo::manifest::VersionEntry> {
    let mut v: Vec<_> = versions.iter().collect();
    v.sort_by(|a, b| b.version.cmp(&a.version));
    v
}

pub fn fleet(ctx: &Context<'_>, component: Option<&str>) -> Markup {
    let s = ctx.state;
    let here = "/console/fleet";
    let Some(fleet) = s.fleet.as_deref() else {
        return layout(ctx, here, "Fleet", html! { p { "The fleet inventory is off ([fleet] enabled = false)." } });
    };
    let Some(cat) = s.published.current() else {
        return layout(ctx, here, "Fleet", html! { p { "No verified manifest yet." } });
    };
    let summaries = fleet.summaries(&cat);
    // The tabs may be a few seconds old (summaries are cached); the chosen
    // component is counted now, as /admin/fleet?component= counts it.
    let name = component
        .filter(|c| summaries.iter().any(|x| x.component == *c))
        .map(str::to_string)
        .or_else(|| summaries.iter().max_by_key(|x| x.agents).map(|x| x.component.clone()));
    let chosen = name.as_deref().and_then(|c| fleet.summary(&cat, c));
    let chosen = chosen.as_ref();
    let sites = fleet.sites.list(fleet.stale_after());
    let content = html! {
        p { span #agents-tracked { (fleet.len()) } " agents tracked"
            @if fleet.refused() > 0 { ", " (fleet.refused()) " refused beyond fleet.max_agents" } "." }
        nav.tabs {
            @for x in summaries.iter() {
                a href=(format!("/console/fleet?component={}", super::percent_encode(&x.component)))
                  class=[chosen.is_some_and(|c| c.component == x.component).then_some("on")] { (x.component) " (" (x.agents) ")" }
            }
        }
        @if let Some(sum) = chosen {
            @let behind: u64 = sum.behind.values().sum();
            section.cards {
                div.card { h2 { "Agents" } p.big #fleet-agents { (sum.agents) } }
                div.card { h2 { "Up to date" } p.big #fleet-up-to-date { (sum.up_to_date) } p { "on " (sum.latest) } }
                div.card { h2 { "Behind" } p.big #fleet-behind { (behind) } }
                div.card { h2 { "Stale" } p.big #fleet-stale { (sum.stale) } p { "not seen for " (humantime::format_duration(fleet.stale_after())) } }
            }
            h2 { "Agents per version" }
            (chart(&sum.versions))
            @if !sum.behind.is_empty() {
                table #behind {
                    thead { tr { th { "Versions behind" } th { "Agents" } } }
                    tbody { @for (n, a) in &sum.behind { tr { td { (n) } td { (a) } } } }
                }
            }
            @if sum.unlisted > 0 { p { (sum.unlisted) " agents report versions the manifest no longer lists." } }
            @let q = super::percent_encode(&sum.component);
            p { "Lists: "
                a href=(format!("/admin/fleet/agents?component={q}&behind=1&format=csv")) { "agents behind (CSV)" } ", "
                a href=(format!("/admin/fleet/agents?component={q}&stale=true&format=csv")) { "stale agents (CSV)" } ", "
                a href=(format!("/admin/fleet/agents?component={q}&format=json")) { "all (JSON)" } "." }
            h2 { "Sites" }
            @if sites.is_empty() {
                p { "No downstream relay reports here (fleet.report_upstream on theirs, [[fleet.site]] here)." }
            } @else {
                table #sites {
                    thead { tr { th { "Site" } th { "Serial" } th { "Reported" } th { "Agents" } th { "Up to date" } th { "Behind" } th { "Stale" } } }
                    tbody {
                        @for r in &sites {
                            @let x = r.summaries.iter().find(|x| x.component == sum.component);
                            tr {
                                td { (r.site) }
                                td { (r.serial.map(|n| n.to_string()).unwrap_or_default()) }
                                td { (ago(r.received_at)) }
                                td { (x.map(|x| x.agents).unwrap_or(0)) }
                                td { (x.map(|x| x.up_to_date).unwrap_or(0)) }
                                td { (x.map(|x| x.behind.values().sum::<u64>()).unwrap_or(0)) }
                                td { (x.map(|x| x.stale).unwrap_or(0)) }
                            }
                        }
                    }
                }
            }
        } @else {
            p { "No agent has asked for a plan yet." }
        }
    };
    layout(ctx, here, "Fleet", content)
}

/// Agents per version as bars, oldest version on the left, drawn as SVG in
/// the page (no script, no image request).
fn chart(versions: &[crate::fleet::VersionCount]) -> Markup {
    const W: u64 = 720;
    const H: u64 = 220;
    const BOTTOM: u64 = 30;
    const TOP: u64 = 20;
    let n = versions.len().max(1) as u64;
    let max = versions.iter().map(|v| v.agents).max().unwrap_or(0).max(1);
    let slot = W / n;
    let bar = (slot * 7 / 10).max(2);
    html! {
        svg #fleet-chart width=(W) height=(H) viewBox=(format!("0 0 {W} {H}")) role="img" aria-label="agents per version" {
            line x1="0" y1=(H - BOTTOM) x2=(W) y2=(H - BOTTOM) class="axis" {}
            @for (i, v) in versions.iter().enumerate() {
                @let h = (H - BOTTOM - TOP) * v.agents / max;
                @let x = i as u64 * slot + (slot - bar) / 2;
                g.bar data-version=(v.version) data-agents=(v.agents) {
                    title { (v.version) ": " (v.agents) " agents" }
                    rect x=(x) y=(H - BOTTOM - h) width=(bar) height=(h) {}
                    text x=(x + bar / 2) y=(H - BOTTOM - h - 4) text-anchor="middle" class="count" { (v.agents) }
                    text x=(x + bar / 2) y=(H - BOTTOM + 16) text-anchor="middle" class="label" { (v.version) }
                }
            }
        }
    }
}

pub fn events(ctx: &Context<'_>) -> Markup {
    let events = ctx.state.events.as_ref().map(|e| e.recent(crate::events::KEPT)).unwrap_or_default();
    let content = html! {
        p #events-count data-value=(events.len()) { (events.len()) " events (the last " (crate::events::KEPT) " are kept)." }
        table #events {
            thead { tr { th { "When" } th { "Severity" } th { "What" } th { "" } th { "Details" } th { "What to do" } } }
            tbody {
                @for e in &events {
                    tr class=(match e.severity { Severity::Critical => "critical", Severity::Warning => "warning", Severity::Info => "info" }) data-kind=(e.kind) {
                        td { (at(e.at)) }
                        td { (format!("{:?}", e.severity).to_lowercase()) }
                        td { b { (e.title) } br; span.kind { (e.kind) @if e.notify { " · alerted" } } }
                        td { @match e.phase { Phase::Firing => "began", Phase::Resolved => "cleared", Phase::Happened => "" } }
                        td { (e.detail) }
                        td { (e.action) }
                    }
                }
            }
        }
    };
    layout(ctx, "/console/events", "Events", content)
}
