//! Syncing a version by delta ("component duplication" in the vendors'
//! relays): a relay that holds version N of a component and needs N+k asks its
//! upstream, when that is a patchrelay, for the cheapest plan and fetches the
//! deltas instead of the full file. It rebuilds locally, checks the result
//! against the signed manifest's digest, and only then stores it. Any failure
//! (a static upstream without plans, a bad delta, a mismatch) falls back to the
//! ordinary full fill, so this can only save bytes, never cost correctness.

use std::sync::Arc;

use serde::Deserialize;

use super::Filler;
use crate::delta;
use crate::digest::Digest;
use crate::repo::catalog::Catalog;
use crate::telemetry;

#[derive(Deserialize)]
struct PlanStep {
    kind: String,
    to: String,
    url: String,
    size: u64,
    sha256: Digest,
}

#[derive(Deserialize)]
struct Plan {
    steps: Vec<PlanStep>,
}

/// The largest version synced by delta: base, target and delta are held in
/// memory while it is rebuilt (the default `delta.max_target_size` too, so an
/// upstream patchrelay serves no delta for larger targets anyway).
const MAX_SYNC_SIZE: u64 = 1 << 30;

/// Check an upstream's plan against the signed manifest before any of its
/// numbers size a download: every step must end at a listed version and be
/// smaller than that version's full file (a delta never needs more), and the
/// whole chain must cost less than the full target. A hostile upstream's plan
/// of a terabyte is refused here, not allocated.
fn checked_steps(plan: &Plan, catalog: &Catalog, component: &str, target_size: u64) -> Result<Option<()>, String> {
    if plan.steps.is_empty() || plan.steps.iter().any(|s| s.kind != "delta") {
        return Ok(None); // nothing to gain: let the fill fetch the full file
    }
    let mut total = 0u64;
    for step in &plan.steps {
        let (_, to_obj) = catalog
            .version(component, &step.to)
            .ok_or_else(|| format!("the plan goes through unknown version {:?}", step.to))?;
        if step.size >= to_obj.size {
            return Err(format!(
                "the plan's delta to {} is {} bytes, not less than the {}-byte version it builds",
                step.to, step.size, to_obj.size
            ));
        }
        total = total.saturating_add(step.size);
    }
    if total >= target_size {
        return Ok(None); // the full file is as cheap
    }
    Ok(Some(()))
}

/// Bytes of `obj`, from the store (its file, never a mapping).
async fn read(filler: &Filler, digest: Digest) -> Option<Vec<u8>> {
    let store = filler.store().clone();
    let bytes = crate::telemetry::spawn_blocking(move || store.read_all(&digest)).await.ok()?.ok()??;
    Some(bytes.to_vec())
}

/// Try to get `component` at `version` by delta. `Ok(Some(bytes fetched))`
/// when it worked, `Ok(None)` when a full fill should be used instead.
pub async fn sync(
    filler: &Arc<Filler>,
    catalog: &Catalog,
    component: &str,
    version: &str,
) -> Result<Option<u64>, String> {
    let Some((_, c)) = catalog.component(component) else { return Ok(None) };
    let Some((target, target_obj)) = catalog.version(component, version) else { return Ok(None) };
    if target_obj.size > MAX_SYNC_SIZE {
        return Ok(None);
    }
    // The newest older version we hold.
    let mut older: Vec<_> = c.versions.iter().filter(|v| v.version < target.version).collect();
    older.sort_by(|a, b| b.version.cmp(&a.version));
    let Some(held) = older.into_iter().find(|v| filler.store().contains(&v.sha256)) else { return Ok(None) };
    if held.size > MAX_SYNC_SIZE {
        return Ok(None);
    }
    let Some(mut current) = read(filler, held.sha256).await else { return Ok(None) };

    for up in filler.upstreams().candidates() {
        let path = format!("v1/components/{component}/chain?from={}&to={}", held.version, target.version);
        let plan: Plan = match up.get_bytes(&path, 1 << 20).await {
            Ok(body) => match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(_) => continue, // not a patchrelay (or a broken one)
            },
            Err(_) => continue,
        };
        match checked_steps(&plan, catalog, component, target_obj.size) {
            Ok(Some(())) => {}
            Ok(None) => return Ok(None),
            Err(why) => return Err(format!("upstream {}: {why}", up.name)),
        }
        let mut fetched = 0u64;
        for step in &plan.steps {
            let Some((to_entry, to_obj)) = catalog.version(component, &step.to) else {
                return Err(format!("upstream {} planned through unknown version {:?}", up.name, step.to));
            };
            let bytes = up.get_bytes(step.url.trim_start_matches('/'), step.size).await.map_err(|e| e.to_string())?;
            fetched += bytes.len() as u64;
            if Digest::of(&bytes) != step.sha256 {
                return Err(format!("upstream {}: delta {} does not hash to its plan's sha256", up.name, step.url));
            }
            let header = delta::read_header(&bytes).map_err(|e| e.to_string())?;
            if !header.target.matches(&to_entry.sha256) {
                return Err(format!(
                    "upstream {}: delta {} builds {}, the manifest says {}",
                    up.name, step.url, header.target, to_entry.sha256
                ));
            }
            let base = std::mem::take(&mut current);
            let limit = to_obj.size;
            current = crate::telemetry::spawn_blocking(move || delta::apply(&base, &bytes, limit))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("upstream {}: delta {}: {e}", up.name, step.url))?;
        }
        if Digest::of(&current) != target.sha256 || current.len() as u64 != target_obj.size {
            return Err(format!("upstream {}: the delta chain did not rebuild {component} {version}", up.name));
        }
        let store = filler.store().clone();
        let digest = target.sha256;
        crate::telemetry::spawn_blocking(move || store.put(digest, &current))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let saved = target_obj.size.saturating_sub(fetched);
        metrics::counter!(telemetry::DELTA_SYNC, "result" => "ok").increment(1);
        metrics::counter!(telemetry::DELTA_SYNC_BYTES, "upstream" => up.name.clone()).increment(fetched);
        metrics::counter!(telemetry::DELTA_SYNC_SAVED, "upstream" => up.name.clone()).increment(saved);
        tracing::info!(
            upstream = %up.name,
            component,
            from = %held.version,
            to = version,
            delta_bytes = fetched,
            full_bytes = target_obj.size,
            "synced by delta"
        );
        return Ok(Some(fetched));
    }
    Ok(None)
}
