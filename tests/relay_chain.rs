//! origin <- relay <- relay on loopback: byte-identical manifests, RFC 9110
//! byte serving at every hop, resume with a real curl, and new publishes
//! flowing down the chain.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG};

struct Chain {
    repo: TestRepo,
    origin: patchrelay::server::RunningServer,
    relay1: patchrelay::server::RunningServer,
    relay2: patchrelay::server::RunningServer,
    _storage: tempfile::TempDir,
}

async fn chain() -> Chain {
    let repo = TestRepo::new();
    let storage = tempfile::tempdir().unwrap();
    let origin = start_origin(&repo).await;
    let relay1 = start_relay(&[&origin.url()], &repo.public, &storage.path().join("r1")).await;
    assert!(wait_ready(&relay1.url(), Duration::from_secs(10)).await, "relay1 never became ready");
    let relay2 = start_relay(&[&relay1.url()], &repo.public, &storage.path().join("r2")).await;
    assert!(wait_ready(&relay2.url(), Duration::from_secs(10)).await, "relay2 never became ready");
    Chain { repo, origin, relay1, relay2, _storage: storage }
}

/// Split a multipart/byteranges body into (Content-Range, data) parts.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delim = format!("\r\n--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut pos = 0;
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
    };
    while let Some(start) = find(text, delim.as_bytes(), pos) {
        let after = start + delim.len();
        if text[after..].starts_with(b"--") {
            break;
        }
        let headers_end = find(text, b"\r\n\r\n", after).unwrap();
        let headers = std::str::from_utf8(&text[after..headers_end]).unwrap();
        let range = headers.lines().find_map(|l| l.strip_prefix("Content-Range: ")).unwrap().to_string();
        let (a, b) = range.trim_start_matches("bytes ").split('/').next().unwrap().split_once('-').unwrap();
        let len = b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1;
        let data_start = headers_end + 4;
        parts.push((range, text[data_start..data_start + len].to_vec()));
        pos = data_start + len;
    }
    parts
}

#[actix_web::test]
async fn chain_serves_identical_bytes_with_full_http_semantics() {
    let c = chain().await;
    let http = client();
    let big = noise(42, 3 << 20);
    let big_sha = c.repo.sha("big", "1.0");

    for server in [&c.origin, &c.relay1, &c.relay2] {
        let url = server.url();
        // Manifest and signature pass through verbatim.
        let m = http.get(format!("{url}/v1/manifest")).send().await.unwrap();
        assert_eq!(m.status(), 200);
        assert_eq!(m.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(m.bytes().await.unwrap(), c.repo.manifest_bytes(), "{url}");
        let s = http.get(format!("{url}/v1/manifest.sig")).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(s, c.repo.signature_bytes(), "{url}");

        // Full body, strong ETag = sha256, version header.
        let r = http.get(format!("{url}/v1/components/big/latest")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[ETAG], format!("\"{big_sha}\""));
        assert_eq!(r.headers()[CONTENT_LENGTH], big.len().to_string());
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        assert_eq!(r.headers()["x-patchrelay-version"], "1.0");
        assert!(r.headers().contains_key("last-modified"));
        assert_eq!(r.bytes().await.unwrap(), big, "{url}");

        // Immutable objects by digest.
        let r = http.get(format!("{url}/v1/objects/{big_sha}")).send().await.unwrap();
        assert!(r.headers()["cache-control"].to_str().unwrap().contains("immutable"));
        assert_eq!(r.bytes().await.unwrap(), big);

        // Single range.
        let r = http.get(format!("{url}/v1/objects/{big_sha}")).header("Range", "bytes=100-199").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[CONTENT_RANGE], format!("bytes 100-199/{}", big.len()));
        assert_eq!(r.bytes().await.unwrap(), big[100..200]);

        // Multiple ranges, including a suffix and one across a chunk boundary.
        let r = http
            .get(format!("{url}/v1/objects/{big_sha}"))
            .header("Range", "bytes=0-9, 65530-65545, -5")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        let ct = r.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        let boundary = ct.strip_prefix("multipart/byteranges; boundary=").expect(&ct).to_string();
        let declared: usize = r.headers()[CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), declared);
        let parts = parse_multipart(&body, &boundary);
        let n = big.len();
        assert_eq!(
            parts,
            vec![
                (format!("bytes 0-9/{n}"), big[0..10].to_vec()),
                (format!("bytes 65530-65545/{n}"), big[65530..65546].to_vec()),
                (format!("bytes {}-{}/{n}", n - 5, n - 1), big[n - 5..].to_vec()),
            ]
        );

        // Unsatisfiable.
        let r =
            http.get(format!("{url}/v1/objects/{big_sha}")).header("Range", "bytes=999999999-").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[CONTENT_RANGE], format!("bytes */{n}"));

        // If-Range: a stale ETag gets the whole thing; the right one gets the range.
        let r = http
            .get(format!("{url}/v1/objects/{big_sha}"))
            .header("Range", "bytes=0-9")
            .header("If-Range", "\"0000000000000000000000000000000000000000000000000000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap().len(), n);
        let r = http
            .get(format!("{url}/v1/objects/{big_sha}"))
            .header("Range", "bytes=0-9")
            .header("If-Range", format!("\"{big_sha}\""))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);

        // If-None-Match.
        let r = http
            .get(format!("{url}/v1/objects/{big_sha}"))
            .header("If-None-Match", format!("\"{big_sha}\""))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()[ETAG], format!("\"{big_sha}\""));
        assert!(r.bytes().await.unwrap().is_empty());

        // HEAD: headers as for GET, no body.
        let r = http.head(format!("{url}/v1/components/big/versions/1.0")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_LENGTH], n.to_string());
        assert!(r.bytes().await.unwrap().is_empty());
        // Range handling is defined for GET only (RFC 9110 §14.2): HEAD ignores it.
        let r =
            http.head(format!("{url}/v1/objects/{big_sha}")).header("Range", "bytes=0-9,20-29").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[CONTENT_LENGTH], n.to_string());
        assert!(r.bytes().await.unwrap().is_empty());

        // Chunk lists: the bytes published, ETag = their own digest.
        let chunks = std::fs::read(c.repo.repo.join(format!("v1/chunks/{big_sha}"))).unwrap();
        let r = http.get(format!("{url}/v1/chunks/{big_sha}")).send().await.unwrap();
        assert_eq!(r.headers()[ETAG], patchrelay::digest::Digest::of(&chunks).etag());
        assert_eq!(r.bytes().await.unwrap(), chunks);

        // Every version of a text component, and an empty payload.
        for v in 1..=3u64 {
            let r = http.get(format!("{url}/v1/components/engine/versions/{v}")).send().await.unwrap();
            assert_eq!(r.bytes().await.unwrap(), TestRepo::engine_bytes(v));
        }
        let r =
            http.get(format!("{url}/v1/components/empty/latest")).header("Range", "bytes=0-10").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_LENGTH], "0");

        // Unknown things: 404 with a JSON error.
        for path in [
            "/v1/components/nope/latest".to_string(),
            "/v1/components/engine/versions/99".to_string(),
            format!("/v1/objects/{}", "0".repeat(64)),
            "/v1/objects/XYZ".to_string(),
            "/nothing/here".to_string(),
        ] {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 404, "{path}");
            let j: serde_json::Value = r.json().await.unwrap();
            assert_eq!(j["error"], "not_found", "{path}");
        }
    }

    // The relays pulled objects through once and then served them from disk.
    assert!(metric(&c.relay2.url(), "patchrelay_fills_total", &[("result", "ok")]).await > 0.0);
    assert!(metric(&c.relay2.url(), "patchrelay_cache_hits_total", &[("kind", "object")]).await > 0.0);
}

