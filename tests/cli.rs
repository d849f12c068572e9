//! The command line as an operator uses it: the real binary, real files, exit
//! codes and messages that a script can rely on.

mod common;

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
    // config/*.toml document every key; they must stay loadable, with their
    // admin token file where they say (here: a temp directory).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, "9f2c4e7a1b3d5f60718293a4b5c6d7e8\n").unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text_in =
                std::fs::read_to_string(&path).unwrap().replace("/etc/patchrelay/admin.token", p(&token_file));
            let copy = tmp.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text_in).unwrap();
            let o = patchrelay(&["check-config", "--config", p(&copy)]);
            assert!(o.status.success(), "{}: {}", path.display(), text(&o));
            n += 1;
        }
    }
    assert!(n >= 3, "expected origin.toml, relay.toml and demo.toml in config/");
}

/// The admin token: sample tokens are refused wherever they come from; it
/// can live in a file of its own (relative to the config) or in the
/// environment, which wins.
#[test]
fn admin_tokens_from_a_file_or_the_environment_and_never_a_sample() {
    let dir = tempfile::tempdir().unwrap();
    let key = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    let cfg = dir.path().join("relay.toml");
    let write = |admin: &str| {
        std::fs::write(
            &cfg,
            format!("[storage]\ndir = \"/tmp/x\"\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n[trust]\npublic_key = \"{key}\"\n{admin}"),
        )
        .unwrap()
    };
    let check = |env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_patchrelay"));
        c.args(["check-config", "--config", p(&cfg)]);
        match env {
            Some(v) => c.env("PATCHRELAY_ADMIN_TOKEN", v),
            None => c.env_remove("PATCHRELAY_ADMIN_TOKEN"),
        };
        c.output().unwrap()
    };
    write("[admin]\ntoken = \"change-me-to-a-long-random-token\"\n");
    let o = check(None);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("sample or a placeholder") && text(&o).contains("line 8"), "{}", text(&o));
    write("[admin]\ntoken_file = \"admin.token\"\n");
    let o = check(None);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("admin.token_file") && text(&o).contains("No such file"), "{}", text(&o));
    std::fs::write(dir.path().join("admin.token"), "a7c1e9f03b5d24681357ace0\n").unwrap();
    assert!(check(None).status.success(), "{}", text(&check(None)));
    std::fs::write(dir.path().join("admin.token"), "EXAMPLE-token-for-the-docs\n").unwrap();
    assert_eq!(check(None).status.code(), Some(2));
    write("");
    let o = check(Some("changeme-changeme-changeme"));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("PATCHRELAY_ADMIN_TOKEN"), "{}", text(&o));
    assert!(check(Some("f00dfacecafe1234beef5678")).status.success());
    // The environment wins: [admin] is then not read for a token.
    write("[admin]\ntoken_file = \"nowhere.token\"\n");
    assert!(
        check(Some("f00dfacecafe1234beef5678")).status.success(),
        "{}",
        text(&check(Some("f00dfacecafe1234beef5678")))
    );
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
        // As every reader finds the pair (the signature kept under the
        // manifest's digest first; see `repo::read_pair`).
        let (m, s) = patchrelay::repo::read_pair(&patchrelay::repo::RepoDir::new(repo)).unwrap().unwrap();
        let cat = patchrelay::repo::verify(&public, m, s).expect("manifest and signature must agree");
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

/// The repository after a publish killed at each of its renames in turn
/// (strace injects SIGKILL at the Nth rename, before it happens): always the
/// previous repository or the new one, each with a manifest and signature
/// that verify, every object intact, and the next publish succeeds and
/// leaves `manifest.sig` matching again. One of the kills lands between the
/// manifest's rename and the signature's: the case that used to leave a
/// repository nobody could read.
#[test]
fn a_publish_killed_at_every_rename_leaves_a_valid_repository() {
    use patchrelay::repo::{RepoDir, read_pair, verify};
    let Some(strace) = common::require_tool("strace", &["/usr/bin/strace"], "strace") else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let public = String::from_utf8(patchrelay(&["keygen", "--secret", p(&key)]).stdout).unwrap();
    let public = patchrelay::repo::sign::PublicKey::parse(public.trim()).unwrap();
    let input = dir.path().join("in");
    let base = dir.path().join("base");
    let add = |c: &str, v: u32| {
        let d = input.join(format!("{c}/{v}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("payload.bin"), common::noise(u64::from(v) * 31 + c.len() as u64, 200_000)).unwrap();
    };
    add("a", 1);
    add("b", 1);
    let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&base), "--key", p(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    add("a", 2);
    add("b", 2);
    let copy = |to: &Path| {
        let o = Command::new("cp").arg("-a").arg(&base).arg(to).output().unwrap();
        assert!(o.status.success());
    };
    let publish_under_strace = |repo: &Path, inject: Option<usize>| {
        let log = dir.path().join("strace.log");
        let mut cmd = Command::new(&strace);
        cmd.args(["-f", "-qq", "-e", "trace=rename,renameat,renameat2", "-o"]).arg(&log);
        if let Some(n) = inject {
            cmd.args(["-e", &format!("inject=rename,renameat,renameat2:signal=KILL:when={n}")]);
        }
        let o = cmd
            .arg(env!("CARGO_BIN_EXE_patchrelay"))
            .args(["publish", "--input", p(&input), "--output", p(repo), "--key", p(&key)])
            .output()
            .unwrap();
        let renames = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("rename")).count();
        (o, renames)
    };
    let trial = dir.path().join("trial");
    copy(&trial);
    let (o, renames) = publish_under_strace(&trial, None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(renames >= 5, "only {renames} renames traced");

    let mut torn = 0;
    for n in 1..=renames {
        let repo = dir.path().join(format!("killed-{n}"));
        copy(&repo);
        let (o, _) = publish_under_strace(&repo, Some(n));
        assert!(!o.status.success(), "kill at rename {n} did not happen: {}", text(&o));
        let (m, s) = read_pair(&RepoDir::new(&repo)).unwrap().unwrap();
        let cat = verify(&public, m, s).unwrap_or_else(|e| panic!("killed at rename {n}: {e}"));
        assert!(cat.serial() == 1 || cat.serial() == 2, "killed at rename {n}: serial {}", cat.serial());
        for obj in cat.objects() {
            let bytes = std::fs::read(repo.join(format!("v1/objects/{}", obj.sha256))).unwrap();
            assert_eq!(patchrelay::digest::Digest::of(&bytes), obj.sha256, "killed at rename {n}");
        }
        let plain = std::fs::read(repo.join("v1/manifest.sig")).unwrap();
        if plain != std::fs::read(repo.join(format!("v1/signatures/{}", cat.manifest_digest))).unwrap() {
            torn += 1;
        }
        let o = patchrelay(&["publish", "--input", p(&input), "--output", p(&repo), "--key", p(&key)]);
        assert!(o.status.success(), "publish after a kill at rename {n}: {}", text(&o));
        let m = std::fs::read(repo.join("v1/manifest")).unwrap();
        let s = std::fs::read(repo.join("v1/manifest.sig")).unwrap();
        let cat = verify(&public, m.into(), s.into()).unwrap_or_else(|e| panic!("after a kill at rename {n}: {e}"));
        assert_eq!(cat.serial(), 2);
    }
    assert_eq!(torn, 1, "exactly one kill lands between the manifest and its signature");
}
