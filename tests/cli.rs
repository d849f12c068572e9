//! The command line as an operator uses it: the real binary, real files, exit
//! codes and messages that a script can rely on.

use std::path::Path;
use std::process::{Command, Output};

fn patchrelay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patchrelay")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn keygen_publish_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let o = patchrelay(&["keygen", "--secret", p(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    let public = String::from_utf8(o.stdout.clone()).unwrap().trim().to_string();
    assert_eq!(public.len(), 44, "{public}");
    // Never overwrites a key.
    let o = patchrelay(&["keygen", "--secret", p(&key)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("refusing to overwrite"), "{}", text(&o));

    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join("engine/171")).unwrap();
    std::fs::write(input.join("engine/component.toml"), "kind = \"pattern\"\ncritical = true\n").unwrap();
    std::fs::write(input.join("engine/171/lpt171.zip"), b"pattern 171").unwrap();
    let out = dir.path().join("repo");
    let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("published serial 1"), "{}", text(&o));
    for f in ["v1/manifest", "v1/manifest.sig"] {
        assert!(out.join(f).is_file());
    }
    let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)]);
    assert!(text(&o).contains("nothing new"), "{}", text(&o));
    std::fs::write(input.join("engine/171/lpt171.zip"), b"changed").unwrap();
    let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("already published"), "{}", text(&o));

    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        format!("[storage]\ndir = \"/tmp/x\"\n\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n\n[trust]\npublic_key = \"{public}\"\n"),
    )
    .unwrap();
    let o = patchrelay(&["check-config", "--config", p(&cfg)]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(&cfg, format!("[storage]\ndir = \"/tmp/x\"\n\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\ncolour = 1\n[trust]\npublic_key = \"{public}\"\n")).unwrap();
    let o = patchrelay(&["check-config", "--config", p(&cfg)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("line 6") && text(&o).contains("colour"), "{}", text(&o));
    let o = patchrelay(&["check-config", "--config", p(&dir.path().join("missing.toml"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("cannot read config"), "{}", text(&o));
}

#[test]
fn serve_fails_clearly_without_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("origin.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nrepository = {:?}\n", p(&dir.path().join("nope"))),
    )
    .unwrap();
    let o = patchrelay(&["serve", "--config", p(&cfg)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("patchrelay publish"), "{}", text(&o));
}

#[test]
fn the_shipped_configs_are_valid() {
    // config/*.toml document every key; they must stay loadable.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let o = patchrelay(&["check-config", "--config", p(&path)]);
            assert!(o.status.success(), "{}: {}", path.display(), text(&o));
            n += 1;
        }
    }
    assert!(n >= 3, "expected origin.toml, relay.toml and demo.toml in config/");
}

/// `kill -9` a publish at arbitrary moments: the repository must always be the
/// previous complete one (manifest and signature agree, every object it names
/// is present and intact), and the next publish must succeed.
#[test]
#[allow(clippy::disallowed_methods)] // a plain #[test]: no async worker to block
fn a_killed_publish_leaves_the_previous_repository_intact() {
    use patchrelay::repo::sign::PublicKey;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let public = String::from_utf8(patchrelay(&["keygen", "--secret", p(&key)]).stdout).unwrap();
    let public = PublicKey::parse(public.trim()).unwrap();
    let input = dir.path().join("in");
    let out = dir.path().join("repo");
    let add = |v: u32| {
        for c in 0..4 {
            let d = input.join(format!("c{c}/{v}"));
            std::fs::create_dir_all(&d).unwrap();
            let data: Vec<u8> =
                (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2654435761).wrapping_add(v * 7 + c)) as u8).collect();
            std::fs::write(d.join("payload.bin"), data).unwrap();
        }
    };
    add(1);
    assert!(patchrelay(&["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)]).status.success());
    let check = |repo: &Path| {
        let m = std::fs::read(repo.join("v1/manifest")).unwrap();
        let s = std::fs::read(repo.join("v1/manifest.sig")).unwrap();
        let cat = patchrelay::repo::verify(&public, m.into(), s.into()).expect("manifest and signature must agree");
        for o in cat.objects() {
            let bytes = std::fs::read(repo.join(format!("v1/objects/{}", o.sha256))).unwrap();
            assert_eq!(patchrelay::digest::Digest::of(&bytes), o.sha256);
            let chunks = std::fs::read(repo.join(format!("v1/chunks/{}", o.sha256))).unwrap();
            assert_eq!(patchrelay::digest::Digest::of(&chunks), o.chunks_sha256);
        }
        cat.serial()
    };
    for (round, delay_ms) in [5u64, 40, 80, 150, 300].into_iter().enumerate() {
        add(round as u32 + 2);
        let before = check(&out);
        let mut child = Command::new(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let after = check(&out);
        assert!(after == before || after == before + 1, "round {round}: serial {before} -> {after}");
    }
    let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&out), "--key", p(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    check(&out);
    // No temp files survive a completed publish.
    for sub in ["v1", "v1/objects", "v1/chunks"] {
        for e in std::fs::read_dir(out.join(sub)).unwrap() {
            assert!(!e.unwrap().file_name().to_string_lossy().starts_with(".tmp-"));
        }
    }
}
