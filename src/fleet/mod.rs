//! The fleet inventory: which agent runs which version of each component,
//! when it was last seen, from where, with what.
//!
//! Agents say what they hold when they ask for an update plan
//! (`chain?from=V`): that is the one moment the relay learns an agent's
//! version, so the plan route records it here. Who the agent is comes from
//! `crate::identity` (the same rules as the limits). Only versions the
//! manifest lists are recorded (an unlisted `from` is a 404 before it gets
//! here), so what an agent can make the inventory hold is bounded: its own
//! entry, of bounded size, and no more than `fleet.max_agents` entries in all.
//!
//! The hot path: recording costs a hash, one shard's lock held for a few
//! comparisons (never across an await), and an allocation only for an agent
//! seen for the first time or a version that changed. Nothing waits on the
//! disk: [`store`] writes changed entries in batches from a background task,
//! and reads them back at start. Reading (summaries, lists, metrics) walks
//! the shards one at a time, each held only while it is copied.
//!
//! Memory: per agent, its key (id up to 128 bytes, or an address), its
//! record, and per component a pair of shared strings and a time
//! (`cargo bench --bench fleet_memory` measures it; README). Past
//! `max_agents`, the least recently seen are dropped on the next trim (every
//! few seconds); a flood of new ids beyond 105% of it is not recorded at all
//! until then.

pub mod report;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::Who;
use crate::repo::catalog::Catalog;

const SHARDS: usize = 64;
/// Longest user agent kept (longer ones are cut).
const MAX_USER_AGENT: usize = 128;
/// Distinct user agents shared between agents; beyond, each is its own copy.
const MAX_SHARED_STRINGS: usize = 4096;
/// A record whose only change is the time it was seen is written this often
/// (seconds): on disk, `last_seen` is at most this old.
const SEEN_WRITE: u64 = 300;

/// An agent's key: its id, or a zero byte and its address's octets (an id
/// is printable ASCII, so the two never meet).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey(Box<[u8]>);

impl AgentKey {
    pub fn of(who: &Who<'_>) -> AgentKey {
        match who {
            Who::Id(id) => AgentKey(id.to_vec().into_boxed_slice()),
            Who::Ip(ip) => {
                let mut k = vec![0u8];
                match ip {
                    IpAddr::V4(v) => k.extend_from_slice(&v.octets()),
                    IpAddr::V6(v) => k.extend_from_slice(&v.octets()),
                }
                AgentKey(k.into_boxed_slice())
            }
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn from_bytes(b: &[u8]) -> Option<AgentKey> {
        let valid = match b.first() {
            Some(0) => b.len() == 5 || b.len() == 17,
            Some(_) => crate::identity::agent_id(b) == Some(b),
            None => false,
        };
        valid.then(|| AgentKey(b.to_vec().into_boxed_slice()))
    }

    /// The id, or the address written out.
    pub fn name(&self) -> String {
        match self.0.first() {
            Some(0) if self.0.len() == 5 => {
                let o: [u8; 4] = self.0[1..5].try_into().unwrap_or([0; 4]);
                IpAddr::from(o).to_string()
            }
            Some(0) if self.0.len() == 17 => {
                let o: [u8; 16] = self.0[1..17].try_into().unwrap_or([0; 16]);
                IpAddr::from(o).to_string()
            }
            _ => String::from_utf8_lossy(&self.0).into_owned(),
        }
    }

    /// Its place in the inventory: a 64-bit keyed hash (see [`hash`]).
    fn hash(&self) -> u64 {
        hash(&self.0)
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.name())
    }
}

/// The secret key of the inventory's hashes.
static KEYS: std::sync::LazyLock<std::hash::RandomState> = std::sync::LazyLock::new(Default::default);

/// A keyed hash (SipHash under a secret key): agents are kept under the hash
/// of their key, so a lookup touches the table and the agent's entry, not
/// the key's own bytes elsewhere (a miss of the CPU cache per request on a
/// busy relay). Two agents would have to collide in 64 secret bits to share
/// an entry; no client can aim at a shard.
fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = KEYS.build_hasher();
    h.write(bytes);
    h.finish()
}

