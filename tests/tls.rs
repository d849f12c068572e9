//! HTTPS on the relay's own listeners: certificates made in the test, real
//! servers on loopback, curl, wget and aria2c as clients; reload without a
//! restart; client certificates as agent identity, expired and revoked ones
//! refused at the handshake; a relay fetching from a relay over mTLS; the
//! admin listener apart from the agents'.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use patchrelay::config::Config;
use patchrelay::tls::mint::KeyKind;
use sha2::{Digest as _, Sha256};

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An origin for `repo` with `extra` TOML appended (after `[admin]`).
fn origin_toml(repo: &TestRepo, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[origin]\nrepository = {:?}\nreload_interval = \"100ms\"\n[trust]\npublic_key = \"{}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n{extra}",
        repo.repo.display().to_string(),
        repo.public
    )
}

/// curl with `args`, off the test's thread (the servers' tasks run there).
async fn curl(args: &[&str]) -> std::process::Output {
    let bin = curl_binary().expect("curl");
    let mut cmd = Command::new(bin);
    cmd.args(["-sS", "--max-time", "30", "--noproxy", "*"]).args(args);
    run(cmd).await
}

/// Run a command to its end off the test's thread.
async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

#[actix_rt::test]
async fn https_listener_serves_ranges_h2_and_resume_to_real_clients() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    // HTTPS on server.listen, plain HTTP on a second listener.
    let toml = origin_toml(
        &repo,
        &format!("{}[[server.listener]]\nlisten = \"127.0.0.1:0\"\ntls = false\n", pki.server_tls_toml("")),
    );
    let server = start(&Config::from_toml(&toml, "origin.toml").unwrap()).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    assert!(!server.listeners[1].tls);
    let big = repo.sha("big", "1.0");
    let url = format!("{}/v1/objects/{big}", server.url());
    let ca = pki.ca_pem.to_str().unwrap();

    // A client that does not trust the CA is refused at the handshake.
    let out = curl(&["-o", "/dev/null", &url]).await;
    assert!(!out.status.success(), "untrusted certificate accepted");

    // The whole 3 MiB object (served from a mapping: over TLS it is read
    // from its file), over HTTP/2 by ALPN, and by HTTP/1.1.
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let out = curl(&["--cacert", ca, "--http2", "-w", "%{http_version}", "-o", whole.to_str().unwrap(), &url]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2", "HTTP/2 by ALPN");
    assert_eq!(sha_hex(&std::fs::read(&whole).unwrap()), big);
    let out = curl(&["--cacert", ca, "--http1.1", "-w", "%{http_version}", "-o", "/dev/null", &url]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1");

    // A range, and multiple ranges.
    let out = curl(&["--cacert", ca, "-r", "100-199", &url]).await;
    assert_eq!(out.stdout.len(), 100);
    assert_eq!(out.stdout[..], std::fs::read(&whole).unwrap()[100..200]);
    let out = curl(&["--cacert", ca, "-i", "-r", "0-9,1000-1009", &url]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("206") && text.contains("multipart/byteranges"), "{text}");

    // A download cut short, resumed with curl -C -.
    let part = dir.path().join("part");
    std::fs::write(&part, &std::fs::read(&whole).unwrap()[..1_000_000]).unwrap();
    let out = curl(&["--cacert", ca, "-C", "-", "-o", part.to_str().unwrap(), &url]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha_hex(&std::fs::read(&part).unwrap()), big);

    // The plain listener serves the same bytes.
    let plain = format!("{}/v1/objects/{big}", server.listeners[1].url());
    let body = client().get(&plain).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha_hex(&body), big);

    // wget and aria2c, both resuming a partial file.
    let wget = require_tool("wget", &["/usr/bin/wget"], "wget").expect("wget");
    let w = dir.path().join("wget.bin");
    std::fs::write(&w, &std::fs::read(&whole).unwrap()[..777_777]).unwrap();
    let mut cmd = Command::new(wget);
    cmd.args(["-q", "--no-proxy", "-c", "--ca-certificate", ca, "-O"]).arg(&w).arg(&url);
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha_hex(&std::fs::read(&w).unwrap()), big);
    let aria = require_tool("aria2c", &["/usr/bin/aria2c"], "aria2").expect("aria2c");
    let a = dir.path().join("aria.bin");
    std::fs::write(&a, &std::fs::read(&whole).unwrap()[..555_555]).unwrap();
    let mut cmd = Command::new(aria);
    cmd.args(["-q", "--no-conf", "--all-proxy=", "-c", "--allow-overwrite=false", "--ca-certificate", ca])
        .arg(format!("--dir={}", dir.path().display()))
        .arg("--out=aria.bin")
        .arg(&url);
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(sha_hex(&std::fs::read(&a).unwrap()), big);

    server.stop(false).await;
}

