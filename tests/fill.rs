//! The cache fill: one upstream request however many agents ask, bytes
//! streamed as they verify, resume after cuts and stalls, failover, integrity
//! failures never served, critical precache, restart safety and the disk budget.
//! Real peers throughout: nginx (throttled with `limit_rate`), a fault-injecting
//! TCP proxy, tinyproxy, and the relay binary for `kill -9`.

mod common;

use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy};
use common::*;
use patchrelay::config::Config;
use patchrelay::digest::Digest;

fn relay_config(upstreams: &[(&str, &str)], public: &str, storage: &std::path::Path, extra: &str) -> Config {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n[storage]\ndir = {:?}\n[trust]\npublic_key = \"{public}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
        storage.display().to_string()
    );
    for (i, (url, upstream_extra)) in upstreams.iter().enumerate() {
        toml.push_str(&format!("[[upstream]]\nurl = \"{url}\"\nname = \"u{i}\"\n{upstream_extra}\n"));
    }
    toml.push_str(extra);
    Config::from_toml(&toml, "relay.toml").unwrap()
}

fn sha_hex(data: &[u8]) -> String {
    Digest::of(data).to_hex()
}

async fn status(url: &str) -> serde_json::Value {
    client().get(format!("{url}/admin/status")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap()
}

#[actix_web::test]
async fn two_hundred_agents_share_one_streaming_fill() {
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let data = noise(7, 24 << 20);
    repo.add_version("installer", "9.1", &data);
    repo.publish();
    // 8 MB/s: the fill takes about 3 s.
    let Some(nginx) = start_nginx_with(&repo.repo, "limit_rate 8m;", None).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let relay = start(&relay_config(&[(&nginx.url, "")], &repo.public, storage.path(), "")).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);

    let results = agents(200, format!("{}/v1/components/installer/latest", relay.url())).await;
    let want = sha_hex(&data);
    for r in &results {
        assert_eq!((r.status, r.bytes, r.sha256.as_str()), (200, data.len(), want.as_str()));
    }
    let sha = repo.sha("installer", "9.1");
    let upstream_requests = nginx.requests_for(&format!("/v1/objects/{sha}"));
    assert_eq!(upstream_requests.len(), 1, "{upstream_requests:?}");
    // Agents got bytes as they arrived, not after the whole fill.
    let fill_done = results.iter().map(|r| r.total).min().unwrap();
    let first_byte = median(results.iter().map(|r| r.first_byte).collect());
    assert!(first_byte < fill_done / 2, "median first byte {first_byte:?}, fill done {fill_done:?}");
    eprintln!("200 agents: median first byte {first_byte:?}, fill done after {fill_done:?}");
}

#[actix_web::test]
async fn cut_and_stalled_transfers_resume_where_they_broke() {
    let repo = TestRepo::new();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nginx.port), "/v1/objects/").await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = relay_config(&[(&proxy.url, "read_timeout = \"1s\"")], &repo.public, storage.path(), "");
    let relay = start(&cfg).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let sha = repo.sha("big", "1.0");

    // Cut after ~1.5 MB, then stall after ~0.5 MB more (1 s read timeout).
    wait_prefetched(&relay.url(), 3.0).await;
    proxy.plan([Fault::CutAfter(1_500_000), Fault::StallAfter(500_000, Duration::from_secs(10))]);
    let got = client().get(format!("{}/v1/objects/{sha}", relay.url())).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap(), noise(42, 3 << 20));
    let seen = proxy.seen(&format!("/v1/objects/{sha}"));
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(!seen[0].contains("bytes="), "{seen:?}");
    for resumed in &seen[1..] {
        let from: u64 = resumed.split("bytes=").nth(1).unwrap().trim_end_matches('-').parse().unwrap();
        assert!(from > 0, "resumed from zero: {seen:?}");
    }
    assert!(metric(&relay.url(), "patchrelay_fill_resumes_total", &[("upstream", "u0")]).await >= 2.0);
}

