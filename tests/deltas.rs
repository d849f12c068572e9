//! Incremental updates end to end: the reference agent (the real binary) at
//! every older version reaches the latest through origin <- relay <- relay,
//! deltas that are tampered with or made for another base are refused before
//! the file is touched (the agent then takes the full file, and if that is bad
//! too, leaves its file as it was), an interrupted delta download resumes, and
//! relays sync new versions from each other by delta.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy};
use common::*;
use patchrelay::config::Config;
use patchrelay::digest::Digest;

/// A binary component whose releases differ in a few places.
fn blob(version: u64) -> Vec<u8> {
    let mut b = noise(77, 2 << 20);
    for v in 1..=version {
        let at = (v as usize * 300_007) % (b.len() - 40_000);
        b[at..at + 40_000].copy_from_slice(&noise(1000 + v, 40_000));
    }
    b
}

/// A 12 MiB component whose versions differ in one place: a delta between two
/// takes a second or so to build.
fn big_blob(version: u64) -> Vec<u8> {
    let mut b = noise(5, 12 << 20);
    b[(version as usize) * 1_000_000..][..50_000].copy_from_slice(&noise(version, 50_000));
    b
}

fn origin_with_deltas(repo: &TestRepo, storage: &Path) -> Config {
    origin_with_deltas_and(repo, storage, "", "")
}

/// An origin keeping deltas in `storage`, with `storage_extra` in its
/// `[storage]` and `extra` appended.
fn origin_with_deltas_and(repo: &TestRepo, storage: &Path, storage_extra: &str, extra: &str) -> Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[origin]\nrepository = {:?}\nreload_interval = \"100ms\"\n[storage]\ndir = {:?}\n{storage_extra}\n[trust]\npublic_key = \"{}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n{extra}",
        repo.repo.display().to_string(),
        storage.display().to_string(),
        repo.public
    );
    Config::from_toml(&toml, "origin.toml").unwrap()
}

struct AgentRun {
    code: i32,
    report: serde_json::Value,
    stderr: String,
}

