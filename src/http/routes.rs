//! Route table and handlers for HTTP API v1.
//!
//! Path segments are parsed into their types (a [`Digest`], a component name, a
//! version) before anything else happens; none of them is ever joined onto a
//! file path as a string, so no request can reach outside the store.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::Bytes;

use super::error::ApiError;
use super::respond::{self, Representation, ResponseCtx};
use super::{AppState, Route};
use crate::actors::SyncNow;
use crate::delta::plan;
use crate::digest::Digest;
use crate::limits::{Caller, Limits, Permit};
use crate::repo::catalog::{Catalog, ObjectInfo};
use crate::source::{Check, Content, Kept, Target};
use crate::state::unix_now;
use crate::store::Blob;
use crate::telemetry;

fn get_head<F, Args>(path: &str, f: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path).route(web::get().to(f.clone())).route(web::head().to(f))
}

/// The agents' listeners; with `admin`, `/admin/*` and `/metrics` too
/// (otherwise they are on the admin listener only, and 404 here).
pub fn configure(cfg: &mut web::ServiceConfig, admin: bool) {
    // Fixed paths go through actix's router (a string compare each). Paths
    // with variable segments go to `dispatch`, which splits them itself:
    // actix matches such patterns with regular expressions, which cost a fifth
    // of the CPU of serving a small cached object.
    cfg.service(get_head("/v1/manifest", manifest)).service(get_head("/v1/manifest.sig", signature));
    if admin {
        admin_routes(cfg);
    }
    // Downstream relays report where they fetch (their upstream URL), also
    // when the admin API has a listener of its own; a site's token only
    // files its report.
    cfg.service(fleet_report());
    cfg.service(get_head("/healthz", healthz)).service(get_head("/readyz", readyz)).default_service(web::to(dispatch));
}

/// The admin listener (`[admin] listen`): the admin API, metrics and the
/// health checks, nothing an agent downloads.
pub fn configure_admin(cfg: &mut web::ServiceConfig) {
    admin_routes(cfg);
    cfg.service(fleet_report());
    cfg.service(get_head("/healthz", healthz)).service(get_head("/readyz", readyz));
}

fn fleet_report() -> actix_web::Resource {
    web::resource("/admin/fleet/report")
        .app_data(web::PayloadConfig::new(crate::fleet::report::MAX_REPORT))
        .route(web::post().to(super::fleet::report))
}

fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/sync").route(web::post().to(admin_sync)))
        .service(web::resource("/admin/status").route(web::get().to(admin_status)))
        .service(web::resource("/admin/fleet").route(web::get().to(super::fleet::summary)))
        .service(web::resource("/admin/fleet/agents").route(web::get().to(super::fleet::agents)))
        .service(web::resource("/admin/events").route(web::get().to(super::console::events::admin_events)));
    super::console::configure(cfg);
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)));
}

/// Count the request under its route and turn errors into responses.
pub(super) fn finish(state: &AppState, route: Route, result: Result<HttpResponse, ApiError>) -> HttpResponse {
    let res = result.unwrap_or_else(|e| e.error_response());
    state.route(route).count(res.status());
    res
}

/// Where the bytes for a representation come from.
enum Bytesource {
    Memory(Bytes),
    Target(Target),
    /// A stored delta.
    Delta(Digest),
}

/// A body's bytes before admission: here already, or still to be fetched.
enum Have {
    Here(Content),
    Missing(Target),
}

/// Who is asking, when limits apply. Worked out as the request comes in, so
/// the agent's state is on its way into the CPU cache while the request is
/// routed (`limits::Caller`).
fn caller(req: &HttpRequest, state: &AppState) -> Option<Caller> {
    // Only a GET can be a download (HEAD sends no body).
    let limits = state.limits.filter(|_| req.method() == actix_web::http::Method::GET)?;
    Some(limits.caller(peer_ip(req), req.headers(), cert_name(req, limits)))
}

