//! The access log (`[log] access = "combined" | "json"`, off by default): one
//! line per response, written when its body has gone (or was cut), with the
//! client's address, the agent's id, status, bytes sent, duration and what
//! the cache did.
//!
//! Installed only when on (`server` builds the app with or without this
//! middleware), so a relay that does not log pays nothing per request. When
//! on, a line is formatted on the worker and handed to a writer thread
//! through a bounded queue: a worker never waits for the disk, and if the
//! disk cannot keep up lines are dropped and counted
//! (`patchrelay_access_log_dropped_total`), never the requests. The writer
//! reopens the file when it was moved away (logrotate without
//! `copytruncate`).

use std::future::{Future, Ready, ready};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::HttpMessage;
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header;
use bytes::Bytes;

use crate::config::AccessFormat;
use crate::identity::Forwarded;

/// What the cache did for a request, set by the routes when the log is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from what the relay held.
    Hit,
    /// Fetched from upstream for this request (or joined a fetch under way).
    Miss,
}

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 65_536;
/// Longest field kept from a request (target, user agent, referer, agent):
/// the queue then holds at most about 64 MiB of lines whatever clients send.
const FIELD_MAX: usize = 256;

/// The access log middleware of one worker (`None`: off, and then only ever
/// inside a disabled `Condition`).
#[derive(Clone)]
pub struct AccessLog(Option<Rc<Inner>>);

impl AccessLog {
    pub fn off() -> AccessLog {
        AccessLog(None)
    }
}

struct Inner {
    format: AccessFormat,
    tx: SyncSender<String>,
    trusted: Vec<ipnet::IpNet>,
    forwarded: Forwarded,
    /// The header naming the agent; `None` when certificates do
    /// (`limits.identity = "cert"`): a header is then the client's word only.
    agent_header: Option<header::HeaderName>,
    dropped: metrics::Counter,
}

/// Where lines go, shared by every worker; the writer thread runs until
/// every sender is gone.
#[derive(Clone)]
pub struct AccessSink {
    format: AccessFormat,
    tx: SyncSender<String>,
    trusted: Vec<ipnet::IpNet>,
    forwarded: Forwarded,
    agent_header: Option<header::HeaderName>,
    writer: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl AccessSink {
    /// Start the writer: to `file` (appended, created), or standard output.
    pub fn start(
        format: AccessFormat,
        file: Option<PathBuf>,
        trusted: Vec<ipnet::IpNet>,
        forwarded: Forwarded,
        agent_header: Option<header::HeaderName>,
    ) -> std::io::Result<AccessSink> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let out = Output::open(file)?;
        let writer =
            std::thread::Builder::new().name("patchrelay-access-log".into()).spawn(move || write_lines(rx, out))?;
        let writer = std::sync::Arc::new(std::sync::Mutex::new(Some(writer)));
        Ok(AccessSink { format, tx, trusted, forwarded, agent_header, writer })
    }

    /// Once the servers have stopped (their senders gone): wait up to
    /// `within` for the writer to write what is queued and flush.
    pub async fn finish(self, within: Duration) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(self);
        let Some(writer) = writer else { return };
        let deadline = Instant::now() + within;
        while !writer.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if writer.is_finished() {
            let _ = writer.join();
        }
    }

    /// The middleware for one worker.
    pub fn middleware(&self) -> AccessLog {
        AccessLog(Some(Rc::new(Inner {
            format: self.format,
            tx: self.tx.clone(),
            trusted: self.trusted.clone(),
            forwarded: self.forwarded,
            agent_header: self.agent_header.clone(),
            dropped: metrics::counter!(crate::telemetry::ACCESS_LOG_DROPPED),
        })))
    }
}

/// The log file, or standard output.
struct Output {
    path: Option<PathBuf>,
    inode: u64,
    out: std::io::BufWriter<Box<dyn Write + Send>>,
}

impl Output {
    fn open(path: Option<PathBuf>) -> std::io::Result<Output> {
        use std::os::unix::fs::MetadataExt;
        let (w, inode): (Box<dyn Write + Send>, u64) = match &path {
            None => (Box::new(std::io::stdout()), 0),
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("log.access_file {}: {e}", p.display())))?;
                let ino = f.metadata()?.ino();
                (Box::new(f), ino)
            }
        };
        Ok(Output { path, inode, out: std::io::BufWriter::with_capacity(64 << 10, w) })
    }

    /// Reopen when the file was moved or removed.
    fn reopen_if_moved(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(p) = &self.path else { return };
        if std::fs::metadata(p).map(|m| m.ino()).ok() != Some(self.inode) {
            let _ = self.out.flush();
            match Output::open(self.path.clone()) {
                Ok(o) => *self = o,
                Err(e) => tracing::warn!(error = %e, "cannot reopen the access log; writing to the old file"),
            }
        }
    }
}

fn write_lines(rx: Receiver<String>, mut out: Output) {
    let mut last_check = Instant::now();
    loop {
        let next = rx.recv_timeout(Duration::from_secs(1));
        // Rotation is looked for before a batch is written, so lines written
        // after a rename go to the new file.
        if last_check.elapsed() >= Duration::from_millis(500) {
            out.reopen_if_moved();
            last_check = Instant::now();
        }
        match next {
            Ok(line) => {
                let _ = out.out.write_all(line.as_bytes());
                // Drain what is queued, then flush once.
                while let Ok(line) = rx.try_recv() {
                    let _ = out.out.write_all(line.as_bytes());
                }
                let _ = out.out.flush();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = out.out.flush();
                return;
            }
        }
    }
}

