//! The look every [`PERIOD`] at what the server knows, turned into events:
//! new versions (critical ones alerted, once available and again once
//! cached here unless both come at once), a sync gone stale, upstreams down
//! or sending bad bytes, a store near its budget, a disk near full, fills
//! failing. It reads counters and snapshots only: nothing here waits on the
//! hot path, and the hot path never waits on it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::status::StatusSource;
use crate::config::AlertsConfig;
use crate::events::{Events, Say, Severity};
use crate::repo::catalog::Catalog;
use crate::state::{Published, unix_now};
use crate::store::Store;

pub const PERIOD: Duration = Duration::from_secs(2);
/// A new critical version not cached within this is alerted as available
/// (and again once cached); cached within it, one alert says both.
const READY_WAIT: Duration = Duration::from_secs(60);
/// The window of the fill error rate, and the fills it needs to count.
const FILL_WINDOW: Duration = Duration::from_secs(300);
const FILL_MIN: u64 = 10;
/// Failures in a row that make an upstream "down".
const DOWN_AFTER: u32 = 3;
const STORE_FULL_SHARE: f64 = 0.9;

/// What the watcher looks at.
pub struct Watched {
    pub published: Arc<Published>,
    pub events: Arc<Events>,
    /// Relays: the filler (upstreams, fills) and prefetcher.
    pub relay: Option<Arc<StatusSource>>,
    /// The store (a relay's, or an origin's delta store).
    pub store: Option<Store>,
    /// Where free space is measured: the store's directory, else the
    /// origin's repository.
    pub disk: Option<PathBuf>,
}

/// A critical version seen, not yet alerted as cached.
struct Pending {
    component: String,
    version: String,
    objects: Vec<crate::digest::Digest>,
    seen: Instant,
    announced: bool,
}

pub struct Watcher {
    w: Watched,
    stale_after: Duration,
    min_free_disk: u64,
    fill_error_rate: f64,
    started: u64,
    serial: Option<u64>,
    /// The catalog new versions are judged against (the first one seen is
    /// the baseline: a relay that starts does not alert on all it holds).
    last: Option<Arc<Catalog>>,
    pending: Vec<Pending>,
    integrity: HashMap<String, u64>,
    fills: VecDeque<(Instant, u64, u64)>,
    evicted: (u64, u64),
}

impl Watcher {
    pub fn new(w: Watched, config: &AlertsConfig) -> Watcher {
        Watcher {
            w,
            stale_after: config.stale_after.0,
            min_free_disk: config.min_free_disk.0,
            fill_error_rate: config.fill_error_rate,
            started: unix_now(),
            serial: None,
            last: None,
            pending: Vec::new(),
            integrity: HashMap::new(),
            fills: VecDeque::new(),
            evicted: (0, 0),
        }
    }

