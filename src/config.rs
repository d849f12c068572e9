//! Configuration: one TOML file, validated before anything starts.
//!
//! Every key is checked while the file is parsed: values are read into types that
//! validate themselves (a URL, a duration like `"1h"`, a size like `"50GiB"`, a
//! public key), so the TOML parser reports a bad value with its line and column,
//! and unknown keys are refused (`deny_unknown_fields`) because a misspelt key
//! silently falling back to a default is the worst kind of config bug. Rules that
//! span several keys are checked afterwards in [`Config::validate`], which names
//! the keys involved and the line of the section that holds them.
//!
//! `config/*.toml` documents every key; keep it in step with this file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::repo::sign::PublicKey;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {file}: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: line {line}, column {column}: {message}")]
    Parse { file: String, line: usize, column: usize, message: String },
    #[error("{file}: {}{message}", .line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Invalid { file: String, line: Option<usize>, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub storage: Option<StorageConfig>,
    pub origin: Option<OriginConfig>,
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
    pub trust: Option<TrustConfig>,
    #[serde(default)]
    pub sync: SyncConfig,
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub delta: DeltaConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// The admin token, wherever it came from (see [`AdminConfig`]); `None`:
    /// the admin API is off.
    #[serde(skip)]
    pub admin_token: Option<AdminToken>,
}

/// `[fleet]`: the inventory of agents and their versions (`crate::fleet`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Keep the inventory (plan requests record who runs what).
    pub enabled: bool,
    /// Agents kept; beyond, the least recently seen are dropped.
    pub max_agents: usize,
    /// An agent not seen for this long counts as stale.
    pub stale_after: HumanDuration,
    /// Send this relay's fleet summary (counts only) to its upstreams'
    /// `/admin/fleet/report`.
    pub report_upstream: bool,
    pub report_interval: HumanDuration,
    /// The token this relay presents with its reports (a file holding it;
    /// relative to the config file).
    pub report_token_file: Option<PathBuf>,
    /// This relay's name in its parent's console (default: the host name).
    pub site_name: Option<String>,
    /// Downstream relays that report here, each with its own token.
    pub site: Vec<SiteConfig>,
    /// `report_token_file`'s contents, read as the config is loaded.
    #[serde(skip)]
    pub report_token: Option<AdminToken>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: true,
            max_agents: 200_000,
            stale_after: HumanDuration(Duration::from_secs(7 * 86_400)),
            report_upstream: false,
            report_interval: HumanDuration(Duration::from_secs(300)),
            report_token_file: None,
            site_name: None,
            site: Vec::new(),
            report_token: None,
        }
    }
}

/// `[[fleet.site]]`: a downstream relay allowed to report here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    pub token_file: PathBuf,
    #[serde(skip)]
    pub token: Option<AdminToken>,
}

/// `[alerts]`: what is worth telling someone, and how (`crate::alerts`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// No good sync for longer than this is an alert (relays with upstreams).
    pub stale_after: HumanDuration,
    /// Less free space than this where the store is, an alert.
    pub min_free_disk: ByteSize,
    /// Failed fills over all fills in 5 minutes (at least 10 of them)
    /// above this, an alert.
    pub fill_error_rate: f64,
    /// An alert that stays active is sent again this often; the same event
    /// again within it, not at all.
    pub repeat: HumanDuration,
    pub webhook: Vec<WebhookConfig>,
    pub email: Option<EmailConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            stale_after: HumanDuration(Duration::from_secs(3 * 3600)),
            min_free_disk: ByteSize(1 << 30),
            fill_error_rate: 0.2,
            repeat: HumanDuration(Duration::from_secs(6 * 3600)),
            webhook: Vec::new(),
            email: None,
        }
    }
}

/// `[[alerts.webhook]]`: an HTTP(S) endpoint that takes each alert as JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// A file holding the HMAC-SHA256 key the body is signed with
    /// (`X-Patchrelay-Signature: sha256=<hex>`); relative to the config file.
    pub secret_file: Option<PathBuf>,
    /// PEM CAs for an `https://` receiver with a private CA.
    pub ca: Option<PathBuf>,
    #[serde(skip)]
    pub secret: Option<AdminToken>,
}

/// `[alerts.email]`: SMTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `host:port`.
    pub server: String,
    #[serde(default)]
    pub tls: SmtpTls,
    pub from: String,
    pub to: Vec<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Option<String>,
}

