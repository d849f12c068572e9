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
    let tls = patchrelay::tls::client_config(&patchrelay::tls::UpstreamTls {
        name: "agent",
        ca: Some(&pki.ca_pem),
        web_roots: false,
        client: None,
    })
    .unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from(from))
        .timeout(Duration::from_secs(60))
        .use_preconfigured_tls(tls)
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