#[actix_web::test]
async fn a_flipped_byte_is_never_served_or_cached() {
    let repo = TestRepo::new();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let sha = repo.sha("big", "1.0");
    let want = noise(42, 3 << 20);

    // One upstream that corrupts once: the bad block is never passed on; the
    // fill comes back to that upstream (the only one, and it had sent good
    // blocks before) from the verified mark, and the agent gets the right
    // bytes or an error, never wrong ones.
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nginx.port), "/v1/objects/").await;
    let storage = tempfile::tempdir().unwrap();
    let relay = start(&relay_config(&[(&proxy.url, "")], &repo.public, storage.path(), "")).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    // The critical component's prefetches go through the proxy too: let them
    // finish first, or one of them takes the planned fault.
    wait_prefetched(&relay.url(), 3.0).await;
    proxy.plan([Fault::FlipAt(2_000_000)]);
    let url = format!("{}/v1/objects/{sha}", relay.url());
    match get_outcome(&url).await {
        Outcome::Complete(status, body) => assert!(status == 200 && body == want, "wrong bytes served"),
        Outcome::Error(status, body) => assert_eq!(status, 502, "{body}"),
        Outcome::Truncated(n) => assert!(n < 2_000_000, "{n}"),
    }
    assert!(metric(&relay.url(), "patchrelay_upstream_integrity_failures_total", &[("upstream", "u0")]).await >= 1.0);
    match get_outcome(&url).await {
        Outcome::Complete(200, body) => assert_eq!(body, want),
        other => panic!("{other:?}"),
    }
    let seen = proxy.seen(&format!("/v1/objects/{sha}"));
    assert!(seen.last().unwrap().contains("bytes="), "the retry should resume: {seen:?}");

    // Two upstreams, the first corrupting: the fill switches to the second
    // mid-object and the agent gets one complete, correct response.
    let proxy2 = FaultProxy::start(format!("127.0.0.1:{}", nginx.port), "/v1/objects/").await;
    let storage2 = tempfile::tempdir().unwrap();
    let relay2 = start(&relay_config(&[(&proxy2.url, ""), (&nginx.url, "")], &repo.public, storage2.path(), "")).await;
    assert!(wait_ready(&relay2.url(), Duration::from_secs(10)).await);
    wait_prefetched(&relay2.url(), 3.0).await;
    proxy2.plan([Fault::FlipAt(2_000_000)]);
    match get_outcome(&format!("{}/v1/objects/{sha}", relay2.url())).await {
        Outcome::Complete(200, body) => assert_eq!(body, want),
        other => panic!("{other:?}"),
    }
    let direct = nginx.requests_for(&format!("/v1/objects/{sha}"));
    assert!(direct.iter().any(|l| l.contains("\"bytes=")), "second upstream should resume mid-object: {direct:?}");
}

#[actix_web::test]
async fn failover_when_the_first_upstream_keeps_breaking() {
    let repo = TestRepo::new();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nginx.port), "/v1/objects/").await;
    // Every object response from the first upstream dies in its headers.
    proxy.plan(std::iter::repeat_n(Fault::CutAfter(20), 100));
    let storage = tempfile::tempdir().unwrap();
    let relay = start(&relay_config(&[(&proxy.url, ""), (&nginx.url, "")], &repo.public, storage.path(), "")).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let r = client().get(format!("{}/v1/components/big/latest", relay.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), noise(42, 3 << 20));
    assert_eq!(nginx.requests_for(&format!("/v1/objects/{}", repo.sha("big", "1.0"))).len(), 1);
}

