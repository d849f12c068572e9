//! Wiring: build the state for the configured role, start the actors and the
//! HTTP server, and hand back a handle to stop them.
//!
//! Must run inside an actix `System` (the actors live on its arbiter); `serve`
//! and the tests both provide one.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix::{Actor, Addr};
use actix_web::{App, HttpServer, web};

use crate::actors::deltas::{DeltaBuilder, DeltaService, Objects};
use crate::actors::housekeeping::{Housekeeping, RelayParts};
use crate::actors::prefetch::Prefetcher;
use crate::actors::reload::OriginReload;
use crate::actors::status::StatusSource;
use crate::actors::sync::{RelaySync, SyncContext};
use crate::actors::{Stop, SyncNow};
use crate::config::{Config, Role};
use crate::delta::EncodeOptions;
use crate::fill::Filler;
use crate::fleet::Fleet;
use crate::http::conn::{ConnectionRules, PerAddress};
use crate::http::{self, AppState, Services};
use crate::limits::Limits;
use crate::repo::RepoDir;
use crate::source::Source;
use crate::state::Published;
use crate::store::db::StateDb;
use crate::store::{MemoryCache, Store, StoreOptions, WeakStore};
use crate::telemetry;
use crate::tls::{PeerTls, ServerTls};
use crate::upstream::Upstreams;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source} (is another server using the port?)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start metrics: {0}")]
    Metrics(String),
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::upstream::TlsSetupError),
    #[error("[server.tls]: {0}")]
    ListenerTls(#[from] crate::tls::TlsError),
    #[error("origin: {0} (run `patchrelay publish` into it first)")]
    Repository(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

enum ControlPlane {
    /// The reload actor, and housekeeping when the origin keeps deltas.
    Origin(Addr<OriginReload>, Option<Addr<Housekeeping>>),
    Relay(Addr<RelaySync>, Addr<Housekeeping>),
}

/// One address the server listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Bound {
    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }
}

/// The admin listener (`[admin] listen`): its own small server.
struct AdminServer {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    task: actix_rt::task::JoinHandle<std::io::Result<()>>,
}

/// A started server.
pub struct RunningServer {
    /// The first listener's address (`server.listen`).
    pub addr: SocketAddr,
    /// Every listener, `server.listen` first.
    pub listeners: Vec<Bound>,
    pub published: Arc<Published>,
    /// The listeners' TLS, when `[server.tls]` is set.
    pub tls: Option<Arc<ServerTls>>,
    /// The agents' servers: one for plain and TLS listeners, one for those
    /// reading the PROXY protocol (either may be absent).
    servers: Vec<(actix_web::dev::ServerHandle, actix_rt::task::JoinHandle<std::io::Result<()>>)>,
    admin: Option<AdminServer>,
    /// The TLS files' watcher (or the SIGHUP handler).
    watch: Option<actix_rt::task::JoinHandle<()>>,
    /// The access log's writer, flushed when the servers are done.
    access: Option<http::access::AccessSink>,
    control: ControlPlane,
    /// The store, to wait for its directory lock's release on `stop`.
    store: Option<WeakStore>,
    /// Background tasks of this server (the fleet's upkeep), and those on
    /// the upstream runtime (its reports): stopped with it.
    tasks: Vec<actix_rt::task::JoinHandle<()>>,
    reporters: Vec<tokio::task::JoinHandle<()>>,
    /// What is written once more as the server stops.
    last_flush: Option<(Arc<Fleet>, StateDb)>,
    /// The event log and the prefetcher (the operator's pins), which let
    /// go of the state database at stop.
    events: Arc<crate::events::Events>,
    prefetcher: Option<Arc<Prefetcher>>,
}

