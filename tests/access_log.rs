//! The access log: one line per response with the agent, status, bytes sent,
//! duration and cache result, in JSON or combined form; hostile header
//! values cannot break a line; the file is reopened when rotated away.

mod common;

use std::time::{Duration, Instant};

use common::*;
use patchrelay::config::Config;

/// Wait until `path` has at least `n` lines; they are returned.
async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = text.lines().map(str::to_owned).collect();
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{} has {} lines, wanted {n}: {got:?}", path.display(), got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn json_lines_say_who_what_how_much_and_what_the_cache_did() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let toml = relay_toml(
        &[&origin.url()],
        &repo.public,
        storage.path(),
        &format!("[log]\naccess = \"json\"\naccess_file = {:?}\n", log.display().to_string()),
    );
    let relay = start(&Config::from_toml(&toml, "relay.toml").unwrap()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let c = client();
    let url = format!("{}/v1/components/big/latest", relay.url());
    let before = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
    let body = c.get(&url).header("X-Agent-Id", "ws-0042").send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), 3 << 20);
    let r = c.get(&url).header("X-Agent-Id", "ws-0042").header("Range", "bytes=0-99").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 100);
    // Lines for the two downloads (the readiness checks before are logged too).
    let deadline = Instant::now() + Duration::from_secs(10);
    let parsed: Vec<serde_json::Value> = loop {
        let got = lines(&log, before + 2).await;
        let all: Vec<serde_json::Value> = got.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let ours: Vec<_> = all.into_iter().filter(|j| j["target"] == "/v1/components/big/latest").collect();
        if ours.len() == 2 {
            break ours;
        }
        assert!(Instant::now() < deadline, "{ours:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (first, second) = (&parsed[0], &parsed[1]);
    assert_eq!(first["agent"], "ws-0042");
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["target"], "/v1/components/big/latest");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], 3 << 20);
    assert_eq!(first["cache"], "miss");
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(second["status"], 206);
    assert_eq!(second["bytes"], 100);
    assert_eq!(second["cache"], "hit");

    // Rotated away (logrotate's rename): the next lines go to a new file.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // The writer notices within a second or so and starts a new file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(Instant::now() < deadline, "the access log was not reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.get(format!("{}/v1/manifest", relay.url())).send().await.unwrap().bytes().await.unwrap();
    let fresh = lines(&log, 1).await;
    assert!(fresh.iter().any(|l| l.contains("/v1/manifest")), "{fresh:?}");
    relay.stop(false).await;
    origin.stop(false).await;
}

#[actix_rt::test]
async fn combined_lines_stay_one_line_of_fields_whatever_the_client_sends() {
    let repo = TestRepo::new();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let mut cfg = origin_config(&repo);
    cfg.log.access = patchrelay::config::AccessFormat::Combined;
    cfg.log.access_file = Some(log.clone());
    let origin = start(&cfg).await;
    let c = client();
    let res = c
        .get(format!("{}/v1/manifest?x=\"y z\"", origin.url()))
        .header("User-Agent", "evil\" 200 999 \"agent")
        .header("X-Agent-Id", "id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let len = res.bytes().await.unwrap().len();
    let got = lines(&log, 1).await;
    let line = got.last().unwrap();
    // client - agent [time] "request" status bytes "referer" "user-agent" seconds cache
    let quoted: Vec<&str> = line.split('"').collect();
    assert_eq!(quoted.len(), 7, "{line}");
    assert!(quoted[1].starts_with("GET /v1/manifest?x="), "{line}");
    let after_request: Vec<&str> = quoted[2].split_whitespace().collect();
    assert_eq!(after_request, ["200", &len.to_string()], "{line}");
    assert!(quoted[5].starts_with("evil\\x22"), "{line}");
    assert!(line.starts_with("127.0.0.1 - id%20with%20spaces ["), "{line}");
    origin.stop(false).await;
}
