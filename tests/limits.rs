//! Per-agent limits over real HTTP on loopback: rates held within 10% over 8 s,
//! an agent's connections sharing its rate, concurrency caps answered 429 with
//! Retry-After, small downloads giving their slot back as they go, forwarded
//! addresses believed only from trusted proxies, closed windows, and a total
//! cap shared evenly.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use patchrelay::config::Config;

const MIB: f64 = 1024.0 * 1024.0;

/// A relay in front of an origin with one large object, and `limits` TOML.
async fn relay_with(
    limits: &str,
    server_extra: &str,
) -> (TestRepo, patchrelay::server::RunningServer, patchrelay::server::RunningServer, tempfile::TempDir) {
    let repo = TestRepo::bare();
    repo.add_version("big", "1", &noise(5, 48 << 20));
    repo.add_version("small", "1", &noise(6, 4096));
    repo.publish();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    // Start with the object already in the store (as after a restart), so the
    // measurements are about limits, not the fill.
    let sha = repo.sha("big", "1");
    let dest = storage.path().join("objects").join(&sha[..2]);
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::copy(repo.repo.join(format!("v1/objects/{sha}")), dest.join(&sha)).unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n{server_extra}\n[storage]\ndir = {:?}\n[[upstream]]\nurl = \"{}\"\n[trust]\npublic_key = \"{}\"\n{limits}",
        storage.path().display().to_string(),
        origin.url(),
        repo.public
    );
    let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    (repo, origin, relay, storage)
}

/// Download with these headers (from `source`), counting bytes for `secs`
/// seconds after the first byte; returns bytes per second.
async fn measure(url: String, headers: Vec<(&'static str, String)>, source: Option<IpAddr>, secs: f64) -> f64 {
    let mut b = reqwest::Client::builder().no_proxy();
    if let Some(ip) = source {
        b = b.local_address(ip);
    }
    let c = b.build().unwrap();
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut t0 = None;
    let mut got = 0usize;
    while let Some(piece) = body.next().await {
        let piece = piece.unwrap();
        let now = Instant::now();
        let start = *t0.get_or_insert(now);
        got += piece.len();
        if now.duration_since(start).as_secs_f64() >= secs {
            break;
        }
    }
    got as f64 / t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0)
}

fn within(rate: f64, want: f64, tolerance: f64) -> bool {
    (rate - want).abs() <= want * tolerance
}

#[actix_web::test]
async fn agents_get_their_rate_and_share_it_across_connections() {
    let limits =
        "[limits]\nidentity = \"header\"\n[[limits.policy]]\nname = \"fleet\"\nrate = \"1MiB/s\"\nburst = \"128KiB\"\n";
    let (_repo, _origin, relay, _s) = relay_with(limits, "").await;
    let url = format!("{}/v1/components/big/latest", relay.url());
    // Four agents, one connection each; and one agent on three connections.
    let mut tasks = Vec::new();
    for a in 0..4 {
        tasks.push(tokio::spawn(measure(url.clone(), vec![("X-Agent-Id", format!("agent-{a}"))], None, 8.0)));
    }
    for _ in 0..3 {
        tasks.push(tokio::spawn(measure(url.clone(), vec![("X-Agent-Id", "shared".into())], None, 8.0)));
    }
    let mut rates = Vec::new();
    for t in tasks {
        rates.push(t.await.unwrap());
    }
    eprintln!("rates (MiB/s): {:?}", rates.iter().map(|r| r / MIB).collect::<Vec<_>>());
    for r in &rates[..4] {
        assert!(within(*r, MIB, 0.10), "agent measured {:.3} MiB/s", r / MIB);
    }
    let shared: f64 = rates[4..].iter().sum();
    assert!(within(shared, MIB, 0.10), "three connections of one agent got {:.3} MiB/s together", shared / MIB);
    for r in &rates[4..] {
        assert!(within(*r, MIB / 3.0, 0.25), "uneven share: {:.3} MiB/s", r / MIB);
    }
    assert!(metric(&relay.url(), "patchrelay_limit_throttled_bytes_total", &[("policy", "fleet")]).await > 0.0);
    // The per-thread tallies reach /metrics. Five agents took about 1 MiB/s
    // each for 8 s: counted as egress as it is reserved, and as response bytes
    // when each response ends (the server notices the hang-ups shortly).
    let egress = metric(&relay.url(), "patchrelay_limit_egress_bytes_total", &[("policy", "fleet")]).await;
    assert!(egress >= 5.0 * 6.0 * MIB, "egress {egress}");
    let mut sent = 0.0;
    for _ in 0..50 {
        sent = metric(&relay.url(), "patchrelay_http_response_body_bytes_total", &[("route", "latest")]).await;
        if sent >= 5.0 * 6.0 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent >= 5.0 * 6.0 * MIB, "response bytes {sent}");
    let ok = metric(&relay.url(), "patchrelay_http_requests_total", &[("route", "latest"), ("status", "200")]).await;
    assert!(ok >= 7.0, "requests {ok}");
}

