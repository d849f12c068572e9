//! Notable events: new versions, refused manifests, integrity failures, an
//! upstream down, a sync gone stale, a filling disk. The last [`KEPT`] are
//! kept (in memory, and in the state database so a restart keeps them) for
//! the console; those worth telling someone about go to the alert channels
//! (`crate::alerts`) too.
//!
//! Two shapes of event. A *point* event happens once (a version arrived, a
//! manifest was refused): repeated within `alerts.repeat` under the same key,
//! it is recorded but not sent again. A *condition* holds for a while (an
//! upstream is down): it is sent when it begins, again every `alerts.repeat`
//! while it lasts, and once more when it clears. Emitting never blocks: the
//! channels read a bounded queue, and what does not fit is dropped and
//! counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::db::{Batch, StateDb, Table};

/// Events kept for the console.
pub const KEPT: usize = 500;
const TABLE: Table = Table::new("events");

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Whether an event begins something, ends it, or just happened.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A point event.
    Happened,
    /// A condition began (or still holds: a reminder).
    Firing,
    /// A condition cleared.
    Resolved,
}

/// One event, as the console shows it and the channels send it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// What kind: `critical_version`, `critical_ready`, `new_version`,
    /// `manifest_rejected`, `integrity_failure`, `upstream_down`,
    /// `sync_stale`, `store_over_budget`, `disk_low`, `fill_errors`, `import`.
    pub kind: String,
    pub severity: Severity,
    /// What deduplicates it (the kind and what it is about).
    pub key: String,
    pub phase: Phase,
    /// One line: what happened.
    pub title: String,
    /// The details.
    pub detail: String,
    /// What to do about it (empty: nothing).
    pub action: String,
    /// Whether it goes to the alert channels.
    pub notify: bool,
}

/// What an emitter says; the log adds the rest.
pub struct Say<'a> {
    pub kind: &'a str,
    pub severity: Severity,
    pub key: String,
    pub title: String,
    pub detail: String,
    pub action: &'a str,
    /// Send it to the alert channels (else: the console only).
    pub notify: bool,
}

/// Notifications one key may send within an hour: a condition that flaps
/// (an upstream up, down, up) is recorded each time but sent this often.
const SENDS_PER_HOUR: u32 = 4;

/// Where notified events go: one bounded queue per channel (`crate::alerts`).
pub type Outlet = (String, tokio::sync::mpsc::Sender<Arc<Event>>);

pub struct Events {
    ring: Mutex<VecDeque<Event>>,
    seq: AtomicU64,
    /// Taken away as the server stops ([`Events::release`]).
    db: Mutex<Option<StateDb>>,
    channels: OnceLock<Vec<Outlet>>,
    repeat: Duration,
    /// Key -> when it was last sent (unix seconds) and whether the
    /// condition holds now.
    sent: Mutex<HashMap<String, (u64, bool)>>,
    /// Key -> (hour it counts in, sends in it).
    budget: Mutex<HashMap<String, (u64, u32)>>,
}

impl Events {
    /// An empty log; `keep_in` gives it the state database.
    pub fn new(repeat: Duration) -> Arc<Events> {
        Arc::new(Events {
            ring: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            db: Mutex::new(None),
            channels: OnceLock::new(),
            repeat,
            sent: Mutex::new(HashMap::new()),
            budget: Mutex::new(HashMap::new()),
        })
    }

