//! Across an air gap: a connected relay exports bundles, an offline relay
//! imports them. The real binary does the exporting and importing (its exit
//! codes are the contract), the relays are real servers, the bundles real
//! files that `tar` lists.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use patchrelay::config::Config;

fn patchrelay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patchrelay")).args(args).env("PATCHRELAY_LOG", "warn").output().unwrap()
}

/// The same, off the async test's thread (the relay it talks to runs there).
async fn patchrelay_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        patchrelay(&args)
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A relay's config file and store.
struct Side {
    _dir: tempfile::TempDir,
    config: PathBuf,
    storage: PathBuf,
}

impl Side {
    fn new(upstreams: &[&str], public: &str, extra: &str) -> Side {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("store");
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, relay_toml(upstreams, public, &storage, extra)).unwrap();
        Side { _dir: dir, config, storage }
    }

    fn load(&self) -> Config {
        Config::load(&self.config).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self._dir.path().join(name)
    }
}

async fn export_async(from: &Side, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["export", "--config", p(&from.config), "--output", p(out), "--json"];
    args.extend_from_slice(extra);
    let o = patchrelay_async(&args).await;
    assert!(o.status.success(), "export failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn import(to: &Side, bundle: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import", "--config", p(&to.config), p(bundle), "--json"];
    args.extend_from_slice(extra);
    patchrelay(&args)
}

async fn import_async(to: &Side, bundle: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import", "--config", p(&to.config), p(bundle), "--json"];
    args.extend_from_slice(extra);
    patchrelay_async(&args).await
}

fn tar_list(bundle: &Path) -> Vec<String> {
    let o = Command::new("tar").arg("tf").arg(bundle).output().unwrap();
    assert!(o.status.success(), "tar tf: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).collect()
}

async fn get(url: &str) -> (u16, bytes::Bytes) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap())
}

async fn serial(url: &str) -> Option<u64> {
    let r = client().get(format!("{url}/readyz")).send().await.unwrap();
    r.json::<serde_json::Value>().await.unwrap()["serial"].as_u64()
}

/// Every version of every component, byte for byte as published.
async fn serves_every_version(url: &str, repo: &TestRepo, versions: &[(&str, &str)]) {
    for (c, v) in versions {
        let (status, body) = get(&format!("{url}/v1/components/{c}/versions/{v}")).await;
        assert_eq!(status, 200, "{c} {v}");
        let want = std::fs::read(repo.input.join(c).join(v).join(format!("{c}-{v}.bin"))).unwrap();
        assert!(body[..] == want[..], "{c} {v}: wrong bytes");
    }
}

async fn agent_update(server: &str, component: &str, file: &Path, key: &str) -> (i32, serde_json::Value) {
    let args =
        ["agent", "update", "--server", server, "--component", component, "--file", p(file), "--public-key", key];
    let o = patchrelay_async(&args).await;
    (o.status.code().unwrap_or(-1), serde_json::from_slice(&o.stdout).unwrap_or_default())
}

