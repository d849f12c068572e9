//! The inventory on disk: agents and site reports in the state database
//! (`store::db`), written in batches by a background task, read at start.
//!
//! A plan request never waits for this: it changes memory only, and every
//! [`FLUSH`] the changed records go out in one transaction. A crash loses at
//! most that much of what agents reported, which they report again on their
//! next poll.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AgentKey, Fleet, Record};
use crate::store::db::{Batch, StateDb, Table};

pub const AGENTS: Table = Table::new("fleet_agents");
pub const SITES: Table = Table::new("fleet_sites");

/// How often changes are written (and the inventory trimmed to its bound).
pub const FLUSH: Duration = Duration::from_secs(10);

/// An agent as stored: short names, the record's strings as plain strings.
#[derive(Serialize, Deserialize)]
struct Stored {
    s: u64,
    a: IpAddr,
    u: String,
    c: Vec<(String, String, u64)>,
}

/// Read the inventory back into `fleet`. Blocking.
pub fn load(db: &StateDb, fleet: &Fleet) -> Result<usize, crate::store::db::DbError> {
    let mut n = 0;
    for (key, s) in db.scan::<Stored>(AGENTS)? {
        let Some(key) = AgentKey::from_bytes(&key) else { continue };
        let rec = Record {
            last_seen: s.s,
            address: s.a,
            user_agent: Arc::from(s.u.as_str()),
            components: s.c.into_iter().map(|(c, v, t)| (Arc::from(c.as_str()), Arc::from(v.as_str()), t)).collect(),
        };
        fleet.restore(key, rec);
        n += 1;
    }
    for (_, report) in db.scan::<super::report::SiteReport>(SITES)? {
        fleet.sites.put(report);
    }
    // Over the bound (it was lowered)? The first flush trims and deletes.
    Ok(n)
}

/// Trim to the bound and write what changed. Blocking.
pub fn flush(db: &StateDb, fleet: &Fleet) -> Result<usize, crate::store::db::DbError> {
    fleet.trim();
    let (write, delete) = fleet.take_changes();
    let mut batch = Batch::default();
    for k in &delete {
        batch.delete(AGENTS, k.as_bytes());
    }
    for (k, r) in &write {
        let stored = Stored {
            s: r.last_seen,
            a: r.address,
            u: r.user_agent.to_string(),
            c: r.components.iter().map(|(c, v, t)| (c.to_string(), v.to_string(), *t)).collect(),
        };
        batch.put(AGENTS, k.as_bytes(), &stored);
    }
    for report in fleet.sites.take_dirty() {
        batch.put(SITES, report.site.as_bytes(), &report);
    }
    let n = batch.len();
    if let Err(e) = db.commit(batch) {
        fleet.restore_changes(write, delete);
        return Err(e);
    }
    Ok(n)
}

/// Flush every [`FLUSH`] on the blocking pool until the returned handle is
/// aborted; `final_flush` writes what is left (at stop).
pub fn spawn_upkeep(db: Option<StateDb>, fleet: Arc<Fleet>) -> actix_rt::task::JoinHandle<()> {
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (db, fleet) = (db.clone(), fleet.clone());
            let done = crate::telemetry::spawn_blocking(move || match &db {
                Some(db) => flush(db, &fleet).map(|_| ()),
                None => {
                    fleet.trim();
                    let _ = fleet.take_changes();
                    Ok(())
                }
            })
            .await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "cannot write the fleet inventory; will try again");
            }
        }
    })
}
