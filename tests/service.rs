//! The relay as a service: `patchrelay serve` as its own process, stopped
//! with SIGTERM while agents download and a fill runs, restarted; SIGHUP
//! reloading the listener's certificate; the systemd unit checked by
//! systemd-analyze.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A download by agent `id`: its body, or how many bytes came before it was
/// cut. `started` counts downloads whose response head has arrived.
async fn download(url: String, id: String, started: Arc<AtomicUsize>) -> Result<Vec<u8>, usize> {
    let r = client().get(&url).header("X-Agent-Id", id).send().await.map_err(|_| 0usize)?;
    assert_eq!(r.status(), 200);
    started.fetch_add(1, Ordering::SeqCst);
    let mut got = Vec::new();
    let mut body = r.bytes_stream();
    while let Some(piece) = body.next().await {
        match piece {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => return Err(got.len()),
        }
    }
    Ok(got)
}

/// SIGTERM during 50 paced downloads and a fill: the listener closes, the
/// downloads finish within `server.shutdown_grace`, the one waiting on the
/// slow fill is cut only when the grace is over, the process exits 0, and
/// the restarted relay resumes the fill from its partial file.
#[actix_rt::test]
async fn sigterm_lets_downloads_finish_and_the_restarted_relay_resumes_the_fill() {
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let big = noise(9, 24 << 20);
    let pattern = noise(5, 1 << 20);
    repo.add_version("pattern", "1", &pattern);
    repo.add_version("big", "1", &big);
    repo.publish();
    // The WAN: 4 MB/s from the upstream, so the 24 MiB fill takes seconds.
    let Some(nginx) = start_nginx_with(&repo.repo, "limit_rate 4m;", None).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let cfg_path = storage.path().join("relay.toml");
    let grace = Duration::from_secs(4);
    // Each ws-* agent gets 512 KiB/s: the 1 MiB pattern takes two seconds.
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{}s\"\n[storage]\ndir = {:?}\n[[upstream]]\nurl = \"{}\"\nread_timeout = \"5s\"\n[trust]\npublic_key = \"{}\"\n[limits]\n[[limits.policy]]\nname = \"agents\"\nagents = [\"ws-*\"]\nrate = \"512KiB/s\"\nburst = \"64KiB\"\n",
            grace.as_secs(),
            storage.path().join("cache").display().to_string(),
            nginx.url,
            repo.public
        ),
    )
    .unwrap();
    let mut relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    // The pattern cached first, so the 50 downloads are of stored bytes.
    let pattern_url = format!("{}/v1/components/pattern/latest", relay.url);
    let started = Arc::new(AtomicUsize::new(0));
    assert_eq!(download(pattern_url.clone(), "warm".into(), started.clone()).await.unwrap(), pattern);

    let big_url = format!("{}/v1/components/big/latest", relay.url);
    let fill = tokio::spawn(download(big_url.clone(), "fill".into(), started.clone()));
    let downloads: Vec<_> =
        (0..50).map(|i| tokio::spawn(download(pattern_url.clone(), format!("ws-{i:03}"), started.clone()))).collect();
    let partial = storage.path().join("cache/partial").join(repo.sha("big", "1"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 2 << 20 {
        assert!(Instant::now() < deadline, "fill did not progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every download under way (its head arrived) before the signal: the
    // warm-up, the fill's and the 50.
    while started.load(Ordering::SeqCst) < 52 {
        assert!(Instant::now() < deadline, "downloads did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.signal("TERM");
    let termed = Instant::now();

    // New connections are refused once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client().get(format!("{}/healthz", relay.url)).send().await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, d) in downloads.into_iter().enumerate() {
        let body = d.await.unwrap().unwrap_or_else(|n| panic!("download {i} cut after {n} bytes"));
        assert_eq!(sha_hex(&body), sha_hex(&pattern), "download {i}");
    }
    // The fill's 24 MiB cannot arrive within the grace: its download is cut,
    // and not before the grace is over.
    let cut = fill.await.unwrap().expect_err("the 24 MiB download finished within the grace");
    assert!(termed.elapsed() >= grace - Duration::from_millis(500), "cut {:?} after SIGTERM", termed.elapsed());
    assert!(cut < big.len());
    let status = relay.wait_exit(Duration::from_secs(20)).await.expect("the relay did not exit");
    assert!(status.success(), "exit status {status:?}");
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept >= 2 << 20, "the partial file was not kept ({kept} bytes)");

    // Restarted, the relay resumes the fill from the partial file.
    let relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    let body = download(format!("{}/v1/components/big/latest", relay.url), "after".into(), started).await.unwrap();
    assert_eq!(sha_hex(&body), sha_hex(&big));
    let sha_big = repo.sha("big", "1");
    let fetches = nginx.requests_for(&format!("/v1/objects/{sha_big}"));
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    assert!(fetches[1].contains("\"bytes="), "the restarted relay did not resume: {fetches:?}");
    relay.kill9();
}

/// SIGHUP loads new TLS files at once (the file check here is hourly).
#[actix_rt::test]
async fn sighup_reloads_the_listeners_certificate() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("origin.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nrepository = {:?}\n{}",
            repo.repo.display().to_string(),
            pki.server_tls_toml("reload_check = \"1h\"\n")
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(&cfg_path);
    assert!(relay.url.starts_with("https://"), "{}", relay.url);
    let url = format!("{}/v1/manifest", relay.url);
    assert_eq!(pki.client_https(None).get(&url).send().await.unwrap().status(), 200);

    let ca2 = patchrelay::tls::mint::Ca::new("second CA").unwrap();
    let ca2_pem = dir.path().join("ca2.pem");
    std::fs::write(&ca2_pem, ca2.cert_pem()).unwrap();
    let new = ca2.server(&["127.0.0.1"], patchrelay::tls::mint::KeyKind::EcdsaP256).unwrap();
    std::fs::write(&pki.key, new.key_pem).unwrap();
    std::fs::write(&pki.cert, new.cert_pem).unwrap();
    let trusts_new = https_client(&ca2_pem, None).build().unwrap();
    assert!(trusts_new.get(&url).send().await.is_err(), "reloaded before SIGHUP");
    relay.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trusts_new.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill9();
}

/// deploy/patchrelay.service passes `systemd-analyze verify` (with the
/// binary built here in place of /usr/local/bin/patchrelay), without a
/// warning.
#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) =
        require_tool("systemd-analyze", &["/usr/bin/systemd-analyze", "/bin/systemd-analyze"], "systemd")
    else {
        return;
    };
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/patchrelay.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patchrelay.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/patchrelay", env!("CARGO_BIN_EXE_patchrelay"))).unwrap();
    let out = std::process::Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}

/// SIGHUP (`systemctl reload`, logrotate) leaves a relay without TLS running.
#[actix_rt::test]
async fn sighup_does_not_stop_a_relay_without_tls() {
    let repo = TestRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("origin.toml");
    std::fs::write(
        &cfg_path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nrepository = {:?}\n", repo.repo.display().to_string()),
    )
    .unwrap();
    let mut relay = RelayProcess::start(&cfg_path);
    for _ in 0..3 {
        relay.signal("HUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(relay.wait_exit(Duration::from_millis(500)).await.is_none(), "SIGHUP ended the process");
    let r = client().get(format!("{}/v1/manifest", relay.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    relay.kill9();
}