/// How SMTP is secured.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); the default.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS (a relay on the same host or a test server).
    None,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record metrics and serve `/metrics`. Off, every metric call is a no-op
    /// (and `/metrics` answers 404).
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// `[limits]`: per-agent rate and concurrency policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `header` (the `agent_header` value, falling back to the address when
    /// absent), `ip`, or `cert` (the client certificate's `cert_name`,
    /// falling back to the address on a connection without one; needs
    /// `[server.tls] client_ca`).
    pub identity: crate::identity::IdentityKind,
    pub agent_header: HeaderNameText,
    /// With `identity = "cert"`: which name of the client certificate is the
    /// agent's id: `cn` (the subject's common name), or the first subject
    /// alternative name of a kind: `dns`, `email`, `uri`.
    pub cert_name: CertName,
    /// Cap on all egress, shared among active downloads.
    pub total_rate: Option<Rate>,
    pub total_burst: Option<ByteSize>,
    /// An agent's state is dropped after this long without a request.
    pub idle_ttl: HumanDuration,
    /// Time zone of policy windows: `UTC`, or an IANA name like `Europe/Berlin`.
    pub timezone: String,
    /// Most agent ids one address may hold at once (a new one beyond it is
    /// refused, 429); 0: no cap.
    pub max_agents_per_address: u32,
    /// Policies by address first, then by id, each in order; the first match
    /// wins; none configured: nothing is limited.
    pub policy: Vec<PolicyConfig>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            identity: crate::identity::IdentityKind::Header,
            agent_header: HeaderNameText(actix_web::http::header::HeaderName::from_static("x-agent-id")),
            cert_name: CertName::Cn,
            total_rate: None,
            total_burst: None,
            idle_ttl: HumanDuration(Duration::from_secs(600)),
            timezone: "UTC".into(),
            max_agents_per_address: 64,
            policy: Vec::new(),
        }
    }
}

/// Which name in a client certificate identifies the agent.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CertName {
    Cn,
    Dns,
    Email,
    Uri,
}

/// `[[limits.policy]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// Globs on the agent identity, e.g. `"ws-*"`; absent: any agent.
    #[serde(default)]
    pub agents: Vec<GlobText>,
    /// Client networks, e.g. `"10.1.0.0/16"`; absent: any address.
    #[serde(default)]
    pub cidrs: Vec<ipnet::IpNet>,
    /// Bytes per second for one agent across all its connections.
    pub rate: Option<Rate>,
    pub burst: Option<ByteSize>,
    /// Downloads at once per agent.
    pub max_concurrent: Option<u32>,
    /// `"HH:MM-HH:MM"`: when this group may download.
    pub window: Option<WindowText>,
}

/// A glob, checked while parsing.
#[derive(Debug, Clone)]
pub struct GlobText(pub String);

impl<'de> Deserialize<'de> for GlobText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        globset::Glob::new(&s).map_err(|e| serde::de::Error::custom(format!("{s:?} is not a glob: {e}")))?;
        Ok(GlobText(s))
    }
}

impl AsRef<str> for GlobText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A header name, checked while parsing.
#[derive(Debug, Clone)]
pub struct HeaderNameText(pub actix_web::http::header::HeaderName);

impl<'de> Deserialize<'de> for HeaderNameText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        actix_web::http::header::HeaderName::try_from(s.as_str())
            .map(HeaderNameText)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a header name")))
    }
}

/// A daily window, checked while parsing.
#[derive(Debug, Clone)]
pub struct WindowText(pub String);

impl<'de> Deserialize<'de> for WindowText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::limits::Window::parse(&s).map_err(serde::de::Error::custom)?;
        Ok(WindowText(s))
    }
}

