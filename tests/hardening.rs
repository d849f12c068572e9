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

/// A publish killed between renaming the manifest and renaming
/// `manifest.sig` (strace's SIGKILL at its last rename) leaves the new
/// manifest beside the old signature. The origin serving that tree starts,
/// a relay reading it from a static nginx accepts it, and so does the
/// reference agent reading nginx directly: all find the signature kept under
/// the manifest's digest.
#[actix_web::test]
async fn a_repository_torn_between_manifest_and_signature_is_still_served() {
    let Some(strace) = require_tool("strace", &["/usr/bin/strace"], "strace") else { return };
    let repo = TestRepo::new();
    let key_file = repo.dir.path().join("origin.key");
    repo.key.save_new(&key_file).unwrap();
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    let publish = |inject: &str| {
        let mut cmd = Command::new(&strace);
        cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2"]);
        if !inject.is_empty() {
            cmd.args(["-e", inject]);
        }
        cmd.arg(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["publish", "--input"])
            .arg(&repo.input)
            .arg("--output")
            .arg(&repo.repo)
            .arg("--key")
            .arg(&key_file)
            .output()
            .unwrap()
    };
    // Five renames: object, chunk list, signature by digest, manifest, manifest.sig.
    let o = publish("inject=rename,renameat,renameat2:signal=KILL:when=5");
    assert!(!o.status.success(), "the publish was not killed");
    let manifest = repo.manifest_bytes();
    let serial = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["serial"].as_u64().unwrap();
    assert_eq!(serial, 2, "the manifest was not renamed into place");
    let key = patchrelay::repo::sign::PublicKey::parse(&repo.public).unwrap();
    assert!(
        patchrelay::repo::verify(&key, manifest.clone().into(), repo.signature_bytes().into()).is_err(),
        "manifest.sig is not the stale one: the kill missed its mark"
    );

    let origin = start_origin(&repo).await;
    let served = client().get(format!("{}/v1/manifest.sig", origin.url())).send().await.unwrap().bytes().await.unwrap();
    assert!(patchrelay::repo::verify(&key, manifest.clone().into(), served).is_ok(), "the origin serves a stale pair");

    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&nginx.url], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await, "the relay refused the static repository");
    let got = client().get(format!("{}/v1/manifest", relay.url())).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got, manifest);

    let file = storage.path().join("engine.bin");
    std::fs::write(&file, TestRepo::engine_bytes(1)).unwrap();
    let (url, public, f) = (nginx.url.clone(), repo.public.clone(), file.clone());
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["agent", "update", "--server", &url, "--component", "engine", "--public-key", &public, "--file"])
            .arg(&f)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), TestRepo::engine_bytes(4));

    // The next publish puts a matching manifest.sig back.
    let o = publish("");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(patchrelay::repo::verify(&key, manifest.into(), repo.signature_bytes().into()).is_ok());
}
