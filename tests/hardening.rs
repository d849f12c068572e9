//! Hardening: operators who run two copies, upstreams and agents that are not
//! polite. Each test reproduces one fault against the real binary or real
//! servers on loopback.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// A second `patchrelay serve` on a store another process holds is refused
/// before it touches a file, and says which process holds it.
#[actix_web::test]
async fn a_second_process_on_one_store_is_refused() {
    let repo = TestRepo::new();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let cfg_path = storage.path().join("relay.toml");
    std::fs::write(&cfg_path, relay_toml(&[&nginx.url], &repo.public, &storage.path().join("cache"), "")).unwrap();
    let relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    // A partial file the first relay owns must survive the second's attempt.
    let partial = storage.path().join("cache/partial").join(repo.sha("big", "1.0"));
    std::fs::write(&partial, b"in progress").unwrap();
    let tmp = storage.path().join("cache/tmp/.tmp-1-2-3");
    std::fs::write(&tmp, b"being written").unwrap();

    let o = Command::new(env!("CARGO_BIN_EXE_patchrelay")).args(["serve", "--config"]).arg(&cfg_path).output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("in use by another patchrelay process (pid {})", relay.child.id())), "{text}");
    assert!(partial.exists() && tmp.exists(), "the refused process touched the store");

    // The holder's death releases the lock: a new process starts.
    relay.kill9();
    let relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
}