#[actix_web::test]
async fn critical_components_are_prefetched_and_others_wait_for_demand() {
    let repo = TestRepo::bare();
    repo.write_meta("engine", "kind = \"pattern\"\ncritical = true\n");
    for v in 1..=5 {
        repo.add_version("engine", &v.to_string(), &TestRepo::engine_bytes(v));
    }
    repo.add_version("tool", "1", &noise(3, 200_000));
    repo.publish();
    let Some(mut nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let cfg = relay_config(&[(&nginx.url, "")], &repo.public, storage.path(), "[sync]\nretain = 3\n");
    let relay = start(&cfg).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&relay.url()).await;
        let states: Vec<String> =
            s["prefetch"].as_array().unwrap().iter().map(|p| p["state"].as_str().unwrap().to_string()).collect();
        if states.len() == 3 && states.iter().all(|st| st == "cached") {
            break;
        }
        assert!(Instant::now() < deadline, "prefetch did not finish: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fetched ahead of any agent: the three newest engine versions, and nothing else.
    for v in ["3", "4", "5"] {
        assert_eq!(nginx.requests_for(&format!("/v1/objects/{}", repo.sha("engine", v))).len(), 1, "engine {v}");
    }
    for (c, v) in [("engine", "1"), ("engine", "2"), ("tool", "1")] {
        assert!(nginx.requests_for(&format!("/v1/objects/{}", repo.sha(c, v))).is_empty(), "{c} {v} fetched early");
    }
    // With the upstream gone, prefetched versions are still served; the
    // non-critical one, never asked for, is not there.
    nginx.kill();
    let r = client().get(format!("{}/v1/components/engine/latest", relay.url())).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), TestRepo::engine_bytes(5));
    let r = client().get(format!("{}/v1/components/tool/latest", relay.url())).send().await.unwrap();
    assert!(r.status() == 502 || r.status() == 504, "{}", r.status());
    // And the relay says it is degraded but ready.
    let (status_code, _) = admin_sync(&relay.url()).await;
    assert_eq!(status_code, 502);
    let ready: serde_json::Value =
        client().get(format!("{}/readyz", relay.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(ready["degraded_since"].is_string());
    assert_eq!(metric(&relay.url(), "patchrelay_degraded", &[]).await, 1.0);
}

#[actix_web::test]
async fn kill_9_mid_fill_then_restart_without_the_upstream() {
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let big = noise(9, 24 << 20);
    repo.add_version("small", "1", &noise(5, 100_000));
    repo.add_version("big", "1", &big);
    repo.publish();
    let Some(mut nginx) = start_nginx_with(&repo.repo, "limit_rate 4m;", None).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = storage.path().join("relay.toml");
    let write_cfg = |upstream: &str| {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndir = {:?}\n[[upstream]]\nurl = \"{upstream}\"\nread_timeout = \"2s\"\nconnect_timeout = \"1s\"\n[trust]\npublic_key = \"{}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
            storage.path().join("cache").display().to_string(),
            repo.public
        );
        std::fs::write(&cfg_path, toml).unwrap();
    };
    write_cfg(&nginx.url);
    let relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await);
    let small_url = format!("{}/v1/components/small/latest", relay.url);
    let r = client().get(&small_url).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), noise(5, 100_000));

    // Start the big fill, let a few MB arrive, then SIGKILL the relay.
    let big_url = format!("{}/v1/components/big/latest", relay.url);
    let agent = tokio::spawn({
        let u = big_url.clone();
        async move { get_outcome(&u).await }
    });
    let partial = storage.path().join("cache/partial").join(repo.sha("big", "1"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 5 << 20 {
        assert!(Instant::now() < deadline, "fill did not progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill9();
    assert!(matches!(agent.await.unwrap(), Outcome::Truncated(_)));
    let sha_big = repo.sha("big", "1");
    assert!(!storage.path().join("cache/objects").join(&sha_big[..2]).join(&sha_big).exists());

    // Restart with the upstream gone: complete objects are served, the partial never.
    nginx.kill();
    let relay = RelayProcess::start(&cfg_path);
    assert!(wait_ready(&relay.url, Duration::from_secs(10)).await, "saved manifest not served");
    let r = client().get(format!("{}/v1/components/small/latest", relay.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), noise(5, 100_000));
    match get_outcome(&format!("{}/v1/components/big/latest", relay.url)).await {
        Outcome::Error(s, _) => assert!(s == 502 || s == 504, "{s}"),
        other => panic!("a partial object was served: {other:?}"),
    }

    // Upstream back (unthrottled, same address): the fill resumes from the
    // verified part of the partial file instead of starting over.
    let nginx = start_nginx_with(&repo.repo, "", Some(nginx.port)).await.unwrap();
    match get_outcome(&format!("{}/v1/components/big/latest", relay.url)).await {
        Outcome::Complete(200, body) => assert_eq!(sha_hex(&body), sha_hex(&big)),
        other => panic!("{other:?}"),
    }
    let resumed = nginx.requests_for(&format!("/v1/objects/{sha_big}"));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0].contains("\"bytes="), "did not resume: {resumed:?}");
    relay.kill9();
}

#[actix_web::test]
async fn eviction_keeps_the_store_under_its_budget_and_spares_pins() {
    let repo = TestRepo::bare();
    repo.write_meta("engine", "kind = \"pattern\"\ncritical = true\n");
    repo.add_version("engine", "1", &TestRepo::engine_bytes(1));
    for v in 1..=6 {
        repo.add_version("blob", &v.to_string(), &noise(100 + v, 1 << 20));
    }
    repo.publish();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let budget = 3u64 << 20;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndir = {:?}\nmax_size = \"3MiB\"\n[[upstream]]\nurl = \"{}\"\n[trust]\npublic_key = \"{}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
        storage.path().join("b").display().to_string(),
        nginx.url,
        repo.public
    );
    let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    for v in 1..=6u64 {
        let r = client().get(format!("{}/v1/components/blob/versions/{v}", relay.url())).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), noise(100 + v, 1 << 20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(&relay.url()).await;
        if s["store"]["bytes"].as_u64().unwrap() <= budget {
            break;
        }
        assert!(Instant::now() < deadline, "store not brought under budget: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let objects = storage.path().join("b/objects");
    let present = |sha: &str| objects.join(&sha[..2]).join(sha).exists();
    assert!(present(&repo.sha("engine", "1")), "pinned critical object evicted");
    assert!(present(&repo.sha("blob", "6")), "most recent object evicted");
    assert!(!present(&repo.sha("blob", "1")), "least recently used object kept");
    assert!(metric(&relay.url(), "patchrelay_store_evictions_total", &[]).await >= 1.0);
    // An evicted object comes back transparently.
    let r = client().get(format!("{}/v1/components/blob/versions/1", relay.url())).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), noise(101, 1 << 20));
    assert_eq!(nginx.requests_for(&format!("/v1/objects/{}", repo.sha("blob", "1"))).len(), 2);
}