/// A rate written for people: `"1MiB/s"`, `"500KB/s"` (the `/s` is optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let n = s
            .trim()
            .trim_end_matches("/s")
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a rate ({e}); write e.g. \"1MiB/s\"")))?;
        if n.0 == 0 {
            return Err(serde::de::Error::custom("a rate of 0 would stop all traffic; leave the key out instead"));
        }
        Ok(Rate(n.0))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeltaConfig {
    /// Serve and compute deltas (a relay needs [storage]; an origin too, to
    /// keep the deltas it computes).
    pub enabled: bool,
    /// Threads computing deltas.
    pub workers: usize,
    /// Builds running or queued at once; more are refused until a slot frees.
    pub queue: usize,
    /// No deltas for targets larger than this (memory: about 7x the target).
    pub max_target_size: ByteSize,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig { enabled: true, workers: 1, queue: 4, max_target_size: ByteSize(1 << 30) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTP worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Pending connections the kernel queues before accept.
    pub backlog: u32,
    /// Most connections open at once, per worker.
    pub max_connections_per_worker: usize,
    /// How long an idle keep-alive connection is kept.
    pub keep_alive: HumanDuration,
    /// `Cache-Control: max-age` for the manifest, its signature and `latest`.
    pub manifest_max_age: HumanDuration,
    /// Peers whose `forwarded_header` is believed (reverse proxies, load
    /// balancers); from anyone else it is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header the trusted proxies set: `x-forwarded-for` or `forwarded`.
    /// Only that one is read (the other could come from the client itself).
    pub forwarded_header: crate::identity::Forwarded,
    /// How much a connection buffers before asking for more of a response
    /// (actix's write buffer threshold). Small keeps slow connections cheap;
    /// fast ones are unaffected (their pieces grow instead).
    pub write_buffer: ByteSize,
    /// Cap on each connection's kernel send buffer (SO_SNDBUF). With tens of
    /// thousands of slow agents, kernel socket memory runs out before the
    /// relay's; absent: the kernel's own tuning.
    pub send_buffer: Option<ByteSize>,
    /// A connection whose client acknowledges nothing for this long (it
    /// stopped reading, or vanished) is closed (TCP_USER_TIMEOUT); "0s" (the
    /// default): the kernel's own retransmission limits. Off by default
    /// because the kernel also counts time a slow *reader* keeps its window
    /// shut: readers slower than the relay's sending were cut after the
    /// timeout however steadily they read (Linux 6.18, docs/security.md).
    pub send_timeout: HumanDuration,
    /// Connections one client address may hold at once (trusted proxies
    /// excepted); 0: no cap.
    pub max_connections_per_address: u32,
    /// On SIGTERM (or SIGINT): how long downloads in flight may take to
    /// finish after the listeners close; what is left then is cut.
    pub shutdown_grace: HumanDuration,
    /// `[server.tls]`: `listen` (and `[[server.listener]]` entries that do
    /// not say `tls = false`) speak HTTPS with this certificate.
    pub tls: Option<ServerTlsConfig>,
    /// `[[server.listener]]`: more addresses to serve on, each HTTP or HTTPS.
    pub listener: Vec<ListenerConfig>,
    /// `listen` expects the PROXY protocol (v1 or v2) from a load balancer
    /// in `trusted_proxies` on every connection, and takes the client's
    /// address from it (plain HTTP listeners only).
    pub proxy_protocol: bool,
}

/// `[server.tls]`. Paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM: the server's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 RSA or SEC1 EC; RSA, ECDSA or
    /// Ed25519).
    pub key: PathBuf,
    /// PEM: the CAs that issue agents' certificates. Set: clients are asked
    /// for a certificate (`client_auth`).
    pub client_ca: Option<PathBuf>,
    /// `required` (the default with `client_ca`): a connection without a
    /// valid client certificate fails its handshake; `optional`: one without
    /// any certificate is served (limited by its address), one with an
    /// invalid certificate still fails.
    pub client_auth: Option<ClientAuth>,
    /// PEM: certificate revocation lists from the `client_ca` CAs. With it,
    /// a client certificate must be shown unrevoked by a list from its
    /// issuer (a certificate whose issuer has no list here is refused).
    pub client_crl: Option<PathBuf>,
    /// How often the files are looked at for a change (SIGHUP reloads at
    /// once). A new set that does not load is refused and logged; the one in
    /// use stays.
    #[serde(default = "default_tls_check")]
    pub reload_check: HumanDuration,
}

fn default_tls_check() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// `[[server.listener]]`: one more address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// HTTPS with `[server.tls]`; default: whether `[server.tls]` is set.
    pub tls: Option<bool>,
    /// As `server.proxy_protocol`, for this listener.
    #[serde(default)]
    pub proxy_protocol: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            backlog: 4096,
            max_connections_per_worker: 25_000,
            keep_alive: HumanDuration(Duration::from_secs(30)),
            manifest_max_age: HumanDuration(Duration::from_secs(60)),
            trusted_proxies: Vec::new(),
            forwarded_header: crate::identity::Forwarded::XForwardedFor,
            write_buffer: ByteSize(2 * 1024),
            send_buffer: None,
            send_timeout: HumanDuration(Duration::ZERO),
            max_connections_per_address: 256,
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            tls: None,
            listener: Vec::new(),
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub dir: PathBuf,
    /// Memory for small hot objects.
    #[serde(default = "default_memory_cache")]
    pub memory_cache: ByteSize,
    /// Objects up to this size are kept in memory once read.
    #[serde(default = "default_memory_object_max")]
    pub memory_object_max: ByteSize,
    /// Disk budget for cached objects; least recently used unpinned objects are
    /// evicted above it. Absent: no limit.
    pub max_size: Option<ByteSize>,
    /// Serve objects larger than `memory_object_max` from read-only memory
    /// mappings (one copy fewer per byte). Object files must then never be
    /// edited in place.
    #[serde(default = "yes")]
    pub mmap: bool,
}