/// Whether `blob` would be mapped bytes that this connection copies in user
/// space (`respond::slice`); looked up only for mapped objects.
fn copies(req: &HttpRequest, blob: Option<&Content>) -> bool {
    matches!(blob, Some(Content::Stored(Blob::Mapped(_)))) && req.conn_data::<crate::tls::PeerTls>().is_some()
}

/// The agent's name from its client certificate, when `limits.identity =
/// "cert"` (otherwise nothing is looked up).
fn cert_name<'r>(req: &'r HttpRequest, limits: &Limits) -> Option<&'r [u8]> {
    if !limits.by_certificate() {
        return None;
    }
    req.conn_data::<crate::tls::PeerTls>().and_then(|p| p.name.as_deref()).map(str::as_bytes)
}

fn peer_ip(req: &HttpRequest) -> std::net::IpAddr {
    req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
}

/// How a download is admitted under the limits.
enum Admission {
    /// In `serve`, once it knows a body is due (and whether it can go at once).
    Later(Option<Caller>),
    /// Already, before work that only a download should cause (a delta
    /// build): the permit, if a policy applies. Dropped if no body is sent.
    Done(Option<Permit>),
}

async fn serve(
    req: &HttpRequest,
    state: &AppState,
    route: Route,
    admission: Admission,
    rep: Representation,
    src: Bytesource,
) -> Result<HttpResponse, ApiError> {
    let caller = match admission {
        Admission::Later(caller) => caller,
        Admission::Done(permit) => return serve_admitted(req, state, route, permit, rep, src).await,
    };
    let decision = respond::decide(req, &rep)?;
    let kept = src.kept();
    let needs_body = respond::needs_body(req, &decision);
    // What is already here is looked up first (nothing is fetched for it), so
    // that admission knows whether a small body can go at once.
    let have = if needs_body {
        Some(match src {
            Bytesource::Memory(b) => Have::Here(Content::Stored(Blob::Memory(b))),
            Bytesource::Target(t) => match state.source.stored(&t)? {
                Some(blob) => Have::Here(Content::Stored(blob)),
                None => Have::Missing(t),
            },
            Bytesource::Delta(d) => Have::Here(stored_delta(state, &d)?),
        })
    } else {
        None
    };
    if state.access_log {
        let status = match &have {
            Some(Have::Missing(_)) => super::access::CacheStatus::Miss,
            _ => super::access::CacheStatus::Hit,
        };
        actix_web::HttpMessage::extensions_mut(req).insert(status);
    }
    // Downloads (not the manifest or a plan) count against the agent's limits;
    // refused ones are turned away before anything is fetched.
    let permit = match (state.limits, needs_body, route) {
        (Some(limits), true, Route::Object | Route::Version | Route::Latest | Route::Delta) => {
            let caller = caller.unwrap_or_else(|| limits.caller(peer_ip(req), req.headers(), cert_name(req, limits)));
            let here = match &have {
                Some(Have::Here(c)) => Some(c),
                _ => None,
            };
            let whole = respond::goes_whole(&rep, &decision, here).then_some(rep.len);
            limits.admit(caller, rep.critical, whole).map_err(ApiError::Limited)?
        }
        _ => None,
    };
    let blob = match have {
        None => None,
        Some(Have::Here(content)) => Some(content),
        Some(Have::Missing(t)) => Some(state.source.fill(&t).await?),
    };
    let ctx = ResponseCtx {
        boundary: &state.boundary,
        sent_counter: state.route(route).bytes,
        permit,
        max_piece: state.max_piece,
        on_short: checker(state, blob.as_ref(), kept),
        copies: copies(req, blob.as_ref()),
    };
    Ok(respond::build(&rep, decision, blob.as_ref(), ctx))
}

impl Bytesource {
    fn kept(&self) -> Option<Kept> {
        match self {
            Bytesource::Memory(_) => None,
            Bytesource::Target(t) => Some(Kept::Target(*t)),
            Bytesource::Delta(d) => Some(Kept::Delta(*d)),
        }
    }
}

