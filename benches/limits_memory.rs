//! Memory per agent under limits: admit 100,000 distinct agent ids (one
//! download each, finished), each from an address of its own as on a site's
//! network (so each also costs its address's entry in the per-address count
//! of ids), and measure the process's resident memory before and after. Run:
//! `cargo bench --bench limits_memory`.

use std::net::IpAddr;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use patchrelay::config::Config;
use patchrelay::limits::Limits;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let toml = "[[upstream]]\nurl = \"http://127.0.0.1:1\"\n[storage]\ndir = \"/tmp/x\"\n[trust]\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n[limits]\n[[limits.policy]]\nname = \"fleet\"\nrate = \"1MiB/s\"\nmax_concurrent = 2\n";
    let cfg = Config::from_toml(toml, "bench").expect("config");
    let limits = Limits::new(&cfg.limits, &cfg.server).expect("limits").expect("a policy");
    let peer = |i: u32| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    let name = HeaderName::from_static("x-agent-id");
    let n = 100_000u32;
    // Warm up allocator and cache structures with a few agents first.
    for i in 0..1000u32 {
        let mut h = HeaderMap::new();
        h.insert(name.clone(), HeaderValue::from_str(&format!("warm-{i:06}")).expect("header"));
        drop(limits.admit(limits.caller(IpAddr::from([11, 0, (i >> 8) as u8, i as u8]), &h, None), false, None));
    }
    let before = rss_kib();
    for i in 0..n {
        let mut h = HeaderMap::new();
        h.insert(name.clone(), HeaderValue::from_str(&format!("agent-{i:08}")).expect("header"));
        let permit = limits.admit(limits.caller(peer(i), &h, None), false, None).expect("admitted");
        drop(permit);
    }
    let after = rss_kib();
    let tracked = limits.tracked_agents();
    println!(
        "{tracked} agents tracked; RSS {before} KiB -> {after} KiB: {:.0} bytes per agent",
        (after.saturating_sub(before) as f64 * 1024.0) / f64::from(n)
    );
}
