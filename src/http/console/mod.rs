//! The operator's console: what the server holds, whether it is up to date,
//! which agents are behind, what went wrong, and buttons for what an
//! operator does by hand (sync now, prefetch, pin, purge).
//!
//! Server-rendered HTML (`pages`, maud), a little plain JavaScript for live
//! refresh (`console.js`; the pages work without it, by reload), no CDN and
//! no build step. Behind the admin token: HTTP Basic with the user `admin`
//! (what a browser asks for) or Bearer. Actions are POSTs carrying a CSRF
//! token derived from the admin token, so another site cannot make the
//! operator's browser press a button.

pub mod events;
mod pages;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::routes::{authorize, constant_time_eq, finish};
use super::{AppState, Route};
use crate::actors::SyncNow;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");
/// Headers every page carries: nothing from elsewhere runs or frames it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/console").route(web::get().to(overview)))
        .service(web::resource("/console/components").route(web::get().to(components)))
        .service(web::resource("/console/fleet").route(web::get().to(fleet)))
        .service(web::resource("/console/events").route(web::get().to(events_page)))
        .service(web::resource("/console/action").route(web::post().to(action)))
        .service(web::resource("/console/static/console.css").route(web::get().to(css)))
        .service(web::resource("/console/static/console.js").route(web::get().to(js)));
}

/// Requests, bytes and 429s a second over the last minute, from samples
/// taken every few seconds ([`spawn_sampler`]).
#[derive(Default)]
pub struct Traffic(Mutex<VecDeque<(Instant, [u64; 3])>>);

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Traffic {
    fn sample(&self, totals: [u64; 3]) {
        let now = Instant::now();
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, totals));
        while s.len() > 2 && s.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            s.pop_front();
        }
    }

    /// Per second: requests, bytes, 429s; `None` until two samples exist.
    pub fn rates(&self) -> Option<[f64; 3]> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ((t0, a), (t1, b)) = (s.front()?, s.back()?);
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        Some([0, 1, 2].map(|i| b[i].saturating_sub(a[i]) as f64 / secs))
    }
}

/// Sample the server's traffic every few seconds until aborted.
pub fn spawn_sampler(state: web::Data<AppState>) -> actix_rt::task::JoinHandle<()> {
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            state.traffic.sample(state.traffic_totals());
        }
    })
}

/// The CSRF token: an HMAC of a fixed label under the admin token, the same
/// for every page (no server state), unknown to anyone without the token.
fn csrf_token(admin_token: &str) -> String {
    crate::alerts::webhook::sign(admin_token.as_bytes(), b"patchrelay console actions")
}

/// The console's 401: a browser asks for the user (`admin`) and the token.
fn unauthorized(state: &AppState, route: Route, e: super::error::ApiError) -> HttpResponse {
    let mut res = finish(state, route, Err(e));
    if res.status() == actix_web::http::StatusCode::UNAUTHORIZED {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"patchrelay console\", charset=\"UTF-8\""),
        );
    }
    res
}

fn page(state: &AppState, body: maud::Markup) -> HttpResponse {
    let res = HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .insert_header((header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .insert_header((header::REFERRER_POLICY, HeaderValue::from_static("same-origin")))
        .body(body.into_string());
    finish(state, Route::Console, Ok(res))
}

#[derive(Deserialize)]
struct PageQuery {
    /// What the last action did (shown once, after the redirect).
    said: Option<String>,
    component: Option<String>,
}

fn query(req: &HttpRequest) -> PageQuery {
    web::Query::<PageQuery>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or(PageQuery { said: None, component: None })
}

/// Render a page for an operator with the token, else the console's 401.
fn render(
    req: &HttpRequest,
    state: &AppState,
    draw: impl FnOnce(&pages::Context<'_>, &PageQuery) -> maud::Markup,
) -> HttpResponse {
    if let Err(e) = authorize(req, state) {
        return unauthorized(state, Route::Console, e);
    }
    let q = query(req);
    let ctx = pages::Context {
        state,
        csrf: csrf_token(state.admin_token.as_deref().unwrap_or_default()),
        said: q.said.as_deref().map(|s| s.chars().take(500).collect()),
    };
    page(state, draw(&ctx, &q))
}

async fn overview(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    render(&req, &state, |ctx, _| pages::overview(ctx))
}

async fn components(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    render(&req, &state, |ctx, _| pages::components(ctx))
}

async fn fleet(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    render(&req, &state, |ctx, q| pages::fleet(ctx, q.component.as_deref()))
}

async fn events_page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    render(&req, &state, |ctx, _| pages::events(ctx))
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300")))
        .body(CSS)
}

async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300")))
        .body(JS)
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
    action: String,
    component: Option<String>,
    version: Option<String>,
    back: Option<String>,
}

/// `POST /console/action`: do it, then 303 back to the page it came from
/// with what happened (`?said=`).
async fn action(req: HttpRequest, state: web::Data<AppState>, form: web::Form<ActionForm>) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return unauthorized(&state, Route::ConsoleAction, e);
    }
    let want = csrf_token(state.admin_token.as_deref().unwrap_or_default());
    if !constant_time_eq(form.csrf.as_bytes(), want.as_bytes()) {
        let e = super::error::ApiError::BadRequest(
            "the form's CSRF token is missing or wrong: reload the console page and try again".into(),
        );
        return finish(&state, Route::ConsoleAction, Err(e));
    }
    let said = match perform(&state, &form).await {
        Ok(s) => s,
        Err(s) => format!("failed: {s}"),
    };
    tracing::info!(action = %form.action, component = ?form.component, version = ?form.version, "console: {said}");
    let back = form.back.as_deref().filter(|b| safe_back(b)).unwrap_or("/console");
    let sep = if back.contains('?') { '&' } else { '?' };
    let location = format!("{back}{sep}said={}", percent_encode(&said));
    let res = HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .finish();
    finish(&state, Route::ConsoleAction, Ok(res))
}