#[actix_rt::test]
async fn rsa_ed25519_and_ecdsa_keys_all_serve() {
    let repo = TestRepo::new();
    let openssl = require_tool("openssl", &["/usr/bin/openssl"], "openssl").expect("openssl");
    for kind in ["rsa", "ed25519", "ecdsa"] {
        let pki = Pki::new(&[]);
        match kind {
            "rsa" => {
                // ring cannot make RSA keys: openssl makes one, rcgen signs it.
                let key = pki.dir.path().join("rsa.key");
                let st = Command::new(&openssl)
                    .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
                    .arg(&key)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                let csr = pki.dir.path().join("rsa.csr");
                let st = Command::new(&openssl)
                    .args(["req", "-new", "-subj", "/CN=127.0.0.1", "-key"])
                    .arg(&key)
                    .arg("-out")
                    .arg(&csr)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                // The CA's key is in memory only: sign with openssl from a
                // CA of its own instead, and trust that CA.
                let ca_key = pki.dir.path().join("ossl-ca.key");
                let ca_pem = pki.dir.path().join("ca.pem");
                let st = Command::new(&openssl)
                    .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=openssl CA", "-days", "2"])
                    .arg("-keyout")
                    .arg(&ca_key)
                    .arg("-out")
                    .arg(&ca_pem)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                let ext = pki.dir.path().join("ext");
                std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
                let st = Command::new(&openssl)
                    .args(["x509", "-req", "-days", "2", "-in"])
                    .arg(&csr)
                    .arg("-CA")
                    .arg(&ca_pem)
                    .arg("-CAkey")
                    .arg(&ca_key)
                    .arg("-CAcreateserial")
                    .arg("-extfile")
                    .arg(&ext)
                    .arg("-out")
                    .arg(&pki.cert)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                std::fs::copy(&key, &pki.key).unwrap();
            }
            "ed25519" => {
                let c = pki.ca.server(&["127.0.0.1"], KeyKind::Ed25519).unwrap();
                std::fs::write(&pki.cert, c.cert_pem).unwrap();
                std::fs::write(&pki.key, c.key_pem).unwrap();
            }
            _ => {}
        }
        let toml = origin_toml(&repo, &pki.server_tls_toml(""));
        let server = start(&Config::from_toml(&toml, "origin.toml").unwrap()).await;
        let out = curl(&["--cacert", pki.ca_pem.to_str().unwrap(), &format!("{}/v1/manifest", server.url())]).await;
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, repo.manifest_bytes(), "{kind}");
        server.stop(false).await;
    }
}

