//! `GET /admin/events?limit=N`: the event log, newest first (what the
//! console's events page shows, for scripts).

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::super::routes::{authorize, finish};
use super::super::{AppState, Route};

#[derive(Deserialize)]
pub struct EventsQuery {
    limit: Option<usize>,
}

pub async fn admin_events(req: HttpRequest, state: web::Data<AppState>, q: web::Query<EventsQuery>) -> HttpResponse {
    let result = authorize(&req, &state).map(|()| {
        let events = state.events.as_ref().map(|e| e.recent(q.limit.unwrap_or(100))).unwrap_or_default();
        HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .json(serde_json::json!({ "events": events }))
    });
    finish(&state, Route::AdminEvents, result)
}
