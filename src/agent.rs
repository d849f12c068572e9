//! The reference agent: `patchrelay agent update`.
//!
//! Brings one local file to the latest version of a component, the way an
//! endpoint agent should: verify the manifest's signature under a pinned key,
//! work out which version the file is (by its SHA-256), ask for the cheapest
//! plan, download each step with resume, rebuild, check the result against the
//! signed digest, and replace the file atomically. Every failure leaves the
//! old file untouched. A delta chain that fails verification (a damaged or
//! wrong delta, from a faulty or hostile server) is not the end: the agent
//! falls back to the full file once, verified the same way, as an agent in the
//! field must rather than stay behind.
//!
//! Exit codes (see [`AgentError::exit_code`]): 0 the file is the latest; 3 the
//! server's manifest cannot be trusted or does not have the component; 4 the
//! server could not be reached or kept failing (try again later); 5 downloaded
//! bytes failed verification; 1 anything else (local disk, bad arguments).

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{HumanDuration, UpstreamConfig, UpstreamUrl};
use crate::delta;
use crate::digest::{Digest, Hasher};
use crate::repo::sign::PublicKey;
use crate::repo::{self};
use crate::store::atomic::TempFile;
use crate::upstream::{ErrorKind, Upstream, Upstreams};

/// Attempts per download step before giving up (each resumes where the last
/// one stopped).
const ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot trust the server's manifest: {0}")]
    Trust(String),
    #[error("server: {0} (try again later)")]
    Network(String),
    #[error("downloaded data failed verification: {0}")]
    Integrity(String),
    #[error("local file: {0}")]
    Local(String),
}

impl AgentError {
    /// The same failure, saying that it came after a failed delta chain, so
    /// the first cause is not lost when the full download fails too.
    fn after(self, chain: &str) -> AgentError {
        let ctx = |m: String| format!("{m} (after the update chain failed verification: {chain})");
        match self {
            AgentError::Usage(m) => AgentError::Usage(ctx(m)),
            AgentError::Trust(m) => AgentError::Trust(ctx(m)),
            AgentError::Network(m) => AgentError::Network(ctx(m)),
            AgentError::Integrity(m) => AgentError::Integrity(ctx(m)),
            AgentError::Local(m) => AgentError::Local(ctx(m)),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Usage(_) | AgentError::Local(_) => 1,
            AgentError::Trust(_) => 3,
            AgentError::Network(_) => 4,
            AgentError::Integrity(_) => 5,
        }
    }
}