impl RunningServer {
    /// The first listener's URL: `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        self.listeners[0].url()
    }

    /// `http://addr` of the admin listener, when `[admin] listen` is set.
    pub fn admin_url(&self) -> Option<String> {
        self.admin.as_ref().map(|a| format!("http://{}", a.addr))
    }

    /// Stop accepting, finish requests in flight (gracefully, up to
    /// `server.shutdown_grace`) or drop them, and wait (up to a few seconds)
    /// until the store is closed, so that the same `storage.dir` can be
    /// opened again in this process.
    pub async fn stop(self, graceful: bool) {
        // All at once: each may take up to the grace.
        let mut stopping: Vec<_> = self.servers.iter().map(|(h, _)| h.stop(graceful)).collect();
        if let Some(admin) = &self.admin {
            stopping.push(admin.handle.stop(graceful));
        }
        futures_util::future::join_all(stopping).await;
        if let Some(w) = &self.watch {
            w.abort();
        }
        self.stop_actors();
        self.events.release();
        if let Some(p) = &self.prefetcher {
            p.release();
        }
        finish_tasks(&self.tasks, &self.reporters, self.last_flush.as_ref()).await;
        for (_, task) in self.servers {
            let _ = task.await;
        }
        if let Some(access) = self.access {
            access.finish(std::time::Duration::from_secs(2)).await;
        }
        if let Some(store) = &self.store {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while store.is_open() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if store.is_open() {
                tracing::warn!("the store is still in use 5 s after the server stopped");
            }
        }
    }

    /// Wait until the HTTP server stops (on SIGINT/SIGTERM when signals are
    /// on: SIGTERM lets downloads in flight finish, up to
    /// `server.shutdown_grace`).
    pub async fn wait(self) -> std::io::Result<()> {
        let RunningServer {
            servers,
            control,
            admin,
            watch,
            access,
            tasks,
            reporters,
            last_flush,
            events,
            prefetcher,
            ..
        } = self;
        let mut result = Ok(());
        for (_, task) in servers {
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e)),
            };
            result = result.and(r);
        }
        if let Some(admin) = admin {
            admin.handle.stop(true).await;
            let _ = admin.task.await;
        }
        if let Some(w) = watch {
            w.abort();
        }
        stop_actors(&control);
        events.release();
        if let Some(p) = &prefetcher {
            p.release();
        }
        finish_tasks(&tasks, &reporters, last_flush.as_ref()).await;
        if let Some(access) = access {
            access.finish(std::time::Duration::from_secs(2)).await;
        }
        result
    }

    fn stop_actors(&self) {
        stop_actors(&self.control);
    }
}

/// Stop the background tasks, and write what the fleet learnt since the
/// last flush.
async fn finish_tasks(
    tasks: &[actix_rt::task::JoinHandle<()>],
    reporters: &[tokio::task::JoinHandle<()>],
    last: Option<&(Arc<Fleet>, StateDb)>,
) {
    for t in tasks {
        t.abort();
    }
    for t in reporters {
        t.abort();
    }
    if let Some((fleet, db)) = last {
        let (fleet, db2) = (fleet.clone(), db.clone());
        match crate::telemetry::spawn_blocking(move || crate::fleet::store::flush(&db2, &fleet)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the fleet inventory as the server stops"),
            Err(_) => {}
        }
        // The aborted tasks let go of the database as they are dropped: wait,
        // so that the same storage.dir can be opened again in this process.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while db.is_shared() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// This machine's name (a site's default name in its parent's console).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| crate::fleet::report::valid_site(h))
        .unwrap_or_else(|| "site".into())
}

fn stop_actors(control: &ControlPlane) {
    match control {
        ControlPlane::Origin(a, h) => {
            a.do_send(Stop);
            if let Some(h) = h {
                h.do_send(Stop);
            }
        }
        ControlPlane::Relay(a, h) => {
            a.do_send(Stop);
            h.do_send(Stop);
        }
    }
}

/// Options that are not config keys because only embedders (tests, the demo) set them.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Let actix-web handle SIGINT/SIGTERM (true for `serve`).
    pub handle_signals: bool,
}

