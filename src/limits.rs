//! Per-agent limits: who an agent is, which policy applies, how fast and how
//! many downloads at once it may have, and when.
//!
//! - **Identity** is the `agent_header` value (default `X-Agent-Id`), or the
//!   client address; behind reverse proxies the address comes from the one
//!   header the proxies are configured to set (`server.forwarded_header`:
//!   `X-Forwarded-For` or `Forwarded`), and only when the immediate peer is
//!   one of `server.trusted_proxies`; the right-most address in it that is not
//!   a trusted proxy is the client's. A header the client could have sent
//!   itself (the other one, passed through by the proxy) is never read. An
//!   agent that sends no header is limited by its address, so leaving the
//!   header out does not escape a limit.
//! - **Ids are the client's word, addresses are not.** So a policy matches by
//!   address (`cidrs`) or by id (`agents`), never both, and address policies
//!   are looked at first: no id takes an agent out of its network's policy.
//!   And one address may hold at most `max_agents_per_address` ids at once
//!   (429 beyond): a client that invents a fresh id per request gets a fresh
//!   bucket only that many times, and the table's memory is bounded by
//!   addresses times that cap, not by the ids a client can make up.
//! - **Rate** is one token bucket per agent, shared by all its connections, so
//!   opening more connections gets it nothing. Buckets are *reservations*
//!   (GCRA-like): a stream reserves the bytes of its next piece and waits until
//!   they are due, so an agent's connections take turns and the average is
//!   exact over any interval longer than the burst.
//! - **`total_rate`** caps all egress with one more bucket, which every bulk
//!   stream also reserves from; reservations are served in order, so active
//!   streams share it evenly. Critical components (patches and patterns the
//!   manifest marks critical) are counted against it but never wait for it:
//!   when the cap binds, they go first and bulk downloads absorb the shortfall.
//! - **Concurrency and windows** are checked when a download starts: over
//!   `max_concurrent`, or outside the policy's `window`, the answer is 429 with
//!   a `Retry-After` spread at random, so a refused wave does not come back in
//!   step.
//! - **State** for an agent lives in a sharded table whose idle entries are
//!   forgotten after `idle_ttl` by a sweep that runs as lookups go by (see
//!   `agents`), so 100,000 distinct agents cost a bounded, measured amount of
//!   memory (docs/performance.md).
//!
//! No policy configured: nothing here runs, and serving pays nothing for it.

mod agents;
mod clock;
mod huge;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;

use self::agents::{AgentTable, Expiring};
pub use self::clock::Clock;
use crate::config::{LimitsConfig, PolicyConfig, ServerConfig};
use crate::identity::{Identify, Who};
use crate::telemetry;

/// GCRA arithmetic for one rate, shared by the process-wide bucket (an atomic)
/// and the per-agent ones (plain numbers under their shard's lock).
///
/// A bucket is the time (in ns since the limits' epoch) at which it is "empty
/// but even": the theoretical arrival time. Reserving `n` bytes pushes it by
/// `n / rate`; it may run ahead of now by at most `burst / rate` before a
/// reservation has to wait.
#[derive(Debug, Clone, Copy)]
struct Rate {
    ns_per_byte: f64,
    slack_ns: u64,
    burst: u64,
}

impl Rate {
    fn new(rate: u64, burst: u64) -> Rate {
        let (rate, burst) = (rate.max(1), burst.max(1));
        let ns_per_byte = 1e9 / rate as f64;
        Rate { ns_per_byte, slack_ns: (burst as f64 * ns_per_byte) as u64, burst }
    }

    /// Where a bucket standing at `tat` stands after reserving `n` bytes, and
    /// how long the reservation waits.
    fn take(&self, tat: u64, n: u64, now_ns: u64) -> (u64, Duration) {
        let next = tat.max(now_ns).saturating_add((n as f64 * self.ns_per_byte) as u64);
        (next, Duration::from_nanos(next.saturating_sub(now_ns).saturating_sub(self.slack_ns)))
    }

    fn burst(&self) -> u64 {
        self.burst
    }
}

/// A token bucket of bytes shared by threads, by reservation. Times are
/// nanoseconds on the limits' [`Clock`].
pub struct Bucket {
    rate: Rate,
    tat_ns: AtomicU64,
}

impl Bucket {
    pub fn new(rate: u64, burst: u64) -> Bucket {
        Bucket { rate: Rate::new(rate, burst), tat_ns: AtomicU64::new(0) }
    }