pub struct UpdateArgs {
    pub server: String,
    pub component: String,
    pub file: PathBuf,
    pub public_key: String,
    /// A specific version instead of the latest.
    pub to: Option<String>,
    /// A private CA for an https:// server, instead of the web's CAs.
    pub cacert: Option<PathBuf>,
    /// A client certificate and its key (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// What an update did (printed as JSON on stdout).
#[derive(Debug, Serialize)]
pub struct Report {
    pub component: String,
    pub from: Option<String>,
    pub to: String,
    /// `up_to_date`, `updated`.
    pub result: &'static str,
    pub steps: Vec<String>,
    pub downloaded_bytes: u64,
    pub full_bytes: u64,
    /// Why the delta chain was abandoned for the full file, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct Plan {
    pub(crate) steps: Vec<PlanStep>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct PlanStep {
    pub(crate) kind: String,
    from: String,
    pub(crate) to: String,
    url: String,
    pub(crate) size: u64,
    pub(crate) sha256: Digest,
}

fn net(e: impl std::fmt::Display) -> AgentError {
    AgentError::Network(e.to_string())
}

fn local(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Local(format!("{}: {e}", path.display()))
}

/// Run `agent update`.
pub async fn update(args: UpdateArgs) -> Result<Report, AgentError> {
    let key = PublicKey::parse(&args.public_key).map_err(|e| AgentError::Usage(format!("--public-key: {e}")))?;
    let url = UpstreamUrl::parse(&args.server).map_err(|e| AgentError::Usage(format!("--server: {e}")))?;
    let server = client(url, &args)?;

    // 1. The manifest, verified.
    let catalog = repo::fetch_verified(&server, &key).await.map_err(|(reason, why)| match reason {
        "fetch_failed" => AgentError::Network(why),
        _ => AgentError::Trust(why),
    })?;
    // No going back: a validly signed but older manifest (replayed on the
    // way, or from a stale or hostile server) would otherwise take the file
    // back to an older version.
    let serial_file = serial_path(&args.file);
    let seen = read_serial(&serial_file);
    if seen.is_some_and(|s| catalog.serial() < s) {
        return Err(AgentError::Trust(format!(
            "the server offers manifest serial {}, older than the {} this agent has verified (rollback refused)",
            catalog.serial(),
            seen.unwrap_or_default()
        )));
    }
    if seen != Some(catalog.serial()) {
        crate::store::atomic::write_atomic(&serial_file, format!("{}\n", catalog.serial()).as_bytes())
            .map_err(|e| local(&serial_file, e))?;
    }
    let (_, component) = catalog
        .component(&args.component)
        .ok_or_else(|| AgentError::Trust(format!("the manifest has no component {:?}", args.component)))?;
    let to = args.to.clone().unwrap_or_else(|| component.latest.to_string());
    let (target, target_obj) = catalog
        .version(&args.component, &to)
        .ok_or_else(|| AgentError::Trust(format!("{} has no version {to:?}", args.component)))?;
    let (target_sha, full_bytes) = (target.sha256, target_obj.size);

    // 2. Where the local file is.
    let current = match fs::read(&args.file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(local(&args.file, e)),
    };
    let current_sha = current.as_deref().map(Digest::of);
    let from =
        current_sha.and_then(|d| component.versions.iter().find(|v| v.sha256 == d)).map(|v| v.version.to_string());
    let mut report = Report {
        component: args.component.clone(),
        from: from.clone(),
        to: to.clone(),
        result: "up_to_date",
        steps: Vec::new(),
        downloaded_bytes: 0,
        full_bytes,
        fallback: None,
    };
    if current_sha == Some(target_sha) {
        return Ok(report);
    }

    // 3. The plan: cheapest from where we are, or the full file.
    let full = vec![PlanStep {
        kind: "full".into(),
        from: from.clone().unwrap_or_default(),
        to: to.clone(),
        // The object's own URL: served by relays, origins and static hosts alike.
        url: format!("/{}", repo::object_path(&target_sha)),
        size: full_bytes,
        sha256: target_sha,
    }];
    let mut refused_plan = None;
    let steps = match &from {
        Some(f) => {
            let path = format!("v1/components/{}/chain?from={f}&to={to}", args.component);
            let steps = match server.get_bytes(&path, 1 << 20).await {
                Ok(body) => {
                    serde_json::from_slice::<Plan>(&body)
                        .map_err(|e| AgentError::Network(format!("unreadable plan: {e}")))?
                        .steps
                }
                // A static web server hosting the repository has no plans:
                // the full file is the plan.
                Err(e) if matches!(e.kind, ErrorKind::Status(404 | 405 | 501)) => full.clone(),
                Err(e) => return Err(net(e)),
            };
            // The plan's numbers size downloads: they must agree with the
            // signed manifest, or the full file (whose size the manifest
            // gives) is fetched instead.
            match check_plan(&steps, &catalog, &args.component, full_bytes) {
                Ok(()) => steps,
                Err(why) => {
                    tracing::warn!(component = %args.component, reason = %why, "the server's plan is refused; downloading the full file");
                    refused_plan = Some(format!("plan refused: {why}"));
                    full.clone()
                }
            }
        }
        None => full.clone(),
    };

    // 4. Download each step (resumable), rebuild, verify. If a chain with
    // deltas fails verification, once more with the full file.
    let work = download_dir(&args.file);
    fs::create_dir_all(&work).map_err(|e| local(&work, e))?;
    let current = current.unwrap_or_default();
    report.fallback = refused_plan;
    let job = Job { server: &server, catalog: &catalog, component: &args.component, work: &work };
    let only_full = steps.len() == 1 && steps[0].kind == "full";
    let bytes = match job.run_to(&steps, &current, &target_sha, &mut report).await {
        Err(AgentError::Integrity(why)) if !only_full => {
            tracing::warn!(component = %args.component, reason = %why, "update chain failed verification; downloading the full file");
            // The failed chain's parts are of no further use; a part of the full
            // file left by an earlier run is, so it stays and is resumed.
            for step in &steps {
                let _ = fs::remove_file(work.join(step.sha256.to_hex()));
            }
            report.steps.clear();
            report.fallback = Some(why.clone());
            job.run_to(&full, &current, &target_sha, &mut report).await.map_err(|e| e.after(&why))?
        }
        other => other?,
    };

    // 5. Replace the file atomically.
    let dir = crate::store::atomic::parent_dir(&args.file);
    let mut tmp = TempFile::new_in(dir).map_err(|e| local(dir, e))?;
    tmp.file().write_all(&bytes).map_err(|e| local(dir, e))?;
    tmp.persist(&args.file).map_err(|e| local(&args.file, e))?;
    let _ = fs::remove_dir_all(&work);
    report.result = "updated";
    Ok(report)
}

/// Whether a server's plan agrees with the signed manifest: every step ends at
/// a listed version; a full step is exactly that version (its size and
/// digest); a delta is smaller than the version it builds; and the whole is
/// not more than the full target. Nothing a hostile server writes in a plan
/// can then make this agent download more than the manifest allows.
pub(crate) fn check_plan(
    steps: &[PlanStep],
    catalog: &repo::catalog::Catalog,
    component: &str,
    full_bytes: u64,
) -> Result<(), String> {
    let versions = catalog.component(component).map(|(_, c)| c.versions.len()).unwrap_or(0);
    if steps.len() > versions {
        return Err(format!("{} steps for a component with {versions} versions", steps.len()));
    }
    let mut total = 0u64;
    for step in steps {
        let (entry, obj) = catalog
            .version(component, &step.to)
            .ok_or_else(|| format!("it goes through unknown version {:?}", step.to))?;
        match step.kind.as_str() {
            "full" if step.size == obj.size && step.sha256 == entry.sha256 => {}
            "full" => return Err(format!("its full step to {} does not match the manifest", step.to)),
            "delta" if step.size < obj.size => {}
            "delta" => return Err(format!("its delta to {} is not smaller than the version itself", step.to)),
            other => return Err(format!("unknown step kind {:?}", other.chars().take(16).collect::<String>())),
        }
        total = total.saturating_add(step.size);
    }
    if total > full_bytes {
        return Err(format!("it costs {total} bytes, more than the {full_bytes}-byte full file"));
    }
    Ok(())
}

/// What downloading and applying a plan needs.
struct Job<'a> {
    server: &'a Arc<Upstream>,
    catalog: &'a repo::catalog::Catalog,
    component: &'a str,
    work: &'a Path,
}

impl Job<'_> {
    /// [`Job::run`], and the result must be the target: a plan that stops short
    /// (a faulty server's) fails verification like a bad step.
    async fn run_to(
        &self,
        steps: &[PlanStep],
        base: &[u8],
        target: &Digest,
        report: &mut Report,
    ) -> Result<Vec<u8>, AgentError> {
        let bytes = self.run(steps, base, report).await?;
        if Digest::of(&bytes) != *target {
            return Err(AgentError::Integrity("the plan did not end at the target version".into()));
        }
        Ok(bytes)
    }

