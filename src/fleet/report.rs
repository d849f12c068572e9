//! Fleet summaries across a chain of relays: each site's relay sends its
//! counts to its parent (`fleet.report_upstream`), so the top relay's console
//! shows the whole estate, site by site. Only counts per version leave a
//! site, never an agent's name or address.
//!
//! A report is a small JSON POST to `/admin/fleet/report` on each upstream,
//! every `fleet.report_interval`, with the site's own credential
//! (`fleet.report_token_file`). The parent takes it when the token is one of
//! its `[[fleet.site]]`'s, and then files it under that site's configured
//! name (a site cannot speak for another), or when it is the parent's admin
//! token (the site names itself). Reports older than `fleet.stale_after`
//! are not shown.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Fleet, Summary};
use crate::state::Published;
use crate::upstream::Upstreams;

/// The path reports are sent to.
pub const PATH: &str = "admin/fleet/report";
/// The largest report taken (a site with hundreds of components and
/// versions sends a few hundred KB).
pub const MAX_REPORT: usize = 4 << 20;

/// What a site sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteReport {
    pub site: String,
    /// The serial the site serves.
    pub serial: Option<u64>,
    pub summaries: Vec<Summary>,
    /// Unix seconds, as received (set by the receiver).
    #[serde(default)]
    pub received_at: u64,
}

/// Reports received, by site.
#[derive(Default)]
pub struct Sites {
    by_site: RwLock<BTreeMap<String, SiteReport>>,
    dirty: RwLock<Vec<String>>,
}

impl Sites {
    pub fn put(&self, report: SiteReport) {
        let site = report.site.clone();
        self.by_site.write().unwrap_or_else(|p| p.into_inner()).insert(site.clone(), report);
        self.dirty.write().unwrap_or_else(|p| p.into_inner()).push(site);
    }

    /// Reports received since the last call (to be written to disk).
    pub fn take_dirty(&self) -> Vec<SiteReport> {
        let names = std::mem::take(&mut *self.dirty.write().unwrap_or_else(|p| p.into_inner()));
        let all = self.by_site.read().unwrap_or_else(|p| p.into_inner());
        names.iter().filter_map(|n| all.get(n).cloned()).collect()
    }

    /// Every site's report received within `fresh`, by site name.
    pub fn list(&self, fresh: Duration) -> Vec<SiteReport> {
        let since = crate::state::unix_now().saturating_sub(fresh.as_secs());
        self.by_site
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| r.received_at >= since)
            .cloned()
            .collect()
    }
}

/// Whether a site name is fit for a console and a log line.
pub fn valid_site(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Send this relay's summary to every upstream every `interval`.
pub fn spawn_reporter(
    fleet: Arc<Fleet>,
    published: Arc<Published>,
    upstreams: Arc<Upstreams>,
    site: String,
    token: Option<String>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    crate::upstream::runtime::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(catalog) = published.current() else { continue };
            let report = SiteReport {
                site: site.clone(),
                serial: Some(catalog.serial()),
                summaries: fleet.site_summary(&catalog),
                received_at: 0,
            };
            let Ok(json) = serde_json::to_vec(&report) else { continue };
            let json = bytes::Bytes::from(json);
            for up in upstreams.list() {
                match up.post_json(PATH, json.clone(), token.as_deref()).await {
                    Ok(200..=299) => tracing::debug!(upstream = %up.name, "fleet report sent"),
                    Ok(status) => tracing::warn!(
                        upstream = %up.name,
                        status,
                        "fleet report refused (is it a patchrelay with [[fleet.site]] for this site's report_token?)"
                    ),
                    Err(e) => tracing::warn!(upstream = %up.name, error = %e, "fleet report not sent"),
                }
            }
        }
    })
}
