//! Guards config loading: any text gives a config or an error, and accepted configs keep the cross-key rules.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use patchrelay::config::{Config, Role};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // `admin.token_file` is read from disk. Keep the fuzzer away from device
    // and kernel files (reading /dev/zero never ends), including paths
    // spelt with TOML escapes.
    if ["/dev", "/proc", "/sys", "\\u", "\\U"].iter().any(|s| text.contains(s)) {
        return;
    }
    let config = match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => config,
        Err(e) => {
            // Errors are printed for the operator: formatting must not panic.
            let _ = e.to_string();
            return;
        }
    };
    // One role, and what it needs: an origin has no upstreams; a relay without
    // upstreams is an offline relay, fed by `patchrelay import`.
    assert!(!(config.origin.is_some() && !config.upstream.is_empty()), "origin and upstreams together");
    match config.role() {
        Role::Origin => assert!(config.origin.is_some()),
        Role::Relay => assert!(config.trust.is_some() && config.storage.is_some()),
    }
    assert!(config.sync.interval.0 >= Duration::from_secs(1));
    assert!(config.sync.retain >= 1 && config.sync.prefetch_concurrency >= 1);
    assert!(config.delta.workers >= 1 && config.delta.queue >= 1);
    assert!(config.server.max_connections_per_worker >= 1 && config.server.write_buffer.0 >= 1);
    if let Some(storage) = &config.storage {
        assert!(storage.memory_object_max.0 <= storage.memory_cache.0);
    }
    // An [admin] section yields a token or an error; no section, no token.
    assert_eq!(config.admin.is_some(), config.admin_token.is_some());
    let mut names: Vec<String> = config.upstream.iter().map(|u| u.display_name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), config.upstream.len(), "two upstreams with one name");
});
