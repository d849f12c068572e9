//! `fleet`: agents that behave like update agents.
//!
//! Each agent has an id (sent as `X-Agent-Id`) and a current version of one
//! component (random among the older ones, or none). It polls the manifest
//! (with `If-None-Match`, as a real agent would), and when it is behind it
//! asks for a plan and downloads every step, now and then dropping the
//! connection part way and resuming with `Range` + `If-Range`, checking each
//! step's SHA-256 against the plan. Deltas are not applied (that is the
//! agent's CPU, not the server's): the digest check is what proves delivery.
//!
//! Closed loop: `--agents N` run for `--duration`, polling every `--poll`.
//! Open loop: `--rate R` new agents per second, each doing one update.
//! `--processes K` runs K copies of this program, agents split between them,
//! and merges their reports (the fd limit is per process).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::http::Conn;

#[derive(clap::Args, Clone)]
pub struct Args {
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long)]
    pub component: String,
    /// Closed loop: this many agents for the whole run.
    #[arg(long, default_value_t = 100)]
    pub agents: u64,
    /// Open loop: new agents per second (each does one update); overrides --agents.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Seconds between an agent's manifest polls (closed loop).
    #[arg(long, default_value_t = 5.0)]
    pub poll: f64,
    /// Chance that a download is cut part way (and resumed).
    #[arg(long, default_value_t = 0.1)]
    pub drop: f64,
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Split the agents over this many processes.
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// (internal) this process's share: index/count.
    #[arg(long, hide = true)]
    pub shard: Option<String>,
    /// Stop after this many requests in all (a bound for every run).
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
}

#[derive(Deserialize)]
struct Manifest {
    components: BTreeMap<String, Component>,
}

#[derive(Deserialize)]
struct Component {
    latest: String,
    versions: Vec<VersionEntry>,
}

#[derive(Deserialize)]
struct VersionEntry {
    version: String,
    sha256: String,
    size: u64,
}

#[derive(Deserialize)]
struct Plan {
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    url: String,
    size: u64,
    sha256: String,
}

/// What one process measured; merged across processes.
#[derive(Serialize, Deserialize, Default)]
pub struct Report {
    pub agents: u64,
    pub requests: u64,
    pub polls_not_modified: u64,
    pub updates: u64,
    pub steps: u64,
    pub resumes: u64,
    pub bytes: u64,
    pub corrupt: u64,
    pub errors: BTreeMap<String, u64>,
    /// (microseconds, count) pairs.
    pub poll_us: Vec<(u64, u64)>,
    pub first_byte_us: Vec<(u64, u64)>,
    pub download_us: Vec<(u64, u64)>,
    /// Bytes per second of each agent's downloads.
    pub agent_rates: Vec<f64>,
    pub elapsed_s: f64,
}

/// The latest version and every `(version, sha256, size)`, as last polled.
type Known = Option<(String, Vec<(String, String, u64)>)>;

