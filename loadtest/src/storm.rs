//! `storm`: many agents, one object, all at once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;

use crate::http::Conn;

#[derive(clap::Args)]
pub struct Args {
    /// Server address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub target: SocketAddr,
    /// Path to GET, e.g. /v1/objects/<sha256>.
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Expected SHA-256 of the body (hex); a mismatch counts as corrupt.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Spread connections over 127.0.0.1 .. 127.0.0.N as source addresses.
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

struct Outcome {
    head: Option<Duration>,
    /// When the first body byte reached the agent's socket (kernel stamp).
    first_byte: Duration,
    /// When this process read it.
    first_read: Duration,
    total: Duration,
    result: Result<bool, String>,
}

pub async fn run(a: Args) -> Result<String, String> {
    let barrier = Arc::new(Barrier::new(a.agents));
    let path = Arc::new(a.path.clone());
    let want = a.sha256.clone().map(Arc::new);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(a.agents);
    for i in 0..a.agents {
        let (barrier, path, want) = (barrier.clone(), path.clone(), want.clone());
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % a.sources.max(1) as usize) as u8));
        let target = a.target;
        tasks.push(tokio::spawn(async move {
            // Connect first, then all ask at the same instant.
            let conn = Conn::connect(target, Some(source), None).await;
            barrier.wait().await;
            let (t0, wall0) = (Instant::now(), SystemTime::now());
            let (mut head_at, mut arrived, mut read_at) = (None, None, None);
            let result = async {
                let mut conn = conn.map_err(|e| format!("connect: {e}"))?;
                conn.read_buffer(64 << 10);
                conn.stamp_arrivals().map_err(|e| format!("connect: SO_TIMESTAMPNS: {e}"))?;
                let head = conn.get(&path, &[]).await.map_err(|e| format!("request: {e}"))?;
                head_at = Some(t0.elapsed());
                if head.status != 200 {
                    return Err(format!("status {}", head.status));
                }
                if head.content_length > 0 {
                    let stamp = conn.first_body_arrival().await.map_err(|e| format!("body: {e}"))?;
                    read_at = Some(t0.elapsed());
                    // A stamp before the request was sent is a clock step: use the read time.
                    arrived = stamp.and_then(|s| s.duration_since(wall0).ok()).or(read_at);
                }
                let mut h = Sha256::new();
                conn.read_body(head.content_length, None, |b| h.update(b)).await.map_err(|e| format!("body: {e}"))?;
                Ok(want.as_ref().is_none_or(|w| hex::encode(h.finalize()) == **w))
            }
            .await;
            let total = t0.elapsed();
            Outcome {
                head: head_at,
                first_byte: arrived.unwrap_or(total),
                first_read: read_at.unwrap_or(total),
                total,
                result,
            }
        }));
    }
    let mut first = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut head = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut read = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut total = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let (mut ok, mut corrupt) = (0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Duration::from_secs(a.timeout);
    for t in tasks {
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, t).await {
            Ok(Ok(o)) => {
                match o.result {
                    Ok(true) => ok += 1,
                    Ok(false) => corrupt += 1,
                    Err(e) => *errors.entry(e.split(':').next().unwrap_or("error").to_string()).or_default() += 1,
                }
                let _ = first.record(o.first_byte.as_micros() as u64);
                let _ = read.record(o.first_read.as_micros() as u64);
                if let Some(h) = o.head {
                    let _ = head.record(h.as_micros() as u64);
                }
                let _ = total.record(o.total.as_micros() as u64);
            }
            Ok(Err(e)) => *errors.entry(format!("task: {e}")).or_default() += 1,
            Err(_) => *errors.entry("timeout".into()).or_default() += 1,
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "mode": "storm",
        "agents": a.agents,
        "ok": ok,
        "corrupt": corrupt,
        "errors": errors,
        // Response head, then first body byte: a relay can answer the head at once
        // and the body only once the first verified block has arrived.
        "head_ms": { "p50": ms(&head, 0.5), "p99": ms(&head, 0.99), "max": ms(&head, 1.0) },
        "first_byte_ms": {
            "min": first.min() as f64 / 1000.0, "p10": ms(&first, 0.1), "p50": ms(&first, 0.5),
            "p90": ms(&first, 0.9), "p99": ms(&first, 0.99), "max": ms(&first, 1.0)
        },
        "first_read_ms": { "p50": ms(&read, 0.5), "p99": ms(&read, 0.99), "max": ms(&read, 1.0) },
        "total_ms": { "p50": ms(&total, 0.5), "p99": ms(&total, 0.99), "min": total.min() as f64 / 1000.0, "max": ms(&total, 1.0) },
        "elapsed_s": started.elapsed().as_secs_f64(),
    })
    .to_string())
}
