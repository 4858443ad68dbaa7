//! What a reload of a large catalog costs, phase by phase, through the
//! path SIGHUP takes (`reload::reload_timed`, which `reload::reload` and
//! the SIGHUP handler run): read, parse, validate, compile, the warnings
//! (shadowed rules), the diff for the log, and building and swapping the
//! snapshot. Catalogs of 10,000 and 100,000 rules shaped like a vendor's
//! connection table (`support/catalog.rs`), reloaded into a proxy set up
//! as `run` sets it up (no listeners: nothing is served).
//!
//! `cargo bench --bench reload` prints a markdown table of medians;
//! `cargo bench --bench reload -- 10000 50000` picks the sizes, and
//! `ROUNDS=N` the reloads per size (default 5).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic on bad setup

#[path = "support/catalog.rs"]
mod catalog;

use std::path::Path;
use std::time::{Duration, Instant};

use egress_proxy::audit::MemorySink;
use egress_proxy::config::Settings;
use egress_proxy::reload::{self, Timings};
use egress_proxy::{start_audit, Proxy};

/// The proxy's allocator: freeing a catalog costs what it costs there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 100_000]
    } else {
        sizes
    };
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| phase | {} |", header(&sizes));
    println!("|---|{}", "---|".repeat(sizes.len()));
    let results: Vec<(usize, Vec<Timings>, Duration)> = sizes
        .iter()
        .map(|&n| {
            let (times, drop) = measure(&runtime, n, rounds);
            (n, times, drop)
        })
        .collect();
    type Phase = (&'static str, fn(&Timings) -> Duration);
    let phases: [Phase; 9] = [
        ("read the files", |t| t.load.read),
        ("parse (TOML)", |t| t.load.parse),
        ("validate (settings, rules, duplicates)", |t| {
            t.load.validate
        }),
        ("compile the policy", |t| t.load.compile),
        ("warnings (shadowed rules)", |t| t.load.warnings),
        ("diff against the running catalog", |t| t.diff),
        ("build the guards and swap the snapshot", |t| t.swap),
        ("**whole reload**", |t| t.total),
        ("per rule (whole reload)", |t| t.total),
    ];
    for (i, (name, get)) in phases.iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|(n, times, _)| {
                let d = median(times.iter().map(get).collect());
                if i == phases.len() - 1 {
                    format!("{:.1} µs", d.as_secs_f64() * 1e6 / *n as f64)
                } else {
                    ms(d)
                }
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let drops: Vec<String> = results.iter().map(|(_, _, d)| ms(*d)).collect();
    println!(
        "| dropping the old snapshot (last holder) | {} |",
        drops.join(" | ")
    );
    println!();
    println!(
        "Medians of {rounds} reloads per size (each a full reload of the same file, \
         so the diff finds every rule unchanged); one `egress-proxy` process, \
         catalogs from benches/support/catalog.rs (`vendor_catalog`)."
    );
}

fn header(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(|n| format!("{n} rules"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Reload a catalog of `n` rules `rounds` times; also how long the last
/// holder of a snapshot of that size takes to drop it.
fn measure(runtime: &tokio::runtime::Runtime, n: usize, rounds: usize) -> (Vec<Timings>, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), n);
    let settings = Settings::load(Some(&config), Vec::new()).expect("the catalog loads");
    assert_eq!(settings.policy.rules().len(), n);
    assert!(
        settings.warnings.is_empty(),
        "the generated catalog has warnings: {:?}",
        &settings.warnings[..settings.warnings.len().min(3)]
    );
    let (log, writer, metrics) = start_audit(Box::new(MemorySink::new())).expect("audit");
    let proxy = runtime.block_on(async { Proxy::new(Vec::new(), settings, log, metrics) });
    let handle = proxy.expect("proxy").handle();
    let times = (0..rounds)
        .map(|_| {
            let (result, t) = reload::reload_timed(&handle, Some(&config), Vec::new);
            result.expect("reload");
            t
        })
        .collect();
    // What a connection pays when it is the last to let go of a snapshot.
    let held = handle.settings();
    reload::reload(&handle, Some(&config), Vec::new).expect("reload");
    let start = Instant::now();
    drop(held);
    let dropped = start.elapsed();
    handle.audit().close();
    drop(handle);
    writer.join();
    (times, dropped)
}

/// A configuration and a vendor-shaped catalog of `n` rules in `dir`.
fn write_config(dir: &Path, n: usize) -> std::path::PathBuf {
    std::fs::write(dir.join("catalog.toml"), catalog::vendor_catalog(n)).expect("catalog");
    let config = dir.join("egress-proxy.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[clients]\nallow = [\"127.0.0.0/8\"]\n\n\
         [policy]\ncatalog = \"catalog.toml\"\n",
    )
    .expect("config");
    config
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}
