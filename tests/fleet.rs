//! The fleet inventory: agents report their versions through plan requests;
//! the admin API and `/metrics` count them; it survives restarts, keeps its
//! bound, and a site's relay reports its counts to its parent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use patchrelay::config::Config;

async fn plan(url: &str, from: &str, agent: Option<&str>, ua: &str) -> u16 {
    let mut r = client().get(format!("{url}/v1/components/engine/chain?from={from}")).header("User-Agent", ua);
    if let Some(a) = agent {
        r = r.header("X-Agent-Id", a);
    }
    r.send().await.unwrap().status().as_u16()
}

async fn admin(url: &str, path: &str) -> (u16, String) {
    let r = client().get(format!("{url}{path}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn fleet_json(url: &str, path: &str) -> serde_json::Value {
    let (status, body) = admin(url, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn relay_config(upstream: &str, public: &str, storage: &std::path::Path, extra: &str) -> Config {
    Config::from_toml(&relay_toml(&[upstream], public, storage, extra), "relay.toml").unwrap()
}

#[actix_web::test]
async fn plan_requests_fill_the_inventory_and_the_admin_api_counts_them() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = relay_config(&origin.url(), &repo.public, storage.path(), "[fleet]\nstale_after = \"2s\"\n");
    let relay = start(&cfg).await;
    let url = relay.url();
    assert!(wait_ready(&url, Duration::from_secs(10)).await);

    // 6 agents on 1, 3 on 2, 2 on 3; one without an id (its address names it).
    for i in 0..6 {
        assert_eq!(plan(&url, "1", Some(&format!("ws-{i:02}")), "acme-agent/7.1").await, 200);
    }
    for i in 6..9 {
        assert_eq!(plan(&url, "2", Some(&format!("ws-{i:02}")), "acme-agent/7.2").await, 200);
    }
    assert_eq!(plan(&url, "3", Some("ws-09"), "acme-agent/7.2").await, 200);
    assert_eq!(plan(&url, "3", None, "curl/8").await, 200);
    // An agent that moves on is counted once, at its new version.
    assert_eq!(plan(&url, "2", Some("ws-00"), "acme-agent/7.2").await, 200);
    // Relays and unknown versions are not agents.
    assert_eq!(plan(&url, "1", Some("relay-b"), patchrelay::upstream::RELAY_USER_AGENT).await, 200);
    assert_eq!(plan(&url, "99", Some("ws-bad"), "x").await, 404);

    let f = fleet_json(&url, "/admin/fleet?component=engine").await;
    let s = &f["summary"];
    assert_eq!(
        (s["agents"].as_u64(), s["up_to_date"].as_u64(), s["latest"].as_str()),
        (Some(11), Some(2), Some("3")),
        "{f}"
    );
    let per: Vec<(String, u64)> = s["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_str().unwrap().to_string(), v["agents"].as_u64().unwrap()))
        .collect();
    assert_eq!(per, [("1".to_string(), 5), ("2".to_string(), 4), ("3".to_string(), 2)]);
    assert_eq!(s["behind"], serde_json::json!({ "1": 4, "2": 5 }));
    assert_eq!(s["stale"], 0);

    // The list: behind by two or more, paged, as JSON and as CSV.
    let page = fleet_json(&url, "/admin/fleet/agents?component=engine&behind=2&limit=3").await;
    assert_eq!((page["total"].as_u64(), page["next_offset"].as_u64()), (Some(5), Some(3)), "{page}");
    let names: Vec<&str> = page["agents"].as_array().unwrap().iter().map(|a| a["agent"].as_str().unwrap()).collect();
    assert_eq!(names, ["ws-01", "ws-02", "ws-03"]);
    assert_eq!(page["agents"][0]["user_agent"], "acme-agent/7.1");
    assert_eq!(page["agents"][0]["address"], "127.0.0.1");
    let rest = fleet_json(&url, "/admin/fleet/agents?component=engine&behind=2&offset=3&limit=3").await;
    assert_eq!(rest["agents"].as_array().unwrap().len(), 2);
    assert_eq!(rest["next_offset"], serde_json::Value::Null);
    let (status, csv) = admin(&url, "/admin/fleet/agents?component=engine&format=csv").await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "agent,version,behind,reported_at,last_seen,stale,address,user_agent");
    assert_eq!(lines.len(), 12, "{csv}");
    assert!(lines.iter().any(|l| l.starts_with("127.0.0.1,3,0,")), "the agent without an id is its address: {csv}");
    // Bad input is a clear 4xx.
    assert_eq!(admin(&url, "/admin/fleet/agents?component=nope").await.0, 404);
    assert_eq!(admin(&url, "/admin/fleet/agents?component=engine&format=xml").await.0, 400);
    assert_eq!(admin(&url, "/admin/fleet/agents?component=engine&behind=x").await.0, 400);
    assert_eq!(client().get(format!("{url}/admin/fleet")).send().await.unwrap().status(), 401);

    // /metrics: one series per listed version.
    let text = client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("patchrelay_fleet_agents{component=\"engine\",version=\"2\"} 4"), "{text}");
    assert!(text.contains("patchrelay_fleet_agents{component=\"big\",version=\"1.0\"} 0"), "{text}");
    assert!(text.contains("patchrelay_fleet_agents_stale{component=\"engine\"} 0"), "{text}");

    // More than two seconds without a poll (counted in whole seconds): stale.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let f = fleet_json(&url, "/admin/fleet?component=engine").await;
    assert_eq!(f["summary"]["stale"], 11, "{f}");
    let stale = fleet_json(&url, "/admin/fleet/agents?component=engine&stale=true").await;
    assert_eq!(stale["total"], 11);

    // A restart keeps the inventory (written as the relay stops).
    relay.stop(false).await;
    let relay = start(&cfg).await;
    let url = relay.url();
    assert!(wait_ready(&url, Duration::from_secs(10)).await);
    let f = fleet_json(&url, "/admin/fleet?component=engine").await;
    assert_eq!(f["summary"]["agents"], 11, "{f}");
    let one = fleet_json(&url, "/admin/fleet/agents?component=engine&behind=1").await;
    assert!(one["agents"].as_array().unwrap().iter().any(|a| a["agent"] == "ws-00" && a["version"] == "2"), "{one}");
    relay.stop(false).await;
    origin.stop(false).await;
}

/// `fleet.max_agents`: a flood of new ids is cut at 105% of it, and the
/// least recently seen go at the next trim (here, as the relay stops).
#[actix_web::test]
async fn the_inventory_keeps_its_bound() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let extra = "[fleet]\nmax_agents = 100\n[limits]\nmax_agents_per_address = 0\n";
    let cfg = relay_config(&origin.url(), &repo.public, storage.path(), extra);
    let relay = start(&cfg).await;
    let url = relay.url();
    assert!(wait_ready(&url, Duration::from_secs(10)).await);
    for i in 0..150 {
        assert_eq!(plan(&url, "2", Some(&format!("flood-{i:03}")), "x").await, 200);
    }
    let f = fleet_json(&url, "/admin/fleet").await;
    assert_eq!((f["agents_tracked"].as_u64(), f["agents_refused"].as_u64()), (Some(105), Some(45)), "{f}");
    // Seen again later than the others: these stay.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..10 {
        plan(&url, "3", Some(&format!("flood-{i:03}")), "x").await;
    }
    relay.stop(false).await;
    let relay = start(&cfg).await;
    let url = relay.url();
    let f = fleet_json(&url, "/admin/fleet?component=engine").await;
    assert_eq!(f["agents_tracked"], 100, "{f}");
    let fresh = fleet_json(&url, "/admin/fleet/agents?component=engine&behind=0&limit=10000").await;
    let at3 = fresh["agents"].as_array().unwrap().iter().filter(|a| a["version"] == "3").count();
    assert_eq!(at3, 10, "the most recently seen were kept");
    relay.stop(false).await;
    origin.stop(false).await;
}

