//! `slow`: many agents on slow links, each reading one large download at a
//! trickle for the whole run. What it measures is the server's cost per
//! connection: errors (there should be none) and resident memory, sampled from
//! the server's processes before the agents connect and while they all hold
//! their downloads open.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::Conn;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub target: SocketAddr,
    /// A large object (it must outlast the run at `--rate`).
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value_t = 1000)]
    pub agents: u64,
    /// Bytes per second each agent reads.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seconds over which agents connect.
    #[arg(long, default_value_t = 10)]
    pub ramp: u64,
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Server process ids whose resident memory to sample (comma-separated).
    #[arg(long, default_value = "")]
    pub server_pids: String,
    /// Speak HTTPS, trusting the CA certificates in this PEM file.
    #[arg(long)]
    pub cacert: Option<std::path::PathBuf>,
}

/// Resident memory of the processes, in KiB: `(all, anonymous)`. The
/// anonymous part is what connections cost; the rest is file pages (the page
/// cache, shared with every other reader of those files, including a mapping).
fn rss_kib(pids: &[u32]) -> (u64, u64) {
    let field = |s: &str, name: &str| -> u64 {
        s.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .map(|s| (field(&s, "VmRSS:"), field(&s, "RssAnon:")))
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
}

pub async fn run(a: Args) -> Result<String, String> {
    let tls = match &a.cacert {
        Some(ca) => Some(crate::http::tls_client(ca).map_err(|e| format!("--cacert: {e}"))?),
        None => None,
    };
    let pids: Vec<u32> =
        a.server_pids.split(',').filter(|s| !s.is_empty()).filter_map(|s| s.trim().parse().ok()).collect();
    let idle = rss_kib(&pids);
    let started = Instant::now();
    let end = started + Duration::from_secs(a.ramp + a.duration);
    let connected = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for n in 0..a.agents {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (n % u64::from(a.sources.max(1))) as u8));
        let (path, target, rate, tls) = (a.path.clone(), a.target, a.rate, tls.clone());
        let (connected, bytes, errors) = (connected.clone(), bytes.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let result = async {
                // A small receive buffer, as on a slow link: the server's data
                // waits on its side, which is what is being measured.
                let mut conn = match tls {
                    Some(tls) => Conn::connect_tls(target, Some(source), Some(4096), tls).await,
                    None => Conn::connect(target, Some(source), Some(4096)).await,
                }
                .map_err(|e| format!("connect: {e}"))?;
                let head =
                    conn.get(&path, &[format!("X-Agent-Id: slow-{n}")]).await.map_err(|e| format!("request: {e}"))?;
                if head.status != 200 {
                    return Err(format!("status {}", head.status));
                }
                connected.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let mut got = 0u64;
                while Instant::now() < end && got < head.content_length {
                    // Read about a second's worth, then wait until it is due.
                    let want = rate.min(head.content_length - got);
                    let n = conn.read_body(want, Some(want), |_| {}).await.map_err(|e| format!("body: {e}"))?;
                    got += n;
                    bytes.fetch_add(n, Ordering::Relaxed);
                    let due = t0 + Duration::from_secs_f64(got as f64 / rate as f64);
                    tokio::time::sleep_until(due.min(end).into()).await;
                }
                Ok::<_, String>(())
            }
            .await;
            if let Err(e) = result {
                *errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e.split(':').next().unwrap_or("error").to_string())
                    .or_default() += 1;
            }
        }));
        // Ramp: spread connects so the listen queue is not the test.
        tokio::time::sleep(Duration::from_micros(a.ramp * 1_000_000 / a.agents.max(1))).await;
    }
    // Sample memory while everyone is connected and reading.
    let sample_at = started + Duration::from_secs(a.ramp + a.duration / 2);
    tokio::time::sleep_until(sample_at.into()).await;
    let busy = rss_kib(&pids);
    let holding = connected.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(json!({
        "mode": "slow",
        "agents": a.agents,
        "connected_at_sample": holding,
        "errors": errors,
        "bytes": bytes.load(Ordering::Relaxed),
        "server_rss_idle_kib": idle.0,
        "server_rss_busy_kib": busy.0,
        "server_anon_idle_kib": idle.1,
        "server_anon_busy_kib": busy.1,
        // Private memory per connection (file pages are the shared page cache).
        "server_kib_per_connection": if holding > 0 { (busy.1.saturating_sub(idle.1)) as f64 / holding as f64 } else { 0.0 },
        "server_rss_kib_per_connection": if holding > 0 { (busy.0.saturating_sub(idle.0)) as f64 / holding as f64 } else { 0.0 },
        "elapsed_s": started.elapsed().as_secs_f64(),
    })
    .to_string())
}