#[actix_web::test]
async fn curl_resumes_a_partial_download() {
    let c = chain().await;
    let big = noise(42, 3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.bin");
    // An agent that got the first 1,000,000 bytes before its link dropped.
    std::fs::write(&out, &big[..1_000_000]).unwrap();
    let url = format!("{}/v1/components/big/latest", c.relay2.url());
    let status = tokio::task::spawn_blocking({
        let out = out.clone();
        move || std::process::Command::new("curl").args(["-sS", "--fail", "-C", "-", "-o"]).arg(&out).arg(&url).status()
    })
    .await
    .unwrap()
    .expect("curl must be installed (.ci/run installs it)");
    assert!(status.success());
    assert_eq!(std::fs::read(&out).unwrap(), big);
    // The resume asked for the rest only.
    let bytes_sent = metric(&c.relay2.url(), "patchrelay_http_response_body_bytes_total", &[("route", "latest")]).await;
    assert!(bytes_sent >= (big.len() - 1_000_000) as f64);
}

#[actix_web::test]
async fn a_second_publish_flows_down_the_chain() {
    let c = chain().await;
    c.repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    assert_eq!(c.repo.publish(), 2);
    // The origin notices its repository changed (reload_interval 100ms).
    let (status, report) = admin_sync(&c.origin.url()).await;
    assert_eq!(status, 200, "{report}");
    let (status, report) = admin_sync(&c.relay1.url()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "updated");
    assert_eq!(report["serial"], 2);
    assert_eq!(report["added"], serde_json::json!(["engine 4"]));
    let (status, report) = admin_sync(&c.relay2.url()).await;
    assert_eq!((status, report["serial"].as_u64()), (200, Some(2)));
    // Again: nothing new.
    let (_, report) = admin_sync(&c.relay2.url()).await;
    assert_eq!(report["result"], "unchanged");

    let r = client().get(format!("{}/v1/components/engine/latest", c.relay2.url())).send().await.unwrap();
    assert_eq!(r.headers()["x-patchrelay-version"], "4");
    assert_eq!(r.bytes().await.unwrap(), TestRepo::engine_bytes(4));
    let m = client().get(format!("{}/v1/manifest", c.relay2.url())).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(m, c.repo.manifest_bytes());
    assert!(metric(&c.relay2.url(), "patchrelay_manifest_serial", &[]).await > 0.0);
}

#[actix_web::test]
async fn admin_sync_needs_the_token() {
    let c = chain().await;
    let url = format!("{}/admin/sync", c.relay1.url());
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().post(&url).bearer_auth("wrong-token-wrong-token").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
}
