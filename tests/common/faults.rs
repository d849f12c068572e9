//! A fault-injecting TCP proxy: sits between a relay and its upstream and, for
//! responses to object requests, cuts the connection after N bytes, flips a
//! byte, or stalls. A real TCP peer on loopback, not a mock: the relay's HTTP
//! client sees exactly what a broken network or a broken upstream would give it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do to one object response (counted from its first byte, headers included).
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    Pass,
    /// Close both sides after this many response bytes.
    CutAfter(u64),
    /// Invert the byte at this offset of the response.
    FlipAt(u64),
    /// Stop forwarding after this many bytes, for this long, then close.
    StallAfter(u64, Duration),
}

#[derive(Clone)]
pub struct FaultProxy {
    pub url: String,
    /// Faults for successive object responses; `Pass` once empty.
    plan: Arc<Mutex<VecDeque<Fault>>>,
    /// Request heads seen (the first line and any Range header), in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    /// Proxy to `target` ("127.0.0.1:port"); faults apply to responses whose
    /// request path contains `needle`.
    pub async fn start(target: String, needle: &'static str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let proxy = FaultProxy { url, plan: Arc::default(), requests: Arc::default() };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (p, target) = (p.clone(), target.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        p.relay(client, server, needle).await;
                    }
                });
            }
        });
        proxy
    }

    pub fn plan(&self, faults: impl IntoIterator<Item = Fault>) {
        self.plan.lock().unwrap().extend(faults);
    }

    pub fn seen(&self, needle: &str) -> Vec<String> {
        self.requests.lock().unwrap().iter().filter(|r| r.contains(needle)).cloned().collect()
    }

    async fn relay(&self, client: TcpStream, server: TcpStream, needle: &'static str) {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        // Client -> server: pass through, noting requests; arm the fault for
        // the response to a matching request.
        let armed: Arc<Mutex<Option<Fault>>> = Arc::default();
        let (armed_up, this) = (armed.clone(), self.clone());
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(line) = text.lines().next()
                    && (line.starts_with("GET ") || line.starts_with("HEAD "))
                {
                    let range = text.lines().find(|l| l.to_ascii_lowercase().starts_with("range:")).unwrap_or("");
                    this.requests.lock().unwrap().push(format!("{line} {range}"));
                    let fault = if line.contains(needle) {
                        this.plan.lock().unwrap().pop_front().unwrap_or(Fault::Pass)
                    } else {
                        Fault::Pass
                    };
                    *armed_up.lock().unwrap() = Some(fault);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        // Server -> client, with the armed fault applied.
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent: u64 = 0;
        let mut current = Fault::Pass;
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(f) = armed.lock().unwrap().take() {
                current = f;
                sent = 0;
            }
            let chunk = &mut buf[..n];
            match current {
                Fault::Pass => {}
                Fault::FlipAt(at) => {
                    if at >= sent && at < sent + n as u64 {
                        chunk[(at - sent) as usize] ^= 0xff;
                    }
                }
                Fault::CutAfter(limit) | Fault::StallAfter(limit, _) => {
                    if sent + n as u64 > limit {
                        let keep = (limit.saturating_sub(sent)) as usize;
                        let _ = cw.write_all(&chunk[..keep]).await;
                        if let Fault::StallAfter(_, d) = current {
                            tokio::time::sleep(d).await;
                        }
                        break;
                    }
                }
            }
            sent += n as u64;
            if cw.write_all(chunk).await.is_err() {
                break;
            }
        }
        up.abort();
    }
}
