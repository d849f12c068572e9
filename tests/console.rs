//! The console in a real browser (headless Chromium over the DevTools
//! protocol): every page loads behind the admin token, shows the numbers the
//! admin API gives, and "Sync now" moves the relay to the new serial.
//! Screenshots go to target/console-shots/.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use patchrelay::config::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: Socket,
    session: String,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let bin = require_tool("chromium", &["/usr/bin/chromium", "/usr/bin/chromium-browser"], "chromium")
            .expect("chromium is needed");
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it took, and the browser's endpoint.
        let file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Some((port, path)) = text.split_once('\n')
                && !path.trim().is_empty()
            {
                break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
            assert!(Instant::now() < deadline, "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(&endpoint).await.expect("DevTools websocket");
        let mut b = Browser { child, _profile: profile, ws, session: String::new(), next_id: 0 };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" })).await;
        let attached =
            b.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({})).await;
        b.call("Network.enable", json!({})).await;
        b
    }

    /// One command; its result (events in between are passed over).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next()).await.expect("DevTools answer").unwrap().unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// A JavaScript expression's value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true })).await;
        r["result"]["value"].clone()
    }

    async fn text(&mut self, selector: &str) -> String {
        let v = self.eval(&format!("(document.querySelector({selector:?}) || {{}}).textContent")).await;
        v.as_str().unwrap_or_else(|| panic!("no element {selector}")).trim().to_string()
    }

    /// Wait until the page at a URL containing `url_part` has loaded.
    async fn wait_loaded(&mut self, url_part: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval("document.readyState + ' ' + location.href").await;
            let s = v.as_str().unwrap_or("");
            if s.starts_with("complete ") && s.contains(url_part) {
                return;
            }
            assert!(Instant::now() < deadline, "page {url_part} did not load: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_loaded(url).await;
    }

    async fn screenshot(&mut self, name: &str) {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-shots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

async fn admin_json(url: &str, path: &str) -> Value {
    let r = client().get(format!("{url}{path}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

#[actix_web::test]
async fn every_page_shows_what_the_admin_api_says_and_sync_now_moves_the_serial() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    // Syncs only when asked: the serial moves by the button alone.
    let extra = "[sync]\ninterval = \"1h\"\n[fleet]\nsite_name = \"hq\"\n";
    let cfg =
        Config::from_toml(&relay_toml(&[&origin.url()], &repo.public, storage.path(), extra), "relay.toml").unwrap();
    let relay = start(&cfg).await;
    let url = relay.url();
    assert!(wait_ready(&url, Duration::from_secs(10)).await);
    wait_prefetched(&url, 3.0).await;
    // A fleet: 5 agents on 1, 3 on 2, 2 on 3.
    for (i, from) in ["1", "1", "1", "1", "1", "2", "2", "2", "3", "3"].iter().enumerate() {
        let r = client()
            .get(format!("{url}/v1/components/engine/chain?from={from}"))
            .header("X-Agent-Id", format!("pc-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // Without the token: a 401 that makes a browser ask for it.
    let r = client().get(format!("{url}/console")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic "));
    // A POST without the page's CSRF token does nothing.
    let r = client()
        .post(format!("{url}/console/action"))
        .bearer_auth(ADMIN_TOKEN)
        .form(&[("csrf", "forged"), ("action", "sync")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut b = Browser::start().await;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_TOKEN}"));
    b.call("Network.setExtraHTTPHeaders", json!({ "headers": { "Authorization": format!("Basic {basic}") } })).await;

    let status = admin_json(&url, "/admin/status").await;
    b.open(&format!("{url}/console")).await;
    assert_eq!(b.text("#serial").await, status["serial"].to_string());
    assert_eq!(b.text("#status").await, "ok");
    let upstreams = b.eval("document.querySelectorAll('#upstreams tbody tr').length").await;
    assert_eq!(upstreams, json!(status["upstreams"].as_array().unwrap().len()));
    assert_eq!(b.text("#store-objects").await, status["store"]["objects"].to_string());
    b.screenshot("overview").await;

    let manifest: Value = client().get(format!("{url}/v1/manifest")).send().await.unwrap().json().await.unwrap();
    b.open(&format!("{url}/console/components")).await;
    let count = b.eval("document.querySelector('#components-count').dataset.value").await;
    assert_eq!(count, json!(manifest["components"].as_object().unwrap().len().to_string()));
    let engine_rows = b.eval("document.querySelectorAll('#component-engine tbody tr').length").await;
    assert_eq!(engine_rows, json!(3));
    b.screenshot("components").await;

    let fleet = admin_json(&url, "/admin/fleet?component=engine").await;
    b.open(&format!("{url}/console/fleet?component=engine")).await;
    assert_eq!(b.text("#fleet-agents").await, fleet["summary"]["agents"].to_string());
    assert_eq!(b.text("#fleet-up-to-date").await, fleet["summary"]["up_to_date"].to_string());
    let behind: u64 = fleet["summary"]["behind"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(b.text("#fleet-behind").await, behind.to_string());
    assert_eq!(behind, 8);
    let bars = b.eval("Array.from(document.querySelectorAll('#fleet-chart g.bar')).map(g => g.dataset.version + '=' + g.dataset.agents).join(',')").await;
    let want: Vec<String> = fleet["summary"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{}={}", v["version"].as_str().unwrap(), v["agents"]))
        .collect();
    assert_eq!(bars, json!(want.join(",")));
    b.screenshot("fleet").await;

    // A new version at the origin; the relay has not synced it.
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    let new_serial = repo.publish();
    tokio::time::sleep(Duration::from_millis(400)).await; // the origin reloads every 100 ms
    b.open(&format!("{url}/console")).await;
    assert_ne!(b.text("#serial").await, new_serial.to_string());
    b.eval("document.querySelector('#sync-now').click(); true").await;
    // The action answers with a redirect back, showing what it did (the
    // page's script then drops `said=` from the address).
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.eval("document.readyState == 'complete' && !!document.querySelector('#said')").await != json!(true) {
        assert!(Instant::now() < deadline, "no answer to Sync now");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.text("#serial").await, new_serial.to_string());
    assert!(b.text("#said").await.contains("updated"), "{}", b.text("#said").await);
    assert_eq!(admin_json(&url, "/admin/status").await["serial"], json!(new_serial));
    b.screenshot("after-sync").await;

    let events = admin_json(&url, &format!("/admin/events?limit={}", patchrelay::events::KEPT)).await;
    b.open(&format!("{url}/console/events")).await;
    let shown = b.eval("document.querySelectorAll('#events tbody tr').length").await;
    assert_eq!(shown, json!(events["events"].as_array().unwrap().len()));
    b.screenshot("events").await;

    drop(b);
    relay.stop(false).await;
    origin.stop(false).await;
}