/// A map keyed by a hash already (no second hashing).
#[derive(Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PrehashedMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<Prehashed>>;

/// What the inventory holds of one agent, as it is read and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Unix seconds.
    pub last_seen: u64,
    pub address: IpAddr,
    pub user_agent: Arc<str>,
    /// Per component: the version it reported, and when (Unix seconds).
    pub components: Vec<(Arc<str>, Arc<str>, u64)>,
}

/// One component of an agent. Its strings are shared (one copy of each
/// name and version for the whole fleet), so comparing them touches memory
/// that is hot anyway.
struct Reported {
    component: Arc<str>,
    version: Arc<str>,
    at: u64,
}

/// An agent in memory. `repr(C)`, in the order a plan request touches the
/// fields, its key (read only for listings) last: a sighting then reads one
/// or two cache lines of the entry, not three.
#[repr(C)]
struct Entry {
    last_seen: u64,
    /// `last_seen` as last written to disk.
    written_seen: u64,
    user_agent: Arc<str>,
    /// Most agents report one or two components: kept in the entry.
    components: smallvec::SmallVec<[Reported; 2]>,
    address: IpAddr,
    /// Changed since it was last written to disk.
    dirty: bool,
    key: AgentKey,
}

impl Entry {
    fn record(&self) -> Record {
        Record {
            last_seen: self.last_seen,
            address: self.address,
            user_agent: self.user_agent.clone(),
            components: self.components.iter().map(|c| (c.component.clone(), c.version.clone(), c.at)).collect(),
        }
    }

    fn reported(&self, component: &str) -> Option<&Reported> {
        self.components.iter().find(|c| &*c.component == component)
    }
}

struct Shard {
    map: PrehashedMap<Entry>,
    /// Keys dropped since the last write (to delete on disk).
    dropped: Vec<AgentKey>,
}

/// Shared strings: component names, versions and user agents, one copy each.
#[derive(Default)]
struct Strings(RwLock<HashSet<Arc<str>>>);

impl Strings {
    fn get(&self, s: &str, bounded: bool) -> Arc<str> {
        if let Some(a) = self.0.read().unwrap_or_else(|p| p.into_inner()).get(s) {
            return a.clone();
        }
        let mut w = self.0.write().unwrap_or_else(|p| p.into_inner());
        if bounded && w.len() >= MAX_SHARED_STRINGS {
            return Arc::from(s);
        }
        if let Some(a) = w.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        w.insert(a.clone());
        a
    }

    /// Forget strings nothing refers to any more.
    fn prune(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).retain(|a| Arc::strong_count(a) > 1);
    }
}

/// What the inventory is told by one plan request.
pub struct Sighting<'a> {
    pub who: Who<'a>,
    pub address: IpAddr,
    pub user_agent: &'a [u8],
    pub component: &'a str,
    pub version: &'a str,
}

pub struct Fleet {
    shards: Box<[Mutex<Shard>]>,
    strings: Strings,
    count: AtomicUsize,
    max_agents: usize,
    stale_after: Duration,
    /// Agents not recorded because the inventory was full (105%).
    refused: AtomicU64,
    /// Something changed since the last write.
    changed: AtomicBool,
    /// Reports from downstream relays (`report`), by site.
    pub sites: report::Sites,
    /// The summary `/metrics` shows, and when it was made.
    cached: Mutex<Option<(u64, Arc<Vec<Summary>>)>>,
}

/// A component's versions, oldest first.
fn sorted_versions(c: &crate::repo::manifest::Component) -> Vec<&str> {
    let mut v: Vec<_> = c.versions.iter().map(|e| &e.version).collect();
    v.sort();
    v.into_iter().map(|v| v.as_str()).collect()
}