/// For a body read from a stored file or mapping, what checks the object
/// when the response ends early (`source::Check`).
fn checker(state: &AppState, blob: Option<&Content>, kept: Option<Kept>) -> Option<Check> {
    if !matches!(blob, Some(Content::Stored(Blob::Mapped(_) | Blob::File { .. }))) {
        return None;
    }
    Some(Check { checks: state.checks, kept: kept? })
}

/// [`serve`] for a download admitted already (see [`Admission::Done`]).
async fn serve_admitted(
    req: &HttpRequest,
    state: &AppState,
    route: Route,
    permit: Option<Permit>,
    rep: Representation,
    src: Bytesource,
) -> Result<HttpResponse, ApiError> {
    let decision = respond::decide(req, &rep)?;
    let kept = src.kept();
    let blob = if respond::needs_body(req, &decision) {
        Some(match src {
            Bytesource::Memory(b) => Content::Stored(Blob::Memory(b)),
            Bytesource::Target(t) => state.source.open(&t).await?,
            Bytesource::Delta(d) => stored_delta(state, &d)?,
        })
    } else {
        None
    };
    let ctx = ResponseCtx {
        boundary: &state.boundary,
        sent_counter: state.route(route).bytes,
        permit: permit.filter(|_| blob.is_some()),
        max_piece: state.max_piece,
        on_short: checker(state, blob.as_ref(), kept),
        copies: copies(req, blob.as_ref()),
    };
    Ok(respond::build(&rep, decision, blob.as_ref(), ctx))
}

/// A stored delta's bytes.
fn stored_delta(state: &AppState, digest: &Digest) -> Result<Content, ApiError> {
    let store = state.deltas.as_ref().map(|x| x.store()).ok_or_else(|| ApiError::NotFound("deltas are off".into()))?;
    match store.get(digest).map_err(|e| ApiError::Source(e.into()))? {
        Some(blob) => Ok(Content::Stored(blob)),
        None => Err(ApiError::NotFound("that delta was evicted a moment ago; ask again".into())),
    }
}

pub(super) fn catalog(state: &AppState) -> Result<std::sync::Arc<Catalog>, ApiError> {
    state.published.current().ok_or(ApiError::NotReady)
}

