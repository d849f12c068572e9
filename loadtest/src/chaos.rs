//! `chaos-proxy`: a TCP proxy for the path between a relay and its upstream
//! that misbehaves at random, as a bad WAN link or a broken upstream does.
//!
//! Per upstream connection, before anything is forwarded: answer `503` and
//! close (`--error`). Per piece read from the upstream (16 KiB at most): cut
//! the connection (`--cut`), stall it for `--stall-secs` and then cut it
//! (`--stall`), or flip one byte of the piece (`--flip`). Everything else
//! passes through. It counts the bytes it took from the upstream and each
//! fault it made, and writes them as JSON to `--stats` every second, so a
//! script can read them while it runs and after it is killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Clone)]
pub struct Args {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Chance that a new connection is answered 503 and closed.
    #[arg(long, default_value_t = 0.05)]
    pub error: f64,
    /// Chance, per piece, that the connection is cut there.
    #[arg(long, default_value_t = 0.0005)]
    pub cut: f64,
    /// Chance, per piece, that the connection stalls and is then cut.
    #[arg(long, default_value_t = 0.0002)]
    pub stall: f64,
    #[arg(long, default_value_t = 5.0)]
    pub stall_secs: f64,
    /// Chance, per piece, that one of its bytes is flipped.
    #[arg(long, default_value_t = 0.0005)]
    pub flip: f64,
    /// Where to write the counts (JSON), every second.
    #[arg(long)]
    pub stats: PathBuf,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Default)]
struct Counts {
    upstream_bytes: AtomicU64,
    connections: AtomicU64,
    errors: AtomicU64,
    cuts: AtomicU64,
    stalls: AtomicU64,
    flips: AtomicU64,
}

impl Counts {
    fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "upstream_bytes": g(&self.upstream_bytes),
            "connections": g(&self.connections),
            "faults": {
                "error_503": g(&self.errors),
                "cut": g(&self.cuts),
                "stall": g(&self.stalls),
                "flip": g(&self.flips),
            },
        })
    }
}

/// A small xorshift generator: the schedule only has to be random enough and
/// repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Spreads nearby seeds (connection numbers) over all 64 bits: xorshift's
/// first outputs from seeds that differ in a few low bits differ little.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub async fn run(args: Args) -> Result<String, String> {
    let listener = TcpListener::bind(args.listen).await.map_err(|e| format!("listen {}: {e}", args.listen))?;
    let counts = Arc::new(Counts::default());
    {
        let (counts, path) = (counts.clone(), args.stats.clone());
        tokio::spawn(async move {
            loop {
                let _ = std::fs::write(&path, counts.json().to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let mut n = 0u64;
    loop {
        let (client, _) = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
        n += 1;
        let seed = splitmix(args.seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))) | 1;
        let (args, counts) = (args.clone(), counts.clone());
        tokio::spawn(async move {
            let _ = connection(client, &args, &counts, Rng(seed)).await;
        });
    }
}

async fn connection(mut client: TcpStream, args: &Args, counts: &Counts, mut rng: Rng) -> std::io::Result<()> {
    counts.connections.fetch_add(1, Ordering::Relaxed);
    if rng.chance(args.error) {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 4096];
        let _ = client.read(&mut buf).await;
        let _ = client
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return Ok(());
    }
    let server = TcpStream::connect(args.upstream).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counts.upstream_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if rng.chance(args.cut) {
            counts.cuts.fetch_add(1, Ordering::Relaxed);
            let keep = (rng.next() as usize) % n;
            let _ = cw.write_all(&buf[..keep]).await;
            break;
        }
        if rng.chance(args.stall) {
            counts.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(args.stall_secs)).await;
            break;
        }
        if rng.chance(args.flip) {
            counts.flips.fetch_add(1, Ordering::Relaxed);
            let at = (rng.next() as usize) % n;
            buf[at] ^= 0x5a;
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
    Ok(())
}
