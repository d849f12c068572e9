//! `/admin/status`: what a relay holds, fetches and thinks of its upstreams.

use std::sync::Arc;

use serde_json::{Value, json};

use super::prefetch::Prefetcher;
use crate::fill::Filler;
use crate::repo::manifest::format_time;
use crate::state::Published;

/// Everything the status report reads; owned by the server, read by `http`.
pub struct StatusSource {
    pub published: Arc<Published>,
    pub filler: Arc<Filler>,
    pub prefetcher: Arc<Prefetcher>,
}

fn time(unix: Option<u64>) -> Value {
    unix.map(|t| Value::String(format_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))))
        .unwrap_or(Value::Null)
}

impl StatusSource {
    pub fn report(&self) -> Value {
        let store = self.filler.store();
        let (objects, bytes) = store.usage();
        let partials = store.partials();
        let upstreams: Vec<Value> = self
            .filler
            .upstreams()
            .list()
            .iter()
            .map(|u| json!({ "name": u.name, "url": u.url.base, "health": u.health() }))
            .collect();
        json!({
            "role": "relay",
            "serial": self.published.serial(),
            "last_good_sync": time(self.published.last_good_sync()),
            "degraded_since": time(self.published.degraded_since()),
            "store": {
                "objects": objects,
                "bytes": bytes,
                "max_size": store.budget(),
                "partial_files": partials.len(),
                "partial_bytes": partials.iter().map(|p| p.1).sum::<u64>(),
            },
            "upstreams": upstreams,
            "fills": self.filler.in_flight(),
            "prefetch": self.prefetcher.report(),
        })
    }
}