async fn agent(server: &str, component: &str, file: &Path, key: &str) -> AgentRun {
    let args: Vec<String> = vec![
        "agent".into(),
        "update".into(),
        "--server".into(),
        server.into(),
        "--component".into(),
        component.into(),
        "--file".into(),
        file.display().to_string(),
        "--public-key".into(),
        key.into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_patchrelay")).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    AgentRun {
        code: out.status.code().unwrap_or(-1),
        report: serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

async fn plan(server: &str, component: &str, from: &str) -> serde_json::Value {
    client()
        .get(format!("{server}/v1/components/{component}/chain?from={from}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Poll until the plan from `from` starts with a delta (deltas are built in the background).
async fn wait_for_delta_plan(server: &str, component: &str, from: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = plan(server, component, from).await;
        if p["steps"][0]["kind"] == "delta" {
            return p;
        }
        assert!(Instant::now() < deadline, "no delta plan appeared: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn agents_at_every_older_version_reach_the_latest_through_two_relays() {
    let repo = TestRepo::bare();
    repo.write_meta("engine", "kind = \"pattern\"\ncritical = true\n");
    for v in 1..=5 {
        repo.add_version("engine", &v.to_string(), &TestRepo::engine_bytes(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas(&repo, &dirs.path().join("o"))).await;
    let relay1 = start_relay(&[&origin.url()], &repo.public, &dirs.path().join("r1")).await;
    assert!(wait_ready(&relay1.url(), Duration::from_secs(10)).await);
    let relay2 = start_relay(&[&relay1.url()], &repo.public, &dirs.path().join("r2")).await;
    assert!(wait_ready(&relay2.url(), Duration::from_secs(10)).await);
    let latest = TestRepo::engine_bytes(5);
    let full = latest.len() as u64;

    // The retained versions (3, 4) get precomputed deltas; 1 and 2 get one
    // built when first asked for.
    for v in 1..=4u64 {
        wait_for_delta_plan(&relay2.url(), "engine", &v.to_string()).await;
        let file = dirs.path().join(format!("agent-{v}.sig"));
        std::fs::write(&file, TestRepo::engine_bytes(v)).unwrap();
        let run = agent(&relay2.url(), "engine", &file, &repo.public).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(std::fs::read(&file).unwrap(), latest);
        let got = run.report["downloaded_bytes"].as_u64().unwrap();
        assert!(got * 20 < full, "version {v}: {got} bytes for a {full}-byte file: {}", run.report);
        eprintln!("agent at {v}: {got} bytes instead of {full} ({})", run.report["steps"]);
        assert!(!patchrelay::agent::download_dir(&file).exists());
        // Running again is a no-op that says so.
        let again = agent(&relay2.url(), "engine", &file, &repo.public).await;
        assert_eq!((again.code, again.report["result"].as_str()), (0, Some("up_to_date")));
    }
    // No file yet: the full file.
    let fresh = dirs.path().join("fresh.sig");
    let run = agent(&relay2.url(), "engine", &fresh, &repo.public).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.report["downloaded_bytes"].as_u64(), Some(full));
    assert_eq!(std::fs::read(&fresh).unwrap(), latest);

    // Fleet freshness: every agent's plan request recorded its lag.
    let n = metric(&relay2.url(), "patchrelay_agent_version_lag_count", &[("component", "engine")]).await;
    assert!(n >= 4.0, "{n}");
    // Plans: same version, unknown version, unknown component, bad query.
    let p = plan(&relay2.url(), "engine", "5").await;
    assert_eq!((p["steps"].as_array().unwrap().len(), p["total_bytes"].as_u64()), (0, Some(0)));
    let r = client().get(format!("{}/v1/components/engine/chain?from=99", relay2.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client().get(format!("{}/v1/components/nope/chain?from=1", relay2.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client().get(format!("{}/v1/components/engine/chain", relay2.url())).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[actix_web::test]
async fn bad_deltas_fall_back_to_the_full_file_and_bad_files_never_touch_it() {
    let repo = TestRepo::bare();
    for v in 1..=3 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas(&repo, &dirs.path().join("o"))).await;
    let delta_2_3 = client()
        .get(format!("{}/v1/components/blob/deltas/2/3", origin.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(delta_2_3.len() < 200_000, "{}", delta_2_3.len());

    // A server that plans 1 -> 3 in one delta step, but serves the 2 -> 3
    // delta (wrong base), or a tampered copy of it.
    let evil = ScriptedUpstream::start().await;
    evil.files.load_repo(&repo.repo);
    let plan_for = |bytes: &[u8]| {
        serde_json::json!({"component": "blob", "from": "1", "to": "3", "total_bytes": bytes.len(), "full_bytes": blob(3).len(),
            "steps": [{"kind": "delta", "from": "1", "to": "3", "url": "/v1/components/blob/deltas/1/3", "size": bytes.len(),
                       "sha256": Digest::of(bytes)}]})
        .to_string()
    };
    let mut tampered = delta_2_3.to_vec();
    let at = tampered.len() - 100;
    tampered[at] ^= 0x40;
    // The server also has the full file, as every server does (the agent
    // takes it by its object URL, which static hosts serve too).
    let no_temp_files = |case: &str| {
        let leftovers: Vec<_> = std::fs::read_dir(dirs.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{case}: temp files left");
    };
    for (case, bytes) in [("wrong base", delta_2_3.to_vec()), ("tampered", tampered.clone())] {
        evil.files.put("v1/components/blob/chain", plan_for(&bytes));
        evil.files.put("v1/components/blob/deltas/1/3", bytes);
        let file = dirs.path().join(format!("{}.bin", case.replace(' ', "-")));
        std::fs::write(&file, blob(1)).unwrap();
        // The delta is refused before it is applied, and the agent gets the
        // full file instead, checked against the manifest all the same.
        let run = agent(&evil.url, "blob", &file, &repo.public).await;
        assert_eq!(run.code, 0, "{case}: {}", run.stderr);
        assert_eq!(std::fs::read(&file).unwrap(), blob(3), "{case}");
        let why = run.report["fallback"].as_str().unwrap_or_default().to_string();
        assert!(!why.is_empty(), "{case}: no fallback reported: {}", run.report);
        if case == "wrong base" {
            assert!(why.contains("delta is for base"), "{why}");
        }
        let steps = run.report["steps"].as_array().unwrap();
        assert!(steps.len() == 1 && steps[0].as_str().unwrap().starts_with("full 1->3"), "{steps:?}");
        no_temp_files(case);
    }

    // A plan that stops short of the target (every step fine, none reaching it):
    // the same fallback.
    evil.files.put(
        "v1/components/blob/chain",
        serde_json::json!({"component": "blob", "from": "1", "to": "3", "total_bytes": 0,
                           "full_bytes": blob(3).len(), "steps": []})
        .to_string(),
    );
    let file = dirs.path().join("short-plan.bin");
    std::fs::write(&file, blob(1)).unwrap();
    let run = agent(&evil.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(3));
    assert!(run.report["fallback"].as_str().unwrap_or_default().contains("did not end"), "{}", run.report);

    // The full file is damaged too: nothing verifies, exit 5, the file is untouched.
    let mut bad_full = blob(3);
    bad_full[1000] ^= 0x01;
    evil.files.put(&format!("v1/objects/{}", repo.sha("blob", "3")), bad_full);
    let file = dirs.path().join("all-bad.bin");
    std::fs::write(&file, blob(1)).unwrap();
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let run = agent(&evil.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("after the update chain failed verification"), "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(1), "file changed");
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), before);
    no_temp_files("all bad");

    // A forged manifest: exit 3, file untouched.
    let forged = String::from_utf8(repo.manifest_bytes()).unwrap().replacen("\"serial\": 1", "\"serial\": 2", 1);
    evil.files.put("v1/manifest", forged);
    let file = dirs.path().join("forged.bin");
    std::fs::write(&file, blob(1)).unwrap();
    let run = agent(&evil.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(1));
}

#[actix_web::test]
async fn an_interrupted_delta_download_resumes() {
    let repo = TestRepo::bare();
    for v in 1..=2 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas(&repo, &dirs.path().join("o"))).await;
    wait_for_delta_plan(&origin.url(), "blob", "1").await;
    let proxy = FaultProxy::start(origin.addr.to_string(), "/deltas/").await;
    proxy.plan([Fault::CutAfter(30_000)]);
    let file = dirs.path().join("blob.bin");
    std::fs::write(&file, blob(1)).unwrap();
    let run = agent(&proxy.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(2));
    let seen = proxy.seen("/deltas/1/2");
    assert_eq!(seen.len(), 2, "{seen:?}");
    let from: u64 =
        seen[1].split("bytes=").nth(1).expect("second request resumes").trim_end_matches('-').parse().unwrap();
    assert!(from > 0);
}

#[actix_web::test]
async fn relays_sync_new_versions_from_each_other_by_delta() {
    let repo = TestRepo::bare();
    repo.write_meta("blob", "kind = \"pattern\"\ncritical = true\n");
    repo.add_version("blob", "1", &blob(1));
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas(&repo, &dirs.path().join("o"))).await;
    let relay1 = start_relay(&[&origin.url()], &repo.public, &dirs.path().join("r1")).await;
    assert!(wait_ready(&relay1.url(), Duration::from_secs(10)).await);
    let relay2 = start_relay(&[&relay1.url()], &repo.public, &dirs.path().join("r2")).await;
    assert!(wait_ready(&relay2.url(), Duration::from_secs(10)).await);
    let sha1 = repo.sha("blob", "1");
    let cached = |dir: &str, sha: &str| dirs.path().join(dir).join("objects").join(&sha[..2]).join(sha).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(cached("r1", &sha1) && cached("r2", &sha1)) {
        assert!(Instant::now() < deadline, "version 1 was not prefetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Version 2 is published; each hop syncs it by delta once its upstream has one.
    repo.add_version("blob", "2", &blob(2));
    repo.publish();
    let sha2 = repo.sha("blob", "2");
    admin_sync(&origin.url()).await;
    wait_for_delta_plan(&origin.url(), "blob", "1").await;
    let (status, report) = admin_sync(&relay1.url()).await;
    assert_eq!(status, 200, "{report}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cached("r1", &sha2) {
        assert!(Instant::now() < deadline, "relay1 did not get version 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_delta_plan(&relay1.url(), "blob", "1").await;
    let (status, _) = admin_sync(&relay2.url()).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cached("r2", &sha2) {
        assert!(Instant::now() < deadline, "relay2 did not get version 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let full = blob(2).len() as f64;
    // Each relay reports what it synced from its own upstream.
    for (relay, upstream) in [(&relay1, &origin), (&relay2, &relay1)] {
        let label = format!("up0-{}", upstream.addr.port());
        let saved = metric(&relay.url(), "patchrelay_delta_sync_saved_bytes_total", &[("upstream", &label)]).await;
        let fetched = metric(&relay.url(), "patchrelay_delta_sync_bytes_total", &[("upstream", &label)]).await;
        assert!(fetched > 0.0 && fetched * 10.0 < full, "from {label}: fetched {fetched} of {full}");
        assert!(saved > 0.0);
        eprintln!("sync from {label}: {fetched} delta bytes instead of {full} (saved {saved})");
    }
    // And it is the right version, served from the second relay.
    let r = client().get(format!("{}/v1/components/blob/latest", relay2.url())).send().await.unwrap();
    assert_eq!(Digest::of(&r.bytes().await.unwrap()).to_hex(), sha2);
}

/// A server whose plan claims a terabyte-sized step (and whose delta URL
/// answers with a terabyte Content-Length): the agent checks the plan against
/// the signed manifest, refuses it, and takes the full file instead.
#[actix_web::test]
async fn the_agent_refuses_plans_the_manifest_does_not_allow() {
    let repo = TestRepo::bare();
    for v in 1..=2 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let evil = ScriptedUpstream::start().await;
    evil.files.load_repo(&repo.repo);
    let huge: u64 = 1 << 50; // more than any address space: an allocation of it aborts
    evil.files.put(
        "v1/components/blob/chain",
        serde_json::json!({"component": "blob", "from": "1", "to": "2", "total_bytes": huge, "full_bytes": huge,
            "steps": [{"kind": "delta", "from": "1", "to": "2", "url": "/v1/components/blob/deltas/1/2", "size": huge,
                       "sha256": Digest::of(b"x")}]})
        .to_string(),
    );
    evil.files.put("v1/components/blob/deltas/1/2", vec![0u8; 1000]);
    evil.claimed_len.write().unwrap().insert("v1/components/blob/deltas/1/2".into(), huge);
    let dirs = tempfile::tempdir().unwrap();
    let file = dirs.path().join("blob.bin");
    std::fs::write(&file, blob(1)).unwrap();
    let run = agent(&evil.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(2));
    let why = run.report["fallback"].as_str().unwrap_or_default();
    assert!(why.contains("plan refused") && why.contains("not smaller"), "{}", run.report);
    assert!(!std::fs::read_dir(dirs.path()).unwrap().any(|e| e.unwrap().path().is_dir()), "download dir left");
}

/// An agent that has verified serial 2 refuses a validly signed serial 1
/// (replayed, or from a stale server) instead of going back to its latest.
#[actix_web::test]
async fn the_agent_refuses_an_older_manifest() {
    let repo = TestRepo::bare();
    repo.add_version("blob", "1", &blob(1));
    repo.publish();
    let old = ScriptedUpstream::start().await;
    old.files.load_repo(&repo.repo);
    repo.add_version("blob", "2", &blob(2));
    repo.publish();
    let origin = start_origin(&repo).await;
    let dirs = tempfile::tempdir().unwrap();
    let file = dirs.path().join("blob.bin");
    let run = agent(&origin.url(), "blob", &file, &repo.public).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(2));
    let run = agent(&old.url, "blob", &file, &repo.public).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("rollback refused"), "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), blob(2), "the file went back to an older version");
}

/// The demo prints `--file lpt.sig`: a bare relative name. The agent updates
/// it in place, exits 0 and cleans up after itself.
#[actix_web::test]
async fn the_agent_updates_a_bare_relative_file_name() {
    let repo = TestRepo::bare();
    for v in 1..=2 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let origin = start_origin(&repo).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("blob.bin"), blob(1)).unwrap();
    let (url, public, cwd) = (origin.url(), repo.public.clone(), dir.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["agent", "update", "--server", &url, "--component", "blob", "--file", "blob.bin", "--public-key"])
            .arg(&public)
            .current_dir(&cwd)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.path().join("blob.bin")).unwrap(), blob(2));
    let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["blob.bin", "blob.bin.patchrelay-serial"], "left behind: {left:?}");
}

/// An upstream patchrelay whose plan for a delta sync claims a terabyte step,
/// served with a terabyte Content-Length: the relay refuses the plan (it does
/// not size a buffer by it) and fetches the full file instead.
#[actix_web::test]
async fn a_relay_refuses_delta_sync_plans_the_manifest_does_not_allow() {
    let repo = TestRepo::bare();
    repo.write_meta("blob", "kind = \"pattern\"\ncritical = true\n");
    repo.add_version("blob", "1", &blob(1));
    repo.publish();
    let evil = ScriptedUpstream::start().await;
    evil.files.load_repo(&repo.repo);
    let dirs = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&evil.url], &repo.public, &dirs.path().join("r")).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let cached = |sha: &str| dirs.path().join("r/objects").join(&sha[..2]).join(sha).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cached(&repo.sha("blob", "1")) {
        assert!(Instant::now() < deadline, "version 1 was not prefetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    repo.add_version("blob", "2", &blob(2));
    repo.publish();
    evil.files.load_repo(&repo.repo);
    let huge: u64 = 1 << 50; // more than any address space: an allocation of it aborts
    evil.files.put(
        "v1/components/blob/chain",
        serde_json::json!({"component": "blob", "from": "1", "to": "2", "total_bytes": 100, "full_bytes": huge,
            "steps": [{"kind": "delta", "from": "1", "to": "2", "url": "/v1/components/blob/deltas/1/2", "size": huge,
                       "sha256": Digest::of(b"x")}]})
        .to_string(),
    );
    evil.files.put("v1/components/blob/deltas/1/2", vec![0u8; 1000]);
    evil.claimed_len.write().unwrap().insert("v1/components/blob/deltas/1/2".into(), huge);
    let (status, report) = admin_sync(&relay.url()).await;
    assert_eq!(status, 200, "{report}");
    let sha2 = repo.sha("blob", "2");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cached(&sha2) {
        assert!(Instant::now() < deadline, "version 2 was not fetched in full after the plan was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client().get(format!("{}/v1/components/blob/latest", relay.url())).send().await.unwrap();
    assert_eq!(Digest::of(&r.bytes().await.unwrap()).to_hex(), sha2);
}

/// Deltas go forward between listed versions only; anything else is refused
/// before any work.
#[actix_web::test]
async fn deltas_only_from_older_to_newer_listed_versions() {
    let repo = TestRepo::bare();
    for v in 1..=2 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas(&repo, &dirs.path().join("o"))).await;
    for (pair, code) in [("2/1", 404), ("1/1", 404), ("1/9", 404), ("0/2", 404), ("1/2", 200)] {
        let r = client().get(format!("{}/v1/components/blob/deltas/{pair}", origin.url())).send().await.unwrap();
        assert_eq!(r.status(), code, "{pair}: {}", r.text().await.unwrap());
    }
    let built = std::fs::read_dir(dirs.path().join("o/state/deltas")).unwrap().count();
    assert_eq!(built, 1, "only 1 -> 2 was built");
}

/// With `delta.queue = 1`, five requests for five different deltas at once:
/// one builds, the others are told to come back (503 with Retry-After) at
/// once instead of waiting in an unbounded queue.
#[actix_web::test]
async fn delta_builds_beyond_the_queue_are_refused_at_once() {
    let repo = TestRepo::bare();
    for v in 1..=6 {
        repo.add_version("blob", &v.to_string(), &big_blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas_and(&repo, &dirs.path().join("o"), "", "[delta]\nqueue = 1\n")).await;
    let c = client();
    let asks = (2..=6).map(|to| {
        let url = format!("{}/v1/components/blob/deltas/1/{to}", origin.url());
        let c = c.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = c.get(url).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status().as_u16(), retry, started.elapsed(), r.bytes().await.unwrap())
        })
    });
    let asks: Vec<_> = asks.collect();
    let mut ok = 0;
    let mut busy = 0;
    for a in asks {
        let (status, retry, took, body) = a.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert!(retry.is_some_and(|s| s >= 1), "no Retry-After");
                assert!(took < Duration::from_secs(1), "a refused build waited {took:?}");
                assert!(String::from_utf8_lossy(&body).contains("\"busy\""));
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} built, {busy} refused");
}

/// A delta is a download: an agent at its concurrency limit is refused
/// (429) before the delta is built.
#[actix_web::test]
async fn delta_requests_are_admitted_before_they_are_built() {
    let repo = TestRepo::bare();
    for v in 1..=2 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let limits = "[[limits.policy]]\nname = \"all\"\nrate = \"64KiB/s\"\nmax_concurrent = 1\n";
    let origin = start(&origin_with_deltas_and(&repo, &dirs.path().join("o"), "", limits)).await;
    // The agent's one download slot: a 2 MiB version at 64 KiB/s.
    let mut slow = client()
        .get(format!("{}/v1/components/blob/versions/1", origin.url()))
        .header("x-agent-id", "ws-1")
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    slow.chunk().await.unwrap();
    let r = client()
        .get(format!("{}/v1/components/blob/deltas/1/2", origin.url()))
        .header("x-agent-id", "ws-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    // A HEAD of a delta not built yet would cost the same build.
    let r = client()
        .head(format!("{}/v1/components/blob/deltas/1/2", origin.url()))
        .header("x-agent-id", "ws-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(std::fs::read_dir(dirs.path().join("o/state/deltas")).unwrap().count(), 0, "built before admission");
    drop(slow);
}

/// An origin keeps its deltas within `storage.max_size` like a relay.
#[actix_web::test]
async fn an_origin_keeps_its_deltas_within_its_budget() {
    let repo = TestRepo::bare();
    for v in 1..=6 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let store = dirs.path().join("o");
    let origin = start(&origin_with_deltas_and(&repo, &store, "max_size = \"150KB\"", "")).await;
    for to in 2..=6 {
        let r = client().get(format!("{}/v1/components/blob/deltas/1/{to}", origin.url())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let used = || -> u64 {
        let mut n = 0;
        for fan in std::fs::read_dir(store.join("objects")).unwrap().flatten() {
            for f in std::fs::read_dir(fan.path()).unwrap().flatten() {
                n += f.metadata().unwrap().len();
            }
        }
        n
    };
    let before = used();
    assert!(before > 150_000, "the deltas ({before} bytes) do not exceed the budget; the test proves nothing");
    let deadline = Instant::now() + Duration::from_secs(10);
    while used() > 150_000 {
        assert!(Instant::now() < deadline, "still {} bytes of deltas over a 150 KB budget", used());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests keep every request build slot busy while a critical pattern gets
/// a new version: its deltas are still precomputed (they have a slot of
/// their own).
#[actix_web::test]
async fn critical_precompute_is_not_starved_by_requests() {
    let repo = TestRepo::bare();
    repo.write_meta("engine", "kind = \"pattern\"\ncritical = true\n");
    for v in 1..=2 {
        repo.add_version("engine", &v.to_string(), &TestRepo::engine_bytes(v));
    }
    // Deltas between these take over a second each to build: the requests
    // below keep the request slot busy for half a minute.
    for v in 1..=8 {
        repo.add_version("blob", &v.to_string(), &big_blob(v));
    }
    repo.publish();
    let dirs = tempfile::tempdir().unwrap();
    let origin = start(&origin_with_deltas_and(&repo, &dirs.path().join("o"), "", "[delta]\nqueue = 1\n")).await;
    wait_for_delta_plan(&origin.url(), "engine", "1").await;
    // Keep the one request slot busy: four agents asking for deltas back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4u64)
        .map(|i| {
            let (url, stop, c) = (origin.url(), stop.clone(), client());
            tokio::spawn(async move {
                let mut pairs = (1..8u64).flat_map(|a| ((a + 1)..=8).map(move |b| (a, b))).cycle().skip(i as usize * 5);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (a, b) = pairs.next().unwrap();
                    let _ = c.get(format!("{url}/v1/components/blob/deltas/{a}/{b}")).send().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    repo.add_version("engine", "3", &TestRepo::engine_bytes(3));
    repo.publish();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = plan(&origin.url(), "engine", "2").await;
        if p["to"] == "3" && p["steps"][0]["kind"] == "delta" {
            break;
        }
        assert!(Instant::now() < deadline, "the critical delta 2 -> 3 was not precomputed within 15 s: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
}

/// The delta index forgets deltas between versions the manifest no longer
/// lists (and their bytes), and entries whose bytes were evicted.
#[actix_web::test]
async fn the_delta_index_is_pruned() {
    use patchrelay::actors::deltas::{DeltaBuilder, DeltaService, Objects};
    use patchrelay::repo::{RepoDir, read_pair, verify};
    use patchrelay::store::{Store, StoreOptions};
    let repo = TestRepo::bare();
    for v in 1..=3 {
        repo.add_version("blob", &v.to_string(), &blob(v));
    }
    repo.publish();
    let key = patchrelay::repo::sign::PublicKey::parse(&repo.public).unwrap();
    let catalog = |r: &TestRepo| {
        let (m, s) = read_pair(&RepoDir::new(&r.repo)).unwrap().unwrap();
        verify(&key, m, s).unwrap()
    };
    let full = catalog(&repo);
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { memory_cache: 1 << 20, memory_object_max: 1024, max_size: None, mmap: false };
    let (store, _) = Store::open(dir.path(), &opts).unwrap();
    let builder = DeltaBuilder::start(1, Default::default());
    let deltas =
        DeltaService::open(store.clone(), Objects::Origin(RepoDir::new(&repo.repo)), builder, 4, 1 << 30).unwrap();
    let obj = |c: &patchrelay::repo::catalog::Catalog, v: &str| c.version("blob", v).unwrap().1.clone();
    let d12 = deltas.build(&obj(&full, "1"), &obj(&full, "2")).await.unwrap();
    let d23 = deltas.build(&obj(&full, "2"), &obj(&full, "3")).await.unwrap();
    assert_eq!(deltas.prune(&full), 0, "nothing to prune yet");

    // Version 1 is withdrawn: 1 -> 2 goes, index entry and bytes.
    let mut m: serde_json::Value = serde_json::from_slice(&full.manifest_bytes).unwrap();
    m["serial"] = 2.into();
    m["components"]["blob"]["versions"].as_array_mut().unwrap().retain(|v| v["version"] != "1");
    let bytes = serde_json::to_vec(&m).unwrap();
    let sig = repo.key.sign(&bytes);
    let withdrawn = verify(&key, bytes.into(), sig.into()).unwrap();
    assert_eq!(deltas.prune(&withdrawn), 1);
    assert!(!store.contains(&d12.sha256));
    assert!(deltas.get(&obj(&full, "2").sha256, &obj(&full, "3").sha256).is_some());
    assert_eq!(std::fs::read_dir(dir.path().join("state/deltas")).unwrap().count(), 1);

    // 2 -> 3's bytes evicted: its entry goes too.
    store.remove(&d23.sha256);
    assert_eq!(deltas.prune(&withdrawn), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("state/deltas")).unwrap().count(), 0);
}
