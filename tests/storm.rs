//! The leak storm: thousands of transactions of every kind, clean and
//! hostile, through one in-process proxy; then open file descriptors, proxy
//! tasks, runtime tasks and memory must come back to their baseline, and
//! every transaction must have exactly one record.
//!
//! Its own test binary (one test), so no other test opens sockets or
//! spawns tasks in this process while it counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_proxy::audit::{Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Transactions in the storm.
const TOTAL: usize = 3000;
/// Clients at once.
const CONCURRENCY: usize = 32;
/// The whole storm must end within this.
const STORM_LIMIT: Duration = Duration::from_secs(240);
/// How long to wait for counts to come back down.
const SETTLE: Duration = Duration::from_secs(30);
/// Descriptors allowed above the baseline once settled.
const FD_SLACK: usize = 8;
/// Runtime tasks allowed above the baseline once settled.
const TASK_SLACK: usize = 8;
/// Resident memory growth allowed, KiB.
const RSS_SLACK_KIB: u64 = 32 * 1024;

const WEB: &str = "repo.clearswift.net";
const TUNNEL: &str = "ksn1.kaspersky-labs.com";
const BROKEN: &str = "broken.clearswift.net";
const STALLED: &str = "stalled.clearswift.net";
const UNLISTED: &str = "example.com";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A GET answered 200 by a healthy origin.
    CleanGet,
    /// A CONNECT to an echo origin, 64 bytes both ways, closed cleanly.
    CleanTunnel,
    /// A GET to a host in no rule: 403 `not_in_catalog`.
    Refused,
    /// A head with a NUL in it: hyper's 400, `bad_request`.
    Malformed,
    /// A CONNECT whose client resets after the echo: `client_closed`.
    VanishingClient,
    /// A GET whose upstream resets mid-body: `upstream_reset`.
    UpstreamReset,
    /// A GET whose upstream stalls mid-body and whose client gives up
    /// (closes): `client_closed`, and the upstream connection is closed.
    AbandonedBody,
}

const KINDS: [Kind; 7] = [
    Kind::CleanGet,
    Kind::CleanTunnel,
    Kind::Refused,
    Kind::Malformed,
    Kind::VanishingClient,
    Kind::UpstreamReset,
    Kind::AbandonedBody,
];

/// The kind a record is the trace of, or `None` for a record no kind makes.
fn kind_of(r: &Record) -> Option<Kind> {
    let method = r.method.as_ref().map(|m| m.as_str());
    match (method, r.host.as_deref(), r.reason) {
        (Some("GET"), Some(WEB), None) if r.status == Some(200) => Some(Kind::CleanGet),
        (Some("CONNECT"), Some(TUNNEL), None) if r.status == Some(200) => Some(Kind::CleanTunnel),
        (Some("GET"), Some(UNLISTED), Some(Reason::NotInCatalog)) => Some(Kind::Refused),
        (_, _, Some(Reason::BadRequest)) if r.status == Some(400) => Some(Kind::Malformed),
        (Some("CONNECT"), Some(TUNNEL), Some(Reason::ClientClosed)) => Some(Kind::VanishingClient),
        (Some("GET"), Some(BROKEN), Some(Reason::UpstreamReset)) => Some(Kind::UpstreamReset),
        (Some("GET"), Some(STALLED), Some(Reason::ClientClosed)) => Some(Kind::AbandonedBody),
        _ => None,
    }
}

struct Origins {
    web: HttpOrigin,
    echo: std::net::SocketAddr,
    broken: std::net::SocketAddr,
    stalled: std::net::SocketAddr,
}