/// Unix seconds from the coarse clock (a few ns, no system call; a tick of
/// a few ms late at worst, which whole seconds do not see).
fn now() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    u64::try_from(t.tv_sec).unwrap_or(0)
}

fn clip(s: &[u8], max: usize) -> String {
    let mut t = String::from_utf8_lossy(s).into_owned();
    if t.len() > max {
        let mut cut = max;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t.truncate(cut);
    }
    t
}

/// The key of `who`, built on the stack (no allocation for an agent the
/// inventory knows).
fn key_bytes<'a>(who: &Who<'a>, buf: &'a mut [u8; 17]) -> &'a [u8] {
    match who {
        Who::Id(id) => id,
        Who::Ip(IpAddr::V4(v)) => {
            buf[1..5].copy_from_slice(&v.octets());
            &buf[..5]
        }
        Who::Ip(IpAddr::V6(v)) => {
            buf[1..17].copy_from_slice(&v.octets());
            &buf[..17]
        }
    }
}

/// The shard of a hash: from its middle bits, which the shard's own table
/// does not use (it indexes with the low bits and tags entries with the top
/// seven; sharding by either would crowd a shard's entries together).
fn shard_of(h: u64) -> usize {
    (h >> 32) as usize % SHARDS
}

impl Fleet {
    pub fn new(max_agents: usize, stale_after: Duration) -> Fleet {
        Fleet {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { map: PrehashedMap::default(), dropped: Vec::new() }))
                .collect(),
            strings: Strings::default(),
            count: AtomicUsize::new(0),
            max_agents: max_agents.max(1),
            stale_after,
            refused: AtomicU64::new(0),
            changed: AtomicBool::new(false),
            sites: report::Sites::default(),
            cached: Mutex::new(None),
        }
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Record what a plan request says (the hot path: see the module comment).
    pub fn record(&self, s: &Sighting<'_>) {
        let now = now();
        let mut buf = [0u8; 17];
        let key = key_bytes(&s.who, &mut buf);
        let h = hash(key);
        let ua = &s.user_agent[..s.user_agent.len().min(MAX_USER_AGENT)];
        let mut shard = self.shard(shard_of(h));
        if let Some(e) = shard.map.get_mut(&h) {
            // Only what changes the record on disk marks it for writing; a
            // poll that changes nothing but the time is written at most
            // every SEEN_WRITE (the time in memory is always exact).
            let mut changed = now.saturating_sub(e.written_seen) >= SEEN_WRITE;
            e.last_seen = now;
            if e.address != s.address {
                e.address = s.address;
                changed = true;
            }
            if e.user_agent.as_bytes() != ua {
                e.user_agent = self.strings.get(&clip(ua, MAX_USER_AGENT), true);
                changed = true;
            }
            match e.components.iter_mut().find(|c| &*c.component == s.component) {
                Some(c) => {
                    if &*c.version != s.version {
                        c.version = self.strings.get(s.version, false);
                        changed = true;
                    }
                    c.at = now;
                }
                None => {
                    e.components.push(self.reported(s.component, s.version, now));
                    changed = true;
                }
            }
            if changed && !e.dirty {
                e.dirty = true;
                drop(shard);
                self.changed.store(true, Ordering::Relaxed);
            }
            return;
        }
        if self.len() >= self.max_agents + self.max_agents / 20 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let entry = Entry {
            key: AgentKey(key.to_vec().into_boxed_slice()),
            last_seen: now,
            written_seen: now,
            dirty: true,
            address: s.address,
            user_agent: self.strings.get(&clip(ua, MAX_USER_AGENT), true),
            components: smallvec::smallvec![self.reported(s.component, s.version, now)],
        };
        if shard.map.insert(h, entry).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        drop(shard);
        self.changed.store(true, Ordering::Relaxed);
    }

    fn reported(&self, component: &str, version: &str, at: u64) -> Reported {
        Reported { component: self.strings.get(component, false), version: self.strings.get(version, false), at }
    }

    /// Put back an agent read from disk at start.
    pub fn restore(&self, key: AgentKey, rec: Record) {
        let h = key.hash();
        let entry = Entry {
            last_seen: rec.last_seen,
            written_seen: rec.last_seen,
            dirty: false,
            address: rec.address,
            user_agent: self.strings.get(&rec.user_agent, true),
            components: rec.components.iter().map(|(c, v, at)| self.reported(c, v, *at)).collect(),
            key,
        };
        let mut shard = self.shard(shard_of(h));
        if shard.map.insert(h, entry).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drop the least recently seen agents beyond `max_agents`; returns how
    /// many went. Run before every write of the inventory.
    pub fn trim(&self) -> usize {
        let excess = self.len().saturating_sub(self.max_agents);
        if excess == 0 {
            return 0;
        }
        let mut seen: Vec<(u64, u64)> = Vec::with_capacity(self.len());
        for i in 0..SHARDS {
            let shard = self.shard(i);
            seen.extend(shard.map.iter().map(|(h, e)| (e.last_seen, *h)));
        }
        let cut = excess.min(seen.len());
        seen.select_nth_unstable_by_key(cut.saturating_sub(1), |(t, _)| *t);
        let mut dropped = 0;
        for (_, h) in seen.into_iter().take(cut) {
            let mut shard = self.shard(shard_of(h));
            if let Some(e) = shard.map.remove(&h) {
                shard.dropped.push(e.key);
                dropped += 1;
            }
        }
        self.count.fetch_sub(dropped, Ordering::Relaxed);
        self.changed.store(true, Ordering::Relaxed);
        self.strings.prune();
        dropped
    }

    /// Agents the inventory refused while full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Take what changed since the last call: records to write, keys to delete.
    pub fn take_changes(&self) -> (Vec<(AgentKey, Record)>, Vec<AgentKey>) {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return (Vec::new(), Vec::new());
        }
        let (mut write, mut delete) = (Vec::new(), Vec::new());
        for i in 0..SHARDS {
            let mut shard = self.shard(i);
            delete.append(&mut shard.dropped);
            for e in shard.map.values_mut().filter(|e| e.dirty) {
                e.dirty = false;
                e.written_seen = e.last_seen;
                write.push((e.key.clone(), e.record()));
            }
        }
        (write, delete)
    }

    /// Put changes back after a failed write, so the next one carries them.
    pub fn restore_changes(&self, write: Vec<(AgentKey, Record)>, delete: Vec<AgentKey>) {
        for (k, _) in write {
            let h = k.hash();
            if let Some(e) = self.shard(shard_of(h)).map.get_mut(&h) {
                e.dirty = true;
            }
        }
        for k in delete {
            self.shard(shard_of(k.hash())).dropped.push(k);
        }
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Visit every agent that reported `component` (shard by shard; each
    /// held while visited).
    fn each(&self, component: &str, mut f: impl FnMut(&Entry, &Reported)) {
        for i in 0..SHARDS {
            let shard = self.shard(i);
            for e in shard.map.values() {
                if let Some(c) = e.reported(component) {
                    f(e, c);
                }
            }
        }
    }

    /// The summary of one component against the manifest being served.
    pub fn summary(&self, catalog: &Catalog, component: &str) -> Option<Summary> {
        let (_, c) = catalog.component(component)?;
        let versions = sorted_versions(c);
        let latest = c.latest.as_str();
        let latest_index = versions.iter().position(|v| *v == latest).unwrap_or(versions.len().saturating_sub(1));
        let stale_before = now().saturating_sub(self.stale_after.as_secs());
        let mut per_version: Vec<u64> = vec![0; versions.len()];
        let mut behind: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut total, mut stale, mut unlisted) = (0u64, 0u64, 0u64);
        self.each(component, |e, r| {
            total += 1;
            if e.last_seen < stale_before {
                stale += 1;
            }
            match versions.iter().position(|x| *x == &*r.version) {
                Some(i) => {
                    per_version[i] += 1;
                    *behind.entry(latest_index.saturating_sub(i) as u64).or_default() += 1;
                }
                None => unlisted += 1,
            }
        });
        Some(Summary {
            component: component.to_string(),
            latest: latest.to_string(),
            agents: total,
            up_to_date: behind.get(&0).copied().unwrap_or(0),
            behind: behind.into_iter().filter(|(n, _)| *n > 0).collect(),
            stale,
            unlisted,
            versions: versions
                .iter()
                .zip(per_version)
                .map(|(v, agents)| VersionCount { version: v.to_string(), agents })
                .collect(),
        })
    }

    /// Every component's summary, cached for a few seconds (for `/metrics`
    /// and the console, which may be asked often).
    pub fn summaries(&self, catalog: &Catalog) -> Arc<Vec<Summary>> {
        let t = now();
        if let Some((at, s)) = &*self.cached.lock().unwrap_or_else(|p| p.into_inner())
            && t.saturating_sub(*at) < 5
        {
            return s.clone();
        }
        let all: Vec<Summary> =
            catalog.manifest.components.keys().filter_map(|name| self.summary(catalog, name.as_str())).collect();
        let all = Arc::new(all);
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((t, all.clone()));
        all
    }

    /// The agents that reported `component`, sorted by name, filtered.
    pub fn agents(&self, catalog: &Catalog, component: &str, filter: &AgentFilter) -> Option<Vec<AgentRow>> {
        let (_, c) = catalog.component(component)?;
        let versions = sorted_versions(c);
        let latest_index = versions.iter().position(|v| *v == c.latest.as_str()).unwrap_or(0);
        let stale_before = now().saturating_sub(self.stale_after.as_secs());
        let mut rows = Vec::new();
        self.each(component, |e, r| {
            let behind = versions.iter().position(|x| *x == &*r.version).map(|i| latest_index.saturating_sub(i) as u64);
            let stale = e.last_seen < stale_before;
            if filter.behind.is_some_and(|min| behind.is_none_or(|b| b < min)) || (filter.stale && !stale) {
                return;
            }
            rows.push(AgentRow {
                agent: e.key.name(),
                version: r.version.to_string(),
                behind,
                reported_at: r.at,
                last_seen: e.last_seen,
                stale,
                address: e.address.to_string(),
                user_agent: e.user_agent.to_string(),
            });
        });
        rows.sort_by(|a, b| a.agent.cmp(&b.agent));
        Some(rows)
    }

    /// This relay's fleet, as it reports it upstream (counts only).
    pub fn site_summary(&self, catalog: &Catalog) -> Vec<Summary> {
        self.summaries(catalog).as_ref().clone()
    }
}

/// Filters of `/admin/fleet/agents`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentFilter {
    /// Only agents at least this many versions behind the latest.
    pub behind: Option<u64>,
    /// Only agents not seen for longer than `fleet.stale_after`.
    #[serde(default)]
    pub stale: bool,
}

/// One agent in a list.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    pub agent: String,
    pub version: String,
    /// Versions behind the latest; `None`: a version the manifest no longer lists.
    pub behind: Option<u64>,
    /// When it reported this version (Unix seconds), and when it was last seen.
    pub reported_at: u64,
    pub last_seen: u64,
    pub stale: bool,
    pub address: String,
    pub user_agent: String,
}

/// One component across the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub component: String,
    pub latest: String,
    pub agents: u64,
    pub up_to_date: u64,
    /// Versions behind -> agents (only those behind).
    pub behind: BTreeMap<u64, u64>,
    /// Agents not seen for longer than `fleet.stale_after`.
    pub stale: u64,
    /// Agents on versions the manifest no longer lists.
    pub unlisted: u64,
    /// Every listed version, oldest first, with its agents.
    pub versions: Vec<VersionCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionCount {
    pub version: String,
    pub agents: u64,
}
