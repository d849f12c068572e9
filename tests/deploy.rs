//! The deployments in deploy/, run with the real peers: nginx terminating
//! TLS in front of a relay with deploy/nginx.conf's location block.

mod common;

use std::time::Duration;

use common::*;
use patchrelay::config::Config;
use sha2::{Digest as _, Sha256};

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// deploy/nginx.conf's location block, proxying to `relay` (host:port).
fn nginx_location(relay: &str) -> String {
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
    let begin = conf.find("# BEGIN patchrelay location").expect("BEGIN line");
    let end = conf.find("# END patchrelay location").expect("END line");
    conf[begin..end].replace("http://patchrelay", &format!("http://{relay}"))
}

/// A client of nginx's HTTPS port, connecting from `from` (a loopback
/// address: 127.0.0.2 and 127.0.0.3 are other clients than 127.0.0.1).
fn agent(pki: &Pki, from: [u8; 4]) -> reqwest::Client {
    https_client(&pki.ca_pem, None)
        .local_address(std::net::IpAddr::from(from))
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[actix_rt::test]
async fn nginx_terminating_tls_in_front_of_a_relay() {
    let mut repo = TestRepo::bare();
    repo.chunk_size = 1 << 20;
    let big = noise(7, 24 << 20);
    repo.add_version("big", "1", &big);
    repo.add_version("tool", "1", &noise(8, 2 << 20));
    repo.publish();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    // 127.0.0.2 may download only in a window six hours away.
    let opens = (time::OffsetDateTime::now_utc().hour() as u32 + 6) % 24;
    let extra = format!(
        "[limits]\n[[limits.policy]]\nname = \"closed\"\ncidrs = [\"127.0.0.2/32\"]\nwindow = \"{opens:02}:00-{:02}:00\"\n[[limits.policy]]\nname = \"rest\"\nmax_concurrent = 8\n",
        (opens + 1) % 24
    );
    let toml = relay_toml(&[&origin.url()], &repo.public, storage.path(), &extra)
        .replace("[server]\n", "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n");
    let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);

    let pki = Pki::new(&[]);
    let server_extra = format!(
        "ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    {}",
        pki.cert.display(),
        pki.key.display(),
        nginx_location(&relay.addr.to_string())
    );
    let Some(nginx) = start_nginx_conf(&repo.repo, " ssl", &server_extra, "", None).await else { return };
    let base = nginx.url.clone();
    let sha = repo.sha("big", "1");
    let url = format!("{base}/v1/objects/{sha}");

    // Coalescing through nginx: 20 agents ask for the uncached 24 MiB object
    // at once; the relay fetches it from upstream once.
    let a = agent(&pki, [127, 0, 0, 1]);
    let gets: Vec<_> = (0..20)
        .map(|i| {
            let (a, url) = (a.clone(), url.clone());
            tokio::spawn(async move {
                let r = a.get(&url).header("X-Agent-Id", format!("ws-{i}")).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            })
        })
        .collect();
    for g in gets {
        assert_eq!(sha_hex(&g.await.unwrap()), sha);
    }
    // The origin sent the object's bytes once (its chunk list is a fill of its own).
    let sent = metric(&origin.url(), "patchrelay_http_response_body_bytes_total", &[("route", "object")]).await;
    assert_eq!(sent, big.len() as f64, "the origin sent {sent} bytes of the object");

    // A range, several ranges, If-Range matching and not, 304.
    let r = a.get(&url).header("Range", "bytes=100-199").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 100-199/{}", big.len()).as_str());
    assert_eq!(r.bytes().await.unwrap()[..], big[100..200]);
    let r = a.get(&url).header("Range", "bytes=0-9,1000-1009").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("multipart/byteranges"));
    let etag = format!("\"{sha}\"");
    let r = a.get(&url).header("Range", "bytes=0-9").header("If-Range", &etag).send().await.unwrap();
    assert_eq!(r.status(), 206);
    let r = a.get(&url).header("Range", "bytes=0-9").header("If-Range", "\"other\"").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), big.len());
    let r = a.get(&url).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);

    // A 24 MiB download cut after 9 MB, resumed by curl through nginx.
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("big");
    std::fs::write(&out_file, &big[..9_000_000]).unwrap();
    let curl_bin = curl_binary().expect("curl");
    let mut cmd = std::process::Command::new(curl_bin);
    cmd.args(["-sS", "--fail", "--max-time", "60", "--noproxy", "*", "--cacert"])
        .arg(&pki.ca_pem)
        .args(["-C", "-", "-o"])
        .arg(&out_file)
        .arg(&url);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha_hex(&std::fs::read(&out_file).unwrap()), sha);
    assert!(nginx.requests_for(&format!("/v1/objects/{sha}")).iter().any(|l| l.contains("bytes=9000000-")));

    // Limits by the real client address nginx passes on: 127.0.0.2 is outside
    // its window (a spoofed X-Forwarded-For does not change that), 127.0.0.3
    // is served.
    let tool = format!("{base}/v1/components/tool/latest");
    let r = agent(&pki, [127, 0, 0, 2]).get(&tool).header("X-Forwarded-For", "127.0.0.3").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "outside_window");
    let r = agent(&pki, [127, 0, 0, 3]).get(&tool).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 2 << 20);

    drop(nginx);
    relay.stop(false).await;
    origin.stop(false).await;
}