impl<S, B> Transform<S, ServiceRequest> for AccessLog
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + Unpin + 'static,
{
    type Response = ServiceResponse<Logged<B>>;
    type Error = actix_web::Error;
    type Transform = AccessLogService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(self.0.clone().map(|log| AccessLogService { service: Rc::new(service), log }).ok_or(()))
    }
}

pub struct AccessLogService<S> {
    service: Rc<S>,
    log: Rc<Inner>,
}

/// What is known of a request before its response.
struct Started {
    at: Instant,
    time: time::OffsetDateTime,
    client: IpAddr,
    agent: Option<String>,
    method: String,
    target: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl<S, B> Service<ServiceRequest> for AccessLogService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + Unpin + 'static,
{
    type Response = ServiceResponse<Logged<B>>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let text = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok()).map(capped);
        let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let cert = req.conn_data::<crate::tls::PeerTls>().and_then(|p| p.name.as_deref()).map(str::to_owned);
        let started = Started {
            at: Instant::now(),
            time: time::OffsetDateTime::now_utc(),
            client: crate::identity::client_ip(peer, req.headers(), &self.log.trusted, self.log.forwarded),
            agent: cert.or_else(|| self.log.agent_header.clone().and_then(text)),
            method: req.method().to_string(),
            target: capped(&req.uri().to_string()),
            version: match req.version() {
                actix_web::http::Version::HTTP_2 => "HTTP/2.0",
                actix_web::http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            referer: text(header::REFERER),
            user_agent: text(header::USER_AGENT),
        };
        let (service, log) = (self.service.clone(), self.log.clone());
        Box::pin(async move {
            let res = service.call(req).await?;
            let status = res.status().as_u16();
            let cache = res.request().extensions().get::<CacheStatus>().copied();
            Ok(res.map_body(move |_, body| Logged {
                body,
                sent: 0,
                line: Some(Pending { started, status, cache, log }),
            }))
        })
    }
}

/// The line still to write when the body ends.
struct Pending {
    started: Started,
    status: u16,
    cache: Option<CacheStatus>,
    log: Rc<Inner>,
}

/// A response body that counts what it sends and writes the line when it is
/// dropped: after its last byte, or when the client went away mid-way.
pub struct Logged<B> {
    body: B,
    sent: u64,
    line: Option<Pending>,
}

impl<B: MessageBody + Unpin> MessageBody for Logged<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_next(cx);
        if let Poll::Ready(Some(Ok(b))) = &r {
            this.sent += b.len() as u64;
        }
        r
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        let Some(p) = self.line.take() else { return };
        let line = format_line(&p, self.sent);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = p.log.tx.try_send(line) {
            p.log.dropped.increment(1);
        }
    }
}

fn format_line(p: &Pending, sent: u64) -> String {
    let s = &p.started;
    let ms = s.at.elapsed().as_secs_f64() * 1000.0;
    let cache = match p.cache {
        Some(CacheStatus::Hit) => "hit",
        Some(CacheStatus::Miss) => "miss",
        None => "-",
    };
    match p.log.format {
        AccessFormat::Json => {
            let time = s.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            let mut line = serde_json::json!({
                "time": time,
                "client": s.client.to_string(),
                "agent": s.agent,
                "method": s.method,
                "target": s.target,
                "protocol": s.version,
                "status": p.status,
                "bytes": sent,
                "duration_ms": (ms * 1000.0).round() / 1000.0,
                "cache": cache,
                "referer": s.referer,
                "user_agent": s.user_agent,
            })
            .to_string();
            line.push('\n');
            line
        }
        AccessFormat::Off | AccessFormat::Combined => {
            // NCSA combined, then the agent id, duration and cache result as
            // quoted extra fields (as nginx's and Apache's custom formats do).
            let time = s
                .time
                .format(time::macros::format_description!(
                    "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
                ))
                .unwrap_or_default();
            format!(
                "{} - {} [{time}] \"{} {} {}\" {} {} \"{}\" \"{}\" {:.3} {cache}\n",
                s.client,
                quote_free(s.agent.as_deref().unwrap_or("-")),
                s.method,
                quote_free(&s.target),
                s.version,
                p.status,
                sent,
                quote_free(s.referer.as_deref().unwrap_or("-")),
                quote_free(s.user_agent.as_deref().unwrap_or("-")),
                ms / 1000.0,
            )
        }
    }
}

/// At most [`FIELD_MAX`] bytes of `s` (cut at a character boundary).
fn capped(s: &str) -> String {
    let mut end = s.len().min(FIELD_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A field as a log parser can split it: no quotes, spaces in ids, or
/// control characters from a hostile client (escaped as `\xHH`).
fn quote_free(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(FIELD_MAX));
    for b in s.bytes().take(FIELD_MAX) {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else if b == b' ' {
            out.push_str("%20");
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}
