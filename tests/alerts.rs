//! Alerts reach a real SMTP server (aiosmtpd) and a real HTTP receiver: a
//! new critical version is told once on each, signed; an upstream that goes
//! away makes the sync stale, told once; a receiver that is down does not
//! hold the others back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::*;
use hmac::{KeyInit, Mac};
use patchrelay::config::Config;

/// aiosmtpd writing each message into a Maildir.
struct Smtp {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Smtp {
    async fn start(dir: &Path) -> Smtp {
        let bin = require_tool("aiosmtpd", &["/usr/bin/aiosmtpd"], "python3-aiosmtpd")
            .expect("aiosmtpd (python3-aiosmtpd) is needed");
        let port = free_port();
        let maildir = dir.join("maildir");
        let child = Command::new(bin)
            .args(["-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Smtp { child, port, maildir }
    }

    /// Every message received, as text: headers unfolded, the body's
    /// quoted-printable decoded.
    fn messages(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        dir.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).map(|b| readable(&String::from_utf8_lossy(&b))).collect()
    }

    fn with_subject(&self, needle: &str) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter(|m| m.lines().any(|l| l.starts_with("Subject:") && l.contains(needle)))
            .collect()
    }
}

fn readable(raw: &str) -> String {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    let head = head.replace("\n ", " ");
    let body = body.replace("=\n", "");
    let mut out = Vec::new();
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len() + 1
            && let Ok(v) = u8::from_str_radix(body.get(i + 1..i + 3).unwrap_or(""), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    format!("{head}\n\n{}", String::from_utf8_lossy(&out))
}

/// Each webhook received: its signature header and its body.
type Hooks = Vec<(Option<String>, Vec<u8>)>;

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Hooks>>);

impl Received {
    fn bodies(&self) -> Vec<(Option<String>, serde_json::Value, Vec<u8>)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(sig, body)| (sig.clone(), serde_json::from_slice(body).unwrap(), body.clone()))
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<(Option<String>, serde_json::Value, Vec<u8>)> {
        self.bodies().into_iter().filter(|(_, j, _)| j["event"]["kind"] == kind).collect()
    }
}

/// A real HTTP server taking webhooks.
async fn receiver() -> (String, Received, actix_web::dev::ServerHandle) {
    let got = Received::default();
    let data = got.clone();
    let server = HttpServer::new(move || {
        let data = data.clone();
        App::new().route(
            "/hook",
            web::post().to(move |req: HttpRequest, body: web::Bytes| {
                let data = data.clone();
                async move {
                    let sig = req.headers().get("x-patchrelay-signature").map(|v| v.to_str().unwrap().to_string());
                    data.0.lock().unwrap().push((sig, body.to_vec()));
                    HttpResponse::NoContent().finish()
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (format!("http://{addr}/hook"), got, handle)
}

async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn a_critical_version_and_a_stale_sync_are_told_once_by_email_and_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path()).await;
    let (hook, received, hook_server) = receiver().await;
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "s3cret-webhook-key-42\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A receiver that refuses connections: retried, never in the way.
    let dead = format!("http://127.0.0.1:{}/hook", free_port());

    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let extra = format!(
        "[sync]\ninterval = \"1s\"\n[fleet]\nsite_name = \"branch-7\"\n\
         [alerts]\nstale_after = \"4s\"\nmin_free_disk = \"1MiB\"\n\
         [[alerts.webhook]]\nurl = \"{hook}\"\nsecret_file = {:?}\n\
         [[alerts.webhook]]\nurl = \"{dead}\"\n\
         [alerts.email]\nserver = \"127.0.0.1:{}\"\ntls = \"none\"\nfrom = \"relay@example.net\"\nto = [\"ops@example.net\", \"oncall@example.net\"]\n",
        dir.path().join("hook.secret").display().to_string(),
        smtp.port
    );
    let toml = relay_toml(&[&origin.url()], &repo.public, storage.path(), &extra);
    let relay = start(&Config::from_toml(&toml, &dir.path().join("relay.toml").display().to_string()).unwrap()).await;
    let url = relay.url();
    assert!(wait_ready(&url, Duration::from_secs(10)).await);
    wait_prefetched(&url, 3.0).await;
    // What the relay held as it started is no news.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(smtp.messages().is_empty(), "{:?}", smtp.messages());

    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    repo.publish();
    until(Duration::from_secs(20), "the critical-version email", || !smtp.with_subject("engine 4").is_empty()).await;
    until(Duration::from_secs(10), "the critical-version webhook", || !received.of_kind("critical_version").is_empty())
        .await;
    // Told once, though the relay looks again and again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mails = smtp.with_subject("engine 4");
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert!(
        mail.contains("[patchrelay branch-7] info: critical update engine 4 is available, and cached here"),
        "{mail}"
    );
    assert!(mail.contains("ops@example.net") && mail.contains("oncall@example.net"), "{mail}");
    assert!(mail.contains("What to do:"), "{mail}");
    let hooks = received.of_kind("critical_version");
    assert_eq!(hooks.len(), 1, "{:?}", received.bodies());
    let (sig, json, raw) = &hooks[0];
    assert_eq!(json["server"]["name"], "branch-7");
    assert_eq!(json["server"]["role"], "relay");
    assert_eq!(json["event"]["key"], "critical_version:engine:4");
    assert_eq!(json["event"]["severity"], "info");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret-webhook-key-42").unwrap();
    mac.update(raw);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(sig.as_deref(), Some(want.as_str()), "signature over the body bytes");

    // The upstream goes away: the sync goes stale, told once.
    origin.stop(false).await;
    until(Duration::from_secs(30), "the stale-sync email", || !smtp.with_subject("no good sync").is_empty()).await;
    until(Duration::from_secs(10), "the stale-sync webhook", || !received.of_kind("sync_stale").is_empty()).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stale = smtp.with_subject("no good sync");
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(stale[0].contains("CRITICAL"), "{}", stale[0]);
    assert!(stale[0].contains("agents are served serial 2"), "{}", stale[0]);
    assert_eq!(received.of_kind("sync_stale").len(), 1);

    // The log has it all, for the console and scripts.
    let r = client().get(format!("{url}/admin/events")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events: serde_json::Value = r.json().await.unwrap();
    let kinds: Vec<&str> = events["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"critical_version") && kinds.contains(&"sync_stale"), "{kinds:?}");
    assert!(kinds.contains(&"upstream_down"), "{kinds:?}");
    // The relay counts what each channel did (its own /metrics).
    assert!(metric(&url, "patchrelay_alerts_sent_total", &[("channel", "email")]).await >= 2.0);
    assert_eq!(
        metric(&url, "patchrelay_alerts_sent_total", &[("channel", &format!("webhook {}", &dead[..dead.len() - 5]))])
            .await,
        0.0
    );

    relay.stop(false).await;
    hook_server.stop(false).await;
}