    /// Download each step (resumable) and rebuild from `base`, which is only
    /// read (a fallback starts from it again); every step's result is checked
    /// against the signed manifest before the next.
    async fn run(&self, steps: &[PlanStep], base: &[u8], report: &mut Report) -> Result<Vec<u8>, AgentError> {
        let mut built: Option<Vec<u8>> = None;
        for step in steps {
            let (step_to, _) = self
                .catalog
                .version(self.component, &step.to)
                .ok_or_else(|| AgentError::Trust(format!("the plan goes through unknown version {:?}", step.to)))?;
            let part = self.work.join(step.sha256.to_hex());
            report.downloaded_bytes += fetch(self.server, &step.url, &part, step.size, &step.sha256).await?;
            let data = fs::read(&part).map_err(|e| local(&part, e))?;
            let bytes = match step.kind.as_str() {
                "delta" => {
                    let h = delta::read_header(&data).map_err(|e| AgentError::Integrity(e.to_string()))?;
                    if !h.target.matches(&step_to.sha256) {
                        return Err(AgentError::Integrity(format!(
                            "delta {} -> {} builds the wrong version",
                            step.from, step.to
                        )));
                    }
                    // Refused before anything is written if it is not for our file.
                    let limit = self.catalog.object(&step_to.sha256).map(|o| o.size).unwrap_or(0);
                    delta::apply(built.as_deref().unwrap_or(base), &data, limit)
                        .map_err(|e| AgentError::Integrity(format!("delta {} -> {}: {e}", step.from, step.to)))?
                }
                _ => data,
            };
            if Digest::of(&bytes) != step_to.sha256 {
                return Err(AgentError::Integrity(format!("the rebuilt {} does not match the manifest", step.to)));
            }
            report.steps.push(format!("{} {}->{} ({} bytes)", step.kind, step.from, step.to, step.size));
            built = Some(bytes);
        }
        Ok(built.unwrap_or_else(|| base.to_vec()))
    }
}