/// A connected relay A (on an origin) and an offline relay B, walked
/// through a full bundle and then an incremental one.
#[actix_web::test]
async fn a_full_then_an_incremental_bundle_take_an_offline_relay_along() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let a = Side::new(&[&origin.url()], &repo.public, "");
    let relay_a = start(&a.load()).await;
    assert!(wait_ready(&relay_a.url(), Duration::from_secs(10)).await);
    wait_prefetched(&relay_a.url(), 3.0).await;

    // Full export from the running relay: `big` it never cached is fetched first.
    let full = a.path("full.tar");
    let report = export_async(&a, &full, &[]).await;
    assert_eq!(report["serial"], 1);
    assert_eq!(report["since"], serde_json::Value::Null);
    assert_eq!(report["fetched"], 2, "big and empty were never asked for: {report}");
    let listed = tar_list(&full);
    assert_eq!(
        &listed[..4],
        ["patchrelay-bundle.json", "patchrelay-bundle.json.sha256", "v1/manifest", "v1/manifest.sig"]
    );
    for (c, v) in [("engine", "1"), ("engine", "3"), ("big", "1.0"), ("empty", "1")] {
        assert!(listed.contains(&format!("v1/objects/{}", repo.sha(c, v))), "{c} {v} not in {listed:?}");
    }
    // The running relay's store is as it was: the fetch went to scratch space.
    let leftovers: Vec<_> = std::fs::read_dir(&a.storage)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("export-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The offline relay imports it while stopped, then serves it all.
    let b = Side::new(&[], &repo.public, "");
    let o = patchrelay(&["check-config", "--config", p(&b.config)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = import(&b, &full, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["result"].as_str(), r["relay"].as_str(), r["serial"].as_u64()),
        (Some("imported"), Some("stopped"), Some(1))
    );
    assert_eq!(r["lacks"], serde_json::json!([]));
    let relay_b = start(&b.load()).await;
    let url_b = relay_b.url();
    assert_eq!(serial(&url_b).await, Some(1));
    let v1 = [("engine", "1"), ("engine", "2"), ("engine", "3"), ("big", "1.0"), ("empty", "1")];
    serves_every_version(&url_b, &repo, &v1).await;
    // Plans and deltas work on B (it computes them from what it holds).
    let plan = wait_delta_plan(&url_b, "engine", "1").await;
    let delta_url = format!("{url_b}{}", plan["steps"][0]["url"].as_str().unwrap());
    assert_eq!(get(&delta_url).await.0, 200);
    // The reference agent updates through B.
    let file = b.path("engine.bin");
    std::fs::write(&file, TestRepo::engine_bytes(1)).unwrap();
    let (code, rep) = agent_update(&url_b, "engine", &file, &repo.public).await;
    assert_eq!(code, 0, "{rep}");
    assert_eq!(std::fs::read(&file).unwrap(), TestRepo::engine_bytes(3));
    // Syncing an offline relay says what it is.
    let (status, body) = admin_sync(&url_b).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("patchrelay import"), "{body}");

    // Two more publishes; A syncs; B's status goes over to A.
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    repo.publish();
    repo.add_version("engine", "5", &TestRepo::engine_bytes(5));
    repo.add_version("big", "2.0", &noise(43, 3 << 20));
    assert_eq!(repo.publish(), 3);
    assert_eq!(admin_sync(&origin.url()).await.1["serial"], 3);
    let (status, body) = admin_sync(&relay_a.url()).await;
    assert_eq!((status, body["serial"].as_u64()), (200, Some(3)), "{body}");
    let status_file = b.path("b-status.json");
    let o =
        patchrelay_async(&["import", "--config", p(&b.config), "--status", "--write-manifest", p(&status_file)]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("serial 1"), "{}", text(&o));

    let inc = a.path("inc.tar");
    let report = export_async(&a, &inc, &["--since-manifest", p(&status_file)]).await;
    assert_eq!((report["serial"].as_u64(), report["since"].as_u64()), (Some(3), Some(1)), "{report}");
    let brought: Vec<String> = report["brings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {} {}",
                b["component"].as_str().unwrap(),
                b["version"].as_str().unwrap(),
                b["carried"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(brought, ["big 2.0 object", "engine 4 delta", "engine 5 delta"]);
    // Only the new: big 2.0 whole, and deltas small beside engine 4 and 5.
    let listed = tar_list(&inc);
    let old: Vec<String> = v1.iter().map(|(c, v)| repo.sha(c, v)).collect();
    assert!(listed.iter().all(|e| !old.iter().any(|o| e.ends_with(o.as_str()))), "{listed:?}");
    let engine_new = TestRepo::engine_bytes(4).len() + TestRepo::engine_bytes(5).len();
    let bundle_bytes = report["bundle_bytes"].as_u64().unwrap();
    assert!(bundle_bytes < (3 << 20) + 64 * 1024, "{bundle_bytes} bytes");
    assert!(bundle_bytes > 3 << 20, "{bundle_bytes}");
    assert!(report["deltas"].as_u64().unwrap() >= 4, "{report}");
    // --since 1 (A kept serial 1's manifest) makes the same choice.
    let by_serial = export_async(&a, &a.path("inc-serial.tar"), &["--since", "1"]).await;
    assert_eq!(by_serial["bundle_bytes"], report["bundle_bytes"]);

    // B is running: it adopts within a few seconds, no restart.
    let o = import_async(&b, &inc, &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["relay"].as_str(), r["serial"].as_u64(), r["previous_serial"].as_u64()),
        (Some("running"), Some(3), Some(1)),
        "{r}"
    );
    let adopted = Instant::now();
    while serial(&url_b).await != Some(3) {
        assert!(adopted.elapsed() < Duration::from_secs(5), "B did not serve serial 3 within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v3 = [("engine", "4"), ("engine", "5"), ("big", "2.0"), ("engine", "1"), ("big", "1.0")];
    serves_every_version(&url_b, &repo, &v3).await;
    // The bundle's deltas are served at once, none built on B.
    let built_before = metric(&url_b, "patchrelay_deltas_built_total", &[]).await;
    let plan = client()
        .get(format!("{url_b}/v1/components/engine/chain?from=3"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(plan["steps"][0]["kind"], "delta", "{plan}");
    assert!(plan["total_bytes"].as_u64().unwrap() < engine_new as u64 / 4, "{plan}");
    let (status, _) = get(&format!("{url_b}/v1/components/engine/deltas/3/5")).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&url_b, "patchrelay_deltas_built_total", &[]).await, built_before);
    let (code, rep) = agent_update(&url_b, "engine", &file, &repo.public).await;
    assert_eq!(code, 0, "{rep}");
    assert!(rep["steps"][0].as_str().unwrap().starts_with("delta"), "{rep}");
    assert_eq!(std::fs::read(&file).unwrap(), TestRepo::engine_bytes(5));

    // The same bundle twice: a no-op that says so.
    let o = import_async(&b, &inc, &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["result"], "unchanged", "{r}");
    let o = patchrelay_async(&["import", "--config", p(&b.config), &inc.display().to_string()]).await;
    assert!(text(&o).contains("already imported"), "{}", text(&o));

    relay_b.stop(false).await;
    relay_a.stop(false).await;
    origin.stop(false).await;
}

async fn wait_delta_plan(url: &str, component: &str, from: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let plan: serde_json::Value = client()
            .get(format!("{url}/v1/components/{component}/chain?from={from}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if plan["steps"][0]["kind"] == "delta" {
            return plan;
        }
        assert!(Instant::now() < deadline, "no delta plan: {plan}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(path, data offset, size)` of each entry of a tar (for tests that damage
/// one on purpose).
fn tar_entries(data: &[u8]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= data.len() && data[at..at + 512].iter().any(|&b| b != 0) {
        let h = &data[at..at + 512];
        let name = String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_string();
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&h[124..136]).trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap();
        out.push((name, at + 512, size));
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn flipped(bundle: &Path, out: &Path, entry: &str, at: f64) -> PathBuf {
    let mut data = std::fs::read(bundle).unwrap();
    let (_, offset, size) = tar_entries(&data).into_iter().find(|(n, _, _)| n == entry).unwrap();
    data[offset + ((size - 1) as f64 * at) as usize] ^= 0x20;
    std::fs::write(out, data).unwrap();
    out.to_path_buf()
}

async fn refused(b: &Side, bundle: &Path, extra: &[&str], code: i32, says: &[&str]) -> String {
    let o = import_async(b, bundle, extra).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "{}: {t}", bundle.display());
    for s in says {
        assert!(t.contains(s), "{}: expected {s:?} in: {t}", bundle.display());
    }
    t
}

/// Damaged, reordered, cut, split-and-missing, rolled-back, gapped and
/// equivocating bundles are refused with the contract's exit codes, and the
/// relay goes on serving what it had.
#[actix_web::test]
async fn bad_bundles_are_refused_and_the_relay_keeps_its_serial() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let a = Side::new(&[&origin.url()], &repo.public, "");
    let relay_a = start(&a.load()).await;
    assert!(wait_ready(&relay_a.url(), Duration::from_secs(10)).await);
    let full1 = a.path("full1.tar");
    export_async(&a, &full1, &[]).await;
    let b = Side::new(&[], &repo.public, "");
    let o = import(&b, &full1, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let relay_b = start(&b.load()).await;
    let url_b = relay_b.url();
    let manifest_before = get(&format!("{url_b}/v1/manifest")).await.1;

    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    assert_eq!(repo.publish(), 2);
    admin_sync(&origin.url()).await;
    assert_eq!(admin_sync(&relay_a.url()).await.1["serial"], 2);
    let full2 = a.path("full2.tar");
    export_async(&a, &full2, &[]).await;
    let split = a.path("split2.tar");
    let r = export_async(&a, &split, &["--max-part", "1MiB"]).await;
    let parts: Vec<PathBuf> =
        r["files"].as_array().unwrap().iter().map(|f| PathBuf::from(f.as_str().unwrap())).collect();
    assert_eq!(parts.len(), 4, "{r}");
    assert!(parts.iter().all(|p| std::fs::metadata(p).unwrap().len() <= 1 << 20));
    let mut joined = Vec::new();
    for part in &parts {
        joined.extend(std::fs::read(part).unwrap());
    }
    assert_eq!(tar_entries(&joined).len(), tar_list(&full2).len(), "the parts make a tar");
    repo.add_version("engine", "5", &TestRepo::engine_bytes(5));
    assert_eq!(repo.publish(), 3);
    admin_sync(&origin.url()).await;
    assert_eq!(admin_sync(&relay_a.url()).await.1["serial"], 3);
    let inc23 = a.path("inc23.tar");
    export_async(&a, &inc23, &["--since", "2"]).await;
    let full3 = a.path("full3.tar");
    export_async(&a, &full3, &[]).await;

    let big = repo.sha("big", "1.0");
    let big_entry = format!("v1/objects/{big}");
    refused(&b, &flipped(&full2, &a.path("obj.tar"), &big_entry, 0.5), &[], 5, &[&big_entry, "hashes to"]).await;
    refused(&b, &flipped(&full2, &a.path("man.tar"), "v1/manifest", 0.5), &[], 5, &["v1/manifest", "signature"]).await;
    refused(
        &b,
        &flipped(&full2, &a.path("hdr.tar"), "patchrelay-bundle.json", 0.3),
        &[],
        5,
        &["patchrelay-bundle.json"],
    )
    .await;
    let data = std::fs::read(&full2).unwrap();
    std::fs::write(a.path("cut.tar"), &data[..data.len() * 2 / 3]).unwrap();
    refused(&b, &a.path("cut.tar"), &[], 5, &["cut short"]).await;
    // Reordered with GNU tar: manifest.sig before the manifest.
    let x = a.path("x");
    std::fs::create_dir_all(&x).unwrap();
    assert!(Command::new("tar").arg("xf").arg(&full2).arg("-C").arg(&x).status().unwrap().success());
    let mut names = tar_list(&full2);
    names.swap(2, 3);
    let st =
        Command::new("tar").arg("cf").arg(a.path("reordered.tar")).arg("-C").arg(&x).args(&names).status().unwrap();
    assert!(st.success());
    refused(&b, &a.path("reordered.tar"), &[], 5, &["v1/manifest.sig", "reordered"]).await;
    // A part gone missing.
    std::fs::remove_file(&parts[1]).unwrap();
    refused(&b, &parts[0], &[], 5, &["part 2 of 4", &parts[1].display().to_string()]).await;
    // A gap: serial 3 for a relay at 2 or newer; this one is at 1.
    refused(&b, &inc23, &[], 6, &["serial 1", "--since 2", "patchrelay export", "--since 1"]).await;
    // A header edited to say "full" (its checksum made again): the signed
    // manifests still show what serial 3 adds, and B lacks engine 4.
    let edit = a.path("edit");
    std::fs::create_dir_all(&edit).unwrap();
    assert!(Command::new("tar").arg("xf").arg(&inc23).arg("-C").arg(&edit).status().unwrap().success());
    let hpath = edit.join("patchrelay-bundle.json");
    let mut h: serde_json::Value = serde_json::from_slice(&std::fs::read(&hpath).unwrap()).unwrap();
    assert_eq!(h["since"]["serial"], 2);
    h["since"] = serde_json::Value::Null;
    let json = serde_json::to_vec_pretty(&h).unwrap();
    std::fs::write(&hpath, &json).unwrap();
    let sum = format!("{}  patchrelay-bundle.json\n", patchrelay::digest::Digest::of(&json));
    std::fs::write(edit.join("patchrelay-bundle.json.sha256"), sum).unwrap();
    let forged = a.path("forged.tar");
    let st = Command::new("tar").arg("cf").arg(&forged).arg("-C").arg(&edit).args(tar_list(&inc23)).status().unwrap();
    assert!(st.success());
    refused(&b, &forged, &[], 6, &["engine 4", "--since-manifest", "--force-gap"]).await;
    // Another manifest under serial 1, signed with the same key.
    let twin = TestRepo::bare_signed_by(&repo);
    twin.add_version("engine", "1", b"another engine 1");
    assert_eq!(twin.publish(), 1);
    let twin_bundle = a.path("twin.tar");
    let o = patchrelay(&["export", "--repository", p(&twin.repo), "--output", p(&twin_bundle)]);
    assert!(o.status.success(), "{}", text(&o));
    refused(&b, &twin_bundle, &[], 3, &["equivocation", "serial 1"]).await;
    // Nothing of that changed what B serves.
    assert_eq!(serial(&url_b).await, Some(1));
    assert_eq!(get(&format!("{url_b}/v1/manifest")).await.1, manifest_before);
    let leftovers = std::fs::read_dir(b.storage.join("import/tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "temp files left in staging");

    // --force-gap: imported, and it says what B lacks.
    let o = import_async(&b, &inc23, &["--force-gap"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["serial"], 3);
    assert_eq!(r["lacks"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!((r["lacks"][0]["component"].as_str(), r["lacks"][0]["version"].as_str()), (Some("engine"), Some("4")));
    let deadline = Instant::now() + Duration::from_secs(5);
    while serial(&url_b).await != Some(3) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = get(&format!("{url_b}/v1/components/engine/versions/4")).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("no upstream"), "{}", String::from_utf8_lossy(&body));
    serves_every_version(&url_b, &repo, &[("engine", "5"), ("engine", "3")]).await;
    // Older serials now: rollbacks.
    refused(&b, &full1, &[], 3, &["rollback", "serial 1", "serial 3"]).await;
    refused(&b, &full2, &[], 3, &["rollback"]).await;
    // A full bundle of the serial B holds brings what it lacked.
    let o = import_async(&b, &full3, &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((r["result"].as_str(), r["lacks"].as_array().map(Vec::len)), (Some("repaired"), Some(0)), "{r}");
    serves_every_version(&url_b, &repo, &[("engine", "4")]).await;

    relay_b.stop(false).await;
    relay_a.stop(false).await;
    origin.stop(false).await;
}

/// A connected relay at serial 1 with its full bundle, an offline relay that
/// imported it (stopped), and the repository moved on to serial 3 with an
/// incremental bundle for it.
struct Walk {
    repo: TestRepo,
    origin: patchrelay::server::RunningServer,
    a: Side,
    relay_a: patchrelay::server::RunningServer,
    b: Side,
    inc: PathBuf,
}

async fn walk(b_extra: &str) -> Walk {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let a = Side::new(&[&origin.url()], &repo.public, "");
    let relay_a = start(&a.load()).await;
    assert!(wait_ready(&relay_a.url(), Duration::from_secs(10)).await);
    let full = a.path("full.tar");
    export_async(&a, &full, &[]).await;
    let b = Side::new(&[], &repo.public, b_extra);
    let o = import_async(&b, &full, &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    repo.add_version("big", "2.0", &noise(43, 3 << 20));
    repo.publish();
    repo.add_version("engine", "5", &TestRepo::engine_bytes(5));
    assert_eq!(repo.publish(), 3);
    admin_sync(&origin.url()).await;
    assert_eq!(admin_sync(&relay_a.url()).await.1["serial"], 3);
    let inc = a.path("inc.tar");
    export_async(&a, &inc, &["--since", "1"]).await;
    Walk { repo, origin, a, relay_a, b, inc }
}

/// 200 agents download from B while it adopts a bundle: every download
/// completes with the right bytes, and `latest` is the old version or the
/// new one, whole, never a mix and never an error.
#[actix_web::test]
async fn an_import_under_200_downloading_agents_costs_none_of_them_a_byte() {
    let paced = "[limits]\nmax_agents_per_address = 0\n[[limits.policy]]\nname = \"paced\"\nagents = [\"agent-*\"]\nrate = \"1MiB/s\"\nburst = \"64KiB\"\n";
    let w = walk(paced).await;
    let relay_b = start(&w.b.load()).await;
    let url = relay_b.url();
    assert_eq!(serial(&url).await, Some(1));
    let big1 = noise(42, 3 << 20);
    let (e3, e5) = (TestRepo::engine_bytes(3), TestRepo::engine_bytes(5));
    let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut downloads = Vec::new();
    for i in 0..200 {
        let (c, url, started) = (c.clone(), url.clone(), started.clone());
        downloads.push(tokio::spawn(async move {
            let mut r = c
                .get(format!("{url}/v1/components/big/versions/1.0"))
                .header("X-Agent-Id", format!("agent-{i}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 200 {
                return Err(format!("status {}", r.status()));
            }
            started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut body = Vec::new();
            while let Some(piece) = r.chunk().await.map_err(|e| e.to_string())? {
                body.extend_from_slice(&piece);
            }
            Ok::<Vec<u8>, String>(body)
        }));
    }
    // Agents polling `latest` all along.
    let polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (c, url, polling) = (c.clone(), url.clone(), polling.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while polling.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c.get(format!("{url}/v1/components/engine/latest")).send().await.map_err(|e| e.to_string())?;
                let status = r.status().as_u16();
                let version = r.headers().get("x-patchrelay-version").map(|v| v.to_str().unwrap().to_string());
                let body = r.bytes().await.map_err(|e| e.to_string())?;
                seen.push((status, version, body));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>(seen)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while started.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the downloads did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let o = import_async(&w.b, &w.inc, &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    let imported = Instant::now();
    while serial(&url).await != Some(3) {
        assert!(imported.elapsed() < Duration::from_secs(5), "B did not serve serial 3 within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in downloads {
        let body = d.await.unwrap().unwrap_or_else(|e| panic!("a download failed: {e}"));
        assert!(body == big1, "a download got wrong bytes");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    polling.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = poller.await.unwrap().unwrap();
    let mut versions = std::collections::BTreeSet::new();
    for (status, version, body) in &seen {
        assert_eq!(*status, 200);
        match version.as_deref() {
            Some("3") => assert!(body[..] == e3[..], "latest 3 with wrong bytes"),
            Some("5") => assert!(body[..] == e5[..], "latest 5 with wrong bytes"),
            other => panic!("latest named {other:?}"),
        }
        versions.insert(version.clone().unwrap());
    }
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), ["3", "5"], "latest went from 3 to 5 during the run");
    relay_b.stop(false).await;
    w.relay_a.stop(false).await;
    w.origin.stop(false).await;
}

/// An import killed (SIGKILL, by strace) at each of its renames, staging
/// and adopting alike: the relay then starts on the old serial or the new
/// one (never between: everything it lists it serves), and importing again
/// finishes the job.
#[actix_web::test]
async fn an_import_killed_at_any_rename_leaves_a_relay_that_starts_and_an_import_that_finishes() {
    let Some(strace) = require_tool("strace", &["/usr/bin/strace"], "strace") else { return };
    let w = walk("").await;
    let pristine = w.a.path("b-pristine");
    assert!(Command::new("cp").arg("-a").arg(&w.b.storage).arg(&pristine).status().unwrap().success());
    let traced = |inject: Option<usize>, log: &Path| {
        let mut cmd = Command::new(&strace);
        cmd.args(["-f", "-qq", "-o"]).arg(log).args(["-e", "trace=rename,renameat,renameat2"]);
        if let Some(n) = inject {
            cmd.args(["-e", &format!("inject=rename,renameat,renameat2:signal=KILL:when={n}")]);
        }
        cmd.arg(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["import", "--config"])
            .arg(&w.b.config)
            .arg(&w.inc)
            .env("PATCHRELAY_LOG", "error")
            .output()
            .unwrap()
    };
    let log = w.a.path("renames.log");
    let o = traced(None, &log);
    assert!(o.status.success(), "{}", text(&o));
    let renames = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("rename")).count();
    assert!(renames >= 10, "{renames} renames");
    let all3 = [("engine", "1"), ("engine", "4"), ("engine", "5"), ("big", "1.0"), ("big", "2.0")];
    let all1 = [("engine", "1"), ("engine", "2"), ("engine", "3"), ("big", "1.0")];
    let mut seen_serials = std::collections::BTreeSet::new();
    for k in 1..=renames {
        let _ = std::fs::remove_dir_all(&w.b.storage);
        assert!(Command::new("cp").arg("-a").arg(&pristine).arg(&w.b.storage).status().unwrap().success());
        let o = traced(Some(k), &w.a.path("killed.log"));
        assert!(!o.status.success(), "rename {k}: the import was not killed");
        let relay = start(&w.b.load()).await;
        let url = relay.url();
        let s = serial(&url).await;
        match s {
            Some(1) => serves_every_version(&url, &w.repo, &all1).await,
            Some(3) => serves_every_version(&url, &w.repo, &all3).await,
            other => panic!("rename {k}: the relay started on serial {other:?}"),
        }
        seen_serials.insert(s.unwrap());
        relay.stop(false).await;
        let o = import_async(&w.b, &w.inc, &[]).await;
        assert!(o.status.success(), "rename {k}: the second import: {}", text(&o));
        let relay = start(&w.b.load()).await;
        assert_eq!(serial(&relay.url()).await, Some(3), "rename {k}");
        serves_every_version(&relay.url(), &w.repo, &all3).await;
        // Chunk lists too (those of versions rebuilt from deltas are made
        // by the import): a child relay fills from them.
        for (c, v) in all3 {
            let (status, _) = get(&format!("{}/v1/chunks/{}", relay.url(), w.repo.sha(c, v))).await;
            assert_eq!(status, 200, "rename {k}: chunk list of {c} {v}");
        }
        relay.stop(false).await;
    }
    assert_eq!(seen_serials.into_iter().collect::<Vec<_>>(), [1, 3], "kills fell before and after the commit");
    w.relay_a.stop(false).await;
    w.origin.stop(false).await;
}