/// HAProxy as deploy/haproxy.cfg has it (TLS, balance uri, consistent
/// hashing, /readyz checks, PROXY v2), with `relays` (host:port) as servers.
struct Haproxy {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_haproxy(pki: &Pki, relays: &[String]) -> Option<Haproxy> {
    let bin = require_tool("haproxy", &["/usr/sbin/haproxy", "/usr/bin/haproxy"], "haproxy")?;
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg")).unwrap();
    let begin = conf.find("# BEGIN patchrelay").expect("BEGIN line");
    let end = conf.find("# END patchrelay").expect("END line");
    let dir = tempfile::tempdir().unwrap();
    // HAProxy wants the certificate and its key in one file.
    let pem = dir.path().join("relay.pem");
    let both = std::fs::read_to_string(&pki.cert).unwrap() + &std::fs::read_to_string(&pki.key).unwrap();
    std::fs::write(&pem, both).unwrap();
    let port = free_port();
    let mut body = conf[begin..end]
        .replace(
            "bind :443 ssl crt /etc/haproxy/patchrelay.pem",
            &format!("bind 127.0.0.1:{port} ssl crt {}", pem.display()),
        )
        .replace("inter 2s fall 2 rise 2", "inter 100ms fall 1 rise 1");
    let servers: String = relays.iter().enumerate().map(|(i, r)| format!("    server relay{} {r}\n", i + 1)).collect();
    let first = body.find("    server relay1").expect("server lines");
    body.replace_range(first.., &servers);
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, format!("global\n    maxconn 4096\n\n{body}")).unwrap();
    let check = std::process::Command::new(&bin).arg("-c").arg("-f").arg(&cfg).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stdout));
    let child = std::process::Command::new(&bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "haproxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Haproxy { child, url: format!("https://127.0.0.1:{port}"), _dir: dir })
}

/// Which of `stores` hold the object `sha`.
fn holders(stores: &[&std::path::Path], sha: &str) -> Vec<usize> {
    (0..stores.len()).filter(|&i| stores[i].join("objects").join(&sha[..2]).join(sha).exists()).collect()
}