fn open_store(config: &Config, storage: &crate::config::StorageConfig) -> Result<Store, StartError> {
    let opts = StoreOptions {
        memory_cache: storage.memory_cache.0,
        memory_object_max: storage.memory_object_max.0,
        max_size: storage.max_size.map(|s| s.0),
        mmap: storage.mmap,
    };
    let (store, report) = Store::open(&storage.dir, &opts)?;
    tracing::info!(
        role = ?config.role(),
        dir = %storage.dir.display(),
        objects = report.objects,
        bytes = report.bytes,
        partial_files = report.partial_files,
        temp_files_removed = report.temp_files_removed,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "store opened"
    );
    Ok(store)
}

fn open_deltas(config: &Config, store: Store, objects: Objects) -> Result<Arc<DeltaService>, StartError> {
    let builder = DeltaBuilder::start(config.delta.workers, EncodeOptions::default());
    DeltaService::open(store, objects, builder, config.delta.queue, config.delta.max_target_size.0)
        .map_err(|e| StartError::Config(format!("cannot open the delta index: {e}")))
}

/// Start a server for `config`.
pub async fn start(config: &Config, opts: StartOptions) -> Result<RunningServer, StartError> {
    // Everything this server records goes to its own recorder: set-up here,
    // and its threads and tasks after (`telemetry::scope`).
    let (scope, metrics) = telemetry::new_scope(config.metrics.enabled).map_err(StartError::Metrics)?;
    let _in = telemetry::enter(scope);
    let published = Published::new();
    let mut weak_store = None;
    let mut relay_upstreams: Option<Arc<Upstreams>> = None;
    let mut reporters: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let events = crate::events::Events::new(config.alerts.repeat.0);
    // The store the watcher looks at (a relay's, or an origin's delta store).
    let mut watched_store: Option<Store> = None;
    let (source, control, sync, status, deltas) = match config.role() {
        Role::Origin => {
            let origin = config.origin.as_ref().ok_or_else(|| StartError::Config("no [origin]".into()))?;
            let repo = RepoDir::new(&origin.repository);
            let key = config.trust.as_ref().map(|t| t.public_key.0.clone());
            // An origin keeps the deltas it computes in a store of its own, if
            // it has [storage]; without one it serves full files only.
            let (deltas, delta_store) = match (&config.storage, config.delta.enabled) {
                (Some(storage), true) => {
                    let store = open_store(config, storage)?;
                    weak_store = Some(store.downgrade());
                    watched_store = Some(store.clone());
                    (Some(open_deltas(config, store.clone(), Objects::Origin(repo.clone()))?), Some(store))
                }
                _ => (None, None),
            };
            let mut reload = OriginReload::new(
                repo.clone(),
                key,
                published.clone(),
                origin.reload_interval.0,
                deltas.clone().map(|d| (d, config.sync.retain)),
            );
            reload.reload().map_err(|e| StartError::Repository(format!("{}: {e}", origin.repository.display())))?;
            let (cache, max_object, mmap) = config
                .storage
                .as_ref()
                .map(|s| (s.memory_cache.0, s.memory_object_max.0, s.mmap))
                .unwrap_or((256 << 20, 64 << 10, true));
            let addr = reload.start();
            // The delta store's budget, precompute and index pruning.
            let housekeeping = delta_store.map(|store| {
                Housekeeping::new(store, None, published.clone(), deltas.clone().map(|d| (d, config.sync.retain)))
                    .start()
            });
            let sync = addr.clone().recipient::<SyncNow>();
            (
                Source::Origin { repo, memory: MemoryCache::new(cache, max_object, mmap) },
                ControlPlane::Origin(addr, housekeeping),
                sync,
                None,
                deltas,
            )
        }
        Role::Relay => {
            let storage =
                config.storage.as_ref().ok_or_else(|| StartError::Config("a relay needs [storage]".into()))?;
            let trust = config.trust.as_ref().ok_or_else(|| StartError::Config("a relay needs [trust]".into()))?;
            let store = open_store(config, storage)?;
            weak_store = Some(store.downgrade());
            watched_store = Some(store.clone());
            let upstreams = Arc::new(Upstreams::new(&config.upstream)?);
            relay_upstreams = Some(upstreams.clone());
            let filler = Filler::new(store.clone(), upstreams.clone(), storage.memory_cache.0);
            let deltas = if config.delta.enabled {
                Some(open_deltas(config, store.clone(), Objects::Relay(filler.clone()))?)
            } else {
                None
            };
            let prefetcher = Prefetcher::new(filler.clone(), config.sync.retain, config.sync.prefetch_concurrency);
            let sync_ctx = SyncContext::new(
                published.clone(),
                upstreams,
                trust.public_key.0.clone(),
                prefetcher.clone(),
                store.clone(),
                deltas.clone(),
            )
            .with_events(events.clone());
            sync_ctx.restore();
            let addr = RelaySync::new(sync_ctx, config.sync.interval.0).start();
            let housekeeping = Housekeeping::new(
                store.clone(),
                Some(RelayParts { filler: filler.clone(), prefetcher: prefetcher.clone() }),
                published.clone(),
                deltas.clone().map(|d| (d, config.sync.retain)),
            )
            .start();
            let sync = addr.clone().recipient::<SyncNow>();
            let status = Arc::new(StatusSource { published: published.clone(), filler: filler.clone(), prefetcher });
            (Source::Relay { store, filler }, ControlPlane::Relay(addr, housekeeping), sync, Some(status), deltas)
        }
    };

    let limits = Limits::new(&config.limits, &config.server).map_err(StartError::Config)?;
    if let Some(limits) = limits {
        // Idle agents are forgotten on time, not only as lookups go by.
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(limits.sweep_period());
            loop {
                tick.tick().await;
                limits.sweep_idle();
            }
        });
    }
    let mut state = AppState::new(
        published.clone(),
        source,
        config.server.manifest_max_age.0,
        config.admin_token.as_ref().map(|t| t.0.clone()),
        Services { sync: Some(sync), status, deltas, limits },
        metrics.clone(),
    );
    state.max_piece = http::body::piece_cap(config.server.send_buffer.map(|b| b.0));
    // State that outlives a restart: in storage.dir/state, where there is one.
    let db = match &config.storage {
        Some(s) => {
            let dir = s.dir.join("state");
            std::fs::create_dir_all(&dir).map_err(|source| {
                StartError::Store(crate::store::StoreError::Io {
                    action: "cannot create directory",
                    path: dir.clone(),
                    source,
                })
            })?;
            Some(StateDb::open(&dir).map_err(|e| StartError::Config(e.to_string()))?)
        }
        None => None,
    };
    let mut tasks = Vec::new();
    if let Some(db) = &db {
        events.keep_in(db.clone());
        if let Some(status) = &state.status {
            status.prefetcher.keep_pins_in(db.clone());
        }
    }
    let from = crate::alerts::Sender {
        name: config.fleet.site_name.clone().unwrap_or_else(host_name),
        role: match config.role() {
            Role::Origin => "origin",
            Role::Relay => "relay",
        },
    };
    reporters
        .extend(crate::alerts::start(&config.alerts, &events, from).map_err(|e| StartError::Config(e.to_string()))?);
    let watched = crate::alerts::watch::Watched {
        published: published.clone(),
        events: events.clone(),
        relay: state.status.clone(),
        store: watched_store,
        disk: config
            .storage
            .as_ref()
            .map(|s| s.dir.clone())
            .or_else(|| config.origin.as_ref().map(|o| o.repository.clone())),
    };
    tasks.push(crate::alerts::watch::Watcher::new(watched, &config.alerts).spawn());
    state.events = Some(events.clone());
    let status_source = state.status.clone();
    let fleet = if config.fleet.enabled {
        let fleet = Arc::new(Fleet::new(config.fleet.max_agents, config.fleet.stale_after.0));
        if let Some(db) = &db {
            let started = std::time::Instant::now();
            match crate::fleet::store::load(db, &fleet) {
                Ok(n) => tracing::info!(
                    agents = n,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "fleet inventory read"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot read the fleet inventory; starting with none"),
            }
        }
        tasks.push(crate::fleet::store::spawn_upkeep(db.clone(), fleet.clone()));
        if let (true, Some(upstreams)) = (config.fleet.report_upstream, &relay_upstreams) {
            let site = config.fleet.site_name.clone().unwrap_or_else(host_name);
            let token = config.fleet.report_token.as_ref().map(|t| t.0.clone());
            let reporter = crate::fleet::report::spawn_reporter(
                fleet.clone(),
                published.clone(),
                upstreams.clone(),
                site,
                token,
                config.fleet.report_interval.0,
            );
            reporters.push(reporter);
        }
        Some(fleet)
    } else {
        None
    };
    state.identify = crate::identity::Identify::from_config(config);
    state.fleet = fleet.clone();
    state.site_tokens =
        config.fleet.site.iter().filter_map(|s| Some((s.name.clone(), s.token.as_ref()?.0.clone()))).collect();
    let access = match config.log.access {
        crate::config::AccessFormat::Off => None,
        format => Some(
            http::access::AccessSink::start(
                format,
                config.log.access_file.clone(),
                config.server.trusted_proxies.clone(),
                config.server.forwarded_header,
                match config.limits.identity {
                    // The certificate names the agent; a header is only the client's word.
                    crate::identity::IdentityKind::Cert => None,
                    _ => Some(config.limits.agent_header.0.clone()),
                },
            )
            .map_err(|e| StartError::Config(e.to_string()))?,
        ),
    };
    state.access_log = access.is_some();
    let state = web::Data::new(state);
    tasks.push(http::console::spawn_sampler(state.clone()));
    let tls = config.server.tls.as_ref().map(ServerTls::load).transpose()?;
    let rustls = tls.as_ref().map(|t| t.server_config()).transpose()?;
    let mut wanted = vec![(config.server.listen, tls.is_some(), config.server.proxy_protocol)];
    wanted.extend(config.server.listener.iter().map(|l| (l.listen, l.tls.unwrap_or(tls.is_some()), l.proxy_protocol)));
    let mut bound = Vec::with_capacity(wanted.len());
    let (mut sockets, mut proxied) = (Vec::new(), Vec::new());
    for (want, is_tls, proxy_protocol) in wanted {
        let listener = TcpListener::bind(want).map_err(|source| StartError::Listen { addr: want, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: want, source })?;
        let b = Bound { addr, tls: is_tls };
        bound.push(b);
        if proxy_protocol { proxied.push((listener, b)) } else { sockets.push((listener, b)) }
    }
    let addr = bound[0].addr;
    // Every address is bound before any server runs: a failure leaves
    // nothing half started.
    let admin_listener = match config.admin.as_ref().and_then(|a| a.listen) {
        None => None,
        Some(want) => Some(TcpListener::bind(want).map_err(|source| StartError::Listen { addr: want, source })?),
    };
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        n => n,
    };
    let rules = ConnectionRules {
        send_buffer: config.server.send_buffer.map(|b| b.0 as usize),
        send_timeout: Some(config.server.send_timeout.0).filter(|t| !t.is_zero()),
        per_address: match config.server.max_connections_per_address {
            0 => None,
            n => Some(PerAddress::new(n, &config.server.trusted_proxies)),
        },
    };
    let cert_name = (config.limits.identity == crate::identity::IdentityKind::Cert).then_some(config.limits.cert_name);
    let admin_apart = config.admin.as_ref().and_then(|a| a.listen);
    let agents_state = state.clone();
    let proxied_rules = rules.clone();
    let agents_access = access.clone();
    let mut server = HttpServer::new(move || {
        // Runs on each worker thread as it starts: the worker is this server's.
        telemetry::scope::set_thread(scope);
        App::new()
            .app_data(agents_state.clone())
            .configure(|cfg| http::configure(cfg, admin_apart.is_none()))
            .wrap(access_log(agents_access.as_ref()))
    })
    .on_connect(move |conn, ext| {
        if let Some(tcp) = conn.downcast_ref::<actix_rt::net::TcpStream>() {
            rules.apply(tcp, ext);
        } else if let Some(tls) =
            conn.downcast_ref::<actix_tls::accept::rustls_0_23::TlsStream<actix_rt::net::TcpStream>>()
        {
            let (tcp, session) = tls.get_ref();
            rules.apply(tcp, ext);
            // The certificate was verified in the handshake; its name is
            // read once here, not per request.
            let name = cert_name.and_then(|which| crate::tls::peer_name(session.peer_certificates()?.first()?, which));
            ext.insert(PeerTls { name });
        }
    })
    .workers(workers)
    .backlog(config.server.backlog)
    .max_connections(config.server.max_connections_per_worker)
    .keep_alive(config.server.keep_alive.0)
    .h1_write_buffer_size(config.server.write_buffer.0 as usize)
    .shutdown_timeout(whole_seconds(config.server.shutdown_grace.0));
    let mut servers = Vec::new();
    if !sockets.is_empty() {
        for (listener, b) in sockets {
            server = match (&rustls, b.tls) {
                (Some(rustls), true) => server.listen_rustls_0_23(listener, rustls.clone()),
                _ => server.listen(listener),
            }
            .map_err(|source| StartError::Listen { addr: b.addr, source })?;
        }
        if !opts.handle_signals {
            server = server.disable_signals();
        }
        let server = server.run();
        servers.push((server.handle(), actix_rt::spawn(server)));
    }
    if !proxied.is_empty() {
        let behind = Behind {
            state: state.clone(),
            scope,
            rules: proxied_rules,
            trusted: Arc::new(config.server.trusted_proxies.clone()),
            admin_here: admin_apart.is_none(),
            access: access.clone(),
        };
        let server = start_proxied(proxied, behind, config, workers, opts.handle_signals)?;
        servers.push((server.handle(), actix_rt::spawn(server)));
    }
    if let Some(metrics) = metrics {
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(telemetry::upkeep_interval());
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
    }
    let admin = match admin_apart {
        None => None,
        Some(_) => admin_listener.map(|l| start_admin(l, state, scope, config.server.shutdown_grace.0)).transpose()?,
    };
    let watch = match (&tls, opts.handle_signals) {
        (Some(t), _) => Some(t.watch(opts.handle_signals)),
        // SIGHUP (systemctl reload, logrotate) must not end a relay that has
        // nothing to reload: its default action is to exit.
        (None, true) => Some(ignore_sighup()),
        (None, false) => None,
    };
    for b in &bound {
        tracing::info!(role = ?config.role(), "patchrelay listening on {}", b.url());
    }
    if let Some(a) = &admin {
        tracing::info!("admin API and metrics on http://{}", a.addr);
    }
    Ok(RunningServer {
        addr,
        listeners: bound,
        published,
        tls,
        servers,
        admin,
        watch,
        access,
        control,
        store: weak_store,
        tasks,
        reporters,
        last_flush: fleet.zip(db),
        events,
        prefetcher: status_source.map(|s| s.prefetcher.clone()),
    })
}