#[actix_rt::test]
async fn a_new_certificate_is_used_without_a_restart_and_a_bad_one_is_refused() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    let toml = origin_toml(&repo, &pki.server_tls_toml("reload_check = \"100ms\"\n"));
    let server = start(&Config::from_toml(&toml, "origin.toml").unwrap()).await;
    let url = format!("{}/v1/manifest", server.url());
    let old = pki.client_https(None);
    assert_eq!(old.get(&url).send().await.unwrap().status(), 200);

    // A second CA issues the new certificate; written by rename, as deploy
    // tools do.
    let ca2 = patchrelay::tls::mint::Ca::new("second CA").unwrap();
    let ca2_pem = pki.dir.path().join("ca2.pem");
    std::fs::write(&ca2_pem, ca2.cert_pem()).unwrap();
    let new = ca2.server(&["127.0.0.1"], KeyKind::EcdsaP256).unwrap();
    let trusts_new = https_client(&ca2_pem, None).build().unwrap();
    assert!(trusts_new.get(&url).send().await.is_err(), "the new CA is not in use yet");
    let before = server.tls.as_ref().unwrap().current_cert();
    for (path, pem) in [(&pki.key, &new.key_pem), (&pki.cert, &new.cert_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.tls.as_ref().unwrap().current_cert() == before {
        assert!(std::time::Instant::now() < deadline, "the new pair was not loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(trusts_new.get(&url).send().await.unwrap().status(), 200, "new handshakes use the new pair");
    // The old client's pooled connection was established under the old
    // certificate and is untouched; a new handshake of its fails.
    assert_eq!(old.get(&url).send().await.unwrap().status(), 200, "an established connection goes on");
    assert!(pki.client_https(None).get(&url).send().await.is_err(), "new handshakes no longer see the old pair");

    // A key that does not go with the certificate: refused, the pair in use stays.
    let other = ca2.server(&["127.0.0.1"], KeyKind::EcdsaP256).unwrap();
    let current = server.tls.as_ref().unwrap().current_cert();
    std::fs::write(&pki.key, &other.key_pem).unwrap();
    let err = server.tls.as_ref().unwrap().reload().unwrap_err().to_string();
    assert!(err.contains("does not go with"), "{err}");
    assert_eq!(server.tls.as_ref().unwrap().current_cert(), current);
    assert_eq!(trusts_new.get(&url).send().await.unwrap().status(), 200);
    // Garbage in the certificate file: refused too.
    std::fs::write(&pki.cert, "not a certificate").unwrap();
    assert!(server.tls.as_ref().unwrap().reload().is_err());
    assert_eq!(server.tls.as_ref().unwrap().current_cert(), current);
    // Refusals are counted where an operator alerts on them.
    let text = trusts_new.get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("patchrelay_tls_reloads_total{result=\"refused\"}")).unwrap_or("");
    // Each bad state was refused at least once (the poller may also have tried it).
    let n: f64 = line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
    assert!(n >= 2.0, "{line:?}");
    server.stop(false).await;
}

/// mTLS: a certificate's CN is the agent's id for limits; no certificate,
/// an expired one, one from another CA and a revoked one fail the handshake.
#[actix_rt::test]
async fn client_certificates_identify_agents_and_bad_ones_are_refused() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    let (ws_cert, ws_key, _) = pki.client("ws-0001");
    let (blocked_cert, blocked_key, _) = pki.client("blocked-7");
    let (revoked_cert, revoked_key, revoked_serial) = pki.client("ws-revoked");
    let now = time::OffsetDateTime::now_utc();
    let (expired_cert, expired_key, _) = pki.write_client(
        "expired",
        pki.ca.client_valid("ws-old", None, (now - time::Duration::days(30), now - time::Duration::days(1))).unwrap(),
    );
    let crl = pki.dir.path().join("agents.crl");
    std::fs::write(&crl, pki.ca.crl(&[revoked_serial]).unwrap()).unwrap();
    // blocked-* may download only in a window six hours away.
    let opens = (now.hour() as u32 + 6) % 24;
    let tls = pki.server_tls_toml(&format!(
        "client_ca = {:?}\nclient_crl = {:?}\n[limits]\nidentity = \"cert\"\n[[limits.policy]]\nname = \"blocked\"\nagents = [\"blocked-*\"]\nwindow = \"{opens:02}:00-{:02}:00\"\n[[limits.policy]]\nname = \"all\"\nmax_concurrent = 4\n",
        pki.ca_pem, crl, (opens + 1) % 24
    ));
    let server = start(&Config::from_toml(&origin_toml(&repo, &tls), "origin.toml").unwrap()).await;
    let url = format!("{}/v1/components/engine/latest", server.url());

    let ws = pki.client_https(Some((&ws_cert, &ws_key)));
    assert_eq!(ws.get(&url).send().await.unwrap().status(), 200);
    // The header is not the identity here: a blocked agent cannot claim another id.
    let blocked = pki.client_https(Some((&blocked_cert, &blocked_key)));
    let res = blocked.get(&url).header("X-Agent-Id", "ws-0001").send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["error"], "outside_window");

    for (what, client) in [
        ("no certificate", pki.client_https(None)),
        ("expired", pki.client_https(Some((&expired_cert, &expired_key)))),
        ("revoked", pki.client_https(Some((&revoked_cert, &revoked_key)))),
    ] {
        assert!(client.get(&url).send().await.is_err(), "{what}: served");
    }
    // A certificate from another CA.
    let other = Pki::new(&[]);
    let (oc, ok, _) = other.client("ws-0002");
    let c = https_client(&pki.ca_pem, Some((&oc, &ok))).build().unwrap();
    assert!(c.get(&url).send().await.is_err(), "another CA's certificate: served");

    // curl --cert, the way an operator checks it.
    let ca = pki.ca_pem.to_str().unwrap();
    let out = curl(&[
        "--cacert",
        ca,
        "--cert",
        ws_cert.to_str().unwrap(),
        "--key",
        ws_key.to_str().unwrap(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let out = curl(&["--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}", &url]).await;
    assert!(!out.status.success(), "curl without a certificate: {}", String::from_utf8_lossy(&out.stdout));
    server.stop(false).await;
}

#[actix_rt::test]
async fn optional_client_auth_serves_agents_without_a_certificate() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    let tls = pki.server_tls_toml(&format!("client_ca = {:?}\nclient_auth = \"optional\"\n", pki.ca_pem));
    let server = start(&Config::from_toml(&origin_toml(&repo, &tls), "origin.toml").unwrap()).await;
    let url = format!("{}/v1/manifest", server.url());
    assert_eq!(pki.client_https(None).get(&url).send().await.unwrap().status(), 200);
    let (c, k, _) = pki.client("ws-1");
    assert_eq!(pki.client_https(Some((&c, &k))).get(&url).send().await.unwrap().status(), 200);
    server.stop(false).await;
}

/// relay B -> relay A over mTLS (a private CA, a client certificate, a
/// server name that is not the address dialled) -> origin.
#[actix_rt::test]
async fn a_relay_fetches_from_a_relay_over_mtls() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let pki = Pki::new(&["relay-a.site.test"]);
    // Relay A's certificate names only relay-a.site.test (not 127.0.0.1).
    let a_cert = pki.ca.server(&["relay-a.site.test"], KeyKind::EcdsaP256).unwrap();
    std::fs::write(&pki.cert, a_cert.cert_pem).unwrap();
    std::fs::write(&pki.key, a_cert.key_pem).unwrap();
    let a_store = tempfile::tempdir().unwrap();
    let a_toml = relay_toml(
        &[&origin.url()],
        &repo.public,
        a_store.path(),
        &pki.server_tls_toml(&format!("client_ca = {:?}\n", pki.ca_pem)),
    );
    let a = start(&Config::from_toml(&a_toml, "a.toml").unwrap()).await;
    // Probed by the name in its certificate, as relay B will.
    let (pc, pk, _) = pki.client("probe");
    let probe = https_client(&pki.ca_pem, Some((&pc, &pk))).resolve("relay-a.site.test", a.addr).build().unwrap();
    let a_by_name = format!("https://relay-a.site.test:{}", a.addr.port());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !probe.get(format!("{a_by_name}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(std::time::Instant::now() < deadline, "relay A never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (bc, bk, _) = pki.client("relay-b");
    let b_store = tempfile::tempdir().unwrap();
    let upstream = format!(
        "[[upstream]]\nurl = \"{}\"\nname = \"relay-a\"\nca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\nserver_name = \"relay-a.site.test\"\nread_timeout = \"5s\"\n",
        a.url(),
        pki.ca_pem,
        bc,
        bk
    );
    let b_toml = relay_toml(&[], &repo.public, b_store.path(), &upstream);
    let b = start(&Config::from_toml(&b_toml, "b.toml").unwrap()).await;
    assert!(wait_ready(&b.url(), Duration::from_secs(15)).await, "relay B never synced through relay A");
    let big = repo.sha("big", "1.0");
    let body = client().get(format!("{}/v1/objects/{big}", b.url())).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha_hex(&body), big);

    // Without the client certificate relay A refuses relay C.
    let c_store = tempfile::tempdir().unwrap();
    let upstream = format!(
        "[[upstream]]\nurl = \"{}\"\nname = \"relay-a\"\nca = {:?}\nserver_name = \"relay-a.site.test\"\nread_timeout = \"2s\"\n",
        a.url(),
        pki.ca_pem
    );
    let c =
        start(&Config::from_toml(&relay_toml(&[], &repo.public, c_store.path(), &upstream), "c.toml").unwrap()).await;
    assert!(!wait_ready(&c.url(), Duration::from_secs(3)).await, "relay C synced without a client certificate");
    for s in [c, b, a, origin] {
        s.stop(false).await;
    }
}

#[actix_rt::test]
async fn admin_and_metrics_can_be_moved_off_the_agents_listener() {
    let repo = TestRepo::new();
    let toml = origin_toml(&repo, "").replace("[admin]\n", "[admin]\nlisten = \"127.0.0.1:0\"\n");
    let server = start(&Config::from_toml(&toml, "origin.toml").unwrap()).await;
    let admin = server.admin_url().unwrap();
    let c = client();
    assert_eq!(c.get(format!("{}/metrics", server.url())).send().await.unwrap().status(), 404);
    let res = c.post(format!("{}/admin/sync", server.url())).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(c.get(format!("{}/v1/manifest", server.url())).send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("{admin}/metrics")).send().await.unwrap().status(), 200);
    let res = c.post(format!("{admin}/admin/sync")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(c.get(format!("{admin}/v1/manifest")).send().await.unwrap().status(), 404);
    assert_eq!(c.get(format!("{admin}/readyz")).send().await.unwrap().status(), 200);
    server.stop(false).await;
}

#[test]
fn tls_configs_that_cannot_work_are_refused_with_the_key_named() {
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nrepository = \"/r\"\n";
    for (extra, needle) in [
        ("[limits]\nidentity = \"cert\"\n", "client_ca"),
        ("[server.tls]\ncert = \"c\"\nkey = \"k\"\nclient_auth = \"required\"\n", "need client_ca"),
        ("[[server.listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\n", "no [server.tls]"),
        ("[server.tls]\ncert = \"c\"\nkey = \"k\"\nclient_auth = \"sometimes\"\n", "unknown variant"),
    ] {
        let err = Config::from_toml(&format!("{base}{extra}"), "x.toml").unwrap_err().to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }
    let relay = "[storage]\ndir = \"/s\"\n[trust]\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n";
    for (up, needle) in [
        ("url = \"http://a:1\"\nca = \"ca.pem\"\n", "for https://"),
        ("url = \"https://a:1\"\nclient_cert = \"c.pem\"\n", "go together"),
        ("url = \"https://a:1\"\nserver_name = \"not a name!\"\n", "server_name"),
    ] {
        let text = format!("{relay}[[upstream]]\n{up}");
        let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains(needle), "{up}: {err}");
    }
    // Files named relative to the config are found beside it.
    let cfg = Config::from_toml(
        &format!("{base}[server.tls]\ncert = \"tls/c.pem\"\nkey = \"/abs/k.pem\"\n"),
        "/etc/patchrelay/patchrelay.toml",
    )
    .unwrap();
    let tls = cfg.server.tls.unwrap();
    assert_eq!(tls.cert, Path::new("/etc/patchrelay/tls/c.pem"));
    assert_eq!(tls.key, Path::new("/abs/k.pem"));
}

#[actix_rt::test]
async fn a_server_with_unreadable_or_mismatched_tls_files_does_not_start() {
    let repo = TestRepo::new();
    let pki = Pki::new(&[]);
    let other = pki.ca.server(&["127.0.0.1"], KeyKind::EcdsaP256).unwrap();
    std::fs::write(&pki.key, other.key_pem).unwrap();
    let cfg = Config::from_toml(&origin_toml(&repo, &pki.server_tls_toml("")), "origin.toml").unwrap();
    let err = patchrelay::server::start(&cfg, Default::default()).await.err().expect("started").to_string();
    assert!(err.contains("does not go with"), "{err}");
    let cfg = Config::from_toml(
        &origin_toml(&repo, "[server.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n"),
        "origin.toml",
    )
    .unwrap();
    let err = patchrelay::server::start(&cfg, Default::default()).await.err().expect("started").to_string();
    assert!(err.contains("/nonexistent/c.pem"), "{err}");
}

/// `patchrelay demo --tls`: a throwaway CA, and the printed curl and agent
/// lines work as printed.
#[actix_rt::test]
async fn the_demo_runs_over_https_with_the_lines_it_prints() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_patchrelay"))
        .args(["demo", "--tls", "--port", "0", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.contains("agent update");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let find =
        |needle: &str| lines.iter().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {lines:?}"));
    assert!(find("relay: https://").contains("relay ready: true"), "{lines:?}");
    // `curl --cacert .../ca.pem -s https://.../v1/manifest | head -c 600; echo`
    let manifest_line = find("/v1/manifest | head").trim().split(" | ").next().unwrap().to_string();
    let args: Vec<&str> = manifest_line.split_whitespace().skip(1).collect();
    let out = curl(&args).await;
    assert!(out.status.success(), "{manifest_line}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"serial\""));
    // The agent line, with the demo's old pattern file.
    let old = dir.path().join("input/engine-pattern/171/lpt171.sig");
    let file = dir.path().join("lpt.sig");
    std::fs::copy(old, &file).unwrap();
    let agent_line = find("agent update").trim().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchrelay"));
    cmd.args(agent_line.split_whitespace().skip(1).map(|a| if a == "lpt.sig" { file.to_str().unwrap() } else { a }));
    let out = run(cmd).await;
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(out.status.success(), "{agent_line}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"to\":\"175\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