    /// Reserve `n` bytes; returns how long to wait before sending them.
    pub fn reserve(&self, n: u64, now_ns: u64) -> Duration {
        let mut cur = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let (next, wait) = self.rate.take(cur, n, now_ns);
            match self.tat_ns.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return wait,
                Err(actual) => cur = actual,
            }
        }
    }

    /// How long `reserve(n)` would wait, without reserving.
    pub fn would_wait(&self, n: u64, now_ns: u64) -> Duration {
        self.rate.take(self.tat_ns.load(Ordering::Relaxed), n, now_ns).1
    }

    pub fn burst(&self) -> u64 {
        self.rate.burst()
    }
}

/// One policy, compiled.
pub struct Policy {
    pub name: String,
    agents: Vec<globset::GlobMatcher>,
    cidrs: Vec<IpNet>,
    pub rate: u64,
    /// Each agent's bucket under this policy.
    agent_rate: Rate,
    pub max_concurrent: u32,
    window: Option<Window>,
    pub egress: &'static telemetry::Tally,
    pub throttled_bytes: metrics::Counter,
    pub wait: metrics::Histogram,
}

/// Hours of the day a policy may download, in the configured time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight; `start > end` wraps past midnight.
    start: u32,
    end: u32,
}

impl Window {
    /// Parse `"HH:MM-HH:MM"`.
    pub fn parse(s: &str) -> Result<Window, String> {
        let bad = || format!("{s:?} is not a window like \"00:00-02:00\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Result<u32, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 24 || m > 59 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let w = Window { start: minutes(a)?, end: minutes(b)? };
        if w.start == w.end {
            return Err(format!("{s:?} is an empty window"));
        }
        Ok(w)
    }

    /// Whether minute-of-day `m` is inside; if not, minutes until it opens.
    pub fn check(&self, m: u32) -> Result<(), u32> {
        let inside =
            if self.start < self.end { m >= self.start && m < self.end } else { m >= self.start || m < self.end };
        if inside { Ok(()) } else { Err((self.start + 1440 - m) % 1440) }
    }

    fn len_minutes(&self) -> u32 {
        (self.end + 1440 - self.start) % 1440
    }
}

/// Per-agent state, shared by the agent's connections. Lives inside the
/// agents' table and changes only under its shard's lock (see `agents`).
/// 24 bytes, so that with its key a slot is 32.
#[derive(Default)]
struct AgentState {
    /// The agent's token bucket (see [`Rate`]).
    tat_ns: u64,
    /// Downloads in progress.
    active: u32,
    /// Seconds since the limits' epoch when the agent was last seen (idle
    /// expiry needs no finer clock).
    last_seen_s: u32,
    /// For an agent known by its id: the key of the address it is counted
    /// against in [`Limits::addresses`]; 0 for none.
    address: u64,
}

const NS_PER_S: u64 = 1_000_000_000;

impl Expiring for AgentState {
    fn last_seen(&self) -> u64 {
        u64::from(self.last_seen_s) * NS_PER_S
    }
    fn touch(&mut self, now: u64) {
        self.last_seen_s = u32::try_from(now / NS_PER_S).unwrap_or(u32::MAX);
    }
    fn busy(&self) -> bool {
        self.active > 0
    }
}

/// How many agent ids an address holds (see [`Limits::addresses`]).
#[derive(Default)]
struct AddressIds {
    ids: u32,
    last_seen_s: u32,
}

impl Expiring for AddressIds {
    fn last_seen(&self) -> u64 {
        u64::from(self.last_seen_s) * NS_PER_S
    }
    fn touch(&mut self, now: u64) {
        self.last_seen_s = u32::try_from(now / NS_PER_S).unwrap_or(u32::MAX);
    }
    /// Kept while ids are counted against it.
    fn busy(&self) -> bool {
        self.ids > 0
    }
}

/// Who is asking, worked out once, as the request arrives: the policy that
/// applies and the agent's key in the table. Asking for it early also starts
/// fetching the agent's state into the CPU cache while the request is routed
/// (see `agents`), so admitting the download later does not wait on memory.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The policy that applies (none: the agent is not limited).
    policy: Option<usize>,
    key: u64,
    /// For an agent known by its id, the address it asks from: an id seen
    /// for the first time counts against it.
    id_from: Option<IpAddr>,
}

/// Why a download may not start now.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub policy: String,
    pub reason: &'static str,
    pub retry_after: Duration,
    pub message: String,
}

/// A download in progress: holds its agent's concurrency slot until dropped
/// (or, for a small body that goes at once, never takes it: see [`Hold`]).
pub struct Permit {
    /// The agent's key in the limits' table; its entry stays while this
    /// permit is counted in it.
    agent: u64,
    /// Index into the limits' policies (no reference count to bump and drop
    /// on a counter shared by every download).
    policy: usize,
    /// Counts against `total_rate` but never waits for it.
    pub critical: bool,
    limits: &'static Limits,
    /// When the agent was admitted (and its entry touched), on the coarse
    /// clock.
    admitted_ns: u64,
    hold: Hold,
}