#[actix_web::test]
async fn concurrency_caps_answer_429_with_a_spread_retry_after() {
    let limits = "[limits]\n[[limits.policy]]\nname = \"ws\"\nagents = [\"ws-*\"]\nrate = \"256KiB/s\"\nmax_concurrent = 2\n[[limits.policy]]\nname = \"rest\"\n";
    let (_repo, _origin, relay, _s) = relay_with(limits, "").await;
    let url = format!("{}/v1/components/big/latest", relay.url());
    let c = client();
    let first = c.get(&url).header("X-Agent-Id", "ws-17").send().await.unwrap();
    let second = c.get(&url).header("X-Agent-Id", "ws-17").send().await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let mut retry = Vec::new();
    for _ in 0..5 {
        let third = c.get(&url).header("X-Agent-Id", "ws-17").send().await.unwrap();
        assert_eq!(third.status(), 429);
        let secs: u64 = third.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((5..=30).contains(&secs), "{secs}");
        retry.push(secs);
        let j: serde_json::Value = third.json().await.unwrap();
        assert_eq!(j["error"], "too_many_downloads");
    }
    retry.dedup();
    assert!(retry.len() > 1, "Retry-After is not spread: {retry:?}");
    // ws-17's two downloads are in progress: the gauge, counted when scraped,
    // says so. (Relays of other tests in this process share the recorder and
    // set the gauge when they are scraped too, hence a few tries.)
    let mut active = 0.0;
    for _ in 0..20 {
        active = metric(&relay.url(), "patchrelay_limit_active_agents", &[]).await;
        if active >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(active >= 1.0, "active agents gauge: {active}");
    // Another agent, and agents of another policy, are not affected.
    assert_eq!(c.get(&url).header("X-Agent-Id", "ws-18").send().await.unwrap().status(), 200);
    assert_eq!(c.get(&url).header("X-Agent-Id", "server-1").send().await.unwrap().status(), 200);
    // A finished download frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.get(&url).header("X-Agent-Id", "ws-17").send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Manifest and plans are never limited.
    for _ in 0..5 {
        let r = c.get(format!("{}/v1/manifest", relay.url())).header("X-Agent-Id", "ws-17").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        metric(&relay.url(), "patchrelay_limit_refusals_total", &[("policy", "ws"), ("reason", "concurrency")]).await
            >= 5.0
    );
}

/// A small body that may go at once takes, reserves and gives back its
/// agent's slot in one step; it must still respect the slot while something
/// else holds it, and a ranged or paced small body must hold it until done.
#[actix_web::test]
async fn small_downloads_give_their_slot_back_as_they_go() {
    let limits =
        "[limits]\nidentity = \"header\"\n[[limits.policy]]\nname = \"one\"\nrate = \"1MiB/s\"\nmax_concurrent = 1\n";
    let (repo, _origin, relay, _s) = relay_with(limits, "").await;
    let want = noise(6, 4096);
    let small = format!("{}/v1/objects/{}", relay.url(), repo.sha("small", "1"));
    let big = format!("{}/v1/components/big/latest", relay.url());
    let c = client();
    // One agent, one slot, many small downloads one after another: each one
    // is over as it is sent, so none is refused.
    for i in 0..50 {
        let r = c.get(&small).header("X-Agent-Id", "a").send().await.unwrap();
        assert_eq!(r.status(), 200, "download {i}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &want[..], "download {i}");
    }
    // A range of it goes through the paced path, and frees the slot when done.
    let r = c.get(&small).header("X-Agent-Id", "a").header("Range", "bytes=100-199").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &want[100..200]);
    // Every small body that went was counted as egress (the policy is this
    // test's own, and nothing else has been sent under it yet).
    let egress = metric(&relay.url(), "patchrelay_limit_egress_bytes_total", &[("policy", "one")]).await;
    assert_eq!(egress, 50.0 * 4096.0 + 100.0, "egress");
    // While a large download holds the agent's only slot, a small one waits
    // its turn like any other (429), and gets it once the large one is over.
    let held = c.get(&big).header("X-Agent-Id", "a").send().await.unwrap();
    assert_eq!(held.status(), 200);
    let r = c.get(&small).header("X-Agent-Id", "a").send().await.unwrap();
    assert_eq!(r.status(), 429, "a small download slipped past a held slot");
    assert_eq!(c.get(&small).header("X-Agent-Id", "b").send().await.unwrap().status(), 200, "another agent");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.get(&small).header("X-Agent-Id", "a").send().await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.bytes().await.unwrap().as_ref(), &want[..]);
            break;
        }
        assert!(Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small body not cached yet is fetched and paced like any other download,
/// so it holds its agent's slot from the moment it is admitted: eight first
/// requests at once from an agent with one slot get one 200 and seven 429s.
#[actix_web::test]
async fn small_downloads_still_being_fetched_hold_their_slot() {
    let repo = TestRepo::bare();
    for i in 0..8u64 {
        repo.add_version(&format!("s{i}"), "1", &noise(20 + i, 4096));
    }
    repo.publish();
    // 1 KB at once, then 1 KB/s: each fill takes about 3 s.
    let Some(nginx) = start_nginx_with(&repo.repo, "limit_rate 1k; limit_rate_after 1k;", None).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let limits = "[limits]\nidentity = \"header\"\n[[limits.policy]]\nname = \"fetching\"\nmax_concurrent = 1\n";
    let toml = relay_toml(&[&nginx.url], &repo.public, storage.path(), limits);
    let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let c = client();
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{}/v1/components/s{i}/latest", relay.url()));
            tokio::spawn(async move {
                let r = c.get(url).header("X-Agent-Id", "one-slot").send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap();
                (i, status, body)
            })
        })
        .collect();
    let mut ok = Vec::new();
    for t in tasks {
        let (i, status, body) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(body.as_ref(), &noise(20 + i, 4096)[..]);
                ok.push(i);
            }
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(ok.len(), 1, "one slot, but {} downloads were let through: {ok:?}", ok.len());
}

