//! Memory per agent in the fleet inventory: 200,000 agents (ids of 14
//! bytes, the typical `ws-` plus a serial), each reporting one of 8 versions
//! of two components with one of 4 user agents, and the process's resident
//! memory before and after; then the time a sighting takes for an agent
//! already known (the plan route's cost). Run: `cargo bench --bench fleet_memory`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use patchrelay::fleet::{Fleet, Sighting};
use patchrelay::identity::Who;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n = 200_000u32;
    let fleet = Fleet::new(n as usize, Duration::from_secs(7 * 86_400));
    let ids: Vec<String> = (0..n).map(|i| format!("ws-{i:011}")).collect();
    let uas = ["acme-agent/7.1", "acme-agent/7.2", "acme-agent/7.3 (linux)", "acme-agent/8.0 (windows)"];
    let versions: Vec<String> = (170..178).map(|v| v.to_string()).collect();
    let sight = |i: u32, c: &str| {
        let address = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        fleet.record(&Sighting {
            who: Who::Id(ids[i as usize].as_bytes()),
            address,
            user_agent: uas[i as usize % 4].as_bytes(),
            component: c,
            version: &versions[i as usize % 8],
        });
    };
    let before = rss_kib();
    for i in 0..n {
        sight(i, "engine-pattern");
        sight(i, "hotfix");
    }
    let after = rss_kib();
    println!(
        "{} agents, 2 components each; RSS {before} KiB -> {after} KiB: {:.0} bytes per agent",
        fleet.len(),
        (after.saturating_sub(before) as f64 * 1024.0) / f64::from(n)
    );
    let rounds = 2_000_000u32;
    let t = Instant::now();
    for r in 0..rounds {
        sight((r.wrapping_mul(2_654_435_761)) % n, "engine-pattern");
    }
    println!("a known agent's sighting: {:.0} ns", t.elapsed().as_nanos() as f64 / f64::from(rounds));
}
