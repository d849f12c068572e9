//! Delta sizes and speeds on real consecutive releases, patchrelay's engine
//! beside the reference tools, measured in one run. Writes the table for
//! docs/deltas.md.
//!
//!   bash ../shared/data/fetch-all.sh            # psl, ruff, geolite2 releases
//!   cargo bench --bench deltas                  # every set, every pair
//!   cargo bench --bench deltas -- --sets psl,ruff --pairs 1 --tools ours,zstd3
//!
//! Reference tools are used when installed (zstd, xdelta3, bsdiff, hdiffz) and
//! skipped, with a note, when not. Data lives in $PATCHRELAY_DATA (default
//! ~/.cache/patchrelay-data)/data/<set>/<version>/<file>.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use patchrelay::delta::{self, EncodeOptions};

fn data_root() -> PathBuf {
    let base = std::env::var_os("PATCHRELAY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/patchrelay-data"));
    base.join("data")
}

fn version_key(p: &Path) -> Vec<u64> {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("").split('.').map(|x| x.parse().unwrap_or(0)).collect()
}

/// The releases of a set, oldest first, as file paths.
fn releases(set: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(data_root().join(set)) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort_by_key(|p| version_key(p));
    dirs.iter().filter_map(|d| std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).find(|p| p.is_file())).collect()
}