#[actix_web::test]
async fn upstreams_behind_a_corporate_connect_proxy() {
    let Some(tinyproxy) = require_tool("tinyproxy", &["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"], "tinyproxy") else {
        return;
    };
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("tinyproxy.log");
    let conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nAllow 127.0.0.1\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 20\nConnectPort {}\n",
            log.display(),
            origin.addr.port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(tinyproxy).args(["-d", "-c"]).arg(&conf).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tinyproxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let storage = tempfile::tempdir().unwrap();
    let proxy_line = format!("proxy = \"http://127.0.0.1:{port}\"");
    let relay = start(&relay_config(&[(&origin.url(), &proxy_line)], &repo.public, storage.path(), "")).await;
    let ready = wait_ready(&relay.url(), Duration::from_secs(10)).await;
    let r = client().get(format!("{}/v1/components/big/latest", relay.url())).send().await.unwrap();
    let body = r.bytes().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready);
    assert_eq!(body, noise(42, 3 << 20));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("CONNECT"), "tinyproxy saw no CONNECT:\n{logged}");
}

/// An upstream that sends the right bytes and then some, without a
/// Content-Length: the overshoot is refused, and what the next upstream
/// supplies from the verified mark on is all that gets stored.
#[actix_web::test]
async fn an_overlong_body_leaves_no_trace_in_what_is_stored() {
    let repo = TestRepo::new();
    let sha = repo.sha("big", "1.0");
    let want = noise(42, 3 << 20);
    let bad = ScriptedUpstream::start().await;
    bad.files.load_repo(&repo.repo);
    let mut long = want.clone();
    long.extend_from_slice(&[0xAA; 70_000]);
    bad.files.put(&format!("v1/objects/{sha}"), long);
    bad.chunked.store(true, std::sync::atomic::Ordering::SeqCst);
    let good = ScriptedUpstream::start().await;
    good.files.load_repo(&repo.repo);
    let storage = tempfile::tempdir().unwrap();
    let relay = start(&relay_config(&[(&bad.url, ""), (&good.url, "")], &repo.public, storage.path(), "")).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    match get_outcome(&format!("{}/v1/objects/{sha}", relay.url())).await {
        Outcome::Complete(200, body) => assert_eq!(sha_hex(&body), sha_hex(&want)),
        other => panic!("{other:?}"),
    }
    let stored = std::fs::read(storage.path().join("objects").join(&sha[..2]).join(&sha)).unwrap();
    assert_eq!(sha_hex(&stored), sha);
}