/// The admin listener: `/admin/*`, `/metrics` and the health checks, plain
/// HTTP, one worker; stopped with the main server.
fn start_admin(
    listener: TcpListener,
    state: web::Data<AppState>,
    scope: telemetry::scope::Scope,
    grace: std::time::Duration,
) -> Result<AdminServer, StartError> {
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    let server = HttpServer::new(move || {
        telemetry::scope::set_thread(scope);
        App::new().app_data(state.clone()).configure(http::configure_admin)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(whole_seconds(grace))
    .listen(listener)
    .map_err(|source| StartError::Listen { addr, source })?
    .run();
    let handle = server.handle();
    let task = actix_rt::spawn(server);
    Ok(AdminServer { addr, handle, task })
}

/// What the PROXY protocol listeners share with the others.
struct Behind {
    state: web::Data<AppState>,
    scope: telemetry::scope::Scope,
    rules: ConnectionRules,
    trusted: Arc<Vec<ipnet::IpNet>>,
    admin_here: bool,
    access: Option<http::access::AccessSink>,
}

/// The access log middleware: only in the app when the log is on (a
/// disabled `Condition` is a branch per request, no allocation).
fn access_log(sink: Option<&http::access::AccessSink>) -> actix_web::middleware::Condition<http::access::AccessLog> {
    match sink {
        Some(s) => actix_web::middleware::Condition::new(true, s.middleware()),
        None => actix_web::middleware::Condition::new(false, http::access::AccessLog::off()),
    }
}

/// The listeners that read a PROXY header first (`proxy_protocol = true`):
/// their own actix server (actix-web's `HttpServer` has no hook before
/// HTTP), serving the same app. The header's client address is handed to
/// HTTP as the connection's peer, so everything downstream sees the agent.
fn start_proxied(
    listeners: Vec<(TcpListener, Bound)>,
    behind: Behind,
    config: &Config,
    workers: usize,
    handle_signals: bool,
) -> Result<actix_web::dev::Server, StartError> {
    use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _, fn_service, map_config};
    let mut builder = actix_server::Server::build()
        .workers(workers)
        .backlog(config.server.backlog)
        .max_concurrent_connections(config.server.max_connections_per_worker)
        .shutdown_timeout(whole_seconds(config.server.shutdown_grace.0));
    if !handle_signals {
        builder = builder.disable_signals();
    }
    let shutdown = builder.graceful_shutdown_signal();
    let (keep_alive, write_buffer) = (config.server.keep_alive.0, config.server.write_buffer.0 as usize);
    let behind = Arc::new(behind);
    for (listener, b) in listeners {
        let (behind, shutdown) = (behind.clone(), shutdown.clone());
        builder = builder
            .listen(format!("patchrelay-proxy-protocol-{}", b.addr), listener, move || {
                telemetry::scope::set_thread(behind.scope);
                let (state, admin_here, rules) = (behind.state.clone(), behind.admin_here, behind.rules.clone());
                let app = App::new()
                    .app_data(state)
                    .configure(move |cfg| http::configure(cfg, admin_here))
                    .wrap(access_log(behind.access.as_ref()));
                let trusted = behind.trusted.clone();
                let shutdown = shutdown.clone();
                fn_service(move |mut io: actix_rt::net::TcpStream| {
                    let trusted = trusted.clone();
                    async move {
                        match http::proxy::accept(&mut io, &trusted).await {
                            Ok(client) => Ok((
                                http::proxy::Proxied { tcp: io, client },
                                actix_http::Protocol::Http1,
                                Some(client),
                            )),
                            Err(e) => {
                                tracing::debug!(error = %e, "connection closed: PROXY header refused");
                                Err(actix_http::error::DispatchError::Io(std::io::Error::other(e)))
                            }
                        }
                    }
                })
                .and_then(
                    actix_http::HttpService::build()
                        .graceful_shutdown_signal(move || {
                            let signal = shutdown.clone();
                            async move { signal.notified().await }
                        })
                        .keep_alive(keep_alive)
                        .client_request_timeout(std::time::Duration::from_secs(5))
                        .client_disconnect_timeout(std::time::Duration::from_secs(1))
                        .h1_write_buffer_size(write_buffer)
                        .local_addr(b.addr)
                        // Counted against the agent's address, not the balancer's.
                        .on_connect_ext(move |io: &http::proxy::Proxied, ext| {
                            rules.apply_as(&io.tcp, io.client.ip(), ext)
                        })
                        .finish(map_config(
                            app.into_factory().map_err(|e: actix_web::Error| e.error_response()),
                            |_| actix_web::dev::AppConfig::default(),
                        )),
                )
            })
            .map_err(|source| StartError::Listen { addr: b.addr, source })?;
    }
    Ok(builder.run())
}

/// actix counts its shutdown timeout in whole seconds: a grace is rounded up
/// ("500ms" is a second, not nothing).
fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Take SIGHUP and say there is nothing to reload (no `[server.tls]`).
fn ignore_sighup() -> actix_rt::task::JoinHandle<()> {
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    actix_rt::spawn(async move {
        match hup {
            Ok(mut hup) => {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: nothing to reload (no [server.tls])");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    })
}