#[actix_rt::test]
async fn haproxy_in_front_of_three_relays_fetches_each_object_once() {
    const OBJECTS: usize = 12;
    const SIZE: usize = 256 << 10;
    let repo = TestRepo::bare();
    for i in 0..OBJECTS {
        repo.add_version(&format!("tool{i}"), "1", &noise(100 + i as u64, SIZE));
    }
    repo.publish();
    let origin = start_origin(&repo).await;
    // Relays read the PROXY header from HAProxy (127.0.0.1) on server.listen
    // and serve plain HTTP on a second listener for the test to look in.
    // 127.0.0.2 is outside its window: only the PROXY header can say so.
    let opens = (time::OffsetDateTime::now_utc().hour() as u32 + 6) % 24;
    let extra = format!(
        "[[server.listener]]\nlisten = \"127.0.0.1:0\"\n[limits]\n[[limits.policy]]\nname = \"closed\"\ncidrs = [\"127.0.0.2/32\"]\nwindow = \"{opens:02}:00-{:02}:00\"\n",
        (opens + 1) % 24
    );
    let stores: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut relays = Vec::new();
    for s in &stores {
        let toml = relay_toml(&[&origin.url()], &repo.public, s.path(), &extra)
            .replace("[server]\n", "[server]\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n");
        let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
        assert!(wait_ready(&relay.listeners[1].url(), Duration::from_secs(10)).await);
        relays.push(relay);
    }
    let pki = Pki::new(&[]);
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.to_string()).collect();
    let Some(haproxy) = start_haproxy(&pki, &addrs).await else { return };
    let shas: Vec<String> = (0..OBJECTS).map(|i| repo.sha(&format!("tool{i}"), "1")).collect();
    let store_paths: Vec<&std::path::Path> = stores.iter().map(|s| s.path()).collect();

    // 500 agents, 50 at a time, each fetching one object through HAProxy.
    let a = agent(&pki, [127, 0, 0, 1]);
    let fetch_all = |n: usize, offset: usize| {
        let (a, base, shas) = (a.clone(), haproxy.url.clone(), shas.clone());
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let (a, base, shas) = (a.clone(), base.clone(), shas.clone());
                tasks.spawn(async move {
                    let k = (i + offset) % OBJECTS;
                    let url = format!("{base}/v1/components/tool{k}/latest");
                    for _ in 0..50 {
                        // A relay just taken out may still be chosen until a check notices.
                        match a.get(&url).header("X-Agent-Id", format!("ws-{i}")).send().await {
                            Ok(r) if r.status() == 200 => {
                                assert_eq!(sha_hex(&r.bytes().await.unwrap()), shas[k], "agent {i}");
                                return;
                            }
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                    panic!("agent {i} never got tool{k}");
                });
                if tasks.len() >= 50 {
                    tasks.join_next().await.unwrap().unwrap();
                }
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
        }
    };
    fetch_all(500, 0).await;
    let origin_url = origin.url();
    let sent = || metric(&origin_url, "patchrelay_http_response_body_bytes_total", &[("route", "object")]);
    assert_eq!(sent().await, (OBJECTS * SIZE) as f64, "objects fetched more than once across the fleet");
    let before: Vec<Vec<usize>> = shas.iter().map(|s| holders(&store_paths, s)).collect();
    for (k, h) in before.iter().enumerate() {
        assert_eq!(h.len(), 1, "tool{k} is held by relays {h:?}");
    }
    let share = |r: usize| before.iter().filter(|h| h[0] == r).count();
    assert!((0..3).all(|r| share(r) > 0), "one relay got nothing: {before:?}");

    // The relays see the agent's address from the PROXY header.
    let r =
        agent(&pki, [127, 0, 0, 2]).get(format!("{}/v1/components/tool0/latest", haproxy.url)).send().await.unwrap();
    assert_eq!(r.status(), 429);

    // A download begun on one relay and resumed on another: same ETag, right bytes.
    let k = 3;
    let url = |r: &patchrelay::server::RunningServer| format!("{}/v1/objects/{}", r.listeners[1].url(), shas[k]);
    let first = client().get(url(&relays[0])).header("Range", "bytes=0-99999").send().await.unwrap();
    let etag = first.headers()["etag"].clone();
    let head = first.bytes().await.unwrap();
    let rest = client()
        .get(url(&relays[2]))
        .header("Range", "bytes=100000-")
        .header("If-Range", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.headers()["etag"], etag);
    let whole = [head.to_vec(), rest.bytes().await.unwrap().to_vec()].concat();
    assert_eq!(sha_hex(&whole), shas[k]);
    let sent_before_kill = sent().await;

    // relay 2 goes away: only its objects move, each fetched once more.
    let gone = relays.remove(1);
    gone.stop(false).await;
    fetch_all(OBJECTS * 4, 0).await;
    let moved = (sent().await - sent_before_kill) / SIZE as f64;
    assert_eq!(moved, share(1) as f64, "objects fetched again after relay 2 left: {moved}");
    for (k, h) in before.iter().enumerate() {
        if h[0] != 1 {
            assert!(holders(&store_paths, &shas[k]).contains(&h[0]), "tool{k} moved from relay {}", h[0]);
        }
    }
    drop(haproxy);
    for r in relays {
        r.stop(false).await;
    }
    origin.stop(false).await;
}

/// Behind a PROXY-protocol balancer, `max_connections_per_address` counts
/// the agent's address from the header, not the balancer's.
#[actix_rt::test]
async fn the_per_address_cap_counts_the_agent_named_by_the_proxy_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = TestRepo::new();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_address = 2\n[origin]\nrepository = {:?}\n",
        repo.repo.display().to_string()
    );
    let origin = start(&Config::from_toml(&toml, "origin.toml").unwrap()).await;
    // A connection from "the balancer" for `client`; whether it is served.
    let open = |client: &'static str| {
        let addr = origin.addr;
        async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head =
                format!("PROXY TCP4 {client} 127.0.0.1 40000 80\r\nGET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n");
            c.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap_or(0);
            (c, buf[..n].starts_with(b"HTTP/1.1 200"))
        }
    };
    let (a, served_a) = open("10.9.9.9").await;
    let (b, served_b) = open("10.9.9.9").await;
    assert!(served_a && served_b);
    let (_c, served_c) = open("10.9.9.9").await;
    assert!(!served_c, "a third connection for one agent address was served");
    let (_d, served_d) = open("10.9.9.8").await;
    assert!(served_d, "another agent was refused: the balancer's address was counted");
    drop((a, b));
    origin.stop(false).await;
}
