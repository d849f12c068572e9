//! Hot-path micro-benchmarks: what every request pays before its first byte,
//! and per piece after it: range parsing and slicing, lookups, the token
//! bucket every limited piece is reserved on, and the block check every
//! filled megabyte passes before anyone sees it.
//!
//! Run: `cargo bench --bench hot_path` (CI only compiles it: `cargo test --benches --no-run`).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::Stream;
use patchrelay::digest::Digest;
use patchrelay::http::body::{Piece, PieceStream};
use patchrelay::http::range::{RangeOutcome, resolve};
use patchrelay::limits::{Bucket, Clock};
use patchrelay::repo::catalog::Catalog;
use patchrelay::repo::manifest::Manifest;
use patchrelay::store::{Store, StoreOptions};

fn ranges(c: &mut Criterion) {
    let mut g = c.benchmark_group("range");
    for (name, header) in [
        ("single", &b"bytes=1048576-"[..]),
        ("suffix", b"bytes=-500"),
        ("multi4", b"bytes=0-99, 1000-1999, 50000-50100, -10"),
        ("overlapping", b"bytes=0-100, 50-200, 150-300, 0-5000"),
        ("malformed", b"bytes=12-abc"),
    ] {
        g.bench_function(name, |b| b.iter(|| resolve(black_box(header), black_box(25_165_824))));
    }
    g.finish();
}

fn synthetic_manifest(components: usize, versions: usize) -> Vec<u8> {
    let mut comps = serde_json::Map::new();
    for c in 0..components {
        let vs: Vec<_> = (0..versions)
            .map(|v| {
                let d = Digest::of(format!("{c}-{v}").as_bytes());
                let chunks = Digest::of(format!("chunks-{c}-{v}").as_bytes());
                serde_json::json!({"version": format!("{}", 100 + v), "sha256": d, "size": 4096,
                    "file_name": "p.bin", "chunk_size": 1048576, "chunks_sha256": chunks})
            })
            .collect();
        comps.insert(
            format!("component-{c}"),
            serde_json::json!({"kind": "pattern", "latest": format!("{}", 100 + versions - 1), "versions": vs}),
        );
    }
    serde_json::to_vec(&serde_json::json!({"serial": 1, "generated_at": "2026-11-23T00:00:00Z", "components": comps}))
        .unwrap()
}

fn lookup(c: &mut Criterion) {
    let bytes = synthetic_manifest(200, 20);
    let manifest = Manifest::parse(&bytes).unwrap();
    let catalog = Catalog::new(manifest, Bytes::from(bytes), Bytes::from_static(b"sig"));
    let probe = Digest::of(b"150-7");
    let mut g = c.benchmark_group("lookup");
    g.bench_function("catalog_object_by_digest", |b| b.iter(|| catalog.object(black_box(&probe)).map(|o| o.size)));
    g.bench_function("catalog_latest_by_name", |b| {
        b.iter(|| catalog.latest(black_box("component-150")).map(|(e, _)| e.size))
    });

    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        &StoreOptions { memory_cache: 64 << 20, memory_object_max: 64 << 10, max_size: None, mmap: true },
    )
    .unwrap();
    let small = vec![7u8; 4096];
    let large = vec![9u8; 1 << 20];
    let (ds, dl) = (Digest::of(&small), Digest::of(&large));
    store.put(ds, &small).unwrap();
    store.put(dl, &large).unwrap();
    g.bench_function("store_get_memory_4k", |b| b.iter(|| store.get(black_box(&ds)).unwrap().map(|b| b.len())));
    g.bench_function("store_get_file_1m", |b| b.iter(|| store.get(black_box(&dl)).unwrap().map(|b| b.len())));
    g.bench_function("store_miss", |b| b.iter(|| store.get(black_box(&probe)).unwrap().is_none()));
    g.finish();
}

/// A multi-range response over a memory object: parse the header, slice the
/// object into pieces (no copies), and drain the body stream as actix would.
fn range_slicing(c: &mut Criterion) {
    let object = Bytes::from(vec![5u8; 24 << 20]);
    let header = b"bytes=0-99, 1000-1999, 50000-50100, -10";
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    c.bench_function("range_slicing/multi4_memory_24m", |b| {
        b.iter(|| {
            let RangeOutcome::Partial(ranges) = resolve(black_box(header), object.len() as u64) else {
                panic!("ranges expected");
            };
            let pieces = ranges.iter().map(|r| Piece::Bytes(object.slice(r.start as usize..=r.end as usize))).collect();
            let mut stream =
                PieceStream::new(pieces, patchrelay::telemetry::tally("bench_body_bytes_total", &[]), None);
            let mut sent = 0;
            while let std::task::Poll::Ready(Some(Ok(piece))) = std::pin::Pin::new(&mut stream).poll_next(&mut cx) {
                sent += piece.len();
            }
            sent
        })
    });
}

/// One reservation per piece sent under a rate limit; shared by an agent's
/// connections, so it is a compare-and-swap, not a lock.
fn token_bucket(c: &mut Criterion) {
    let clock = Clock::new();
    let bucket = Bucket::new(1 << 40, 1 << 40);
    c.bench_function("token_bucket/reserve_64k", |b| b.iter(|| bucket.reserve(black_box(64 << 10), clock.now())));
}

/// The check each 1 MiB block of a fill passes before it is served: SHA-256
/// of the block against its entry in the chunk list.
fn chunk_verification(c: &mut Criterion) {
    let block = vec![0x5au8; 1 << 20];
    let expected = Digest::of(&block);
    let mut g = c.benchmark_group("chunk_verification");
    g.throughput(Throughput::Bytes(block.len() as u64));
    g.bench_function("sha256_1m_block", |b| b.iter(|| Digest::of(black_box(&block)) == expected));
    g.finish();
}

criterion_group!(benches, ranges, lookup, range_slicing, token_bucket, chunk_verification);
criterion_main!(benches);