/// What a permit holds in its agent's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// One of the agent's concurrent downloads, until the permit is dropped.
    Slot,
    /// A whole small body's bytes, reserved on the agent's bucket at
    /// admission, and no slot: the body is in memory and goes at once
    /// ([`Permit::send_at_once`]), so its download ends as it starts, and
    /// admission, reservation and the end are one step under one lock.
    AtOnce(u64),
    /// The body went at once: nothing is held.
    Done,
}

impl Permit {
    /// Reserve `n` bytes on every bucket that applies; how long to wait.
    pub fn reserve(&mut self, n: u64) -> Duration {
        self.hold_slot();
        let now = self.limits.clock.now();
        let wait = self.reserve_agent(n, now);
        self.count(n, now, wait)
    }

    /// For a whole small body in memory: send it now (true, and the download
    /// is over), or pace it (false).
    ///
    /// Usually decided at admission ([`Hold::AtOnce`]). Otherwise (the bucket
    /// was not free then) it is looked at again, reserved and released under
    /// one lock. Either way the admission time stands for now: if something
    /// came between, the buckets look fuller than they are and the body is
    /// paced: never earlier than admission allowed, at worst paced when it
    /// need not be. (Admission reads the coarse clock: see `clock` for the
    /// one tick that costs.)
    pub fn send_at_once(&mut self, n: u64) -> bool {
        let now = self.admitted_ns;
        match self.hold {
            Hold::Done => return true,
            Hold::AtOnce(reserved) if reserved == n => {}
            Hold::AtOnce(_) => return false,
            Hold::Slot => {
                if !self.limits.may_go_at_once(self.policy(), self.critical, n, now) {
                    return false;
                }
                let rate = self.policy().agent_rate;
                let free = self.limits.agents.with(self.agent, |a| {
                    let (next, wait) = rate.take(a.tat_ns, n, now);
                    if !wait.is_zero() {
                        return false;
                    }
                    a.tat_ns = next;
                    a.active = a.active.saturating_sub(1);
                    true
                });
                if free != Some(true) {
                    return false;
                }
            }
        }
        self.hold = Hold::Done;
        // The total bucket is looked at before and reserved after: at worst
        // one small body goes a little early when the total cap binds (and it
        // is not counted as throttled: it did not wait).
        if let Some(total) = &self.limits.total {
            total.reserve(n, now);
        }
        self.policy().egress.add(n);
        true
    }

    /// The body is paced after all (an at-once permit only gets here if the
    /// response took another path than admission foresaw): count it among the
    /// agent's downloads until it ends. What admission reserved stays
    /// reserved, so the agent is charged twice for those bytes, never less.
    pub fn hold_slot(&mut self) {
        if let Hold::AtOnce(_) = self.hold {
            let now = self.limits.clock.coarse();
            self.limits.agents.update(self.agent, now, AgentState::default, |a| a.active += 1);
            self.hold = Hold::Slot;
        }
    }

    /// Reserve `n` bytes on the agent's bucket; the wait.
    fn reserve_agent(&self, n: u64, now: u64) -> Duration {
        let rate = self.policy().agent_rate;
        self.limits
            .agents
            .with(self.agent, |a| {
                let (next, wait) = rate.take(a.tat_ns, n, now);
                a.tat_ns = next;
                wait
            })
            .unwrap_or_default()
    }

    /// The total bucket and the counters, once the agent's bucket is reserved.
    fn count(&self, n: u64, now: u64, mut wait: Duration) -> Duration {
        if let Some(total) = &self.limits.total {
            let t = total.reserve(n, now);
            if !self.critical {
                wait = wait.max(t);
            }
        }
        let policy = self.policy();
        policy.egress.add(n);
        if !wait.is_zero() {
            policy.throttled_bytes.increment(n);
            policy.wait.record(wait.as_secs_f64());
        }
        wait
    }

    /// The largest piece to send between waits.
    ///
    /// The same for every connection of an agent (reservations are served in
    /// turn, so equal pieces make equal shares), never more than the burst,
    /// and about a quarter second of the rate: a slow agent's connection holds
    /// a few kilobytes, not a large buffer.
    pub fn piece(&self) -> u64 {
        self.limits.piece(self.policy())
    }

    fn policy(&self) -> &Policy {
        &self.limits.policies[self.policy]
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.hold {
            // An at-once body holds no slot (and one never sent keeps its
            // bytes reserved: charged, never undercharged).
            Hold::Done | Hold::AtOnce(_) => {}
            Hold::Slot => {
                // The idle clock starts when a download ends: touched as the
                // slot is released, so a sweep never sees a just-finished agent
                // with the time it was admitted (its bucket would be forgotten
                // early).
                let now = self.limits.clock.coarse();
                self.limits.agents.with(self.agent, |a| {
                    a.touch(now);
                    a.active = a.active.saturating_sub(1);
                });
            }
        }
    }
}