#[actix_web::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limits =
        "[limits]\nidentity = \"ip\"\n[[limits.policy]]\nname = \"per-ip\"\nrate = \"256KiB/s\"\nmax_concurrent = 1\n";
    let (_repo, _origin, relay, _s) = relay_with(limits, "trusted_proxies = [\"127.0.0.2/32\"]").await;
    let url = format!("{}/v1/components/big/latest", relay.url());
    let from =
        |ip: &str| reqwest::Client::builder().no_proxy().local_address(ip.parse::<IpAddr>().unwrap()).build().unwrap();
    // An untrusted peer cannot split its bucket by claiming other addresses.
    let (a, b) = (from("127.0.0.1"), from("127.0.0.1"));
    let one = a.get(&url).header("X-Forwarded-For", "192.0.2.1").send().await.unwrap();
    let two = b.get(&url).header("X-Forwarded-For", "192.0.2.2").send().await.unwrap();
    assert_eq!((one.status().as_u16(), two.status().as_u16()), (200, 429));
    drop(one);
    // Through the trusted proxy, the forwarded addresses are the agents.
    let (c, d) = (from("127.0.0.2"), from("127.0.0.2"));
    let three = c.get(&url).header("X-Forwarded-For", "192.0.2.3").send().await.unwrap();
    let four = d.get(&url).header("X-Forwarded-For", "192.0.2.4").send().await.unwrap();
    assert_eq!((three.status().as_u16(), four.status().as_u16()), (200, 200));
    // The proxies set X-Forwarded-For (the default): a Forwarded header is
    // the client's own, passed through, and names nobody.
    let five = d.get(&url).header("Forwarded", "for=192.0.2.3").send().await.unwrap();
    assert_eq!(five.status(), 200, "a Forwarded header was believed");
    drop((three, four, five));

    // Proxies configured to set RFC 7239 Forwarded: that one is read.
    let (_repo, _origin, relay, _s) =
        relay_with(limits, "trusted_proxies = [\"127.0.0.2/32\"]\nforwarded_header = \"forwarded\"").await;
    let url = format!("{}/v1/components/big/latest", relay.url());
    let six = c.get(&url).header("Forwarded", "for=192.0.2.3").send().await.unwrap();
    let seven =
        d.get(&url).header("Forwarded", "for=192.0.2.3").header("X-Forwarded-For", "192.0.2.8").send().await.unwrap();
    assert_eq!((six.status().as_u16(), seven.status().as_u16()), (200, 429), "Forwarded names the agent");
}