/// An origin that sends a head promising 100000 bytes, 1000 of them, and
/// resets the connection.
async fn broken_origin() -> std::net::SocketAddr {
    tcp_origin(|mut s| async move {
        if read_head_raw(&mut s).await.is_none() {
            return;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(&[b'a'; 1000]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(s);
    })
    .await
}

/// An origin that sends a head promising 100000 bytes, 1000 of them, and
/// then nothing until the proxy hangs up.
async fn stalled_origin() -> std::net::SocketAddr {
    tcp_origin(|mut s| async move {
        if read_head_raw(&mut s).await.is_none() {
            return;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(&[b's'; 1000]).await;
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

fn catalog(o: &Origins) -> String {
    format!(
        "[[rule]]\nname = \"web\"\nhosts = [\"{WEB}\"]\nports = [{}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"tunnel\"\nhosts = [\"{TUNNEL}\"]\nports = [{}]\naction = \"bypass\"\n\n\
         [[rule]]\nname = \"broken\"\nhosts = [\"{BROKEN}\"]\nports = [{}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"stalled\"\nhosts = [\"{STALLED}\"]\nports = [{}]\naction = \"allow\"\n",
        o.web.port(),
        o.echo.port(),
        o.broken.port(),
        o.stalled.port()
    )
}

/// Read to the close (or an error); false if it did not come in time.
async fn to_close(s: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 8192];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok()
}

/// Run one transaction of `kind`; `Err` says what went wrong.
async fn run(kind: Kind, proxy: std::net::SocketAddr, o: &Origins) -> Result<(), String> {
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let w = |e: std::io::Error| format!("write: {e}");
    let mut out = Vec::new();
    match kind {
        Kind::CleanGet | Kind::Refused | Kind::Malformed | Kind::UpstreamReset => {
            let req = match kind {
                Kind::CleanGet => format!(
                    "GET http://{WEB}:{0}/ HTTP/1.1\r\nHost: {WEB}:{0}\r\nConnection: close\r\n\r\n",
                    o.web.port()
                ),
                Kind::Refused => format!(
                    "GET http://{UNLISTED}/ HTTP/1.1\r\nHost: {UNLISTED}\r\n\r\n"
                ),
                Kind::Malformed => format!(
                    "GET http://{WEB}:{0}/ HTTP/1.1\r\nHost: {WEB}:{0}\r\nX-A: a\0b\r\n\r\n",
                    o.web.port()
                ),
                _ => format!(
                    "GET http://{BROKEN}:{0}/ HTTP/1.1\r\nHost: {BROKEN}:{0}\r\n\r\n",
                    o.broken.port()
                ),
            };
            s.write_all(req.as_bytes()).await.map_err(w)?;
            if !to_close(&mut s, &mut out).await {
                return Err("no close".into());
            }
            let resp = parse_response(&out);
            let ok = match kind {
                Kind::CleanGet => resp.status == 200 && resp.body == b"hello",
                Kind::Refused => resp.status == 403,
                Kind::Malformed => resp.status == 400,
                _ => resp.status == 200 && resp.body.len() == 1000,
            };
            if !ok {
                return Err(format!("unexpected answer: {:?}", resp.head));
            }
        }
        Kind::AbandonedBody => {
            let req = format!(
                "GET http://{STALLED}:{0}/ HTTP/1.1\r\nHost: {STALLED}:{0}\r\n\r\n",
                o.stalled.port()
            );
            s.write_all(req.as_bytes()).await.map_err(w)?;
            let head = tokio::time::timeout(WAIT, read_head_raw(&mut s))
                .await
                .map_err(|_| "no head".to_string())?
                .unwrap_or_default();
            if !head.starts_with("HTTP/1.1 200 ") {
                return Err(format!("answered {head:?}"));
            }
            let mut part = [0u8; 1000];
            tokio::time::timeout(WAIT, s.read_exact(&mut part))
                .await
                .map_err(|_| "no partial body".to_string())?
                .map_err(|e| format!("partial body: {e}"))?;
            drop(s);
        }
        Kind::CleanTunnel | Kind::VanishingClient => {
            let req = format!(
                "CONNECT {TUNNEL}:{0} HTTP/1.1\r\nHost: {TUNNEL}:{0}\r\n\r\n",
                o.echo.port()
            );
            s.write_all(req.as_bytes()).await.map_err(w)?;
            let head = tokio::time::timeout(WAIT, read_head_raw(&mut s))
                .await
                .map_err(|_| "no CONNECT answer".to_string())?
                .unwrap_or_default();
            if !head.starts_with("HTTP/1.1 200 ") {
                return Err(format!("CONNECT answered {head:?}"));
            }
            s.write_all(&[b'p'; 64]).await.map_err(w)?;
            let mut back = [0u8; 64];
            tokio::time::timeout(WAIT, s.read_exact(&mut back))
                .await
                .map_err(|_| "no echo".to_string())?
                .map_err(|e| format!("echo: {e}"))?;
            if kind == Kind::VanishingClient {
                reset(s);
                return Ok(());
            }
            s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            if !to_close(&mut s, &mut out).await || !out.is_empty() {
                return Err(format!("tunnel did not end cleanly: {out:?}"));
            }
        }
    }
    Ok(())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Poll `what` until `ok` holds or `SETTLE` passes; returns the last value.
async fn settle<T: Copy + std::fmt::Debug>(
    mut read: impl FnMut() -> T,
    ok: impl Fn(T) -> bool,
) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        let v = read();
        if ok(v) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn census(records: &[Record]) -> (BTreeMap<Kind, usize>, Vec<Record>) {
    let mut counts = BTreeMap::new();
    let mut strays = Vec::new();
    for r in records {
        match kind_of(r) {
            Some(k) => *counts.entry(k).or_insert(0) += 1,
            None => strays.push(r.clone()),
        }
    }
    (counts, strays)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_leaves_no_descriptors_tasks_or_memory_behind() {
    let origins = Arc::new(Origins {
        web: HttpOrigin::start().await,
        echo: echo_origin().await,
        broken: broken_origin().await,
        stalled: stalled_origin().await,
    });
    let cfg = config(&[WEB, TUNNEL, BROKEN, STALLED, UNLISTED], "");
    let proxy = TestProxy::start(&cfg, &catalog(&origins)).await;
    let addr = proxy.addr;

    // Warm up: a few of each kind, so lazily built state (thread-local
    // buffers, resolver caches, the runtime's worker structures) exists
    // before the baseline.
    let mut warm = 0;
    for _ in 0..3 {
        for kind in KINDS {
            run(kind, addr, &origins)
                .await
                .unwrap_or_else(|e| panic!("warm-up {kind:?}: {e}"));
            warm += 1;
        }
    }
    let got = proxy.audit.wait_for(SETTLE, |r| r.len() >= warm).await;
    assert_eq!(got.len(), warm, "warm-up records");
    let open = settle(|| proxy.handle.open_connections(), |n| n == 0).await;
    assert_eq!(open, 0, "proxy tasks after the warm-up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base_fds = open_fds();
    let base_tasks = alive_tasks();
    let base_rss = rss_kib();
    eprintln!("baseline: {base_fds} fds, {base_tasks} runtime tasks, {base_rss} KiB RSS");

    // The storm: CONCURRENCY clients take the next transaction until TOTAL.
    let next = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let mut peak_open = 0usize;
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, failures, origins) = (
                Arc::clone(&next),
                Arc::clone(&failures),
                Arc::clone(&origins),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= TOTAL {
                        return;
                    }
                    let kind = KINDS[i % KINDS.len()];
                    if let Err(e) = run(kind, addr, &origins).await {
                        failures
                            .lock()
                            .expect("failures")
                            .push(format!("#{i} {kind:?}: {e}"));
                    }
                }
            })
        })
        .collect();
    let done = tokio::time::timeout(STORM_LIMIT, async {
        for w in workers {
            w.await.expect("worker");
        }
    });
    tokio::pin!(done);
    let sampler = async {
        loop {
            peak_open = peak_open.max(proxy.handle.open_connections());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = &mut done => r.expect("the storm ends in time"),
        () = sampler => unreachable!(),
    }
    let took = started.elapsed();
    let failures = failures.lock().expect("failures").clone();
    eprintln!(
        "storm: {TOTAL} transactions in {took:?} ({:.0}/s), peak {peak_open} proxy tasks, {} fds, {} KiB RSS",
        TOTAL as f64 / took.as_secs_f64(),
        open_fds(),
        rss_kib()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );

    // Every transaction has exactly one record.
    let want = warm + TOTAL;
    let records = proxy.audit.wait_for(SETTLE, |r| r.len() >= want).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = if records.len() == want {
        proxy.audit.records()
    } else {
        records
    };
    assert_eq!(records.len(), want, "one record per transaction");
    let (counts, strays) = census(&records[warm..]);
    assert!(strays.is_empty(), "records of no kind: {strays:#?}");
    for kind in KINDS {
        let sent = (0..TOTAL)
            .filter(|i| KINDS[i % KINDS.len()] == kind)
            .count();
        assert_eq!(
            counts.get(&kind).copied().unwrap_or(0),
            sent,
            "{kind:?} records"
        );
    }
    let mut ids: Vec<u64> = records.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), want, "record ids are unique");

    // Everything comes back down.
    let open = settle(|| proxy.handle.open_connections(), |n| n == 0).await;
    assert_eq!(
        open, 0,
        "proxy tasks (client and upstream connections, tunnels) still open"
    );
    let fds = settle(open_fds, |n| n <= base_fds + FD_SLACK).await;
    let tasks = settle(alive_tasks, |n| n <= base_tasks + TASK_SLACK).await;
    let rss = rss_kib();
    eprintln!("settled: {fds} fds, {tasks} runtime tasks, {rss} KiB RSS");
    assert!(
        fds <= base_fds + FD_SLACK,
        "descriptors: {base_fds} before, {fds} after"
    );
    assert!(
        tasks <= base_tasks + TASK_SLACK,
        "runtime tasks: {base_tasks} before, {tasks} after"
    );
    assert!(
        rss.saturating_sub(base_rss) < RSS_SLACK_KIB,
        "resident memory grew from {base_rss} KiB to {rss} KiB"
    );

    // And the proxy still serves.
    run(Kind::CleanGet, addr, &origins)
        .await
        .expect("a request after the storm");
    drop(proxy);
}