/// Everything the limits need at request time.
pub struct Limits {
    policies: Vec<Policy>,
    /// The order policies are matched in: those by address, then the rest.
    order: Vec<usize>,
    /// Keyed by a 64-bit keyed hash of who the agent is (its id, or its
    /// address when it sends none), not the id itself: a lookup then touches
    /// no string (one cache miss fewer among 100,000 agents) and an agent
    /// costs no allocation for its name. Two agents would have to collide in
    /// 64 bits of SipHash under a secret key to share a bucket, and no client
    /// can aim at a shard.
    agents: AgentTable<AgentState>,
    /// Agent ids counted per address (keyed as addresses are in `agents`).
    addresses: &'static AgentTable<AddressIds>,
    /// Most ids one address may hold at once; 0: no cap.
    max_agents_per_address: u32,
    keys: std::hash::RandomState,
    total: Option<Bucket>,
    identify: Identify,
    tz: jiff::tz::TimeZone,
    clock: Clock,
    active_agents: metrics::Gauge,
    tracked_agents: metrics::Gauge,
}

impl Limits {
    /// `None` when no policy is configured: nothing is limited.
    ///
    /// The limits live as long as the process (one per server start), so they
    /// are leaked to a `&'static`: a download then holds a plain reference, not
    /// a reference count that every download on every worker would bump and
    /// drop on one shared cache line.
    pub fn new(cfg: &LimitsConfig, server: &ServerConfig) -> Result<Option<&'static Limits>, String> {
        if cfg.policy.is_empty() {
            return Ok(None);
        }
        let identify = Identify::new(
            cfg.identity,
            cfg.agent_header.0.clone(),
            server.trusted_proxies.clone(),
            server.forwarded_header,
        );
        let tz = if cfg.timezone.eq_ignore_ascii_case("utc") {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(&cfg.timezone).map_err(|e| format!("limits.timezone {:?}: {e}", cfg.timezone))?
        };
        let policies = cfg.policy.iter().map(compile).collect::<Result<Vec<_>, _>>()?;
        // Address policies first (see the module comment), each group in
        // the configured order.
        let mut order: Vec<usize> = (0..policies.len()).collect();
        order.sort_by_key(|&i| policies[i].cidrs.is_empty());
        let addresses: &'static AgentTable<AddressIds> = Box::leak(Box::new(AgentTable::new(cfg.idle_ttl.0)));
        // An id that expires no longer counts against its address. (Runs
        // under the id's shard lock and takes the address's: always in that
        // order, never the other way round.)
        let agents = AgentTable::new(cfg.idle_ttl.0).on_expire(move |a: &AgentState| {
            if a.address != 0 {
                addresses.with(a.address, |e| e.ids = e.ids.saturating_sub(1));
            }
        });
        let total = cfg.total_rate.map(|r| Bucket::new(r.0, cfg.total_burst.map_or(r.0, |b| b.0)));
        Ok(Some(Box::leak(Box::new(Limits {
            policies,
            order,
            agents,
            addresses,
            max_agents_per_address: cfg.max_agents_per_address,
            keys: std::hash::RandomState::new(),
            total,
            identify,
            tz,
            clock: Clock::new(),
            active_agents: metrics::gauge!(telemetry::LIMIT_ACTIVE_AGENTS),
            tracked_agents: metrics::gauge!(telemetry::LIMIT_TRACKED_AGENTS),
        }))))
    }

    /// Whether agents are named by their client certificates: only then is
    /// the connection's certificate name looked up for a request.
    pub fn by_certificate(&self) -> bool {
        self.identify.by_certificate()
    }

    /// The client's address: the peer, or what a trusted proxy says it is.
    pub fn client_ip(&self, peer: IpAddr, headers: &actix_web::http::header::HeaderMap) -> IpAddr {
        self.identify.client_ip(peer, headers)
    }

    /// The first policy that matches: by address, then by id (see the
    /// module comment). An agent without an id is matched by id policies on
    /// its address written out (`agents = ["10.1.*"]`).
    fn policy_for(&self, who: &Who<'_>, ip: IpAddr) -> Option<usize> {
        let mut ip_text = None;
        self.order.iter().copied().find(|&i| {
            let p = &self.policies[i];
            if !p.cidrs.is_empty() {
                return p.cidrs.iter().any(|c| c.contains(&ip));
            }
            p.agents.is_empty()
                || match who {
                    Who::Id(id) => std::str::from_utf8(id).is_ok_and(|id| p.agents.iter().any(|g| g.is_match(id))),
                    Who::Ip(ip) => {
                        let text: &String = ip_text.get_or_insert_with(|| ip.to_string());
                        p.agents.iter().any(|g| g.is_match(text.as_str()))
                    }
                }
        })
    }

    /// The agent's key in the table: SipHash, under the table's secret key,
    /// of the id's bytes in one write, or of a zero byte and the address's
    /// octets. An id is printable ASCII, never a zero byte, so no id is the
    /// same message as an address: an agent that sends an id is not limited
    /// with whoever else is behind its address unless 64 secret bits collide.
    /// (SipHash takes in the length, so the messages need no other framing.)
    fn key(&self, who: &Who<'_>) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.keys.build_hasher();
        match who {
            Who::Id(id) => h.write(id),
            Who::Ip(ip) => {
                h.write_u8(0);
                match ip {
                    IpAddr::V4(ip) => h.write(&ip.octets()),
                    IpAddr::V6(ip) => h.write(&ip.octets()),
                }
            }
        }
        h.finish()
    }

    /// Who is asking (see [`Caller`]); call it as soon as the request is in.
    /// `cert`: the name in the connection's client certificate, if any.
    pub fn caller(&self, peer: IpAddr, headers: &actix_web::http::header::HeaderMap, cert: Option<&[u8]>) -> Caller {
        let ip = self.client_ip(peer, headers);
        let who = self.identify.who(ip, headers, cert);
        let Some(policy) = self.policy_for(&who, ip) else { return Caller { policy: None, key: 0, id_from: None } };
        let key = self.key(&who);
        self.agents.prefetch(key);
        let id_from = matches!(who, Who::Id(_)).then_some(ip);
        Caller { policy: Some(policy), key, id_from }
    }

    /// The state of an agent seen for the first time: counted against its
    /// address when it is known by an id, or `None` when that address holds
    /// `max_agents_per_address` ids already. Runs under the agent's shard
    /// lock and takes its address's (see `Limits::new` for the order).
    fn new_agent(&self, id_from: Option<IpAddr>, now_ns: u64) -> Option<AgentState> {
        let (Some(ip), cap @ 1..) = (id_from, self.max_agents_per_address) else {
            return Some(AgentState::default());
        };
        let address = nonzero_key(self.key(&Who::Ip(ip)));
        let counted = self.addresses.update(address, now_ns, AddressIds::default, |a| {
            if a.ids >= cap {
                return false;
            }
            a.ids += 1;
            true
        });
        counted.then(|| AgentState { address, ..AgentState::default() })
    }

    /// Admit a download by `caller`, or say why not and when to come back.
    /// `whole`: the body is this many bytes, in memory, sent whole and small,
    /// so it may go at once (see [`Hold`]).
    pub fn admit(&'static self, caller: Caller, critical: bool, whole: Option<u64>) -> Result<Option<Permit>, Refusal> {
        let Caller { policy: Some(index), key: agent, id_from } = caller else { return Ok(None) };
        let policy = &self.policies[index];
        if let Some(w) = policy.window {
            let now = jiff::Timestamp::now().to_zoned(self.tz.clone());
            let minute = now.hour() as u32 * 60 + now.minute() as u32;
            if let Err(until) = w.check(minute) {
                // Come back when it opens, spread over the window's first part.
                let spread = w.len_minutes().clamp(1, 15) * 60;
                let secs = u64::from(until) * 60 + jitter(u64::from(spread));
                return Err(self.refuse(
                    policy,
                    "window",
                    secs,
                    format!("downloads for policy {:?} are allowed {} only", policy.name, window_text(w)),
                ));
            }
        }
        // The coarse clock: admission needs no more (see `clock`).
        let now_ns = self.clock.coarse();
        let at_once = whole.filter(|&n| self.may_go_at_once(policy, critical, n, now_ns));
        let rate = policy.agent_rate;
        let admitted = self.agents.try_update(
            agent,
            now_ns,
            || self.new_agent(id_from, now_ns),
            |a| {
                if policy.max_concurrent != 0 && a.active >= policy.max_concurrent {
                    return None;
                }
                if let Some(n) = at_once {
                    let (next, wait) = rate.take(a.tat_ns, n, now_ns);
                    if wait.is_zero() {
                        a.tat_ns = next;
                        return Some(Hold::AtOnce(n));
                    }
                }
                a.active += 1;
                Some(Hold::Slot)
            },
        );
        let Some(admitted) = admitted else {
            // A new id from an address that holds as many as it may.
            return Err(self.refuse(
                policy,
                "agents_per_address",
                60 + jitter(60),
                format!(
                    "{} agent ids at once from one address is the limit (limits.max_agents_per_address); reuse your agent id",
                    self.max_agents_per_address
                ),
            ));
        };
        let Some(hold) = admitted else {
            return Err(self.refuse(
                policy,
                "concurrency",
                5 + jitter(25),
                format!("{} downloads at once is the limit for policy {:?}", policy.max_concurrent, policy.name),
            ));
        };
        Ok(Some(Permit { agent, policy: index, critical, limits: self, admitted_ns: now_ns, hold }))
    }

    /// Whether `n` bytes fit in one piece and the total cap would not hold
    /// them back (critical bodies never wait for it). The agent's own bucket
    /// is checked under its lock.
    fn may_go_at_once(&self, policy: &Policy, critical: bool, n: u64, now: u64) -> bool {
        n <= self.piece(policy) && (critical || self.total.as_ref().is_none_or(|t| t.would_wait(n, now).is_zero()))
    }

    /// The largest piece to send between waits under `policy` (see
    /// [`Permit::piece`]).
    fn piece(&self, policy: &Policy) -> u64 {
        let b = policy.agent_rate.burst().min(policy.rate / 4);
        let b = self.total.as_ref().map_or(b, |t| b.min(t.burst()));
        b.clamp(4096, 256 * 1024)
    }

    fn refuse(&self, policy: &Policy, reason: &'static str, secs: u64, message: String) -> Refusal {
        metrics::counter!(telemetry::LIMIT_REFUSALS, "policy" => policy.name.clone(), "reason" => reason).increment(1);
        Refusal { policy: policy.name.clone(), reason, retry_after: Duration::from_secs(secs.max(1)), message }
    }

    /// Set the gauges that are counted rather than kept: called when metrics
    /// are scraped. Counting busy agents at a scrape (a pass over the table,
    /// about a millisecond for 100,000 agents) keeps two updates of one shared
    /// gauge off every download.
    pub fn publish_gauges(&self) {
        let busy = self.agents.count_where(|a| a.busy());
        self.active_agents.set(busy as f64);
        self.tracked_agents.set(self.agents.count() as f64);
    }

    /// Agents with state right now (for the memory measurement).
    pub fn tracked_agents(&self) -> u64 {
        self.agents.count() as u64
    }

    /// Forget every agent idle for `idle_ttl`, and uncount its id from its
    /// address. Lookups sweep as they go, but in proportion to traffic: on a
    /// quiet relay an id seen hours ago would otherwise keep its place under
    /// `max_agents_per_address`. The server calls this on a timer
    /// ([`Limits::sweep_period`]); a pass over 100,000 agents is about a
    /// millisecond.
    pub fn sweep_idle(&self) {
        let now = self.clock.coarse();
        self.agents.sweep_all(now);
        self.addresses.sweep_all(now);
    }

    /// How often [`Limits::sweep_idle`] should run: a quarter of `idle_ttl`,
    /// at most 30 s, so an id is forgotten within 1.25 `idle_ttl`.
    pub fn sweep_period(&self) -> Duration {
        Duration::from_nanos(self.agents.ttl_ns() / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }
}