/// Peak RSS since the last reset, in MiB (Linux).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Row {
    tool: String,
    sizes: Vec<u64>,
    secs: Vec<f64>,
    note: String,
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Run a reference tool that writes its delta to `out`; returns (bytes, seconds).
fn external(args: &[String], out: &Path) -> Option<(u64, f64)> {
    let t = Instant::now();
    let status = Command::new(&args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return None;
    }
    Some((std::fs::metadata(out).ok()?.len(), secs))
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn human(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let sets = opt("--sets").unwrap_or_else(|| "psl,ruff,geolite2".into());
    let pairs: usize = opt("--pairs").and_then(|p| p.parse().ok()).unwrap_or(usize::MAX);
    let tools = opt("--tools").unwrap_or_else(|| "ours,zstd3,zstd19,xdelta3,bsdiff,hdiffz".into());
    let want = |t: &str| tools.split(',').any(|x| x == t);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut table = String::new();
    table.push_str("| data | tool | mean delta | mean encode | notes |\n| --- | --- | --- | --- | --- |\n");
    for set in sets.split(',') {
        let files = releases(set);
        if files.len() < 2 {
            eprintln!(
                "SKIP {set}: no releases under {} (bash ../shared/data/fetch-all.sh {set})",
                data_root().display()
            );
            continue;
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut ours = Row { tool: "patchrelay".into(), sizes: vec![], secs: vec![], note: String::new() };
        let (mut apply_rates, mut peaks, mut won) = (Vec::new(), Vec::new(), Vec::new());
        let mut ext: Vec<(String, Vec<String>)> = Vec::new();
        let dout = tmp.path().join("out.delta");
        let o = dout.display().to_string();
        for (i, w) in files.windows(2).enumerate().take(pairs) {
            let (old, new) = (w[0].display().to_string(), w[1].display().to_string());
            let a = std::fs::read(&w[0]).expect("read release");
            let b = std::fs::read(&w[1]).expect("read release");
            eprintln!("{set} pair {}: {} -> {} ({} bytes)", i + 1, w[0].display(), w[1].display(), b.len());
            if want("ours") {
                reset_peak();
                let t = Instant::now();
                let d = delta::encode(&a, &b, &EncodeOptions::default()).expect("encode");
                let enc = t.elapsed().as_secs_f64();
                peaks.push(peak_mib());
                let t = Instant::now();
                let back = delta::apply(&a, &d, b.len() as u64).expect("apply");
                let dec = t.elapsed().as_secs_f64();
                assert!(back == b, "round trip failed");
                ours.sizes.push(d.len() as u64);
                ours.secs.push(enc);
                apply_rates.push(b.len() as f64 / dec.max(1e-6) / 1e6);
                won.push(format!("{:?}", delta::read_header(&d).expect("header").algorithm));
                eprintln!("  patchrelay: {} B in {enc:.2}s, apply {dec:.3}s", d.len());
            }
            let bits = 64 - (a.len().max(b.len()) as u64).leading_zeros() + 1;
            let mut candidates: Vec<(&str, &str, Vec<String>)> = vec![
                (
                    "zstd3",
                    "zstd",
                    vec![
                        "zstd".into(),
                        "-q".into(),
                        "-f".into(),
                        "--single-thread".into(),
                        format!("--long={bits}"),
                        "-3".into(),
                        format!("--patch-from={old}"),
                        new.clone(),
                        "-o".into(),
                        o.clone(),
                    ],
                ),
                (
                    "zstd19",
                    "zstd",
                    vec![
                        "zstd".into(),
                        "-q".into(),
                        "-f".into(),
                        "--single-thread".into(),
                        format!("--long={bits}"),
                        "-19".into(),
                        format!("--patch-from={old}"),
                        new.clone(),
                        "-o".into(),
                        o.clone(),
                    ],
                ),
                (
                    "xdelta3",
                    "xdelta3",
                    vec![
                        "xdelta3".into(),
                        "-9".into(),
                        "-f".into(),
                        "-e".into(),
                        "-s".into(),
                        old.clone(),
                        new.clone(),
                        o.clone(),
                    ],
                ),
                ("bsdiff", "bsdiff", vec!["bsdiff".into(), old.clone(), new.clone(), o.clone()]),
                (
                    "hdiffz",
                    "hdiffz",
                    vec!["hdiffz".into(), "-f".into(), "-c-zstd-19".into(), old.clone(), new.clone(), o.clone()],
                ),
            ];
            for (key, bin, cmd) in candidates.drain(..) {
                if !want(key) {
                    continue;
                }
                if !have(bin) {
                    if i == 0 {
                        eprintln!("  {key}: not installed, skipped");
                    }
                    continue;
                }
                let label = match key {
                    "zstd3" => "zstd --patch-from -3 --long",
                    "zstd19" => "zstd --patch-from -19 --long",
                    "xdelta3" => "xdelta3 -9",
                    "bsdiff" => "bsdiff",
                    _ => "HDiffPatch (hdiffz, zstd 19)",
                };
                if !ext.iter().any(|(l, _)| l == label) {
                    ext.push((label.to_string(), cmd.clone()));
                    rows.push(Row { tool: label.to_string(), sizes: vec![], secs: vec![], note: String::new() });
                }
                if let Some((n, s)) = external(&cmd, &dout) {
                    eprintln!("  {label}: {n} B in {s:.2}s");
                    if let Some(r) = rows.iter_mut().find(|r| r.tool == label) {
                        r.sizes.push(n);
                        r.secs.push(s);
                    }
                }
            }
        }
        if !ours.sizes.is_empty() {
            ours.note = format!(
                "apply {:.0} MB/s, encode peak RSS {:.0} MiB, chose {}",
                mean(&apply_rates),
                peaks.iter().cloned().fold(0.0, f64::max),
                won.join("/")
            );
            rows.insert(0, ours);
        }
        let best = rows
            .iter()
            .skip(1)
            .filter(|r| !r.sizes.is_empty())
            .map(|r| mean(&r.sizes.iter().map(|&s| s as f64).collect::<Vec<_>>()))
            .fold(f64::INFINITY, f64::min);
        for r in &rows {
            if r.sizes.is_empty() {
                continue;
            }
            let m = mean(&r.sizes.iter().map(|&s| s as f64).collect::<Vec<_>>());
            let ratio = if best.is_finite() { format!(" ({:.2}x best reference)", m / best) } else { String::new() };
            table.push_str(&format!(
                "| {set} ({} B, {} pairs) | {} | {}{} | {:.2} s | {} |\n",
                std::fs::metadata(&files[1]).map(|m| m.len()).unwrap_or(0),
                r.sizes.len(),
                r.tool,
                human(m),
                if r.tool == "patchrelay" { ratio } else { String::new() },
                mean(&r.secs),
                r.note
            ));
        }
    }
    println!("{table}");
    if let Some(path) = opt("--write") {
        std::fs::write(&path, &table).expect("write table");
        eprintln!("table written to {path}");
    }
}