fn yes() -> bool {
    true
}

fn default_memory_cache() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_memory_object_max() -> ByteSize {
    ByteSize(64 << 10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// A directory written by `patchrelay publish`.
    pub repository: PathBuf,
    /// How often to look for a new publish.
    #[serde(default = "default_reload")]
    pub reload_interval: HumanDuration,
}

fn default_reload() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// Name used in logs and metric labels; defaults to the URL's host:port.
    pub name: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Longest wait for the next bytes of a response.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: HumanDuration,
    /// An HTTP proxy to reach this upstream through (HTTP CONNECT).
    pub proxy: Option<ProxyUrl>,
    /// Most objects fetched from this upstream at once.
    #[serde(default = "default_fills")]
    pub max_concurrent_fills: usize,
    /// How long a fill may keep resuming while it makes progress, in all
    /// (the longest of the upstreams' applies to a fill).
    #[serde(default = "default_fill_deadline")]
    pub fill_deadline: HumanDuration,
    /// PEM: CAs to trust for an `https://` upstream (a private CA). Paths
    /// are relative to the config file.
    pub ca: Option<PathBuf>,
    /// Trust the public web's CAs too; default: only when `ca` is not set
    /// (a private CA names the only issuer this upstream should have).
    pub web_roots: Option<bool>,
    /// PEM: a certificate and key this relay shows its upstream (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The name the upstream's certificate must carry (and the SNI sent),
    /// when it is not the URL's host (an upstream reached by address).
    pub server_name: Option<String>,
}

fn default_fill_deadline() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 60))
}

fn default_fills() -> usize {
    8
}

/// `proxy = "http://host:port"`: where to send CONNECT requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub base: String,
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let u = UpstreamUrl::parse(&s).map_err(serde::de::Error::custom)?;
        if u.https {
            return Err(serde::de::Error::custom(format!(
                "{s:?}: the proxy is spoken to in plain HTTP (CONNECT); write http://host:port"
            )));
        }
        Ok(ProxyUrl { base: u.base })
    }
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl UpstreamConfig {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.url.authority.clone())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    pub public_key: PublicKeyText,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub interval: HumanDuration,
    /// For each critical component, how many of the most recent versions
    /// (the latest included) are fetched ahead of demand and pinned.
    pub retain: usize,
    /// Prefetch fills running at once.
    pub prefetch_concurrency: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { interval: HumanDuration(Duration::from_secs(3600)), retain: 3, prefetch_concurrency: 4 }
    }
}

/// `[admin]`: the admin API's credentials. The token comes from exactly one
/// of `token`, `token_file` (a file holding only the token, so the config
/// itself can be world-readable) or the environment (`PATCHRELAY_ADMIN_TOKEN`,
/// which wins over both; see [`Config::load`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token: Option<AdminToken>,
    pub token_file: Option<PathBuf>,
    /// Serve `/admin/*` and `/metrics` on this address only (plain HTTP),
    /// not on the agents' listeners.
    pub listen: Option<SocketAddr>,
}

/// The environment variable that sets the admin token (over `[admin]`).
pub const ADMIN_TOKEN_ENV: &str = "PATCHRELAY_ADMIN_TOKEN";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `patchrelay=debug,actix_web=warn`, ...
    pub level: String,
    pub format: LogFormat,
    /// One line per response: `off`, `combined` (NCSA combined and the
    /// agent, duration and cache result) or `json`.
    pub access: AccessFormat,
    /// Where access lines go (appended; reopened when moved away);
    /// absent: standard output.
    pub access_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Off,
    Combined,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text, access: AccessFormat::Off, access_file: None }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration written for people: `"90s"`, `"5m"`, `"1h 30m"`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(HumanDuration).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""))
        })
    }
}

/// A size written for people: `"64KiB"`, `"50GiB"` (binary) or `"10MB"` (decimal).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.trim().parse::<bytesize::ByteSize>().map(|b| ByteSize(b.0)).map_err(|e| {
                serde::de::Error::custom(format!("{s:?} is not a size ({e}); write e.g. \"64KiB\", \"50GiB\""))
            }),
        }
    }
}

