//! `patchrelay demo`: an origin and a relay on loopback over a generated
//! repository, so a new user can curl a working relay in one command.
//!
//! It goes through the same paths an operator does: writes an input tree,
//! `keygen`, `publish`, writes `origin.toml` and `relay.toml` (kept in the demo
//! directory to read and reuse), and starts both servers from those configs.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::repo::publish::{PublishOptions, publish};
use crate::repo::sign::SecretKey;
use crate::server::{self, StartOptions};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// A small deterministic generator, so every demo has the same data.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Pattern-like text: signature lines, each release adding and changing a few.
fn pattern_file(release: u64, lines: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let total = lines + release * 200;
    for i in 0..total {
        let h = rng.next();
        // Every release rewrites a few hundred older signatures.
        let rev = if i % 97 == release % 97 { release } else { 0 };
        let _ = writeln!(out, "sig:{i:08}:{h:016x}:rev{rev}:Trojan.Generic.{}", h % 100_000);
    }
    out
}

fn binary_file(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write_input(input: &Path) -> Result<(), DemoError> {
    let w = |path: PathBuf, data: &[u8]| -> Result<(), DemoError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(setup("create input directory"))?;
        }
        fs::write(&path, data).map_err(setup("write input"))
    };
    w(
        input.join("engine-pattern/component.toml"),
        b"kind = \"pattern\"\ncritical = true\ndescription = \"Virus pattern (demo)\"\n",
    )?;
    for release in 171..=175 {
        w(input.join(format!("engine-pattern/{release}/lpt{release}.sig")), &pattern_file(release, 30_000))?;
    }
    w(input.join("hotfix-kb5021/component.toml"), b"kind = \"patch\"\ncritical = true\n")?;
    w(input.join("hotfix-kb5021/1/kb5021.msu"), &binary_file(7, 300 * 1024))?;
    w(input.join("agent-installer/component.toml"), b"kind = \"software\"\n")?;
    w(input.join("agent-installer/5.2.0/agent-5.2.0.pkg"), &binary_file(11, 24 << 20))?;
    Ok(())
}