    /// Keep the log in `db` from now on, after what it kept before a restart.
    pub fn keep_in(&self, db: StateDb) {
        let mut kept: VecDeque<Event> = match db.scan::<Event>(TABLE) {
            Ok(rows) => rows.into_iter().map(|(_, e)| e).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the event log; starting with none");
                VecDeque::new()
            }
        };
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let base = kept.back().map(|e| e.seq).unwrap_or(0);
            // Events emitted before the database was open follow the kept ones.
            for mut e in ring.drain(..) {
                e.seq += base;
                kept.push_back(e);
            }
            while kept.len() > KEPT {
                kept.pop_front();
            }
            self.seq.store(kept.back().map(|e| e.seq).unwrap_or(0), Ordering::Relaxed);
            *ring = kept;
        }
        *self.db.lock().unwrap_or_else(|p| p.into_inner()) = Some(db);
    }

    /// Let go of the state database (the server is stopping): events from
    /// now on are kept in memory only.
    pub fn release(&self) {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Notified events go to these queues from now on (set once).
    pub fn connect(&self, channels: Vec<Outlet>) {
        let _ = self.channels.set(channels);
    }

    /// The newest events, newest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().take(n).cloned().collect()
    }

    /// A point event: recorded; sent unless one with its key was sent within
    /// `alerts.repeat`.
    pub fn happened(&self, say: Say<'_>) {
        let now = crate::state::unix_now();
        let notify = say.notify
            && {
                let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
                match sent.get(&say.key) {
                    Some((at, _)) if now.saturating_sub(*at) < self.repeat.as_secs() => false,
                    _ => {
                        sent.insert(say.key.clone(), (now, false));
                        true
                    }
                }
            }
            && self.within_budget(&say.key, now);
        self.push(say, Phase::Happened, notify, now);
    }

    /// A condition holds (`true`) or not (`false`), as seen now; called on
    /// every look, it records and sends only its beginning, a reminder every
    /// `alerts.repeat`, and its end.
    pub fn condition(&self, holds: bool, say: Say<'_>) {
        let now = crate::state::unix_now();
        let phase = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            let was = sent.get(&say.key).copied();
            match (was, holds) {
                (Some((_, true)), false) => {
                    sent.insert(say.key.clone(), (now, false));
                    Some(Phase::Resolved)
                }
                (Some((at, true)), true) if now.saturating_sub(at) < self.repeat.as_secs() => None,
                (_, true) => {
                    sent.insert(say.key.clone(), (now, true));
                    Some(Phase::Firing)
                }
                (_, false) => None,
            }
        };
        if let Some(phase) = phase {
            let notify = say.notify && self.within_budget(&say.key, now);
            self.push(say, phase, notify, now);
        }
    }

    /// Whether the condition under `key` holds, as last seen.
    pub fn holds(&self, key: &str) -> bool {
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).get(key).is_some_and(|(_, h)| *h)
    }

    /// Whether `key` may send once more this hour (and count it).
    fn within_budget(&self, key: &str, now: u64) -> bool {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let hour = now / 3600;
        let entry = budget.entry(key.to_string()).or_insert((hour, 0));
        if entry.0 != hour {
            *entry = (hour, 0);
        }
        entry.1 += 1;
        entry.1 <= SENDS_PER_HOUR
    }

    fn push(&self, say: Say<'_>, phase: Phase, notify: bool, now: u64) {
        let event = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at: now,
            kind: say.kind.to_string(),
            severity: say.severity,
            key: say.key,
            phase,
            title: say.title,
            detail: say.detail,
            action: say.action.to_string(),
            notify,
        };
        match event.severity {
            Severity::Info => tracing::info!(kind = %event.kind, key = %event.key, "event: {}", event.title),
            _ => tracing::warn!(kind = %event.kind, key = %event.key, phase = ?event.phase, "event: {}", event.title),
        }
        let evicted = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.push_back(event.clone());
            if ring.len() > KEPT { ring.pop_front().map(|e| e.seq) } else { None }
        };
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(db) = db {
            let mut batch = Batch::default();
            batch.put(TABLE, &event.seq.to_be_bytes(), &event);
            if let Some(old) = evicted {
                batch.delete(TABLE, &old.to_be_bytes());
            }
            let commit = move || {
                if let Err(e) = db.commit(batch) {
                    tracing::warn!(error = %e, "cannot keep an event in the state database");
                }
            };
            // Off whatever thread emitted (a commit fsyncs), where there is
            // a runtime to take it.
            match tokio::runtime::Handle::try_current() {
                Ok(_) => drop(crate::telemetry::spawn_blocking(commit)),
                Err(_) => commit(),
            }
        }
        if notify && let Some(channels) = self.channels.get() {
            let event = Arc::new(event);
            for (name, tx) in channels {
                if tx.try_send(event.clone()).is_err() {
                    tracing::warn!(channel = %name, key = %event.key, "alert channel is that far behind: this alert is not sent on it");
                    metrics::counter!(crate::telemetry::ALERTS_DROPPED, "channel" => name.clone()).increment(1);
                }
            }
        }
    }
}
