//! The fleet inventory over HTTP: what agents run (`/admin/fleet`), which
//! agents (`/admin/fleet/agents`, JSON or CSV, paged), reports from
//! downstream relays (`/admin/fleet/report`), and the inventory's lines of
//! `/metrics`.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::error::ApiError;
use super::routes::{authorize, catalog, finish};
use super::{AppState, Route};
use crate::fleet::report::{MAX_REPORT, SiteReport};
use crate::fleet::{AgentFilter, Fleet, Sighting};

/// Record a plan request's `from` (called by the plan route for agents,
/// not relays).
pub fn record(req: &HttpRequest, state: &AppState, component: &str, version: &str) {
    let Some(fleet) = &state.fleet else { return };
    let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let address = state.identify.client_ip(peer, req.headers());
    let cert = if state.identify.by_certificate() {
        req.conn_data::<crate::tls::PeerTls>().and_then(|p| p.name.as_deref()).map(str::as_bytes)
    } else {
        None
    };
    let who = state.identify.who(address, req.headers(), cert);
    let user_agent = req.headers().get(header::USER_AGENT).map(|v| v.as_bytes()).unwrap_or(b"");
    fleet.record(&Sighting { who, address, user_agent, component, version });
}

fn fleet(state: &AppState) -> Result<&Fleet, ApiError> {
    state
        .fleet
        .as_deref()
        .ok_or_else(|| ApiError::NotFound("the fleet inventory is off ([fleet] enabled = false)".into()))
}

#[derive(Deserialize)]
struct FleetQuery {
    component: Option<String>,
}

