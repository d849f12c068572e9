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

/// Upstreams in order: the first lags at serial 1, the second has serial 2.
/// The relay serves serial 2 (it asks them all and takes the highest), and
/// keeps it on the next sync.
#[actix_web::test]
async fn a_lagging_upstream_does_not_hide_a_newer_manifest() {
    let repo = TestRepo::new();
    let lagging = ScriptedUpstream::start().await;
    lagging.files.load_repo(&repo.repo);
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    assert_eq!(repo.publish(), 2);
    let current = ScriptedUpstream::start().await;
    current.files.load_repo(&repo.repo);
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&lagging.url, &current.url], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let serial = || async {
        let m = client().get(format!("{}/v1/manifest", relay.url())).send().await.unwrap().bytes().await.unwrap();
        serde_json::from_slice::<serde_json::Value>(&m).unwrap()["serial"].as_u64().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while serial().await != 2 {
        assert!(std::time::Instant::now() < deadline, "the relay serves serial 1 from the lagging upstream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, report) = admin_sync(&relay.url()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["serial"], 2, "{report}");
    assert_eq!(serial().await, 2);
}

/// An HTTP server that sends a response head and then a byte every 300 ms,
/// forever: never slow enough for a read timeout, never done.
async fn trickling_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if conn.write_all(b" ").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// The first upstream trickles its manifest forever. A sync still completes
/// (every manifest fetch has a total deadline) with the second upstream's
/// manifest, and says why the first was passed over.
#[actix_web::test]
async fn a_trickling_upstream_cannot_hold_a_sync() {
    let repo = TestRepo::new();
    let trickle = trickling_upstream().await;
    let good = ScriptedUpstream::start().await;
    good.files.load_repo(&repo.repo);
    let storage = tempfile::tempdir().unwrap();
    let toml = relay_toml(&[&trickle, &good.url], &repo.public, storage.path(), "")
        .replace("read_timeout = \"5s\"", "read_timeout = \"1s\"");
    let relay = start(&patchrelay::config::Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(15)).await, "the trickling upstream held the sync");
    let started = std::time::Instant::now();
    let (status, report) = admin_sync(&relay.url()).await;
    assert_eq!(status, 200, "{report}");
    assert!(started.elapsed() < Duration::from_secs(10), "a sync took {:?}", started.elapsed());
    assert!(report["skipped"].to_string().contains("not fetched within"), "{report}");
}

/// A relay started before its upstream is up becomes ready soon after the
/// upstream comes up, not a sync interval (an hour) later.
#[actix_web::test]
async fn a_failed_first_sync_is_retried_soon() {
    let repo = TestRepo::new();
    let port = free_port();
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&format!("http://127.0.0.1:{port}")], &repo.public, storage.path()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!wait_ready(&relay.url(), Duration::from_millis(10)).await);
    let Some(_nginx) = start_nginx_with(&repo.repo, "", Some(port)).await else { return };
    assert!(wait_ready(&relay.url(), Duration::from_secs(15)).await, "the relay did not retry its sync");
}

/// One upstream whose connections are cut every 4 MiB. A 24 MiB fill keeps
/// resuming from its verified mark while it makes progress, and the agent
/// gets the whole object, not a truncated 200.
#[actix_web::test]
async fn a_fill_persists_through_a_flaky_single_upstream() {
    use common::faults::{Fault, FaultProxy};
    let mut repo = TestRepo::bare();
    // Blocks as large as what a connection carries before it is cut: no
    // attempt ends a block, and yet every attempt makes progress.
    repo.chunk_size = 4 << 20;
    let big = noise(11, 24 << 20);
    repo.add_version("big", "1", &big);
    repo.publish();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nginx.port), "/v1/objects/").await;
    proxy.plan(std::iter::repeat_n(Fault::CutAfter(4 << 20), 12));
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&proxy.url], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    match get_outcome(&format!("{}/v1/components/big/latest", relay.url())).await {
        Outcome::Complete(200, body) => assert!(body[..] == big[..], "wrong bytes"),
        other => panic!("{other:?}"),
    }
    let requests = proxy.seen("/v1/objects/");
    assert!(requests.len() >= 6, "{requests:?}");
}