/// A page of the console on this server, not a URL elsewhere.
fn safe_back(b: &str) -> bool {
    b.starts_with("/console") && !b.contains("//") && !b.contains("said=") && b.chars().all(|c| c.is_ascii_graphic())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn perform(state: &AppState, form: &ActionForm) -> Result<String, String> {
    let named = || -> Result<(String, String), String> {
        match (&form.component, &form.version) {
            (Some(c), Some(v)) => Ok((c.clone(), v.clone())),
            _ => Err("this action needs a component and a version".into()),
        }
    };
    match form.action.as_str() {
        "sync" => {
            let sync = state.sync.as_ref().ok_or("no sync actor is running")?;
            let report = sync.send(SyncNow).await.map_err(|e| format!("the sync actor did not take it: {e}"))?;
            match report {
                Ok(r) => Ok(format!("sync: {} (serial {}, from upstream {})", r.result, r.serial, r.source)),
                Err(e) => Err(format!("sync: {e}")),
            }
        }
        "prefetch" | "pin" | "unpin" | "purge" => {
            let relay = state
                .status
                .as_ref()
                .ok_or("an origin holds every version it publishes: nothing to fetch, pin or purge")?;
            let (component, version) = named()?;
            let cat = state.published.current().ok_or("no verified manifest yet")?;
            let (entry, obj) = cat
                .version(&component, &version)
                .ok_or_else(|| format!("the manifest has no {component} {version}"))?;
            let critical = cat.component(&component).is_some_and(|(_, c)| c.critical);
            let label = format!("{component} {}", entry.version);
            let store = relay.filler.store();
            match form.action.as_str() {
                "prefetch" => {
                    if store.contains(&obj.sha256) {
                        return Ok(format!("{label} is cached already"));
                    }
                    let (filler, request) = (relay.filler.clone(), crate::source::Target::payload(obj).fill_request());
                    let what = label.clone();
                    crate::upstream::runtime::spawn(async move {
                        if let Err(e) = filler.ensure(request).await {
                            tracing::warn!(version = %what, error = %e, "console prefetch failed");
                        }
                    });
                    Ok(format!("fetching {label}; the components page shows when it is cached"))
                }
                "pin" | "unpin" => {
                    let pin = form.action == "pin";
                    let (prefetcher, c, v) = (relay.prefetcher.clone(), component.clone(), version.clone());
                    crate::telemetry::spawn_blocking(move || prefetcher.hold(&c, &v, pin))
                        .await
                        .map_err(|e| e.to_string())??;
                    Ok(if pin {
                        format!("{label} pinned: kept from eviction, and fetched if it is not cached")
                    } else {
                        format!("{label} unpinned: the disk budget may evict it again")
                    })
                }
                _ => {
                    if critical {
                        return Err(format!("{label} is critical: it stays (critical versions are pinned)"));
                    }
                    if store.is_pinned(&obj.sha256) {
                        return Err(format!("{label} is pinned: unpin it first"));
                    }
                    if !store.contains(&obj.sha256) {
                        return Ok(format!("{label} is not cached"));
                    }
                    let (store, digest) = (store.clone(), obj.sha256);
                    crate::telemetry::spawn_blocking(move || store.remove(&digest)).await.map_err(|e| e.to_string())?;
                    Ok(format!("{label} purged from the cache; the next request fetches it again"))
                }
            }
        }
        other => Err(format!("no such action {:?}", other.chars().take(40).collect::<String>())),
    }
}
