//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): logic that is
//! private to its room, driven here exactly as the relay and the agent drive
//! it, with results a target can check. Not an API; nothing else calls this.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::agent::{Plan, check_plan as agent_check_plan};
use crate::digest::{Digest, Hasher};
use crate::fill::task::Verifier;
use crate::repo::catalog::Catalog;
use crate::repo::sign::SecretKey;

/// The verifier's state after one piece of a transfer.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// What `feed` said: the verified mark moved.
    pub advanced: bool,
    pub verified: u64,
    /// How far waiters may read.
    pub servable: u64,
}

/// What a fill's verifier made of an object's bytes.
#[derive(Debug, Clone)]
pub struct ChunkRun {
    /// Bytes `0..verified` passed the chunk list.
    pub verified: u64,
    /// Bytes the verifier holds: all of them, or back to the verified mark
    /// after a bad block.
    pub written: u64,
    /// The verifier's running whole-object digest (of bytes `0..written`).
    pub whole: Digest,
    /// A block failed verification; the run stops there, as a transfer does.
    pub failed: bool,
    /// One per piece fed.
    pub marks: Vec<Mark>,
}

/// Feed `object` to a fill's verifier the way transfers do: in pieces of the
/// sizes in `split`, where a 0 is a broken transfer that another upstream
/// resumes from the verified mark (forgetting the block in flight), then the
/// rest at once. `list` is the chunk list, 32 bytes per block of
/// `chunk_size`; an empty list for a non-empty object verifies only as a
/// whole (`Verify::Whole`). `None`: a list or chunk size that a fill refuses
/// before verifying anything.
pub fn verify_chunks(object: &[u8], chunk_size: u64, list: &[u8], split: &[u8]) -> Option<ChunkRun> {
    let len = object.len() as u64;
    let whole_only = list.is_empty() && len > 0;
    let chunk_size = if whole_only { len } else { chunk_size };
    if chunk_size == 0 || (!whole_only && list.len() as u64 != len.div_ceil(chunk_size) * Digest::LEN as u64) {
        return None;
    }
    let blocks = list.chunks_exact(Digest::LEN).map(|c| c.try_into().unwrap_or([0u8; 32])).collect();
    let mut v = Verifier {
        len,
        blocks,
        chunk_size,
        verified: 0,
        written: 0,
        block: Hasher::new(),
        whole_at_verified: Hasher::new(),
        whole: Hasher::new(),
    };
    let (mut marks, mut failed) = (Vec::new(), false);
    for piece in split.iter().map(|&n| usize::from(n)).chain([usize::MAX]) {
        if v.written == len {
            break;
        }
        if piece == 0 {
            v.rewind();
            continue;
        }
        let from = v.written as usize;
        let data = &object[from..from.saturating_add(piece).min(object.len())];
        let advanced = match v.feed(data) {
            Ok(advanced) => advanced,
            Err(_) => {
                failed = true;
                false
            }
        };
        marks.push(Mark { advanced, verified: v.verified, servable: v.servable() });
        if failed {
            break;
        }
    }
    Some(ChunkRun { verified: v.verified, written: v.written, whole: v.whole.clone().finish(), failed, marks })
}

/// The component of [`plan_catalog`] that plans are checked for.
pub const PLAN_COMPONENT: &str = "engine";

/// The digest [`plan_catalog`] gives `engine` version `v`: of the text `engine-<v>`.
pub fn plan_digest(v: u64) -> Digest {
    Digest::of(format!("engine-{v}").as_bytes())
}

/// A catalog with `engine` at versions 171 to 175 (1000 to 1400 bytes, digests
/// from [`plan_digest`]) and `tool` at version 1, signed and verified as one
/// from an upstream is. Built once.
pub fn plan_catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let manifest = plan_manifest();
        // Any key will do: the catalog's contents do not depend on it.
        let key = match SecretKey::generate() {
            Ok(key) => key,
            Err(e) => panic!("fuzzing: {e}"),
        };
        let signature = key.sign(&manifest);
        match crate::repo::verify(&key.public(), Bytes::from(manifest), Bytes::from(signature)) {
            Ok(catalog) => catalog,
            Err(e) => panic!("fuzzing: the fixed manifest was refused: {e}"),
        }
    })
}

fn plan_manifest() -> Vec<u8> {
    let entry = |version: String, sha256: Digest, size: u64| {
        serde_json::json!({
            "version": version,
            "sha256": sha256,
            "size": size,
            "file_name": "p.bin",
            "chunk_size": 4096,
            "chunks_sha256": Digest::of(format!("chunks-{sha256}").as_bytes()),
        })
    };
    let engine: Vec<_> = (171..=175).map(|v| entry(v.to_string(), plan_digest(v), 1000 + (v - 171) * 100)).collect();
    let tool = [entry("1".into(), Digest::of(b"tool-1"), 500)];
    serde_json::to_vec(&serde_json::json!({
        "serial": 1,
        "generated_at": "2026-01-01T00:00:00Z",
        "components": {
            "engine": { "kind": "pattern", "critical": true, "latest": "175", "versions": engine },
            "tool": { "kind": "software", "latest": "1", "versions": tool },
        },
    }))
    .unwrap_or_default()
}

/// One step of a plan, as the agent read it.
#[derive(Debug, Clone)]
pub struct SeenStep {
    pub kind: String,
    pub to: String,
    pub size: u64,
    pub sha256: Digest,
}

/// Parse `json` as the agent parses a server's plan, then check it as the
/// agent does against [`plan_catalog`], for an update of [`PLAN_COMPONENT`]
/// to a version `full_bytes` long. `None`: not a plan (the agent gives up on
/// an unreadable one). Otherwise the steps and the check's verdict.
pub fn check_plan(json: &[u8], full_bytes: u64) -> Option<(Vec<SeenStep>, Result<(), String>)> {
    let plan: Plan = serde_json::from_slice(json).ok()?;
    let verdict = agent_check_plan(&plan.steps, plan_catalog(), PLAN_COMPONENT, full_bytes);
    let steps =
        plan.steps.into_iter().map(|s| SeenStep { kind: s.kind, to: s.to, size: s.size, sha256: s.sha256 }).collect();
    Some((steps, verdict))
}