struct Shared {
    args: Args,
    latest: Mutex<Known>,
    requests: AtomicU64,
    report: Mutex<Report>,
    poll: Mutex<Histogram<u64>>,
    first: Mutex<Histogram<u64>>,
    download: Mutex<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

fn rand_f64() -> f64 {
    use std::cell::Cell;
    thread_local!(static S: Cell<u64> = Cell::new(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64));
    S.with(|s| {
        let mut x = s.get() ^ (Instant::now().elapsed().subsec_nanos() as u64);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

async fn error(s: &Shared, kind: String) {
    *s.report.lock().await.errors.entry(kind).or_default() += 1;
}

/// Download one plan step, cutting and resuming at random; returns bytes and
/// whether its digest matched.
async fn fetch(s: &Shared, source: IpAddr, id: &str, step: &Step) -> Result<(u64, bool), String> {
    let started = Instant::now();
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut first = None;
    let mut attempts = 0;
    while got < step.size || (step.size == 0 && attempts == 0) {
        attempts += 1;
        if attempts > 20 {
            return Err("too many attempts".into());
        }
        s.requests.fetch_add(1, Ordering::Relaxed);
        let mut conn =
            Conn::connect(s.args.target, Some(source), Some(64 * 1024)).await.map_err(|e| format!("connect: {e}"))?;
        let mut headers = vec![format!("X-Agent-Id: {id}")];
        if got > 0 {
            headers.push(format!("Range: bytes={got}-"));
            headers.push(format!("If-Range: \"{}\"", step.sha256));
            s.report.lock().await.resumes += 1;
        }
        let head = conn.get(&step.url, &headers).await.map_err(|e| format!("request: {e}"))?;
        match head.status {
            200 if got > 0 => return Err("resume answered 200".into()),
            200 | 206 => {}
            429 => return Err("status 429".into()),
            other => return Err(format!("status {other}")),
        }
        // Maybe cut this attempt short, as a flaky link would.
        let remaining = head.content_length;
        let limit = (rand_f64() < s.args.drop && remaining > 1).then(|| (rand_f64() * remaining as f64) as u64);
        let n = conn
            .read_body(remaining, limit, |b| {
                if first.is_none() {
                    first = Some(started.elapsed());
                }
                h.update(b);
            })
            .await
            .map_err(|e| format!("body: {e}"))?;
        got += n;
        if step.size == 0 {
            break;
        }
    }
    if let Some(f) = first {
        let _ = s.first.lock().await.record(f.as_micros() as u64);
    }
    let _ = s.download.lock().await.record(started.elapsed().as_micros().max(1) as u64);
    Ok((got, hex::encode(h.finalize()) == step.sha256))
}

/// One agent: poll, and update when behind. Returns its download bytes and time.
async fn agent(s: Arc<Shared>, n: u64, once: bool, deadline: Instant) -> (u64, Duration) {
    let id = format!("load-{n:07}");
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (n % u64::from(s.args.sources.max(1))) as u8));
    let (mut bytes, mut busy) = (0u64, Duration::ZERO);
    let mut etag: Option<String> = None;
    let mut current: Option<String> = None;
    let mut first_poll = true;
    while Instant::now() < deadline && s.requests.load(Ordering::Relaxed) < s.args.max_requests {
        let t0 = Instant::now();
        s.requests.fetch_add(1, Ordering::Relaxed);
        let polled = async {
            let mut conn =
                Conn::connect(s.args.target, Some(source), None).await.map_err(|e| format!("connect: {e}"))?;
            let mut headers = vec![format!("X-Agent-Id: {id}")];
            if let Some(t) = &etag {
                headers.push(format!("If-None-Match: {t}"));
            }
            let head = conn.get("/v1/manifest", &headers).await.map_err(|e| format!("request: {e}"))?;
            let mut body = Vec::new();
            conn.read_body(head.content_length, None, |b| body.extend_from_slice(b))
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok::<_, String>((head.status, body))
        }
        .await;
        let _ = s.poll.lock().await.record(t0.elapsed().as_micros().max(1) as u64);
        match polled {
            Ok((304, _)) => s.report.lock().await.polls_not_modified += 1,
            Ok((200, body)) => {
                if let Ok(m) = serde_json::from_slice::<Manifest>(&body)
                    && let Some(c) = m.components.get(&s.args.component)
                {
                    etag = Some(format!("\"{}\"", hex::encode(Sha256::digest(&body))));
                    let versions = c.versions.iter().map(|v| (v.version.clone(), v.sha256.clone(), v.size)).collect();
                    *s.latest.lock().await = Some((c.latest.clone(), versions));
                } else {
                    error(&s, "manifest unreadable".into()).await;
                }
            }
            Ok((status, _)) => error(&s, format!("poll status {status}")).await,
            Err(e) => error(&s, e.split(':').next().unwrap_or("poll").to_string()).await,
        }
        let latest = s.latest.lock().await.clone();
        if let Some((latest, versions)) = latest {
            if first_poll {
                // Start somewhere in history: an older version, or nothing.
                let older: Vec<_> = versions.iter().filter(|v| v.0 != latest).collect();
                let pick = (rand_f64() * (older.len() + 1) as f64) as usize;
                current = older.get(pick).map(|v| v.0.clone());
                first_poll = false;
            }
            if current.as_deref() != Some(latest.as_str()) {
                let steps = match &current {
                    Some(from) => {
                        let path = format!("/v1/components/{}/chain?from={from}", s.args.component);
                        s.requests.fetch_add(1, Ordering::Relaxed);
                        let plan = async {
                            let mut conn = Conn::connect(s.args.target, Some(source), None)
                                .await
                                .map_err(|e| format!("connect: {e}"))?;
                            let head = conn
                                .get(&path, &[format!("X-Agent-Id: {id}")])
                                .await
                                .map_err(|e| format!("request: {e}"))?;
                            let mut body = Vec::new();
                            conn.read_body(head.content_length, None, |b| body.extend_from_slice(b))
                                .await
                                .map_err(|e| format!("body: {e}"))?;
                            serde_json::from_slice::<Plan>(&body).map_err(|e| format!("plan: {e}"))
                        }
                        .await;
                        match plan {
                            Ok(p) => p.steps,
                            Err(e) => {
                                error(&s, e.split(':').next().unwrap_or("plan").to_string()).await;
                                Vec::new()
                            }
                        }
                    }
                    None => versions
                        .iter()
                        .find(|v| v.0 == latest)
                        .map(|v| {
                            vec![Step {
                                url: format!("/v1/components/{}/versions/{}", s.args.component, v.0),
                                size: v.2,
                                sha256: v.1.clone(),
                            }]
                        })
                        .unwrap_or_default(),
                };
                let t = Instant::now();
                let mut ok = !steps.is_empty();
                for step in &steps {
                    match fetch(&s, source, &id, step).await {
                        Ok((n, true)) => {
                            bytes += n;
                            let mut r = s.report.lock().await;
                            r.steps += 1;
                            r.bytes += n;
                        }
                        Ok((_, false)) => {
                            s.report.lock().await.corrupt += 1;
                            ok = false;
                            break;
                        }
                        Err(e) => {
                            error(&s, e.split(':').next().unwrap_or("download").to_string()).await;
                            ok = false;
                            break;
                        }
                    }
                }
                busy += t.elapsed();
                if ok {
                    current = Some(latest.clone());
                    s.report.lock().await.updates += 1;
                }
            }
        }
        if once {
            break;
        }
        let wait = Duration::from_secs_f64(s.args.poll * (0.5 + rand_f64()));
        tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    (bytes, busy)
}

pub async fn run(a: Args) -> Result<String, String> {
    if a.processes > 1 && a.shard.is_none() {
        return run_processes(a).await;
    }
    let (index, count) = match &a.shard {
        Some(s) => {
            let (i, c) = s.split_once('/').ok_or("bad --shard")?;
            (i.parse::<u64>().map_err(|e| e.to_string())?, c.parse::<u64>().map_err(|e| e.to_string())?)
        }
        None => (0, 1),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.duration);
    let s = Arc::new(Shared {
        args: a.clone(),
        latest: Mutex::new(None),
        requests: AtomicU64::new(0),
        report: Mutex::new(Report::default()),
        poll: Mutex::new(hist()),
        first: Mutex::new(hist()),
        download: Mutex::new(hist()),
    });
    let mut tasks = Vec::new();
    match a.rate {
        None => {
            for n in (0..a.agents).filter(|n| n % count == index) {
                tasks.push(tokio::spawn(agent(s.clone(), n, false, deadline)));
                // Stagger starts over a second, as agents do not wake in one instant.
                tokio::time::sleep(Duration::from_micros(1_000_000 / a.agents.max(1))).await;
            }
        }
        Some(rate) => {
            let per_process = rate / count as f64;
            let mut n = index;
            while Instant::now() < deadline && s.requests.load(Ordering::Relaxed) < a.max_requests {
                tasks.push(tokio::spawn(agent(s.clone(), n, true, deadline)));
                n += count;
                tokio::time::sleep(Duration::from_secs_f64(1.0 / per_process.max(0.001))).await;
            }
        }
    }
    let mut rates = Vec::new();
    for t in tasks {
        if let Ok((bytes, busy)) = t.await
            && bytes > 0
        {
            rates.push(bytes as f64 / busy.as_secs_f64().max(1e-3));
        }
    }
    let mut r = std::mem::take(&mut *s.report.lock().await);
    r.agents = rates.len() as u64;
    r.requests = s.requests.load(Ordering::Relaxed);
    r.poll_us = pairs(&*s.poll.lock().await);
    r.first_byte_us = pairs(&*s.first.lock().await);
    r.download_us = pairs(&*s.download.lock().await);
    r.agent_rates = rates;
    r.elapsed_s = started.elapsed().as_secs_f64();
    if a.shard.is_some() {
        return serde_json::to_string(&r).map_err(|e| e.to_string());
    }
    Ok(summary(&r))
}

async fn run_processes(a: Args) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    for i in 0..a.processes {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.push("--shard".into());
        args.push(format!("{i}/{}", a.processes));
        children.push(tokio::process::Command::new(&exe).args(&args).output());
    }
    let mut merged = Report::default();
    for c in children {
        let out = c.await.map_err(|e| e.to_string())?;
        let r: Report = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("a load process failed: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        merged.agents += r.agents;
        merged.requests += r.requests;
        merged.polls_not_modified += r.polls_not_modified;
        merged.updates += r.updates;
        merged.steps += r.steps;
        merged.resumes += r.resumes;
        merged.bytes += r.bytes;
        merged.corrupt += r.corrupt;
        for (k, v) in r.errors {
            *merged.errors.entry(k).or_default() += v;
        }
        merged.poll_us.extend(r.poll_us);
        merged.first_byte_us.extend(r.first_byte_us);
        merged.download_us.extend(r.download_us);
        merged.agent_rates.extend(r.agent_rates);
        merged.elapsed_s = merged.elapsed_s.max(r.elapsed_s);
    }
    Ok(summary(&merged))
}

fn quantiles(pairs: &[(u64, u64)]) -> serde_json::Value {
    let mut h = hist();
    for (v, c) in pairs {
        let _ = h.record_n(*v, *c);
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({ "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": ms(1.0), "count": h.len() })
}

/// Jain's fairness index over per-agent throughput: 1.0 is perfectly even.
fn jain(x: &[f64]) -> f64 {
    let (s, s2): (f64, f64) = x.iter().fold((0.0, 0.0), |(a, b), v| (a + v, b + v * v));
    if x.is_empty() || s2 == 0.0 { 1.0 } else { s * s / (x.len() as f64 * s2) }
}

fn summary(r: &Report) -> String {
    serde_json::json!({
        "mode": "fleet",
        "agents_with_downloads": r.agents,
        "requests": r.requests,
        "requests_per_s": r.requests as f64 / r.elapsed_s.max(1e-3),
        "mb_per_s": r.bytes as f64 / 1e6 / r.elapsed_s.max(1e-3),
        "updates": r.updates,
        "steps": r.steps,
        "resumes": r.resumes,
        "polls_not_modified": r.polls_not_modified,
        "corrupt": r.corrupt,
        "errors": r.errors,
        "manifest_poll": quantiles(&r.poll_us),
        "download_first_byte": quantiles(&r.first_byte_us),
        "download_total": quantiles(&r.download_us),
        "fairness_jain": jain(&r.agent_rates),
        "elapsed_s": r.elapsed_s,
    })
    .to_string()
}