fn window_text(w: Window) -> String {
    format!("{:02}:{:02}-{:02}:{:02}", w.start / 60, w.start % 60, w.end / 60, w.end % 60)
}

/// 0..max seconds, uniformly.
fn jitter(max: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    if max == 0 { 0 } else { u64::from_le_bytes(b) % max }
}

fn compile(p: &PolicyConfig) -> Result<Policy, String> {
    let agents = p
        .agents
        .iter()
        .map(|g| {
            globset::Glob::new(g.as_ref())
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("policy {:?}: agents glob {:?}: {e}", p.name, g.0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let window = p
        .window
        .as_ref()
        .map(|w| Window::parse(&w.0))
        .transpose()
        .map_err(|e| format!("policy {:?}: window {e}", p.name))?;
    let rate = p.rate.map_or(u64::MAX / 4, |r| r.0);
    // Default burst: a quarter second of traffic, at least 64 KiB.
    let burst = p.burst.map_or((rate / 4).max(64 * 1024), |b| b.0);
    let name = p.name.clone();
    Ok(Policy {
        egress: telemetry::tally(telemetry::LIMIT_EGRESS, &[("policy", &name)]),
        throttled_bytes: metrics::counter!(telemetry::LIMIT_THROTTLED_BYTES, "policy" => name.clone()),
        wait: metrics::histogram!(telemetry::LIMIT_WAIT, "policy" => name.clone()),
        name,
        agents,
        cidrs: p.cidrs.clone(),
        rate,
        agent_rate: Rate::new(rate, burst),
        max_concurrent: p.max_concurrent.unwrap_or(0),
        window,
    })
}

/// Keys as the agents' table stores them (0 marks a free slot there).
fn nonzero_key(key: u64) -> u64 {
    key.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

    #[test]
    fn bucket_paces_to_the_rate() {
        let b = Bucket::new(1_000_000, 100_000);
        // 10 MB at 1 MB/s: the last reservation is due ~9.9 s later.
        let mut wait = Duration::ZERO;
        for _ in 0..100 {
            wait = b.reserve(100_000, 0);
        }
        assert!((wait.as_secs_f64() - 9.9).abs() < 0.01, "{wait:?}");
        // The burst goes at once.
        let b = Bucket::new(1_000_000, 100_000);
        assert_eq!(b.reserve(100_000, 0), Duration::ZERO);
    }

    fn limits(policy: &str) -> &'static Limits {
        limits_with("[limits]\n", policy)
    }

    /// Limits from a `[limits]` section (`head`) and one policy's keys.
    fn limits_with(head: &str, policy: &str) -> &'static Limits {
        let toml = format!(
            "[[upstream]]\nurl = \"http://127.0.0.1:1\"\n[storage]\ndir = \"/tmp/x\"\n[trust]\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n{head}[[limits.policy]]\nname = \"p\"\n{policy}"
        );
        let cfg = crate::config::Config::from_toml(&toml, "test").unwrap();
        Limits::new(&cfg.limits, &cfg.server).unwrap().unwrap()
    }

    /// A whole small body in memory is reserved at admission and holds no
    /// slot; one paced after all holds a slot until it ends; one never sent
    /// keeps its bytes reserved; and the slot count is exact throughout.
    #[test]
    fn small_bodies_reserved_at_admission_hold_no_slot() {
        let l = limits("rate = \"1MiB/s\"\nmax_concurrent = 1\n");
        let mut h = HeaderMap::new();
        h.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_static("a"));
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let admit = |whole| l.admit(l.caller(peer, &h, None), false, whole);
        let key = l.caller(peer, &h, None).key;
        let active = || l.agents.with(key, |a| a.active).unwrap();
        let bucket = || l.agents.with(key, |a| a.tat_ns).unwrap();

        let mut p = admit(Some(4096)).unwrap().unwrap();
        assert_eq!(p.hold, Hold::AtOnce(4096));
        assert_eq!(active(), 0, "an at-once body takes no slot");
        let reserved = bucket();
        assert!(reserved > 0, "its bytes are reserved");
        assert!(p.send_at_once(4096));
        assert_eq!(p.hold, Hold::Done);
        assert_eq!(bucket(), reserved, "reserved once, not twice");
        drop(p);
        assert_eq!(active(), 0);

        // Paced after all: a slot is held until it ends, and counted against
        // max_concurrent meanwhile.
        let mut p = admit(Some(4096)).unwrap().unwrap();
        p.hold_slot();
        assert_eq!(active(), 1);
        assert!(admit(Some(4096)).is_err(), "the one slot is held");
        assert!(admit(None).is_err(), "the one slot is held");
        drop(p);
        assert_eq!(active(), 0, "released once");

        // Never sent: nothing held, and its bytes stay charged.
        let p = admit(Some(4096)).unwrap().unwrap();
        let charged = bucket();
        drop(p);
        assert_eq!((active(), bucket()), (0, charged));

        // A download that is not whole and small takes a slot.
        let p = admit(None).unwrap().unwrap();
        assert_eq!((p.hold, active()), (Hold::Slot, 1));
        drop(p);
        assert_eq!(admit(Some(10 << 20)).unwrap().unwrap().hold, Hold::Slot, "larger than a piece");
        assert_eq!(active(), 0);

        // A bucket that is not free: a slot, and the body is paced.
        let l = limits("rate = \"100B/s\"\nburst = \"4KiB\"\n");
        let admit = |whole| l.admit(l.caller(peer, &h, None), false, whole);
        let mut first = admit(Some(4096)).unwrap().unwrap();
        assert!(first.send_at_once(4096), "the burst goes at once");
        let mut second = admit(Some(4096)).unwrap().unwrap();
        assert_eq!(second.hold, Hold::Slot, "the burst is spent (40 s to refill)");
        assert!(!second.send_at_once(4096), "and it is paced");

        // No policy applies: not limited, no state.
        let l = limits("agents = [\"ws-*\"]\n");
        let c = l.caller(peer, &h, None);
        assert!(l.admit(c, false, Some(4096)).unwrap().is_none());
        assert_eq!(l.tracked_agents(), 0);
    }

    /// An agent is known by its id wherever it asks from; one without an id
    /// by its address; and an id is never taken for an address.
    #[test]
    fn ids_and_addresses_key_apart() {
        let l = limits("");
        let with_id = |id: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_static(id));
            h
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let key = |ip, h: &HeaderMap| l.caller(ip, h, None).key;
        assert_eq!(key(a, &with_id("ws-1")), key(b, &with_id(" ws-1 ")), "an id, trimmed, wherever it asks from");
        assert_ne!(key(a, &with_id("ws-1")), key(a, &with_id("ws-2")));
        assert_ne!(key(a, &with_id("ws-1")), key(a, &HeaderMap::new()), "an id is not its address");
        assert_ne!(key(a, &HeaderMap::new()), key(b, &HeaderMap::new()));
        // An id that is not printable ASCII is no id: the address stands for it.
        let mut odd = HeaderMap::new();
        odd.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_bytes(b"ws\xff1").unwrap());
        assert_eq!(key(a, &odd), key(a, &HeaderMap::new()));
        assert_eq!(key(a, &with_id("")), key(a, &HeaderMap::new()));
    }

    #[test]
    fn windows() {
        let w = Window::parse("00:00-02:00").unwrap();
        assert_eq!(w.check(30), Ok(()));
        assert_eq!(w.check(120), Err(1320));
        let night = Window::parse("22:00-06:00").unwrap();
        assert_eq!(night.check(23 * 60), Ok(()));
        assert_eq!(night.check(5 * 60), Ok(()));
        assert_eq!(night.check(12 * 60), Err(600));
        for bad in ["", "1-2", "25:00-01:00", "10:00-10:00", "10:60-11:00"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    /// An id idle for `idle_ttl` gives its place under the per-address cap
    /// back on the timed sweep, however quiet the relay is.
    #[test]
    #[allow(clippy::disallowed_methods)] // a plain #[test]: no async worker to block
    fn idle_ids_free_their_address_on_time() {
        let l = limits_with("[limits]\nidle_ttl = \"1s\"\nmax_agents_per_address = 2\n", "");
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let admit = |id: &str| {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_str(id).unwrap());
            l.admit(l.caller(peer, &h, None), false, None).map(drop)
        };
        admit("a").unwrap();
        admit("b").unwrap();
        assert!(admit("c").is_err());
        std::thread::sleep(Duration::from_millis(2100));
        l.sweep_idle();
        admit("c").unwrap();
        assert_eq!(l.tracked_agents(), 1);
        assert!(l.sweep_period() <= Duration::from_millis(250));
    }

    /// A policy by address applies whatever id the agent sends, even when an
    /// id policy comes first in the file.
    #[test]
    fn address_policies_win_over_ids() {
        let toml = "[[upstream]]\nurl = \"http://127.0.0.1:1\"\n[storage]\ndir = \"/tmp/x\"\n[trust]\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n[[limits.policy]]\nname = \"vip\"\nagents = [\"vip-*\"]\n[[limits.policy]]\nname = \"branch\"\ncidrs = [\"10.1.0.0/16\"]\nmax_concurrent = 1\n";
        let cfg = crate::config::Config::from_toml(toml, "t").unwrap();
        let l = Limits::new(&cfg.limits, &cfg.server).unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_static("vip-7"));
        let policy = |peer: &str| l.caller(peer.parse().unwrap(), &h, None).policy.map(|i| l.policies[i].name.clone());
        assert_eq!(policy("10.1.2.3").as_deref(), Some("branch"));
        assert_eq!(policy("10.2.2.3").as_deref(), Some("vip"));
        // Both in one policy is refused at load.
        let both = toml.replace("cidrs = [\"10.1.0.0/16\"]", "cidrs = [\"10.1.0.0/16\"]\nagents = [\"x\"]");
        let err = crate::config::Config::from_toml(&both, "t").unwrap_err().to_string();
        assert!(err.contains("both `agents` and `cidrs`"), "{err}");
    }

    /// One address holds at most `max_agents_per_address` ids; a flood of
    /// fresh ids from it is refused and costs no memory. (Ids that expire are
    /// uncounted by the table's `on_expire`: `agents` tests that sweeps call
    /// it for every entry they drop.)
    #[test]
    #[allow(clippy::disallowed_methods)] // a plain #[test]: no async worker to block
    fn one_address_holds_a_bounded_number_of_ids() {
        let l = limits("");
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let admit = |peer: IpAddr, id: &str| {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static("x-agent-id"), HeaderValue::from_str(id).unwrap());
            l.admit(l.caller(peer, &h, None), false, None).map(drop)
        };
        for i in 0..64 {
            admit(peer, &format!("ws-{i}")).unwrap();
        }
        let refused = admit(peer, "ws-64").unwrap_err();
        assert_eq!(refused.reason, "agents_per_address");
        admit(peer, "ws-3").unwrap();
        admit(other, "ws-64").unwrap();
        for i in 0..100_000 {
            assert!(admit(peer, &format!("flood-{i}")).is_err());
        }
        assert_eq!(l.tracked_agents(), 65, "a flood of ids took memory");
    }
}