/// An upstream base URL: `http` or `https`, a host, an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The URL without a trailing slash; request paths are appended to it.
    pub base: String,
    pub https: bool,
    pub authority: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{s:?}: upstream URLs must start with http:// or https://")),
        };
        let authority = uri.authority().map(|a| a.to_string()).ok_or_else(|| format!("{s:?} has no host"))?;
        if uri.query().is_some() {
            return Err(format!("{s:?}: an upstream URL cannot have a query string"));
        }
        if authority.contains('@') {
            return Err(format!("{s:?}: credentials in upstream URLs are not supported"));
        }
        let base = s.trim_end_matches('/').to_string();
        Ok(UpstreamUrl { base, https, authority })
    }

    /// The full URL of `path` (which must not start with `/`) on this upstream.
    pub fn join(&self, path: &str) -> String {
        format!("{}/{}", self.base, path)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpstreamUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `trust.public_key`: checked to be a valid Ed25519 key while parsing.
#[derive(Debug, Clone)]
pub struct PublicKeyText(pub PublicKey);

impl<'de> Deserialize<'de> for PublicKeyText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::parse(&s)
            .map(PublicKeyText)
            .map_err(|e| serde::de::Error::custom(format!("{e}; use the key printed by `patchrelay keygen`")))
    }
}

/// `admin.token`: long enough that guessing it is not an option.
#[derive(Clone)]
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Tokens printed in documentation and sample configs: anyone can read them,
/// so a server must not accept them (matched without case, as parts).
const SAMPLE_TOKENS: [&str; 4] = ["change-me", "changeme", "example", "0123456789abcdef"];