/// A real nginx in front, setting X-Forwarded-For and passing the client's
/// own Forwarded and X-Forwarded-For through: the agent is the address nginx
/// saw, whatever the client claims.
#[actix_web::test]
async fn through_a_real_reverse_proxy_the_client_cannot_choose_its_address() {
    let limits = "[limits]\n[[limits.policy]]\nname = \"site\"\ncidrs = [\"127.0.0.0/8\"]\nrate = \"256KiB/s\"\nmax_concurrent = 1\n";
    let (repo, _origin, relay, _s) = relay_with(limits, "trusted_proxies = [\"127.0.0.1/32\"]").await;
    let proxy_conf = format!(
        "location / {{ proxy_pass {}; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_buffering off; }}",
        relay.url()
    );
    let Some(nginx) = start_nginx_with(&repo.repo, &proxy_conf, None).await else { return };
    let url = format!("{}/v1/components/big/latest", nginx.url);
    let from =
        |ip: &str| reqwest::Client::builder().no_proxy().local_address(ip.parse::<IpAddr>().unwrap()).build().unwrap();
    let agent = from("127.0.0.3");
    let first = agent.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    for (name, value) in [("Forwarded", "for=192.0.2.9"), ("X-Forwarded-For", "192.0.2.10")] {
        let again = agent.get(&url).header(name, value).send().await.unwrap();
        assert_eq!(again.status(), 429, "{name}: {value} escaped the agent's limit");
    }
    // Another address behind the same proxy is another agent.
    let other = from("127.0.0.4").get(&url).send().await.unwrap();
    assert_eq!(other.status(), 200);
    drop(first);
}

/// A policy by address applies whatever id an agent sends: here the site's
/// window is closed, and an id that an earlier policy in the file matches
/// does not open it.
#[actix_web::test]
async fn an_id_does_not_take_an_agent_out_of_its_networks_policy() {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let start = (now.hour() as u32 + 6) % 24;
    let limits = format!(
        "[limits]\n[[limits.policy]]\nname = \"vip\"\nagents = [\"vip-*\"]\n[[limits.policy]]\nname = \"site\"\ncidrs = [\"127.0.0.0/8\"]\nwindow = \"{start:02}:00-{:02}:00\"\n",
        (start + 1) % 24
    );
    let (_repo, _origin, relay, _s) = relay_with(&limits, "").await;
    let r = client()
        .get(format!("{}/v1/components/big/latest", relay.url()))
        .header("X-Agent-Id", "vip-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["error"], "outside_window");
}

/// One address may hold `max_agents_per_address` agent ids at once; a new
/// one beyond is refused (429, `too_many_agents`), and a flood of fresh ids
/// leaves the relay's agent table at the cap.
#[actix_web::test]
async fn one_address_cannot_invent_agents_without_end() {
    let limits = "[limits]\nmax_agents_per_address = 3\n[[limits.policy]]\nname = \"all\"\nrate = \"10MiB/s\"\n";
    let (_repo, _origin, relay, _s) = relay_with(limits, "").await;
    let url = format!("{}/v1/components/small/latest", relay.url());
    let c = client();
    for i in 0..3 {
        let r = c.get(&url).header("X-Agent-Id", format!("ws-{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    for i in 3..500 {
        let r = c.get(&url).header("X-Agent-Id", format!("ws-{i}")).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["error"], "too_many_agents");
    }
    let r = c.get(&url).header("X-Agent-Id", "ws-1").send().await.unwrap();
    assert_eq!(r.status(), 200, "a known id is still served");
    assert_eq!(metric(&relay.url(), "patchrelay_limit_tracked_agents", &[]).await, 3.0);
}

#[actix_web::test]
async fn a_closed_window_refuses_until_it_opens() {
    // A one-hour window starting six hours from now (UTC).
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let start = (now.hour() as u32 + 6) % 24;
    let limits = format!(
        "[limits]\ntimezone = \"UTC\"\n[[limits.policy]]\nname = \"night\"\nwindow = \"{start:02}:00-{:02}:00\"\n",
        (start + 1) % 24
    );
    let (_repo, _origin, relay, _s) = relay_with(&limits, "").await;
    let r = client().get(format!("{}/v1/components/big/latest", relay.url())).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let secs: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(secs > 5 * 3600 && secs <= 6 * 3600 + 900, "{secs}");
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["error"], "outside_window");
}

#[actix_web::test]
async fn the_total_cap_is_shared_evenly() {
    let limits = "[limits]\ntotal_rate = \"2MiB/s\"\ntotal_burst = \"128KiB\"\n[[limits.policy]]\nname = \"all\"\nrate = \"100MiB/s\"\n";
    let (_repo, _origin, relay, _s) = relay_with(limits, "").await;
    let url = format!("{}/v1/components/big/latest", relay.url());
    let tasks: Vec<_> =
        (0..4).map(|a| tokio::spawn(measure(url.clone(), vec![("X-Agent-Id", format!("a{a}"))], None, 8.0))).collect();
    let mut rates = Vec::new();
    for t in tasks {
        rates.push(t.await.unwrap());
    }
    eprintln!("rates under a 2 MiB/s total (MiB/s): {:?}", rates.iter().map(|r| r / MIB).collect::<Vec<_>>());
    let total: f64 = rates.iter().sum();
    assert!(within(total, 2.0 * MIB, 0.10), "total {:.3} MiB/s", total / MIB);
    for r in &rates {
        assert!(within(*r, 0.5 * MIB, 0.15), "unfair share {:.3} MiB/s", r / MIB);
    }
}