    /// Look every [`PERIOD`] until aborted.
    pub fn spawn(mut self) -> actix_rt::task::JoinHandle<()> {
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.look();
            }
        })
    }

    pub fn look(&mut self) {
        self.versions();
        self.critical_ready();
        if let Some(relay) = self.w.relay.clone() {
            self.sync(&relay);
            self.upstreams(&relay);
            self.fill_errors(&relay);
        }
        self.store();
        self.disk();
    }

    fn versions(&mut self) {
        let Some(cat) = self.w.published.current() else { return };
        if self.serial == Some(cat.serial()) {
            return;
        }
        self.serial = Some(cat.serial());
        let Some(old) = self.last.replace(cat.clone()) else { return };
        for (name, comp) in &cat.manifest.components {
            let known = old.manifest.components.get(name);
            let new: Vec<_> = comp
                .versions
                .iter()
                .filter(|v| known.is_none_or(|k| !k.versions.iter().any(|o| o.version == v.version)))
                .collect();
            let Some(newest) = new.iter().max_by(|a, b| a.version.cmp(&b.version)) else { continue };
            let name = name.to_string();
            let version = newest.version.to_string();
            let also = if new.len() > 1 { format!(" ({} new versions in all)", new.len()) } else { String::new() };
            if comp.critical {
                let objects = vec![newest.sha256];
                self.pending.push(Pending {
                    component: name,
                    version,
                    objects,
                    seen: Instant::now(),
                    announced: false,
                });
            } else {
                self.w.events.happened(Say {
                    kind: "new_version",
                    severity: Severity::Info,
                    key: format!("new_version:{name}:{version}"),
                    title: format!("{name} {version} is available{also}"),
                    detail: format!("serial {} lists {name} {version} ({} bytes).", cat.serial(), newest.size),
                    action: "",
                    notify: false,
                });
            }
        }
    }

    /// New critical versions: alerted once cached (or after [`READY_WAIT`]
    /// as available, then again once cached). An origin holds what it
    /// publishes: cached at once.
    fn critical_ready(&mut self) {
        let serial = self.serial.unwrap_or_default();
        let store = self.w.relay.as_ref().map(|r| r.filler.store().clone());
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let cached = store.as_ref().is_none_or(|s| p.objects.iter().all(|d| s.contains(d)));
            let (name, version) = (p.component.clone(), p.version.clone());
            let key = format!("critical_version:{name}:{version}");
            if cached {
                let (title, action) = if p.announced {
                    (format!("critical update {name} {version} is now cached here"), "")
                } else if store.is_some() {
                    (
                        format!("critical update {name} {version} is available, and cached here"),
                        "Nothing to do here: agents fetch it on their next check. Make sure they check soon.",
                    )
                } else {
                    (
                        format!("critical update {name} {version} is published"),
                        "Relays fetch it on their next sync; agents on their next check.",
                    )
                };
                let kind = if p.announced { "critical_ready" } else { "critical_version" };
                self.w.events.happened(Say {
                    kind,
                    severity: Severity::Info,
                    key: if p.announced { format!("critical_ready:{name}:{version}") } else { key },
                    title,
                    detail: format!("{name} {version} is a critical component; serial {serial} lists it."),
                    action,
                    notify: true,
                });
                self.pending.swap_remove(i);
                continue;
            }
            if !p.announced && p.seen.elapsed() >= READY_WAIT {
                p.announced = true;
                self.w.events.happened(Say {
                    kind: "critical_version",
                    severity: Severity::Info,
                    key,
                    title: format!("critical update {name} {version} is available; fetching it"),
                    detail: format!(
                        "serial {serial} lists {name} {version}; it is not cached here yet after {} s.",
                        READY_WAIT.as_secs()
                    ),
                    action: "Nothing yet: another alert says when it is cached. If none comes, check the upstreams on /admin/status.",
                    notify: true,
                });
            }
            i += 1;
        }
    }

    fn sync(&mut self, relay: &StatusSource) {
        if relay.filler.upstreams().list().is_empty() {
            return;
        }
        let now = unix_now();
        let last = self.w.published.last_good_sync();
        let since = last.unwrap_or(self.started);
        let stale = now.saturating_sub(since) > self.stale_after.as_secs();
        let serving = self.w.published.serial().map(|s| format!("serial {s}")).unwrap_or_else(|| "nothing yet".into());
        let when = match last {
            Some(t) => format!("The last good sync was at {} ({} s ago)", super::rfc3339(t), now.saturating_sub(t)),
            None => format!("No sync has succeeded since the relay started at {}", super::rfc3339(self.started)),
        };
        self.w.events.condition(
            stale,
            Say {
                kind: "sync_stale",
                severity: Severity::Critical,
                key: "sync_stale".into(),
                title: if stale {
                    format!("no good sync for over {}", humantime::format_duration(self.stale_after))
                } else {
                    "syncing again".into()
                },
                detail: format!("{when}; agents are served {serving}."),
                action: "Look at /admin/status: each upstream's last error says what fails (DNS, TLS, proxy, a refused manifest). Fix the path to one upstream; the relay syncs by itself.",
                notify: true,
            },
        );
    }

    fn upstreams(&mut self, relay: &StatusSource) {
        for up in relay.filler.upstreams().list() {
            let h = up.health();
            let name = &up.name;
            let down = h.consecutive_failures >= DOWN_AFTER;
            let last_error = h.last_error.clone().unwrap_or_default();
            self.w.events.condition(
                down,
                Say {
                    kind: "upstream_down",
                    severity: Severity::Warning,
                    key: format!("upstream_down:{name}"),
                    title: if down { format!("upstream {name} is down") } else { format!("upstream {name} answers again") },
                    detail: format!("{} ({}): {} failures in a row. {last_error}", name, up.url.base, h.consecutive_failures),
                    action: "Check that the upstream runs and that this relay reaches it (firewall, proxy, certificate). Other upstreams, if any, are used meanwhile.",
                    notify: true,
                },
            );
            self.w.events.condition(
                h.suspect,
                Say {
                    kind: "upstream_suspect",
                    severity: Severity::Warning,
                    key: format!("upstream_suspect:{name}"),
                    title: if h.suspect {
                        format!("upstream {name} is set aside: it sent bytes that did not verify")
                    } else {
                        format!("upstream {name} is trusted again")
                    },
                    detail: last_error.clone(),
                    action: "Nothing it sent was served. Check the upstream's disk and any proxy or cache between (one that alters bodies).",
                    notify: true,
                },
            );
            let seen = self.integrity.entry(name.clone()).or_insert(h.integrity_failures);
            if h.integrity_failures > *seen {
                let more = h.integrity_failures - *seen;
                *seen = h.integrity_failures;
                self.w.events.happened(Say {
                    kind: "integrity_failure",
                    severity: Severity::Critical,
                    key: format!("integrity_failure:{name}"),
                    title: format!("upstream {name} sent bytes that do not match the signed manifest"),
                    detail: format!("{more} more integrity failures ({} since start). {last_error}", h.integrity_failures),
                    action: "The bytes were discarded, not served. Find what alters them: the upstream's disk, a proxy, a middlebox.",
                    notify: true,
                });
            }
        }
    }

    fn fill_errors(&mut self, relay: &StatusSource) {
        let (ok, failed) = relay.filler.outcomes();
        let now = Instant::now();
        self.fills.push_back((now, ok, failed));
        while self.fills.front().is_some_and(|(t, ..)| now.duration_since(*t) > FILL_WINDOW) {
            self.fills.pop_front();
        }
        let Some(&(_, ok0, failed0)) = self.fills.front() else { return };
        let (ok, failed) = (ok - ok0, failed - failed0);
        let rate = if ok + failed >= FILL_MIN { failed as f64 / (ok + failed) as f64 } else { 0.0 };
        let high = rate > self.fill_error_rate;
        self.w.events.condition(
            high,
            Say {
                kind: "fill_errors",
                severity: Severity::Warning,
                key: "fill_errors".into(),
                title: if high {
                    format!("{:.0}% of fills from upstream fail", rate * 100.0)
                } else {
                    "fills from upstream succeed again".into()
                },
                detail: format!("{failed} of {} fills failed in the last {} minutes.", ok + failed, FILL_WINDOW.as_secs() / 60),
                action: "The log says why each failed (\"fill failed\"); /admin/status shows the upstreams' last errors.",
                notify: true,
            },
        );
    }

    fn store(&mut self) {
        let Some(store) = &self.w.store else { return };
        if let Some(budget) = store.budget() {
            let (_, bytes) = store.usage();
            let full = bytes as f64 > budget as f64 * STORE_FULL_SHARE;
            self.w.events.condition(
                full,
                Say {
                    kind: "store_over_budget",
                    severity: Severity::Warning,
                    key: "store_over_budget".into(),
                    title: if full {
                        format!("the store holds {}% of its budget", bytes.saturating_mul(100) / budget.max(1))
                    } else {
                        "the store is back under 90% of its budget".into()
                    },
                    detail: format!("{bytes} bytes held, storage.max_size {budget}; pinned objects are never evicted."),
                    action: "Raise storage.max_size, or lower sync.retain so fewer versions stay pinned.",
                    notify: true,
                },
            );
        }
        let evicted = store.evicted();
        if evicted.0 > self.evicted.0 {
            let (objects, bytes) = (evicted.0 - self.evicted.0, evicted.1 - self.evicted.1);
            self.w.events.happened(Say {
                kind: "eviction",
                severity: Severity::Info,
                key: format!("eviction:{}", evicted.0),
                title: format!("{objects} objects ({bytes} bytes) evicted over budget"),
                detail: "The least recently used objects not pinned; they are fetched again on the next request."
                    .into(),
                action: "",
                notify: false,
            });
        }
        self.evicted = evicted;
    }

    fn disk(&mut self) {
        let Some(dir) = &self.w.disk else { return };
        let Some((free, size)) = crate::store::free_space(dir) else { return };
        let low = free < self.min_free_disk;
        self.w.events.condition(
            low,
            Say {
                kind: "disk_low",
                severity: Severity::Critical,
                key: "disk_low".into(),
                title: if low {
                    format!("{} bytes free on the disk of {}", free, dir.display())
                } else {
                    format!("free space on the disk of {} is back", dir.display())
                },
                detail: format!("{free} of {size} bytes free; alerts.min_free_disk is {}.", self.min_free_disk),
                action: "Free space on that file system or lower storage.max_size. A relay that cannot write keeps serving what it holds.",
                notify: true,
            },
        );
    }
}
