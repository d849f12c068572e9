//! Shared test helpers: generated repositories, servers started on loopback
//! port 0 (origin, relay, nginx, a scriptable upstream), and an HTTP client.
//!
//! Everything here is real: servers are the same code `patchrelay serve` runs,
//! listening on real sockets; files are on disk in temp directories.

#![allow(dead_code)]

pub mod faults;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use patchrelay::config::Config;
use patchrelay::repo::publish::{PublishOptions, publish};
use patchrelay::repo::sign::SecretKey;
use patchrelay::server::{self, RunningServer, StartOptions};
use tempfile::TempDir;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A published repository in a temp directory, with its key.
pub struct TestRepo {
    pub dir: TempDir,
    pub input: PathBuf,
    pub repo: PathBuf,
    pub key: SecretKey,
    pub public: String,
    pub chunk_size: u64,
}

impl TestRepo {
    /// Components: `engine` (pattern, critical, versions 1..=3, ~300 KB text),
    /// `big` (software, one 3 MiB version), `empty` (a zero-byte payload).
    pub fn new() -> TestRepo {
        let t = TestRepo::bare();
        t.write_meta("engine", "kind = \"pattern\"\ncritical = true\n");
        for v in 1..=3 {
            t.add_version("engine", &v.to_string(), &Self::engine_bytes(v));
        }
        t.write_meta("big", "kind = \"software\"\n");
        t.add_version("big", "1.0", &noise(42, 3 << 20));
        t.add_version("empty", "1", b"");
        t.publish();
        t
    }

    /// No components yet: add some, then `publish()`.
    pub fn bare() -> TestRepo {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        let repo = dir.path().join("repo");
        let key = SecretKey::generate().unwrap();
        let public = key.public().to_base64();
        TestRepo { dir, input, repo, key, public, chunk_size: 64 * 1024 }
    }

    /// No components yet, signed with `other`'s key (a second repository
    /// under the same origin key).
    pub fn bare_signed_by(other: &TestRepo) -> TestRepo {
        let t = TestRepo::bare();
        let path = t.dir.path().join("key");
        other.key.save_new(&path).unwrap();
        let key = SecretKey::load(&path).unwrap();
        TestRepo { public: key.public().to_base64(), key, ..t }
    }

    pub fn engine_bytes(version: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..(6000 + version * 100) {
            out.extend_from_slice(
                format!(
                    "sig {i:06} {:x} rev{}\n",
                    i * 2654435761 % 1_000_003,
                    if i % 50 == version { version } else { 0 }
                )
                .as_bytes(),
            );
        }
        out
    }

    pub fn write_meta(&self, component: &str, toml: &str) {
        let p = self.input.join(component).join("component.toml");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, toml).unwrap();
    }

    pub fn add_version(&self, component: &str, version: &str, data: &[u8]) {
        let d = self.input.join(component).join(version);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{component}-{version}.bin")), data).unwrap();
    }

    pub fn publish(&self) -> u64 {
        publish(&self.input, &self.repo, &self.key, &PublishOptions { chunk_size: self.chunk_size }).unwrap().serial
    }

    pub fn manifest_bytes(&self) -> Vec<u8> {
        std::fs::read(self.repo.join("v1/manifest")).unwrap()
    }

    pub fn signature_bytes(&self) -> Vec<u8> {
        std::fs::read(self.repo.join("v1/manifest.sig")).unwrap()
    }

    /// sha256 of `component` at `version`, from the published manifest.
    pub fn sha(&self, component: &str, version: &str) -> String {
        let m: serde_json::Value = serde_json::from_slice(&self.manifest_bytes()).unwrap();
        m["components"][component]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .unwrap()["sha256"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

pub fn origin_config(repo: &TestRepo) -> Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[origin]\nrepository = {:?}\nreload_interval = \"100ms\"\n[trust]\npublic_key = \"{}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
        repo.repo.display().to_string(),
        repo.public
    );
    Config::from_toml(&toml, "origin.toml").unwrap()
}