/// A preformatted header value (no copy: the response shares the bytes).
fn hv(b: &Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(b.clone()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

const OCTETS: HeaderValue = HeaderValue::from_static("application/octet-stream");
const IMMUTABLE: HeaderValue = HeaderValue::from_static("public, max-age=31536000, immutable");

/// A payload. `moving` is the `Cache-Control` of a URL whose bytes move on
/// with the manifest (`latest`); `None` for immutable URLs.
fn payload(obj: &ObjectInfo, moving: Option<HeaderValue>, version: Option<String>) -> (Representation, Bytesource) {
    let immutable = moving.is_none();
    let rep = Representation {
        etag: obj.sha256,
        etag_value: hv(&obj.texts.etag),
        modified_value: hv(&obj.texts.last_modified),
        len: obj.size,
        modified: obj.modified,
        cache_control: moving.unwrap_or(IMMUTABLE),
        content_type: OCTETS,
        version,
        critical: obj.critical,
        immutable,
    };
    (rep, Bytesource::Target(Target::payload(obj)))
}

async fn manifest(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = async {
        let cat = catalog(&state)?;
        let rep = Representation {
            etag: cat.manifest_digest,
            etag_value: hv(&cat.manifest_texts.etag),
            modified_value: hv(&cat.manifest_texts.last_modified),
            len: cat.manifest_bytes.len() as u64,
            modified: cat.generated_at,
            cache_control: state.short_cache.clone(),
            content_type: HeaderValue::from_static("application/json"),
            version: None,
            critical: false,
            immutable: false,
        };
        serve(
            &req,
            &state,
            Route::Manifest,
            Admission::Later(None),
            rep,
            Bytesource::Memory(cat.manifest_bytes.clone()),
        )
        .await
    };
    finish(&state, Route::Manifest, result.await)
}

async fn signature(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    serve_signature(req, None, state).await
}

/// `GET /v1/signatures/{sha256}`: the signature of the manifest whose bytes
/// hash to `sha256`, as a static repository has it (`repo` module comment).
/// Served for the manifest being served: a reader that fetched it and a
/// `manifest.sig` from after a reload finds the matching one here.
async fn signature_by_digest(req: HttpRequest, path: String, state: web::Data<AppState>) -> HttpResponse {
    serve_signature(req, Some(path), state).await
}

async fn serve_signature(req: HttpRequest, of: Option<String>, state: web::Data<AppState>) -> HttpResponse {
    let result = async {
        let cat = catalog(&state)?;
        if let Some(of) = of
            && parse_digest(&of)? != cat.manifest_digest
        {
            return Err(ApiError::NotFound(format!(
                "no signature for that manifest here; this server serves manifest serial {} ({})",
                cat.serial(),
                cat.manifest_digest
            )));
        }
        let rep = Representation {
            etag: cat.signature_digest,
            etag_value: hv(&cat.signature_texts.etag),
            modified_value: hv(&cat.signature_texts.last_modified),
            len: cat.signature.len() as u64,
            modified: cat.generated_at,
            cache_control: state.short_cache.clone(),
            content_type: HeaderValue::from_static("text/plain; charset=utf-8"),
            version: None,
            critical: false,
            immutable: false,
        };
        serve(&req, &state, Route::Signature, Admission::Later(None), rep, Bytesource::Memory(cat.signature.clone()))
            .await
    };
    finish(&state, Route::Signature, result.await)
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|_| {
        ApiError::NotFound("not a SHA-256 digest: objects are named by 64 lowercase hex characters".into())
    })
}

/// Route `/v1/...` paths with variable segments (see `configure`).
async fn dispatch(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    // The decoded path (actix decodes percent-escapes that are not delimiters).
    let path = req.match_info().as_str().to_owned();
    let mut segs = [""; 7];
    let mut n = 0;
    if let Some(rest) = path.strip_prefix("/v1/") {
        for s in rest.split('/') {
            if n == segs.len() {
                n += 1;
                break;
            }
            segs[n] = s;
            n += 1;
        }
    }
    let method = req.method().clone();
    let bytes_ok = method == actix_web::http::Method::GET || method == actix_web::http::Method::HEAD;
    let s = |s: &str| s.to_string();
    let (route, allowed) = match (n, &segs[..n.min(segs.len())]) {
        // Downloads: who is asking is worked out first, so that the work of
        // serving hides the wait for the agent's state (`limits::Caller`).
        (2, ["objects", sha]) if bytes_ok => {
            let caller = caller(&req, &state);
            return object(req, s(sha), state, caller).await;
        }
        (2, ["chunks", sha]) if bytes_ok => return chunks(req, s(sha), state).await,
        (2, ["signatures", sha]) if bytes_ok => return signature_by_digest(req, s(sha), state).await,
        (4, ["components", name, "versions", v]) if bytes_ok => {
            let caller = caller(&req, &state);
            return version(req, s(name), s(v), state, caller).await;
        }
        (3, ["components", name, "latest"]) if bytes_ok => {
            let caller = caller(&req, &state);
            return latest(req, s(name), state, caller).await;
        }
        (3, ["components", name, "chain"]) if method == actix_web::http::Method::GET => {
            return chain(req, s(name), state).await;
        }
        (5, ["components", name, "deltas", f, t]) if bytes_ok => {
            let caller = caller(&req, &state);
            return delta(req, s(name), s(f), s(t), state, caller).await;
        }
        (2, ["objects", _]) => (Route::Object, "GET, HEAD"),
        (2, ["chunks", _]) => (Route::Chunks, "GET, HEAD"),
        (2, ["signatures", _]) => (Route::Signature, "GET, HEAD"),
        (4, ["components", _, "versions", _]) => (Route::Version, "GET, HEAD"),
        (3, ["components", _, "latest"]) => (Route::Latest, "GET, HEAD"),
        (3, ["components", _, "chain"]) => (Route::Chain, "GET"),
        (5, ["components", _, _, _, _]) if segs[2] == "deltas" => (Route::Delta, "GET, HEAD"),
        _ => return unmatched(req, state).await,
    };
    let res = HttpResponse::MethodNotAllowed().insert_header((header::ALLOW, allowed)).json(serde_json::json!({
        "error": "method_not_allowed",
        "message": format!("{method} is not allowed here; use {allowed}"),
    }));
    finish(&state, route, Ok(res))
}

async fn object(req: HttpRequest, path: String, state: web::Data<AppState>, caller: Option<Caller>) -> HttpResponse {
    let result = async {
        let digest = parse_digest(&path)?;
        let cat = catalog(&state)?;
        let obj = cat
            .object(&digest)
            .ok_or_else(|| ApiError::NotFound(format!("object {digest} is not in manifest serial {}", cat.serial())))?;
        let (rep, src) = payload(obj, None, None);
        serve(&req, &state, Route::Object, Admission::Later(caller), rep, src).await
    };
    finish(&state, Route::Object, result.await)
}

async fn chunks(req: HttpRequest, path: String, state: web::Data<AppState>) -> HttpResponse {
    let result = async {
        let digest = parse_digest(&path)?;
        let cat = catalog(&state)?;
        let obj = cat
            .object(&digest)
            .ok_or_else(|| ApiError::NotFound(format!("object {digest} is not in manifest serial {}", cat.serial())))?;
        let len = obj.chunk_list_len();
        let rep = Representation {
            etag: obj.chunks_sha256,
            etag_value: hv(&obj.texts.chunks_etag),
            modified_value: hv(&obj.texts.last_modified),
            len,
            modified: obj.modified,
            cache_control: IMMUTABLE,
            content_type: OCTETS,
            version: None,
            critical: false,
            immutable: true,
        };
        serve(&req, &state, Route::Chunks, Admission::Later(None), rep, Bytesource::Target(Target::chunk_list(obj)))
            .await
    };
    finish(&state, Route::Chunks, result.await)
}

fn unknown_component(cat: &Catalog, name: &str) -> ApiError {
    let _ = cat;
    ApiError::NotFound(format!("no component {:?} in the manifest", name.chars().take(128).collect::<String>()))
}

async fn version(
    req: HttpRequest,
    name: String,
    ver: String,
    state: web::Data<AppState>,
    caller: Option<Caller>,
) -> HttpResponse {
    let result = async {
        let cat = catalog(&state)?;
        if cat.component(&name).is_none() {
            return Err(unknown_component(&cat, &name));
        }
        let (entry, obj) = cat.version(&name, &ver).ok_or_else(|| {
            ApiError::NotFound(format!(
                "component {name:?} has no version {:?}",
                ver.chars().take(64).collect::<String>()
            ))
        })?;
        let (rep, src) = payload(obj, None, Some(entry.version.to_string()));
        serve(&req, &state, Route::Version, Admission::Later(caller), rep, src).await
    };
    finish(&state, Route::Version, result.await)
}

async fn latest(req: HttpRequest, path: String, state: web::Data<AppState>, caller: Option<Caller>) -> HttpResponse {
    let result = async {
        let cat = catalog(&state)?;
        let (entry, obj) = cat.latest(&path).ok_or_else(|| unknown_component(&cat, &path))?;
        // `latest` moves: cache it only as long as the manifest.
        let (rep, src) = payload(obj, Some(state.short_cache.clone()), Some(entry.version.to_string()));
        serve(&req, &state, Route::Latest, Admission::Later(caller), rep, src).await
    };
    finish(&state, Route::Latest, result.await)
}

#[derive(serde::Deserialize)]
struct ChainQuery {
    from: String,
    to: Option<String>,
}

/// Whether a request comes from another relay (its upstream client's
/// User-Agent), which is not an agent and stays out of the fleet statistics.
fn from_relay(req: &HttpRequest) -> bool {
    let relay = crate::upstream::RELAY_USER_AGENT.split('/').next().unwrap_or("patchrelay");
    req.headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .is_some_and(|product| product == relay)
}

/// `GET /v1/components/{name}/chain?from=&to=`: the cheapest update plan.
///
/// Planned from the deltas that exist now, never waiting for one to be
/// computed: thousands of agents poll at the top of the hour and each must get
/// an answer at once, and the full file is always a correct plan. When the
/// direct delta `from -> to` is missing it is queued, so the next agent on
/// that version gets it.
async fn chain(req: HttpRequest, name: String, state: web::Data<AppState>) -> HttpResponse {
    let result = (|| {
        let q = web::Query::<ChainQuery>::from_query(req.query_string())
            .map_err(|e| ApiError::BadRequest(format!("expected ?from=<version>[&to=<version>]: {e}")))?;
        let cat = catalog(&state)?;
        let (cname, component) = cat.component(&name).ok_or_else(|| unknown_component(&cat, &name))?;
        let mut versions: Vec<_> = component.versions.iter().collect();
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        let find = |v: &str| versions.iter().position(|e| e.version.as_str() == v);
        let relay = from_relay(&req);
        let Some(from) = find(&q.from) else {
            if !relay {
                metrics::counter!(telemetry::AGENT_UNKNOWN, "component" => cname.to_string()).increment(1);
            }
            return Err(ApiError::NotFound(format!("component {name:?} has no version {:?}", truncate(&q.from))));
        };
        let to = match &q.to {
            Some(v) => find(v)
                .ok_or_else(|| ApiError::NotFound(format!("component {name:?} has no version {:?}", truncate(v))))?,
            None => find(component.latest.as_str()).unwrap_or(versions.len() - 1),
        };
        if !relay {
            super::fleet::record(&req, &state, cname.as_str(), versions[from].version.as_str());
            let latest = find(component.latest.as_str()).unwrap_or(versions.len() - 1);
            let lag = latest.saturating_sub(from);
            metrics::histogram!(telemetry::AGENT_LAG, "component" => cname.to_string()).record(lag as f64);
        }
        let nodes: Vec<plan::Node> = versions
            .iter()
            .map(|v| plan::Node { version: v.version.to_string(), sha256: v.sha256, size: v.size })
            .collect();
        let mut edges = Vec::new();
        if let Some(deltas) = &state.deltas {
            let by_digest: std::collections::HashMap<Digest, usize> =
                nodes.iter().enumerate().map(|(i, n)| (n.sha256, i)).collect();
            for (f, t, info) in deltas.between(&by_digest) {
                edges.push(plan::Edge { from: f, to: t, sha256: info.sha256, size: info.size });
            }
            if from < to
                && let (Some(b), Some(t)) = (cat.object(&nodes[from].sha256), cat.object(&nodes[to].sha256))
            {
                deltas.build_in_background(b, t);
            }
        }
        let steps = plan::cheapest(&nodes, &edges, from, to);
        let first =
            steps.first().map(|s| if s.kind == plan::StepKind::Delta { "delta" } else { "full" }).unwrap_or("none");
        metrics::counter!(telemetry::PLANS, "first_step" => first).increment(1);
        let steps_json: Vec<serde_json::Value> = steps
            .iter()
            .map(|s| {
                let (a, b) = (&nodes[s.from].version, &nodes[s.to].version);
                let url = match s.kind {
                    plan::StepKind::Delta => format!("/v1/components/{name}/deltas/{a}/{b}"),
                    plan::StepKind::Full => format!("/v1/components/{name}/versions/{b}"),
                };
                serde_json::json!({ "kind": s.kind, "from": a, "to": b, "url": url, "size": s.size, "sha256": s.sha256 })
            })
            .collect();
        let body = serde_json::json!({
            "component": name,
            "from": nodes[from].version,
            "to": nodes[to].version,
            "steps": steps_json,
            "total_bytes": steps.iter().map(|s| s.size).sum::<u64>(),
            "full_bytes": nodes[to].size,
        });
        Ok(HttpResponse::Ok().insert_header((header::CACHE_CONTROL, state.short_cache.clone())).json(body))
    })();
    finish(&state, Route::Chain, result)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `GET /v1/components/{name}/deltas/{from}/{to}`: the delta bytes, computed
/// now if they do not exist yet (sharing a build already running).
async fn delta(
    req: HttpRequest,
    name: String,
    from: String,
    to: String,
    state: web::Data<AppState>,
    caller: Option<Caller>,
) -> HttpResponse {
    let result = async {
        let cat = catalog(&state)?;
        if cat.component(&name).is_none() {
            return Err(unknown_component(&cat, &name));
        }
        let missing = |v: &str| ApiError::NotFound(format!("component {name:?} has no version {:?}", truncate(v)));
        let (from_entry, base) = cat.version(&name, &from).ok_or_else(|| missing(&from))?;
        let (to_entry, target) = cat.version(&name, &to).ok_or_else(|| missing(&to))?;
        // Deltas go forward only: nobody updates to an older version, and
        // every pair a client may name is work (and disk) for this server.
        if from_entry.version >= to_entry.version {
            return Err(ApiError::NotFound(format!(
                "deltas go from an older version to a newer one; {:?} is not older than {:?}",
                truncate(&from),
                truncate(&to)
            )));
        }
        if base.sha256 == target.sha256 {
            return Err(ApiError::NotFound(format!("{from} and {to} have the same bytes: there is no delta to send")));
        }
        let deltas = state.deltas.as_ref().ok_or_else(|| {
            ApiError::NotFound(
                "deltas are off on this server ([delta] enabled = false, or an origin without [storage])".into(),
            )
        })?;
        // A download like any other: admitted under the limits before it
        // costs a build (and, on a relay, two fetches over the WAN). A HEAD
        // of a delta not built yet costs the same build: admitted too.
        let costly = req.method() == actix_web::http::Method::GET || deltas.get(&base.sha256, &target.sha256).is_none();
        let permit = match (state.limits, costly) {
            (Some(limits), true) => {
                let caller =
                    caller.unwrap_or_else(|| limits.caller(peer_ip(&req), req.headers(), cert_name(&req, limits)));
                limits.admit(caller, target.critical, None).map_err(ApiError::Limited)?
            }
            _ => None,
        };
        let info = deltas.build(base, target).await?;
        let rep = Representation {
            etag: info.sha256,
            etag_value: hv(&Bytes::from(info.sha256.etag())),
            modified_value: hv(&target.texts.last_modified),
            len: info.size,
            modified: target.modified,
            // Another relay may encode the same pair differently: cacheable,
            // but not immutable across servers (the ETag tells them apart).
            cache_control: HeaderValue::from_static("public, max-age=3600"),
            content_type: OCTETS,
            version: Some(to_entry.version.to_string()),
            critical: target.critical,
            immutable: false,
        };
        serve(&req, &state, Route::Delta, Admission::Done(permit), rep, Bytesource::Delta(info.sha256)).await
    };
    finish(&state, Route::Delta, result.await)
}

/// Compare without an early exit, so response timing does not leak the token.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin API needs `Authorization: Bearer <admin.token>`, or HTTP Basic
/// with the user `admin` and the token as password (what a browser sends
/// for the console, and for the JSON and CSV it links to).
pub(super) fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let token = state.admin_token.as_deref().ok_or(ApiError::AdminDisabled)?;
    let given = presented_token(req).unwrap_or_default();
    if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

/// The token in `Authorization`: `Bearer <token>` or `Basic base64(admin:<token>)`.
fn presented_token(req: &HttpRequest) -> Option<String> {
    use base64::Engine;
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.to_string());
    }
    let basic = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.strip_prefix("admin:").map(str::to_string)
}