/// A site's relay reports its counts (and only counts) to its parent, under
/// the name the parent gives its token; a wrong token files nothing.
#[actix_web::test]
async fn a_site_reports_its_fleet_to_its_parent() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("berlin.token");
    std::fs::write(&token, "berlin-site-token-7f3a9c1e55").unwrap();
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "another-site-token-0b2d4f6a88").unwrap();
    let parent_extra =
        format!("[fleet]\n[[fleet.site]]\nname = \"berlin\"\ntoken_file = {:?}\n", token.display().to_string());
    let parent = start(&relay_config(&origin.url(), &repo.public, &dir.path().join("parent"), &parent_extra)).await;
    let purl = parent.url();
    assert!(wait_ready(&purl, Duration::from_secs(10)).await);
    let site = |name: &str, t: &std::path::Path| {
        format!(
            "[fleet]\nreport_upstream = true\nreport_interval = \"10s\"\nsite_name = \"{name}\"\nreport_token_file = {:?}\n",
            t.display().to_string()
        )
    };
    // The child's agents poll before its first report goes out.
    let child_cfg = relay_config(&purl, &repo.public, &dir.path().join("child"), &site("claims-paris", &token));
    let child = start(&child_cfg).await;
    let curl = child.url();
    assert!(wait_ready(&curl, Duration::from_secs(10)).await);
    for i in 0..4 {
        plan(&curl, if i < 3 { "1" } else { "3" }, Some(&format!("b-{i}")), "agent/1").await;
    }
    let rogue = start(&relay_config(&purl, &repo.public, &dir.path().join("rogue"), &site("rogue", &wrong))).await;
    // Reports go out every 10 s; the second is sure to count the agents.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let f = fleet_json(&purl, "/admin/fleet?component=engine").await;
        let sites = f["sites"].as_array().unwrap();
        if let Some(s) = sites.iter().find(|s| s["summary"]["agents"] == 4) {
            assert_eq!(s["site"], "berlin", "the site's name is the parent's, not its claim: {f}");
            assert_eq!(s["summary"]["up_to_date"], 1);
            assert_eq!(sites.len(), 1, "only berlin reports: {f}");
            // The parent's own fleet is its own agents: none.
            assert_eq!(f["summary"]["agents"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "no report from the site: {f}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all = fleet_json(&purl, "/admin/fleet").await;
    assert!(!all.to_string().contains("b-0"), "agent names stayed at the site: {all}");
    rogue.stop(false).await;
    child.stop(false).await;
    parent.stop(false).await;
    origin.stop(false).await;
}