impl AdminToken {
    /// Check a token, from wherever it came.
    pub fn parse(s: &str) -> Result<AdminToken, String> {
        let s = s.trim();
        if s.len() < 16 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(
                "a token or secret must be at least 16 characters with no spaces (try `openssl rand -hex 24`)".into()
            );
        }
        let lower = s.to_ascii_lowercase();
        if SAMPLE_TOKENS.iter().any(|t| lower.contains(t)) || s.chars().all(|c| s.starts_with(c)) {
            return Err("this token or secret is a sample or a placeholder that anyone can read; make a real one (`openssl rand -hex 24`)".into());
        }
        Ok(AdminToken(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for AdminToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AdminToken::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A secret kept in a file of its own (a token, a password): its contents,
/// trimmed, checked as an admin token is; says when others can read it.
pub fn read_secret(path: &Path) -> Result<AdminToken, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            // Logging is not set up yet when a config is read.
            eprintln!("warning: {} is readable by everyone; chmod 600 it", path.display());
        }
    }
    AdminToken::parse(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

/// Which role the config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Origin,
    Relay,
}

impl Config {
    /// Read, parse and validate a config file; `PATCHRELAY_ADMIN_TOKEN`,
    /// when set, is the admin token (whatever `[admin]` says).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        let env = match std::env::var_os(ADMIN_TOKEN_ENV) {
            None => None,
            Some(v) => Some(AdminToken::parse(&v.to_string_lossy()).map_err(|message| ConfigError::Invalid {
                file: file.clone(),
                line: None,
                message: format!("{ADMIN_TOKEN_ENV}: {message}"),
            })?),
        };
        Config::parse(&text, &file, env)
    }

    /// Parse and validate config text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse(text, file, None)
    }

    /// [`Config::from_toml`], with the admin token from the environment
    /// (which wins: `[admin]` is then not read for one).
    fn parse(text: &str, file: &str, env_token: Option<AdminToken>) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse { file: file.to_string(), line, column, message: e.message().trim().to_string() }
        })?;
        config.validate(text, file)?;
        config.resolve_paths(file);
        config.admin_token = match env_token {
            Some(t) => Some(t),
            None => config.read_admin_token(text, file)?,
        };
        config.read_fleet_tokens(text, file)?;
        config.read_alert_secrets(text, file)?;
        Ok(config)
    }

    /// The token `[admin]` names: `token`, or the contents of `token_file`.
    fn read_admin_token(&self, text: &str, file: &str) -> Result<Option<AdminToken>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: section_line(text, "admin"),
            message,
        };
        let Some(admin) = &self.admin else { return Ok(None) };
        match (&admin.token, &admin.token_file) {
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(path)) => {
                let path = &beside(file, path);
                let raw = std::fs::read_to_string(path)
                    .map_err(|e| invalid(format!("admin.token_file {}: {e}", path.display())))?;
                #[cfg(unix)]
                if let Ok(meta) = std::fs::metadata(path) {
                    use std::os::unix::fs::PermissionsExt;
                    if meta.permissions().mode() & 0o004 != 0 {
                        // Logging is not set up yet when a config is read.
                        eprintln!("warning: admin.token_file {} is readable by everyone; chmod 600 it", path.display());
                    }
                }
                AdminToken::parse(&raw)
                    .map(Some)
                    .map_err(|e| invalid(format!("admin.token_file {}: {e}", path.display())))
            }
            (Some(_), Some(_)) => Err(invalid("[admin] has both token and token_file: keep one".into())),
            // Only moving /metrics off the agents' listeners: no admin API.
            (None, None) if admin.listen.is_some() => Ok(None),
            (None, None) => Err(invalid(format!(
                "[admin] needs token_file (a file holding the token) or token; or leave [admin] out and set {ADMIN_TOKEN_ENV}"
            ))),
        }
    }

    /// Webhook keys and the SMTP password, from their files.
    fn read_alert_secrets(&mut self, text: &str, file: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: section_line(text, "alerts"),
            message,
        };
        for w in &mut self.alerts.webhook {
            if let Some(p) = &w.secret_file {
                w.secret = Some(
                    read_secret(&beside(file, p)).map_err(|e| invalid(format!("alerts.webhook secret_file {e}")))?,
                );
            }
            if let Some(ca) = &mut w.ca {
                *ca = beside(file, ca);
            }
        }
        if let Some(email) = &mut self.alerts.email
            && let Some(p) = &email.password_file
        {
            let path = beside(file, p);
            let raw = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("alerts.email password_file {}: {e}", path.display())))?;
            email.password = Some(raw.trim_end_matches(['\r', '\n']).to_string());
        }
        Ok(())
    }

    /// The fleet report tokens: this relay's own, and its sites'.
    fn read_fleet_tokens(&mut self, text: &str, file: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: section_line(text, "fleet"),
            message,
        };
        if let Some(p) = &self.fleet.report_token_file {
            self.fleet.report_token =
                Some(read_secret(&beside(file, p)).map_err(|e| invalid(format!("fleet.report_token_file {e}")))?);
        } else if self.fleet.report_upstream {
            return Err(invalid(
                "fleet.report_upstream needs fleet.report_token_file (the token the parent knows this site by)".into(),
            ));
        }
        for site in &mut self.fleet.site {
            site.token = Some(
                read_secret(&beside(file, &site.token_file))
                    .map_err(|e| invalid(format!("fleet.site {:?} token_file {e}", site.name)))?,
            );
        }
        Ok(())
    }

    /// Files the config names (TLS material) are relative to the config
    /// file, as an operator reading it expects.
    fn resolve_paths(&mut self, file: &str) {
        if let Some(tls) = &mut self.server.tls {
            for p in [Some(&mut tls.cert), Some(&mut tls.key), tls.client_ca.as_mut(), tls.client_crl.as_mut()]
                .into_iter()
                .flatten()
            {
                *p = beside(file, p);
            }
        }
        if let Some(p) = &mut self.log.access_file {
            *p = beside(file, p);
        }
        for u in &mut self.upstream {
            for p in [u.ca.as_mut(), u.client_cert.as_mut(), u.client_key.as_mut()].into_iter().flatten() {
                *p = beside(file, p);
            }
        }
    }

    pub fn role(&self) -> Role {
        if self.origin.is_some() { Role::Origin } else { Role::Relay }
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let invalid = |section: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: section_line(text, section),
            message,
        };
        match (&self.origin, self.upstream.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    "origin",
                    "both [origin] and [[upstream]] are set: a server is either an origin (serves a repository) or a relay (mirrors upstreams)".into(),
                ));
            }
            // An offline relay: no upstream, updated by `patchrelay import`.
            (None, true) if self.storage.is_some() && self.trust.is_some() => {}
            (None, true) => {
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    line: None,
                    message: "neither [origin] nor [[upstream]] is set: add `[origin] repository = \"...\"` to serve a published repository, `[[upstream]] url = \"...\"` to run a relay, or [storage] and [trust] alone for an offline relay that `patchrelay import` updates".into(),
                });
            }
            _ => {}
        }
        if self.role() == Role::Relay {
            if self.trust.is_none() {
                return Err(invalid(
                    "upstream",
                    "a relay needs [trust] public_key (the origin's key from `patchrelay keygen`) to verify what it mirrors".into(),
                ));
            }
            if self.storage.is_none() {
                return Err(invalid("upstream", "a relay needs [storage] dir for its cache".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstream {
            if !names.insert(u.display_name()) {
                return Err(invalid(
                    "upstream",
                    format!("two upstreams are named {:?}; give each a distinct `name`", u.display_name()),
                ));
            }
        }
        if self.sync.interval.0 < Duration::from_secs(1) {
            return Err(invalid("sync", "sync.interval must be at least 1s".into()));
        }
        if self.sync.retain == 0 || self.sync.prefetch_concurrency == 0 {
            return Err(invalid("sync", "sync.retain and sync.prefetch_concurrency must be at least 1".into()));
        }
        if let Some(s) = &self.storage
            && s.memory_object_max.0 > s.memory_cache.0
        {
            return Err(invalid("storage", "storage.memory_object_max is larger than storage.memory_cache".into()));
        }
        if self.limits.identity == crate::identity::IdentityKind::Cert
            && self.server.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            return Err(invalid(
                "limits",
                "limits.identity = \"cert\" needs client certificates: set [server.tls] client_ca (and cert, key)"
                    .into(),
            ));
        }
        if let Some(tls) = &self.server.tls
            && tls.client_ca.is_none()
            && (tls.client_auth.is_some() || tls.client_crl.is_some())
        {
            return Err(invalid(
                "server.tls",
                "server.tls client_auth and client_crl need client_ca (the CAs that issue agents' certificates)".into(),
            ));
        }
        if self.server.listener.iter().any(|l| l.tls == Some(true)) && self.server.tls.is_none() {
            return Err(invalid(
                "server.listener",
                "a [[server.listener]] has tls = true but there is no [server.tls] cert and key".into(),
            ));
        }
        let mut proxied = vec![(self.server.proxy_protocol, self.server.tls.is_some())];
        proxied.extend(
            self.server.listener.iter().map(|l| (l.proxy_protocol, l.tls.unwrap_or(self.server.tls.is_some()))),
        );
        if proxied.iter().any(|&(p, _)| p) && self.server.trusted_proxies.is_empty() {
            return Err(invalid(
                "server",
                "proxy_protocol needs server.trusted_proxies: the load balancers allowed to name clients".into(),
            ));
        }
        if proxied.iter().any(|&(p, tls)| p && tls) {
            return Err(invalid("server", "proxy_protocol is for plain HTTP listeners (the balancer terminates TLS); set tls = false on that listener".into()));
        }
        let mut addrs = vec![self.server.listen];
        addrs.extend(self.server.listener.iter().map(|l| l.listen));
        addrs.extend(self.admin.as_ref().and_then(|a| a.listen));
        for (i, a) in addrs.iter().enumerate() {
            if a.port() != 0 && addrs[..i].contains(a) {
                return Err(invalid(
                    "server",
                    format!("{a} is named twice among server.listen, [[server.listener]] and admin.listen"),
                ));
            }
        }
        for u in &self.upstream {
            if u.client_cert.is_some() != u.client_key.is_some() {
                return Err(invalid(
                    "upstream",
                    format!("upstream {}: client_cert and client_key go together", u.display_name()),
                ));
            }
            if !u.url.https && (u.ca.is_some() || u.client_cert.is_some() || u.server_name.is_some()) {
                return Err(invalid(
                    "upstream",
                    format!(
                        "upstream {}: ca, client_cert and server_name are for https:// upstreams",
                        u.display_name()
                    ),
                ));
            }
            if let Some(name) = &u.server_name
                && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err(invalid(
                    "upstream",
                    format!("upstream {}: server_name {name:?} is not a DNS name or an IP address", u.display_name()),
                ));
            }
        }
        if !self.limits.timezone.eq_ignore_ascii_case("utc")
            && let Err(e) = jiff::tz::TimeZone::get(&self.limits.timezone)
        {
            return Err(invalid("limits", format!("limits.timezone {:?}: {e}", self.limits.timezone)));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.limits.policy {
            if !names.insert(&p.name) {
                return Err(invalid("limits.policy", format!("two policies are named {:?}", p.name)));
            }
            if !p.agents.is_empty() && !p.cidrs.is_empty() {
                return Err(invalid(
                    "limits.policy",
                    format!(
                        "policy {:?} has both `agents` and `cidrs`: a policy matches by address or by id, not both (ids are chosen by the client, so one that also required an id could be escaped by sending another); make two policies",
                        p.name
                    ),
                ));
            }
        }
        if self.fleet.max_agents == 0 || self.fleet.report_interval.0 < Duration::from_secs(10) {
            return Err(invalid(
                "fleet",
                "fleet.max_agents must be at least 1 and fleet.report_interval at least 10s".into(),
            ));
        }
        let mut sites = std::collections::HashSet::new();
        for name in self.fleet.site.iter().map(|s| s.name.as_str()).chain(self.fleet.site_name.as_deref()) {
            if !crate::fleet::report::valid_site(name) {
                return Err(invalid("fleet", format!("site name {name:?}: use 1 to 64 of [0-9A-Za-z._-]")));
            }
        }
        for site in &self.fleet.site {
            if !sites.insert(&site.name) {
                return Err(invalid("fleet", format!("two [[fleet.site]] are named {:?}", site.name)));
            }
        }
        for w in &self.alerts.webhook {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) || w.url.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "alerts",
                    format!("alerts.webhook url {:?} is not an http:// or https:// URL", w.url),
                ));
            }
        }
        if let Some(e) = &self.alerts.email {
            if e.to.is_empty() {
                return Err(invalid("alerts.email", "alerts.email needs at least one address in `to`".into()));
            }
            for a in e.to.iter().chain(std::iter::once(&e.from)) {
                if a.parse::<lettre::Address>().is_err() {
                    return Err(invalid("alerts.email", format!("{a:?} is not an email address")));
                }
            }
            if e.server.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(invalid("alerts.email", format!("alerts.email server {:?}: write host:port", e.server)));
            }
            if e.username.is_some() != e.password_file.is_some() {
                return Err(invalid("alerts.email", "alerts.email username and password_file go together".into()));
            }
        }
        if !(0.0..=1.0).contains(&self.alerts.fill_error_rate) {
            return Err(invalid("alerts", "alerts.fill_error_rate is a fraction between 0 and 1".into()));
        }
        if self.delta.workers == 0 || self.delta.queue == 0 {
            return Err(invalid("delta", "delta.workers and delta.queue must be at least 1".into()));
        }
        if self.server.max_connections_per_worker == 0 {
            return Err(invalid("server", "server.max_connections_per_worker must be at least 1".into()));
        }
        if self.server.write_buffer.0 == 0 {
            return Err(invalid(
                "server",
                "server.write_buffer must be at least 1 byte (\"2KiB\" is the default)".into(),
            ));
        }
        Ok(())
    }
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The line of `[section]` or `[[section]]` in `text`, if present.
/// `path` as seen from the directory of config file `file`.
fn beside(file: &str, path: &Path) -> PathBuf {
    match Path::new(file).parent() {
        Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn section_line(text: &str, section: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim();
            t == format!("[{section}]") || t == format!("[[{section}]]")
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn relay(extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndir = \"/tmp/x\"\n[[upstream]]\nurl = \"http://127.0.0.1:9/\"\n[trust]\npublic_key = \"{KEY}\"\n{extra}"
        )
    }

    #[test]
    fn parses_a_relay() {
        let c = Config::from_toml(&relay("[sync]\ninterval = \"15m\"\n"), "t.toml").unwrap();
        assert_eq!(c.role(), Role::Relay);
        assert_eq!(c.sync.interval.0, Duration::from_secs(900));
        assert_eq!(c.upstream[0].url.base, "http://127.0.0.1:9");
        assert_eq!(c.upstream[0].url.join("v1/manifest"), "http://127.0.0.1:9/v1/manifest");
        assert_eq!(c.storage.unwrap().memory_cache.0, 256 << 20);
    }

    #[test]
    fn zero_write_buffer_is_refused() {
        // actix asserts on it at start; say so at check-config instead.
        let text = relay("").replace("[server]\n", "[server]\nwrite_buffer = 0\n");
        let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("server.write_buffer"), "{err}");
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = Config::from_toml(&relay("[sync]\nintervall = \"1h\"\n"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 10") && err.contains("intervall"), "{err}");
        let err = Config::from_toml(&relay("[sync]\ninterval = \"soon\"\n"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 10") && err.contains("not a duration"), "{err}");
        let err = Config::from_toml(&relay("").replace(KEY, "nope"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 8") && err.contains("public key"), "{err}");
        let err = Config::from_toml(&relay("").replace("http://", "ftp://"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 6") && err.contains("http://"), "{err}");
        let err = Config::from_toml(&relay("[origin]\nrepository = \"/r\"\n"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 9") && err.contains("either an origin"), "{err}");
        let err = Config::from_toml("[server]\n", "t.toml").unwrap_err().to_string();
        assert!(err.contains("neither [origin] nor [[upstream]]"), "{err}");
        let err = Config::from_toml("[storage]\ndir = 3\n", "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = Config::from_toml("this is not toml", "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        let c = Config::from_toml(
            &relay("")
                .replace("dir = \"/tmp/x\"", "dir = \"/tmp/x\"\nmemory_cache = \"1GiB\"\nmemory_object_max = 4096"),
            "t",
        )
        .unwrap();
        let s = c.storage.unwrap();
        assert_eq!((s.memory_cache.0, s.memory_object_max.0), (1 << 30, 4096));
    }
}