/// `GET /admin/fleet[?component=NAME]`: agents per version, behind, stale;
/// and each downstream site's counts.
pub async fn summary(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = (|| {
        authorize(&req, &state)?;
        let fleet = fleet(&state)?;
        let cat = catalog(&state)?;
        let q = web::Query::<FleetQuery>::from_query(req.query_string())
            .map_err(|e| ApiError::BadRequest(format!("expected ?component=NAME: {e}")))?;
        let sites = fleet.sites.list(fleet.stale_after());
        let body = match &q.component {
            Some(name) => {
                let s = fleet
                    .summary(&cat, name)
                    .ok_or_else(|| ApiError::NotFound(format!("no component {:?} in the manifest", trunc(name))))?;
                let by_site: Vec<serde_json::Value> = sites
                    .iter()
                    .filter_map(|r| {
                        let s = r.summaries.iter().find(|s| &s.component == name)?;
                        Some(serde_json::json!({ "site": r.site, "serial": r.serial, "received_at": r.received_at, "summary": s }))
                    })
                    .collect();
                serde_json::json!({
                    "serial": cat.serial(),
                    "stale_after_seconds": fleet.stale_after().as_secs(),
                    "agents_tracked": fleet.len(),
                    "summary": s,
                    "sites": by_site,
                })
            }
            None => serde_json::json!({
                "serial": cat.serial(),
                "stale_after_seconds": fleet.stale_after().as_secs(),
                "agents_tracked": fleet.len(),
                "agents_refused": fleet.refused(),
                "components": fleet.summaries(&cat).as_ref(),
                "sites": sites.iter().map(|r| serde_json::json!({ "site": r.site, "serial": r.serial, "received_at": r.received_at, "components": r.summaries.len() })).collect::<Vec<_>>(),
            }),
        };
        Ok(HttpResponse::Ok().insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store"))).json(body))
    })();
    finish(&state, Route::AdminFleet, result)
}

#[derive(Deserialize)]
struct AgentsQuery {
    component: String,
    // Not a flattened `AgentFilter`: serde_urlencoded then reads numbers as
    // strings and refuses them.
    behind: Option<u64>,
    #[serde(default)]
    stale: bool,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

/// The most agents one page lists.
const MAX_PAGE: usize = 10_000;

/// `GET /admin/fleet/agents?component=NAME[&behind=N][&stale=true][&format=csv|json][&offset=&limit=]`.
pub async fn agents(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = (|| {
        authorize(&req, &state)?;
        let fleet = fleet(&state)?;
        let cat = catalog(&state)?;
        let q = web::Query::<AgentsQuery>::from_query(req.query_string()).map_err(|e| {
            ApiError::BadRequest(format!(
                "expected ?component=NAME[&behind=N][&stale=true][&format=csv|json][&offset=N][&limit=N]: {e}"
            ))
        })?;
        let limit = q.limit.unwrap_or(1000).clamp(1, MAX_PAGE);
        let rows = fleet
            .agents(&cat, &q.component, &AgentFilter { behind: q.behind, stale: q.stale })
            .ok_or_else(|| ApiError::NotFound(format!("no component {:?} in the manifest", trunc(&q.component))))?;
        let total = rows.len();
        let page: Vec<_> = rows.into_iter().skip(q.offset).take(limit).collect();
        let next = (q.offset + page.len() < total).then_some(q.offset + page.len());
        let mut res = HttpResponse::Ok();
        res.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .insert_header(("X-Total-Count", total.to_string()));
        match q.format.as_deref().unwrap_or("json") {
            "json" => Ok(res.json(serde_json::json!({
                "component": q.component,
                "total": total,
                "offset": q.offset,
                "limit": limit,
                "next_offset": next,
                "agents": page,
            }))),
            "csv" => {
                let mut out = String::from("agent,version,behind,reported_at,last_seen,stale,address,user_agent\n");
                for r in &page {
                    let line = [
                        csv(&r.agent),
                        csv(&r.version),
                        r.behind.map(|b| b.to_string()).unwrap_or_default(),
                        time(r.reported_at),
                        time(r.last_seen),
                        r.stale.to_string(),
                        csv(&r.address),
                        csv(&r.user_agent),
                    ];
                    out.push_str(&line.join(","));
                    out.push('\n');
                }
                Ok(res.content_type("text/csv; charset=utf-8").body(out))
            }
            other => Err(ApiError::BadRequest(format!("format {:?}: use csv or json", trunc(other)))),
        }
    })();
    finish(&state, Route::AdminFleetAgents, result)
}

fn time(unix: u64) -> String {
    crate::repo::manifest::format_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

/// A CSV field (RFC 4180), and never a formula for a spreadsheet that opens
/// it: ids and user agents are the agents' own words.
fn csv(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `POST /admin/fleet/report`: a downstream relay's counts. A site's own
/// token files the report under the name `[[fleet.site]]` gives it; the
/// admin token takes the name the report says.
pub async fn report(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let result = (|| {
        let fleet = fleet(&state)?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        let site = state
            .site_tokens
            .iter()
            .find(|(_, t)| super::routes::constant_time_eq(given.as_bytes(), t.as_bytes()))
            .map(|(n, _)| n.clone());
        if site.is_none() {
            authorize(&req, &state)?;
        }
        if body.len() > MAX_REPORT {
            return Err(ApiError::BadRequest(format!("a fleet report is at most {MAX_REPORT} bytes")));
        }
        let mut r: SiteReport =
            serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("not a fleet report: {e}")))?;
        if let Some(site) = site {
            r.site = site;
        }
        if !crate::fleet::report::valid_site(&r.site) {
            return Err(ApiError::BadRequest("the report's site name is not 1 to 64 of [0-9A-Za-z._-]".into()));
        }
        if r.summaries.len() > 10_000 {
            return Err(ApiError::BadRequest("a fleet report lists at most 10,000 components".into()));
        }
        r.received_at = crate::state::unix_now();
        tracing::debug!(site = %r.site, components = r.summaries.len(), "fleet report received");
        fleet.sites.put(r);
        Ok(HttpResponse::Ok().json(serde_json::json!({ "ok": true })))
    })();
    finish(&state, Route::AdminFleetReport, result)
}

/// The inventory's gauges, computed as `/metrics` is scraped (series per
/// listed version only, so none outlives its version).
pub fn render_metrics(state: &AppState, out: &mut String) {
    use std::fmt::Write;
    let (Some(fleet), Some(cat)) = (&state.fleet, state.published.current()) else { return };
    let summaries = fleet.summaries(&cat);
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    out.push_str("# HELP patchrelay_fleet_agents Agents whose last plan request reported this version.\n");
    out.push_str("# TYPE patchrelay_fleet_agents gauge\n");
    for s in summaries.iter() {
        for v in &s.versions {
            let _ = writeln!(
                out,
                "patchrelay_fleet_agents{{component=\"{}\",version=\"{}\"}} {}",
                esc(&s.component),
                esc(&v.version),
                v.agents
            );
        }
    }
    out.push_str(
        "# HELP patchrelay_fleet_agents_stale Agents of this component not seen for longer than fleet.stale_after.\n",
    );
    out.push_str("# TYPE patchrelay_fleet_agents_stale gauge\n");
    for s in summaries.iter() {
        let _ = writeln!(out, "patchrelay_fleet_agents_stale{{component=\"{}\"}} {}", esc(&s.component), s.stale);
    }
    out.push_str(
        "# HELP patchrelay_fleet_agents_behind Agents of this component on an older version than the latest.\n",
    );
    out.push_str("# TYPE patchrelay_fleet_agents_behind gauge\n");
    for s in summaries.iter() {
        let behind: u64 = s.behind.values().sum();
        let _ = writeln!(out, "patchrelay_fleet_agents_behind{{component=\"{}\"}} {}", esc(&s.component), behind);
    }
    out.push_str("# HELP patchrelay_fleet_tracked_agents Agents the inventory holds.\n");
    out.push_str("# TYPE patchrelay_fleet_tracked_agents gauge\n");
    let _ = writeln!(out, "patchrelay_fleet_tracked_agents {}", fleet.len());
}
