//! How long a relay takes to index its store at start (after a restart or a
//! `kill -9`): 100,000 objects on disk.
//!
//! Run: `cargo bench --bench store_open`. The objects are small (the cost is
//! per file: a directory entry and a stat), created once in a temp directory.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use patchrelay::digest::Digest;
use patchrelay::store::{Store, StoreOptions};

const OBJECTS: u32 = 100_000;

fn store_open(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    for i in 0..OBJECTS {
        let data = i.to_le_bytes();
        let hex = Digest::of(&data).to_hex();
        let fan = objects.join(&hex[..2]);
        if i < 256 || !fan.exists() {
            std::fs::create_dir_all(&fan).unwrap();
        }
        std::fs::write(fan.join(hex), data).unwrap();
    }
    let opts = StoreOptions { memory_cache: 1 << 20, memory_object_max: 0, max_size: None, mmap: true };
    let mut g = c.benchmark_group("store");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("open_100k_objects", |b| {
        b.iter(|| {
            let (store, report) = Store::open(dir.path(), &opts).unwrap();
            assert_eq!(report.objects, u64::from(OBJECTS));
            store
        })
    });
    g.finish();
}

criterion_group!(benches, store_open);
criterion_main!(benches);