fn client(url: UpstreamUrl, args: &UpdateArgs) -> Result<Arc<Upstream>, AgentError> {
    if !url.https && (args.cacert.is_some() || args.client_cert.is_some()) {
        return Err(AgentError::Usage("--cacert, --cert and --key are for an https:// server".into()));
    }
    let cfg = UpstreamConfig {
        url,
        ca: args.cacert.clone(),
        web_roots: None,
        client_cert: args.client_cert.as_ref().map(|c| c.0.clone()),
        client_key: args.client_cert.as_ref().map(|c| c.1.clone()),
        server_name: None,
        name: Some("server".into()),
        connect_timeout: HumanDuration(Duration::from_secs(10)),
        read_timeout: HumanDuration(Duration::from_secs(60)),
        proxy: None,
        max_concurrent_fills: 1,
        fill_deadline: HumanDuration(Duration::from_secs(1800)),
    };
    let ups = Upstreams::with_user_agent(std::slice::from_ref(&cfg), crate::upstream::AGENT_USER_AGENT)
        .map_err(|e| AgentError::Usage(e.to_string()))?;
    ups.list().first().cloned().ok_or_else(|| AgentError::Usage("no server".into()))
}

/// `PATH.patchrelay-serial`: the highest manifest serial this agent has
/// verified for `PATH`, so that an older manifest is refused.
pub fn serial_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".patchrelay-serial");
    file.with_file_name(name)
}

fn read_serial(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `PATH.patchrelay-download/`: partial downloads, kept across runs so an
/// interrupted update resumes.
pub fn download_dir(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".patchrelay-download");
    file.with_file_name(name)
}

/// Download `url` into `part` (resuming what is there), and check its digest.
/// Returns the bytes transferred now.
async fn fetch(server: &Arc<Upstream>, url: &str, part: &Path, size: u64, sha: &Digest) -> Result<u64, AgentError> {
    let path = url.trim_start_matches('/');
    let mut transferred = 0u64;
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * (1 << attempt.min(5)))).await;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(part)
            .map_err(|e| local(part, e))?;
        let mut have = file.metadata().map_err(|e| local(part, e))?.len();
        if have > size {
            file.set_len(0).map_err(|e| local(part, e))?;
            have = 0;
        }
        if have < size {
            // The server's ETag is the content's digest, which we know: resume
            // only if it still names the same bytes.
            let etag = sha.etag();
            let mut body = match server.get_from(path, have, Some(&etag)).await {
                Ok(b) => b,
                Err(e) if matches!(e.kind, ErrorKind::Status(404 | 410)) => {
                    return Err(AgentError::Network(e.to_string()));
                }
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            if body.start == 0 && have > 0 {
                file.set_len(0).map_err(|e| local(part, e))?;
                have = 0;
            }
            file.seek(SeekFrom::Start(have)).map_err(|e| local(part, e))?;
            let mut broke = false;
            loop {
                match body.next_chunk().await {
                    Ok(Some(chunk)) => {
                        if have + chunk.len() as u64 > size {
                            return Err(AgentError::Integrity(format!("{url} is longer than the plan says")));
                        }
                        file.write_all(&chunk).map_err(|e| local(part, e))?;
                        have += chunk.len() as u64;
                        transferred += chunk.len() as u64;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        last_error = e.to_string();
                        broke = true;
                        break;
                    }
                }
            }
            file.sync_all().map_err(|e| local(part, e))?;
            if broke || have < size {
                continue;
            }
        }
        // Complete: check it.
        file.seek(SeekFrom::Start(0)).map_err(|e| local(part, e))?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| local(part, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if h.finish() == *sha {
            return Ok(transferred);
        }
        // Wrong bytes: start this step over once more, from nothing.
        drop(file);
        let _ = fs::remove_file(part);
        last_error = format!("{url} does not hash to {sha}");
        if attempt + 1 == ATTEMPTS {
            return Err(AgentError::Integrity(last_error));
        }
    }
    Err(AgentError::Network(format!("{url}: {last_error}")))
}