async fn admin_status(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = authorize(&req, &state).map(|()| {
        let body = match &state.status {
            Some(s) => s.report(),
            None => serde_json::json!({
                "role": "origin",
                "serial": state.published.serial(),
                "last_reload": state.published.last_good_sync(),
            }),
        };
        HttpResponse::Ok().insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store"))).json(body)
    });
    finish(&state, Route::AdminStatus, result)
}

async fn admin_sync(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = async {
        authorize(&req, &state)?;
        let sync = state.sync.as_ref().ok_or_else(|| ApiError::Unavailable("no sync actor is running".into()))?;
        let report = sync
            .send(SyncNow)
            .await
            .map_err(|e| ApiError::Unavailable(format!("the sync actor did not take the request: {e}")))?
            .map_err(|e| match e {
                crate::actors::SyncError::Offline => ApiError::BadRequest(e.to_string()),
                e => ApiError::SyncFailed(e.to_string()),
            })?;
        Ok(HttpResponse::Ok().json(report))
    };
    finish(&state, Route::AdminSync, result.await)
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let Some(handle) = &state.metrics else {
        return finish(
            &state,
            Route::Metrics,
            Err(ApiError::NotFound("metrics are off ([metrics] enabled = false)".into())),
        );
    };
    if let Some(t) = state.published.last_good_sync() {
        metrics::gauge!(telemetry::SINCE_GOOD_SYNC).set(unix_now().saturating_sub(t) as f64);
    }
    // A sync that keeps finding the same manifest is a good sync: only the
    // manifest's own age shows an upstream that withholds newer ones.
    if let Some(cat) = state.published.current() {
        let age = std::time::SystemTime::now().duration_since(cat.generated_at).unwrap_or_default();
        metrics::gauge!(telemetry::MANIFEST_AGE).set(age.as_secs_f64());
    }
    if let Some(limits) = state.limits {
        limits.publish_gauges();
    }
    telemetry::publish_tallies();
    let mut text = handle.render();
    super::fleet::render_metrics(&state, &mut text);
    let res = HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .body(text);
    finish(&state, Route::Metrics, Ok(res))
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let res = HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .json(serde_json::json!({ "status": "ok" }));
    finish(&state, Route::Health, Ok(res))
}

