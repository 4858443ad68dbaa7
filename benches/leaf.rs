//! Leaf minting for TLS inspection, on its own: what the first inspected
//! tunnel to a name costs the proxy beyond its handshakes (an ECDSA P-256 key
//! pair and a certificate signed by the CA), against a cache hit, and the
//! per-tunnel server configuration built around a cached leaf.
//! Run with `cargo bench --bench leaf`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic on bad setup

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use divan::{black_box, Bencher};
use egress_proxy::tls::{self, ca::Ca};

fn main() {
    divan::main();
}

/// A CA made by the proxy's own `ca generate`, in a directory removed once loaded.
static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = tls::ca::generate(dir.path(), false).expect("ca generate");
    Ca::load(&cert, &key).expect("ca load")
});

/// Names never asked for before: every call is a cache miss (a cold cache).
fn new_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "h{}.cloud-lookup.example",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `Ca::leaf` for a name it has not seen: mints (once the cache holds its
/// 1024 leaves, the least recently used one is evicted first).
#[divan::bench(sample_count = 200)]
fn leaf_new_name(bencher: Bencher) {
    bencher
        .with_inputs(new_name)
        .bench_refs(|name| black_box(CA.leaf(name).expect("leaf")));
}

/// `Ca::leaf` for a cached name.
#[divan::bench(sample_count = 1000)]
fn leaf_cached(bencher: Bencher) {
    CA.leaf("cls.sophosxl.net").expect("leaf");
    bencher.bench(|| black_box(CA.leaf(black_box("cls.sophosxl.net")).expect("leaf")));
}

/// `tls::server_config`, which every inspected tunnel calls: the cached leaf
/// in a new rustls server configuration.
#[divan::bench(sample_count = 1000)]
fn server_config_cached(bencher: Bencher) {
    CA.leaf("cls.sophosxl.net").expect("leaf");
    bencher.bench(|| {
        black_box(tls::server_config(&CA, black_box("cls.sophosxl.net")).expect("config"))
    });
}