fn free_port(preferred: u16) -> u16 {
    if preferred != 0 && TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A throwaway CA and a relay certificate for 127.0.0.1 and localhost, in
/// `dir/tls/`; the `[server.tls]` section that uses them.
fn demo_tls(dir: &Path) -> Result<(String, PathBuf), DemoError> {
    use crate::tls::mint::{Ca, KeyKind};
    let tls = dir.join("tls");
    fs::create_dir_all(&tls).map_err(setup("create tls directory"))?;
    let ca = Ca::new("patchrelay demo CA (throwaway)").map_err(setup("make a CA"))?;
    let server = ca.server(&["127.0.0.1", "localhost"], KeyKind::EcdsaP256).map_err(setup("issue a certificate"))?;
    let (ca_pem, cert, key) = (tls.join("ca.pem"), tls.join("relay.pem"), tls.join("relay.key"));
    fs::write(&ca_pem, ca.cert_pem()).map_err(setup("write ca.pem"))?;
    fs::write(&cert, server.cert_pem).map_err(setup("write relay.pem"))?;
    fs::write(&key, server.key_pem).map_err(setup("write relay.key"))?;
    let section = format!(
        "\n# A throwaway CA made by `patchrelay demo --tls`; trust tls/ca.pem to talk to it.\n\
         [server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    Ok((section, ca_pem))
}

pub fn run(dir: Option<PathBuf>, port: u16, tls: bool) -> Result<(), DemoError> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("patchrelay-demo"));
    fs::create_dir_all(&dir).map_err(setup("create demo directory"))?;
    let key_path = dir.join("origin.key");
    let key = if key_path.exists() {
        SecretKey::load(&key_path).map_err(setup("load demo key"))?
    } else {
        let k = SecretKey::generate().map_err(setup("generate key"))?;
        k.save_new(&key_path).map_err(setup("save demo key"))?;
        k
    };
    let input = dir.join("input");
    if !input.exists() {
        write_input(&input)?;
    }
    let repo = dir.join("repo");
    let report = publish(&input, &repo, &key, &PublishOptions::default()).map_err(setup("publish"))?;
    let public = key.public().to_base64();
    let relay_port = free_port(port);
    let origin_port = free_port(if port == 0 { 0 } else { port.saturating_add(1) });
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(setup("random token"))?;
    let token = hex::encode(token);

    let origin_toml = format!(
        "# Demo origin: serves the repository that `patchrelay demo` published.\n\
         [server]\nlisten = \"127.0.0.1:{origin_port}\"\n\n[origin]\nrepository = {repo:?}\n\n\
         [storage]\ndir = {deltas:?}\n\n[trust]\npublic_key = \"{public}\"\n",
        repo = repo.display().to_string(),
        deltas = dir.join("origin-deltas").display().to_string()
    );
    let mut relay_toml = format!(
        "# Demo relay: mirrors the demo origin. On loopback every simulated agent\n\
         # (loadtest/fleet.sh) comes from a few addresses: no per-address cap.\n\
         [server]\nlisten = \"127.0.0.1:{relay_port}\"\nmax_connections_per_address = 0\n\n[storage]\ndir = {cache:?}\n\n\
         [[upstream]]\nurl = \"http://127.0.0.1:{origin_port}\"\nname = \"demo-origin\"\n\n\
         [trust]\npublic_key = \"{public}\"\n\n[sync]\ninterval = \"1m\"\n\n[admin]\ntoken = \"{token}\"\n",
        cache = dir.join("relay-cache").display().to_string()
    );
    let ca_pem = if tls {
        let (section, ca_pem) = demo_tls(&dir)?;
        relay_toml.push_str(&section);
        Some(ca_pem)
    } else {
        None
    };
    // Every curl line below trusts the demo CA when there is one.
    let curl = match &ca_pem {
        Some(ca) => format!("curl --cacert {}", ca.display()),
        None => "curl".to_string(),
    };
    fs::write(dir.join("origin.toml"), &origin_toml).map_err(setup("write origin.toml"))?;
    fs::write(dir.join("relay.toml"), &relay_toml).map_err(setup("write relay.toml"))?;
    let origin_cfg = Config::from_toml(&origin_toml, "origin.toml").map_err(setup("origin config"))?;
    let relay_cfg = Config::from_toml(&relay_toml, "relay.toml").map_err(setup("relay config"))?;

    actix_rt::System::new().block_on(async move {
        let origin = server::start(&origin_cfg, StartOptions::default()).await.map_err(setup("start origin"))?;
        let relay = server::start(&relay_cfg, StartOptions::default()).await.map_err(setup("start relay"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !relay.published.is_ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = relay.url();
        println!();
        println!("patchrelay demo is running (repository serial {}, files in {})", report.serial, dir.display());
        println!("  origin: {}   relay: {r}   (relay ready: {})", origin.url(), relay.published.is_ready());
        println!();
        println!("Try, against the relay:");
        println!("  {curl} -s {r}/v1/manifest | head -c 600; echo");
        println!("  {curl} -sI {r}/v1/components/engine-pattern/latest");
        println!("  {curl} -s -r 0-99 {r}/v1/components/engine-pattern/versions/173");
        println!("  {curl} -s -o agent.pkg -C - {r}/v1/components/agent-installer/latest   # resumable");
        println!("  {curl} -s -H 'Range: bytes=0-9,100-109' {r}/v1/components/hotfix-kb5021/latest | head -c 400");
        println!("  {curl} -s {r}/readyz; {curl} -s {r}/metrics | grep '^patchrelay_' | head -20");
        println!("  {curl} -s -X POST -H 'Authorization: Bearer {token}' {r}/admin/sync");
        println!("  {curl} -s '{r}/v1/components/engine-pattern/chain?from=171'; echo");
        println!();
        println!("Bring an old pattern file up to date with the reference agent (it fetches a delta):");
        println!("  cp {} lpt.sig", dir.join("input/engine-pattern/171/lpt171.sig").display());
        let ca_arg = ca_pem.as_ref().map(|c| format!(" --cacert {}", c.display())).unwrap_or_default();
        println!(
            "  target/debug/patchrelay agent update --server {r} --component engine-pattern --file lpt.sig --public-key {public}{ca_arg}"
        );
        println!();
        println!(
            "Configs used: {} and {}. Ctrl-C stops both.",
            dir.join("origin.toml").display(),
            dir.join("relay.toml").display()
        );
        let _ = tokio::signal::ctrl_c().await;
        println!("stopping");
        relay.stop(true).await;
        origin.stop(true).await;
        Ok(())
    })
}