/// 200 while a verified manifest is served, even when no upstream answers
/// (`"status": "degraded"` then says since when): a relay that can serve its
/// cache should stay in its load balancer.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    use crate::repo::manifest::format_time;
    let r = readiness(&state);
    let body = serde_json::json!({
        "ready": r.ready,
        "status": r.status,
        "serial": state.published.serial(),
        "last_good_sync": state.published.last_good_sync(),
        "degraded_since": r.since.map(format_time),
        "reasons": r.reasons,
    });
    let mut res = if r.ready { HttpResponse::Ok() } else { HttpResponse::ServiceUnavailable() };
    res.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
    finish(&state, Route::Ready, Ok(res.json(body)))
}

/// Whether the server serves a verified manifest, and what is wrong.
pub(super) struct Readiness {
    pub ready: bool,
    /// `ok`, `degraded` or `not_ready`.
    pub status: &'static str,
    pub reasons: Vec<String>,
    pub since: Option<std::time::SystemTime>,
}

pub(super) fn readiness(state: &AppState) -> Readiness {
    use crate::repo::manifest::format_time;
    let degraded = state.published.degraded_since().map(|t| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
    let store = state.source.write_fault();
    let mut reasons = Vec::new();
    if let Some(t) = degraded {
        reasons.push(format!("no upstream has given an acceptable manifest since {}", format_time(t)));
    }
    if let Some((t, why)) = &store {
        reasons.push(format!(
            "the store cannot write since {} ({why}): serving what it holds, passing misses through from memory",
            format_time(*t)
        ));
    }
    let status = match (state.published.is_ready(), reasons.is_empty()) {
        (false, _) => "not_ready",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let since = [degraded, store.map(|(t, _)| t)].into_iter().flatten().min();
    Readiness { ready: state.published.is_ready(), status, reasons, since }
}

async fn unmatched(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let path: String = req.path().chars().take(200).collect();
    finish(&state, Route::Unmatched, Err(ApiError::NotFound(format!("no such endpoint: {path}"))))
}