/// TOML for a relay with these upstream URLs; `extra` is appended verbatim.
pub fn relay_toml(upstreams: &[&str], public: &str, storage: &Path, extra: &str) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n[storage]\ndir = {:?}\n[trust]\npublic_key = \"{public}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
        storage.display().to_string()
    );
    for (i, u) in upstreams.iter().enumerate() {
        toml.push_str(&format!(
            "[[upstream]]\nurl = \"{u}\"\nname = \"up{i}-{}\"\nread_timeout = \"5s\"\nconnect_timeout = \"2s\"\n",
            u.rsplit(':').next().unwrap_or("x").trim_end_matches('/')
        ));
    }
    toml.push_str(extra);
    toml
}

pub async fn start(config: &Config) -> RunningServer {
    // PATCHRELAY_TEST_LOGS=1 shows the servers' logs (filtered by PATCHRELAY_LOG).
    if std::env::var_os("PATCHRELAY_TEST_LOGS").is_some() {
        patchrelay::telemetry::init_logging(&config.log);
    }
    server::start(config, StartOptions::default()).await.unwrap()
}

pub async fn start_origin(repo: &TestRepo) -> RunningServer {
    start(&origin_config(repo)).await
}

pub async fn start_relay(upstreams: &[&str], public: &str, storage: &Path) -> RunningServer {
    let cfg = Config::from_toml(&relay_toml(upstreams, public, storage, ""), "relay.toml").unwrap();
    start(&cfg).await
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// Poll `/readyz` until 200 or the timeout.
pub async fn wait_ready(url: &str, within: Duration) -> bool {
    let c = client();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = c.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// `POST /admin/sync`; returns (status, JSON body).
pub async fn admin_sync(url: &str) -> (u16, serde_json::Value) {
    let r = client().post(format!("{url}/admin/sync")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The value of a Prometheus series (summed over series matching every label).
pub async fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until a relay has prefetched `n` versions of its critical
/// components (their fetches would otherwise take faults planned for others).
pub async fn wait_prefetched(url: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(url, "patchrelay_prefetches_total", &[("result", "ok")]).await < n {
        assert!(Instant::now() < deadline, "prefetch did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (for servers that cannot report the one they got).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nginx serving `root` as a static tree; killed on drop.
pub struct Nginx {
    child: Child,
    pub url: String,
    pub port: u16,
    /// One line per request: `"<request line>" <status> "<Range>" <bytes sent>`.
    pub access_log: PathBuf,
    _dir: TempDir,
}

impl Nginx {
    /// Access log lines whose request line contains `needle`.
    pub fn requests_for(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Stop serving (the port goes dead).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

pub fn nginx_binary() -> Option<PathBuf> {
    require_tool("nginx", &["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"], "nginx-light")
}

/// A real peer a test needs (nginx, tinyproxy, ...), found at one of `paths`.
///
/// Missing, the test fails with the command that installs it (`.ci/run`
/// does), so a machine without it cannot pass by skipping. Only with
/// `PATCHRELAY_TEST_SKIP_MISSING=1` is it skipped (`None`), loudly.
pub fn require_tool(name: &str, paths: &[&str], package: &str) -> Option<PathBuf> {
    if let Some(found) = paths.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(found);
    }
    let install = format!("apt-get install {package} (or run .ci/run, which installs it)");
    if std::env::var("PATCHRELAY_TEST_SKIP_MISSING").is_ok_and(|v| v == "1") {
        eprintln!("SKIP: {name} is not installed: {install}");
        return None;
    }
    panic!(
        "{name} is not installed and this test needs it: {install}; PATCHRELAY_TEST_SKIP_MISSING=1 skips such tests instead"
    );
}

/// Start nginx on a free port serving `root` (see [`require_tool`] for when
/// nginx is missing).
pub async fn start_nginx(root: &Path) -> Option<Nginx> {
    start_nginx_with(root, "", None).await
}

/// nginx with extra `server { ... }` directives (e.g. `limit_rate 4m;`), on
/// `port` if given (to bring a killed upstream back at the same address).
pub async fn start_nginx_with(root: &Path, server_extra: &str, port: Option<u16>) -> Option<Nginx> {
    start_nginx_conf(root, "", server_extra, "", port).await
}

/// nginx with `listen_extra` after its listen address (`" ssl"` for HTTPS:
/// its URL is then https://), `server_extra` in its server block and
/// `http_extra` in its http block (an `upstream`, say).
pub async fn start_nginx_conf(
    root: &Path,
    listen_extra: &str,
    server_extra: &str,
    http_extra: &str,
    port: Option<u16>,
) -> Option<Nginx> {
    let bin = nginx_binary()?;
    let scheme = if listen_extra.contains("ssl") { "https" } else { "http" };
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..5 {
        let port = port.unwrap_or_else(free_port);
        let access_log = dir.path().join("access.log");
        // As root, nginx's workers would drop to `nobody`, who cannot read a
        // 0700 temp directory: keep them as root (tests only).
        let user = if running_as_root() { "user root;\n" } else { "" };
        let conf = format!(
            "{user}daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  log_format t '\"$request\" $status \"$http_range\" $body_bytes_sent';\n  access_log {log} t;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n  default_type application/octet-stream;\n  {http_extra}\n  server {{\n    listen 127.0.0.1:{port}{listen_extra};\n    root {root};\n    {server_extra}\n  }}\n}}\n",
            dir = dir.path().display(),
            root = root.display(),
            log = access_log.display(),
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Nginx { child, url: format!("{scheme}://127.0.0.1:{port}"), port, access_log, _dir: dir });
            }
            if let Ok(Some(_)) = child.try_wait() {
                break; // port taken meanwhile: try another
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("nginx did not start");
}

/// A scriptable upstream: serves whatever bytes the test puts at each path, so
/// a test can play a hostile or stale upstream. A real HTTP server on loopback.
#[derive(Clone, Default)]
pub struct Files(Arc<RwLock<HashMap<String, Bytes>>>);

impl Files {
    pub fn put(&self, path: &str, data: impl Into<Bytes>) {
        self.0.write().unwrap().insert(path.trim_start_matches('/').to_string(), data.into());
    }

    /// Copy a published repository's files in.
    pub fn load_repo(&self, repo: &Path) {
        for sub in ["v1/objects", "v1/chunks"] {
            for e in std::fs::read_dir(repo.join(sub)).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                if !name.starts_with('.') {
                    self.put(&format!("{sub}/{name}"), std::fs::read(e.path()).unwrap());
                }
            }
        }
        self.put("v1/manifest", std::fs::read(repo.join("v1/manifest")).unwrap());
        self.put("v1/manifest.sig", std::fs::read(repo.join("v1/manifest.sig")).unwrap());
    }

    pub fn get(&self, path: &str) -> Option<Bytes> {
        self.0.read().unwrap().get(path).cloned()
    }
}

pub struct ScriptedUpstream {
    pub url: String,
    pub files: Files,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    /// Send bodies chunked (no Content-Length), as some servers and proxies do.
    pub chunked: Arc<std::sync::atomic::AtomicBool>,
    /// Paths whose responses claim this Content-Length, whatever they send
    /// (then the connection closes): a lying upstream.
    pub claimed_len: Arc<RwLock<HashMap<String, u64>>>,
    handle: actix_web::dev::ServerHandle,
}

impl ScriptedUpstream {
    pub async fn start() -> ScriptedUpstream {
        use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
        let files = Files::default();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let chunked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let claimed_len: Arc<RwLock<HashMap<String, u64>>> = Arc::default();
        let (f, n, ch, cl) = (files.clone(), requests.clone(), chunked.clone(), claimed_len.clone());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            let (f, n, ch, cl) = (f.clone(), n.clone(), ch.clone(), cl.clone());
            App::new().default_service(web::to(move |req: HttpRequest| {
                let (f, n, ch, cl) = (f.clone(), n.clone(), ch.clone(), cl.clone());
                async move {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let path = req.path().trim_start_matches('/');
                    let claimed = cl.read().unwrap().get(path).copied();
                    match f.get(path) {
                        Some(b) if claimed.is_some() => {
                            // The head and the bytes go out; a moment later
                            // the connection breaks, far short of the claim.
                            use futures_util::StreamExt;
                            let piece: Result<Bytes, std::io::Error> = Ok(b);
                            let cut = futures_util::stream::once(async {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                Err(std::io::Error::other("cut"))
                            });
                            HttpResponse::Ok()
                                .no_chunking(claimed.unwrap_or(0))
                                .streaming(futures_util::stream::iter([piece]).chain(cut))
                        }
                        Some(b) if ch.load(std::sync::atomic::Ordering::SeqCst) => {
                            let pieces: Vec<Result<Bytes, std::io::Error>> =
                                b.chunks(50_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
                            HttpResponse::Ok().streaming(futures_util::stream::iter(pieces))
                        }
                        Some(b) => HttpResponse::Ok().body(b),
                        None => HttpResponse::NotFound().finish(),
                    }
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        ScriptedUpstream { url, files, requests, chunked, claimed_len, handle }
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// How a GET ended, seen from the client.
pub enum Outcome {
    /// A complete response with this status and body.
    Complete(u16, Bytes),
    /// An error status (4xx/5xx) with its body.
    Error(u16, String),
    /// A 200/206 cut short after this many bytes.
    Truncated(usize),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Complete(s, b) => {
                write!(f, "Complete({s}, {} bytes, sha256 {})", b.len(), patchrelay::digest::Digest::of(b))
            }
            Outcome::Error(s, body) => write!(f, "Error({s}, {body})"),
            Outcome::Truncated(n) => write!(f, "Truncated({n})"),
        }
    }
}

pub async fn get_outcome(url: &str) -> Outcome {
    use futures_util::StreamExt;
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    if status >= 400 {
        return Outcome::Error(status, r.text().await.unwrap_or_default());
    }
    let mut got = Vec::new();
    let mut body = r.bytes_stream();
    while let Some(piece) = body.next().await {
        match piece {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => return Outcome::Truncated(got.len()),
        }
    }
    Outcome::Complete(status, Bytes::from(got))
}

/// What one simulated agent saw.
#[derive(Debug, Clone)]
pub struct AgentResult {
    pub status: u16,
    pub first_byte: Duration,
    pub total: Duration,
    pub sha256: String,
    pub bytes: usize,
}

/// `n` agents GET `url` at once, each on its own connection, from a separate
/// multi-threaded runtime (so clients and the in-process servers do not share
/// one thread). Returns when all are done.
pub async fn agents(n: usize, url: String) -> Vec<AgentResult> {
    // Off the test's own thread, which runs the servers' actors.
    tokio::task::spawn_blocking(move || agents_blocking(n, url)).await.unwrap()
}

fn agents_blocking(n: usize, url: String) -> Vec<AgentResult> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let start = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        use futures_util::StreamExt;
                        // One client per agent: separate connections, as agents have.
                        let c =
                            reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(300)).build().unwrap();
                        let t0 = Instant::now();
                        let r = c.get(&url).send().await.unwrap();
                        let status = r.status().as_u16();
                        let mut body = r.bytes_stream();
                        let mut first = None;
                        let mut h = patchrelay::digest::Hasher::new();
                        let mut bytes = 0;
                        while let Some(piece) = body.next().await {
                            let piece = piece.unwrap();
                            if first.is_none() && !piece.is_empty() {
                                first = Some(t0.elapsed());
                            }
                            bytes += piece.len();
                            h.update(&piece);
                        }
                        AgentResult {
                            status,
                            first_byte: first.unwrap_or_else(|| t0.elapsed()),
                            total: t0.elapsed(),
                            sha256: h.finish().to_hex(),
                            bytes,
                        }
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            let _ = start;
            out
        })
    })
    .join()
    .unwrap()
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A relay as its own process (`patchrelay serve`), for kill -9 tests.
pub struct RelayProcess {
    pub child: Child,
    pub url: String,
}

impl RelayProcess {
    /// Start `patchrelay serve --config <toml>`; waits for its listening line.
    pub fn start(config_path: &Path) -> RelayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchrelay"));
        cmd.arg("serve").arg("--config").arg(config_path);
        RelayProcess::start_command(cmd)
    }

    /// Run `cmd`, which ends up running `patchrelay serve` (through a wrapper
    /// such as `unshare`), and wait for its listening line.
    pub fn start_command(mut cmd: Command) -> RelayProcess {
        use std::io::BufRead;
        let mut child = cmd.env("PATCHRELAY_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(i) = line.find("listening on http") {
                    let url = line[i + "listening on ".len()..].split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(url);
                    sent = true;
                }
                if std::env::var_os("PATCHRELAY_TEST_LOGS").is_some() {
                    eprintln!("[relay] {line}");
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(20)).expect("relay process did not start");
        RelayProcess { child, url }
    }

    /// Send `signal` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let st = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success(), "kill -{signal} failed");
    }

    /// Wait up to `within` for the process to exit; its status, or `None`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Certificates for a TLS test, written to a temp directory: a CA, a
/// server certificate for 127.0.0.1 and `localhost` (plus `extra_names`).
pub struct Pki {
    pub dir: TempDir,
    pub ca: patchrelay::tls::mint::Ca,
    pub ca_pem: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(extra_names: &[&str]) -> Pki {
        use patchrelay::tls::mint::{Ca, KeyKind};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("patchrelay test CA").unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        let mut names = vec!["127.0.0.1", "localhost"];
        names.extend_from_slice(extra_names);
        let server = ca.server(&names, KeyKind::EcdsaP256).unwrap();
        let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        std::fs::write(&cert, server.cert_pem).unwrap();
        std::fs::write(&key, server.key_pem).unwrap();
        Pki { dir, ca, ca_pem, cert, key }
    }

    /// A client certificate (CN `cn`) written as `<cn>.pem` and `<cn>.key`.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf, u64) {
        let c = self.ca.client(cn, None).unwrap();
        self.write_client(cn, c)
    }

    pub fn write_client(&self, name: &str, c: patchrelay::tls::mint::Issued) -> (PathBuf, PathBuf, u64) {
        let (cert, key) = (self.dir.path().join(format!("{name}.pem")), self.dir.path().join(format!("{name}.key")));
        std::fs::write(&cert, c.cert_pem).unwrap();
        std::fs::write(&key, c.key_pem).unwrap();
        (cert, key, c.serial)
    }

    /// `[server.tls]` for this server certificate; `extra` appended.
    pub fn server_tls_toml(&self, extra: &str) -> String {
        format!("[server.tls]\ncert = {:?}\nkey = {:?}\n{extra}", self.cert, self.key)
    }

    /// A reqwest client trusting only this CA, with a client certificate
    /// (cert and key PEM files) if given.
    pub fn client_https(&self, identity: Option<(&Path, &Path)>) -> reqwest::Client {
        https_client(&self.ca_pem, identity).timeout(Duration::from_secs(30)).build().unwrap()
    }
}

/// A reqwest client builder (no proxy) trusting only the CAs in `ca`, with a
/// client certificate (cert and key PEM files) if given.
pub fn https_client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::ClientBuilder {
    let tls = patchrelay::tls::client_config(&patchrelay::tls::UpstreamTls {
        name: "test",
        ca: Some(ca),
        web_roots: false,
        client: identity,
    })
    .unwrap();
    reqwest::Client::builder().no_proxy().use_preconfigured_tls(tls)
}

/// curl, which tests need as a real HTTPS client (`.ci/run` installs it).
pub fn curl_binary() -> Option<PathBuf> {
    require_tool("curl", &["/usr/bin/curl", "/usr/local/bin/curl"], "curl")
}