/// Partial files take disk too: they count in `storage.max_size`, and
/// objects are evicted to make room for them.
#[actix_web::test]
async fn partial_files_count_in_the_disk_budget() {
    let repo = TestRepo::bare();
    repo.add_version("a", "1", &noise(1, 1_500_000));
    repo.add_version("b", "1", &noise(2, 1_500_000));
    repo.add_version("c", "1", &noise(3, 3_000_000));
    repo.publish();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let toml = relay_toml(&[&nginx.url], &repo.public, storage.path(), "")
        .replace("[storage]\n", "[storage]\nmax_size = \"4MiB\"\n");
    let relay = start(&patchrelay::config::Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    for c in ["a", "b"] {
        let r = client().get(format!("{}/v1/components/{c}/latest", relay.url())).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 1_500_000);
    }
    let cached = |c: &str| {
        let sha = repo.sha(c, "1");
        storage.path().join("objects").join(&sha[..2]).join(sha).exists()
    };
    assert!(cached("a") && cached("b"));
    // A fill of c in progress (or left by a restart) holds 3 MB.
    std::fs::write(storage.path().join("partial").join(repo.sha("c", "1")), noise(9, 3_000_000)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cached("a") || cached("b") {
        assert!(std::time::Instant::now() < deadline, "objects kept although partial files fill the budget");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection from `ip` (a loopback address) to `url`'s host, with a small
/// receive buffer.
async fn connect_from(ip: &str, url: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// A client that asks for a large download and then stops reading holds its
/// connection, its download slot and its buffers only until
/// `server.send_timeout`: then the relay closes the connection and the
/// agent's slot is free again.
#[actix_web::test]
async fn a_client_that_stops_reading_is_let_go() {
    use tokio::io::AsyncWriteExt;
    let repo = TestRepo::bare();
    repo.add_version("big", "1", &noise(5, 48 << 20));
    repo.publish();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let toml = relay_toml(
        &[&nginx.url],
        &repo.public,
        storage.path(),
        "[[limits.policy]]\nname = \"all\"\nmax_concurrent = 1\n",
    )
    .replace("[server]\n", "[server]\nsend_timeout = \"2s\"\n");
    let relay = start(&patchrelay::config::Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let url = format!("{}/v1/components/big/latest", relay.url());
    // Fetched once, so that the stuck download below is served from the store.
    assert_eq!(client().get(&url).send().await.unwrap().bytes().await.unwrap().len(), 48 << 20);

    let mut stuck = connect_from("127.0.0.1", &relay.url()).await;
    stuck
        .write_all(b"GET /v1/components/big/latest HTTP/1.1\r\nHost: relay\r\nX-Agent-Id: ws-1\r\n\r\n")
        .await
        .unwrap();
    // It reads nothing from now on. Meanwhile its one slot is taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = || async { client().get(&url).header("X-Agent-Id", "ws-1").send().await.unwrap().status().as_u16() };
    assert_eq!(again().await, 429);
    let started = std::time::Instant::now();
    loop {
        let status = again().await;
        if status == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the stuck connection still holds the slot");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(stuck);
}

/// One address may hold `server.max_connections_per_address` connections;
/// the next is shut as it is accepted; closing one makes room; a trusted
/// proxy's connections are not counted.
#[actix_web::test]
async fn one_address_cannot_hold_every_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = relay_toml(&[&origin.url()], &repo.public, storage.path(), "")
        .replace("[server]\n", "[server]\nmax_connections_per_address = 3\ntrusted_proxies = [\"127.0.0.9/32\"]\n");
    let relay = start(&patchrelay::config::Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    // Whether a connection is served: a request on it gets a response.
    let served = |mut c: tokio::net::TcpStream| async move {
        if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.is_err() {
            return (false, c);
        }
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap_or(0);
        (n > 0 && buf.starts_with(b"HTTP/1.1 200"), c)
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let (ok, c) = served(connect_from("127.0.0.5", &relay.url()).await).await;
        assert!(ok);
        held.push(c);
    }
    let (ok, _) = served(connect_from("127.0.0.5", &relay.url()).await).await;
    assert!(!ok, "a fourth connection from one address was served");
    let (ok, other) = served(connect_from("127.0.0.6", &relay.url()).await).await;
    assert!(ok, "another address was refused");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, _) = served(connect_from("127.0.0.5", &relay.url()).await).await;
    assert!(ok, "a closed connection was not uncounted");
    let mut proxy = Vec::new();
    for _ in 0..6 {
        let (ok, c) = served(connect_from("127.0.0.9", &relay.url()).await).await;
        assert!(ok, "a trusted proxy's connections were capped");
        proxy.push(c);
    }
    drop((held, other, proxy));
}

/// An error that is this server's fault tells the agent what happened and an
/// id to find it in the log, never the store's paths, OS errors or upstream
/// addresses.
#[actix_web::test]
async fn error_bodies_do_not_leak_paths_or_upstreams() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let sha = repo.sha("big", "1.0");
    std::fs::remove_file(repo.repo.join(format!("v1/objects/{sha}"))).unwrap();
    let r = client().get(format!("{}/v1/objects/{sha}", origin.url())).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["error"], "store_error");
    assert!(j["id"].as_str().is_some_and(|id| id.len() == 8), "{body}");
    for leak in [repo.repo.to_str().unwrap(), "/tmp", "os error", "No such file"] {
        assert!(!body.contains(leak), "{leak:?} in {body}");
    }

    // A relay whose upstream is gone: 502/504, without the upstream's address.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let storage = tempfile::tempdir().unwrap();
    let up = ScriptedUpstream::start().await;
    up.files.load_repo(&repo.repo);
    let relay = start_relay(&[&up.url, &dead], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let r = client().get(format!("{}/v1/objects/{sha}", relay.url())).send().await.unwrap();
    assert!(r.status() == 502 || r.status() == 504, "{}", r.status());
    let body = r.text().await.unwrap();
    for leak in ["127.0.0.1", &dead[7..], "Connection refused", "404"] {
        assert!(!body.contains(leak), "{leak:?} in {body}");
    }
}

/// Read a response from `conn` (after its request is sent) slowly, keeping
/// the server's socket full: `between` runs once `first` bytes are in.
/// Returns the bytes of the body received before the server ended it.
async fn read_slowly_then_all(
    conn: &mut tokio::net::TcpStream,
    first: usize,
    between: impl std::future::Future<Output = ()>,
) -> usize {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut total = 0;
    let mut between = Some(between);
    let started = std::time::Instant::now();
    loop {
        if total >= first
            && let Some(b) = between.take()
        {
            b.await;
        }
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                if head.len() < 4096 {
                    head.extend_from_slice(&buf[..n.min(4096)]);
                }
                total += n;
            }
            Err(_) => panic!("the response stalled instead of ending"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the response did not end");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let head_end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    total - head_end
}

/// An object file cut short under a running server (an operator's `cp` over
/// it, a failing disk): the server serves it from a read-only mapping, and a
/// page past the new end cannot be read. The download in progress ends
/// short; the process stays up (it used to die of SIGBUS); the damage is
/// found and counted; a relay fetches the object again, an origin answers 500.
#[actix_web::test]
async fn an_object_truncated_under_the_server_does_not_take_it_down() {
    // Ahead of where the download is, and inside a body piece: the server
    // sends the piece's start and then meets the pages past the cut.
    const CUT: u64 = (8 << 20) + 100 * 1024 + 123;
    use tokio::io::AsyncWriteExt;
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let big = noise(21, 24 << 20);
    repo.add_version("big", "1", &big);
    repo.publish();
    let sha = repo.sha("big", "1");
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let relay_cfg = dir.path().join("relay.toml");
    std::fs::write(&relay_cfg, relay_toml(&[&nginx.url], &repo.public, &dir.path().join("cache"), "")).unwrap();
    let relay = RelayProcess::start(&relay_cfg);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    let url = format!("{}/v1/objects/{sha}", relay.url);
    assert_eq!(client().get(&url).send().await.unwrap().bytes().await.unwrap().len(), big.len());

    let stored = dir.path().join("cache/objects").join(&sha[..2]).join(&sha);
    let mut conn = connect_from("127.0.0.1", &relay.url).await;
    conn.write_all(format!("GET /v1/objects/{sha} HTTP/1.1\r\nHost: r\r\n\r\n").as_bytes()).await.unwrap();
    let got = read_slowly_then_all(&mut conn, 200_000, async {
        std::fs::OpenOptions::new().write(true).open(&stored).unwrap().set_len(CUT).unwrap();
    })
    .await;
    assert!(got < big.len(), "a truncated object was served whole");
    let mut relay = relay;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(relay.child.try_wait().unwrap().is_none(), "the relay died");
    // The damage is found: the object is fetched again and served whole.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Outcome::Complete(200, body) = get_outcome(&url).await {
            assert!(body[..] == big[..]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the truncated object was never fetched again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let faults = metric(&relay.url, "patchrelay_store_faults_total", &[]).await;
    assert!(faults >= 1.0);

    // Mapped again (served once from the store), then cut inside its last
    // page: through the mapping that page reads as zeros, with no fault at
    // all. The response must not complete with them.
    match get_outcome(&url).await {
        Outcome::Complete(200, body) => assert!(body[..] == big[..]),
        other => panic!("{other:?}"),
    }
    std::fs::OpenOptions::new().write(true).open(&stored).unwrap().set_len(big.len() as u64 - 1000).unwrap();
    if let Outcome::Complete(200, body) = get_outcome(&url).await {
        assert!(body[..] == big[..], "zeros served as the object's last bytes");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Outcome::Complete(200, body) = get_outcome(&url).await {
            assert!(body[..] == big[..]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "damage in the last piece was never found");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&relay.url, "patchrelay_store_faults_total", &[]).await > faults);
    relay.kill9();

    // The origin, whose files operators manage: the same cut, and then 500
    // for that object (and the rest of the repository still served).
    let origin_cfg = dir.path().join("origin.toml");
    std::fs::write(
        &origin_cfg,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nrepository = {:?}\n", repo.repo.display().to_string()),
    )
    .unwrap();
    let origin = RelayProcess::start(&origin_cfg);
    let url = format!("{}/v1/objects/{sha}", origin.url);
    assert_eq!(client().get(&url).send().await.unwrap().bytes().await.unwrap().len(), big.len());
    let file = repo.repo.join(format!("v1/objects/{sha}"));
    let mut conn = connect_from("127.0.0.1", &origin.url).await;
    conn.write_all(format!("GET /v1/objects/{sha} HTTP/1.1\r\nHost: o\r\n\r\n").as_bytes()).await.unwrap();
    let got = read_slowly_then_all(&mut conn, 200_000, async {
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(CUT).unwrap();
    })
    .await;
    assert!(got < big.len());
    let mut origin = origin;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(origin.child.try_wait().unwrap().is_none(), "the origin died");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get_outcome(&url).await {
            Outcome::Error(500, body) => {
                assert!(body.contains("store_error"), "{body}");
                break;
            }
            Outcome::Complete(..) => panic!("a damaged object was served whole"),
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "the damage was never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client().get(format!("{}/v1/manifest", origin.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    origin.kill9();
}

/// The relay's store on a small file system of its own (a tmpfs, mounted in
/// a namespace of the relay's: no root needed where user namespaces are on).
/// It fills up in the middle of a fill. The relay keeps serving what it has,
/// says it is degraded and why, and serves misses whole and verified from
/// memory instead of failing them; nothing it had is lost.
#[actix_web::test]
async fn a_full_disk_degrades_the_relay_but_loses_nothing() {
    let Some(unshare) = require_tool("unshare", &["/usr/bin/unshare"], "util-linux") else { return };
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let (a, b, c) = (noise(31, 100_000), noise(32, 24 << 20), noise(33, 24 << 20));
    repo.add_version("a", "1", &a);
    repo.add_version("b", "1", &b);
    repo.add_version("c", "1", &c);
    repo.publish();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, relay_toml(&[&nginx.url], &repo.public, &cache, "")).unwrap();
    let mut cmd = Command::new(unshare);
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c"]).arg(format!(
        "mount -t tmpfs -o size=40m tmpfs '{}' && exec '{}' serve --config '{}'",
        cache.display(),
        env!("CARGO_BIN_EXE_patchrelay"),
        cfg.display()
    ));
    let relay = RelayProcess::start_command(cmd);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    let get = |c: &str| {
        let url = format!("{}/v1/components/{c}/latest", relay.url);
        async move { get_outcome(&url).await }
    };
    for (name, want) in [("a", &a), ("b", &b)] {
        match get(name).await {
            Outcome::Complete(200, body) => assert!(body[..] == want[..], "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // 40 MB in all, 24 of them b's: c does not fit. The fill that finds out
    // is cut (never completed with wrong bytes).
    match get("c").await {
        Outcome::Complete(200, body) => assert!(body[..] == c[..], "wrong bytes"),
        Outcome::Truncated(_) | Outcome::Error(..) => {}
        other => panic!("{other:?}"),
    }
    let ready: serde_json::Value =
        client().get(format!("{}/readyz", relay.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(ready["reasons"].to_string().contains("the store cannot write"), "{ready}");
    // From now on c is passed through from memory, whole and verified.
    for _ in 0..2 {
        match get("c").await {
            Outcome::Complete(200, body) => assert!(body[..] == c[..], "wrong bytes"),
            other => panic!("c while the disk is full: {other:?}"),
        }
    }
    let r = client()
        .get(format!("{}/v1/components/c/latest", relay.url))
        .header("Range", "bytes=20000000-20000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), c[20_000_000..20_000_100]);
    // What it had is still served, intact.
    for (name, want) in [("a", &a), ("b", &b)] {
        match get(name).await {
            Outcome::Complete(200, body) => assert!(body[..] == want[..], "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(metric(&relay.url, "patchrelay_fills_total", &[("result", "passed_through")]).await >= 2.0);
    assert_eq!(metric(&relay.url, "patchrelay_store_writable", &[]).await, 0.0);
    relay.kill9();
}

/// Two servers in one process each report their own counts: `/metrics` of
/// one shows nothing of the other's requests (each server has a recorder of
/// its own, whatever threads and tasks do the recording).
#[actix_web::test]
async fn each_server_reports_only_its_own_metrics() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_relay(&[&origin.url()], &repo.public, sa.path()).await;
    let b = start_relay(&[&origin.url()], &repo.public, sb.path()).await;
    assert!(wait_ready(&a.url(), Duration::from_secs(10)).await && wait_ready(&b.url(), Duration::from_secs(10)).await);
    let sha = repo.sha("big", "1.0");
    for _ in 0..3 {
        let r = client().get(format!("{}/v1/objects/{sha}", a.url())).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 3 << 20);
    }
    let requests = |url: String| async move {
        metric(&url, "patchrelay_http_requests_total", &[("route", "object"), ("status", "200")]).await
    };
    assert_eq!(requests(a.url()).await, 3.0, "relay a counts its own requests");
    assert_eq!(requests(b.url()).await, 0.0, "relay b counts relay a's requests");
    // Fills run on a runtime every server shares; they count where they
    // belong: both relays prefetched the critical component, and a fetched
    // the object and its chunk list besides.
    let fills = |url: String| async move { metric(&url, "patchrelay_fills_total", &[("result", "ok")]).await };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fills(b.url()).await < 6.0 || fills(a.url()).await < 8.0 {
        assert!(std::time::Instant::now() < deadline, "the relays did not prefetch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fills(b.url()).await, 6.0, "three versions, each with its chunk list");
    assert_eq!(fills(a.url()).await, 8.0, "the same, and the object with its chunk list");
    // The origin served relay a's fetches, and nothing of its own was fetched.
    assert!(metric(&origin.url(), "patchrelay_http_requests_total", &[("route", "object")]).await >= 1.0);
    assert_eq!(metric(&origin.url(), "patchrelay_fills_total", &[]).await, 0.0);
}
