//! Attacks on a spliced tunnel's relay (one hand-written future per tunnel,
//! one idle sweeper per proxy): the SNI gate must hold whatever the timing
//! of the hello against the CONNECT head and the idle sweeps; idle
//! time-outs, the hard cancel at shutdown and slot reuse in the idler must
//! end exactly the right tunnels, each with one record and exact counts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const KSN: &str = "ksn1.kaspersky-labs.com";
const FRONT: &str = "www.example.com";

/// A proxy with a bypass rule (default `sni = "match-if-tls"`) for KSN on
/// `port`, plus `extra` config sections.
async fn proxy(port: u16, extra: &str) -> TestProxy {
    let (settings, dir) = load(
        &config(&[KSN], extra),
        &rule("Kaspersky KSN lookup", &[KSN], port, "bypass", ""),
    );
    TestProxy::start_settings(settings, dir).await
}

async fn open(proxy: &TestProxy, port: u16) -> TcpStream {
    let s = open_tunnel(proxy.addr, &format!("{KSN}:{port}")).await;
    s.set_nodelay(true).expect("nodelay");
    s
}

/// An origin that keeps every byte it is sent (all connections) and, when
/// `tick` is set, writes "tick" every 200 ms until the client goes.
async fn keeping_origin(tick: bool) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&got);
    let addr = tcp_origin(move |s| {
        let got = Arc::clone(&kept);
        async move {
            let (mut r, mut w) = s.into_split();
            if tick {
                tokio::spawn(async move {
                    while w.write_all(b"tick").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.lock().expect("got").extend_from_slice(&buf[..n]);
            }
        }
    })
    .await;
    (addr, got)
}

/// Read until EOF or an error; fails if neither comes within `WAIT`.
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let (got, ended) = read_until_close(s).await;
    assert!(ended.is_some(), "the proxy must close the tunnel");
    got
}

fn assert_refused(r: &Record, reason: Reason, sni: Option<&str>) {
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.reason, Some(reason), "{r:#?}");
    assert_eq!(r.sni.as_deref(), sni, "{r:#?}");
    assert_eq!(r.bytes_up, 0, "nothing was forwarded upstream: {r:#?}");
}

/// CONNECT head and the client's first bytes in one write: hyper reads the
/// hello with the head, and the tunnel gets it as "early" bytes. Returns
/// the stream after the 200.
async fn connect_with(proxy: &TestProxy, port: u16, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut bytes =
        format!("CONNECT {KSN}:{port} HTTP/1.1\r\nHost: {KSN}:{port}\r\n\r\n").into_bytes();
    bytes.extend_from_slice(first);
    s.write_all(&bytes).await.expect("write");
    let head = tokio::time::timeout(WAIT, read_head(&mut s))
        .await
        .expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// A fronted hello pipelined behind the CONNECT head (so it reaches the
/// tunnel as bytes hyper already read, not from the socket) is judged like
/// any other: refused, and not a byte of it reaches the upstream.
#[tokio::test]
async fn a_fronted_hello_pipelined_behind_the_connect_head_is_refused() {
    let (origin, got) = keeping_origin(false).await;
    let proxy = proxy(origin.port(), "").await;
    let mut s = connect_with(&proxy, origin.port(), &client_hello(FRONT)).await;
    read_to_end(&mut s).await;
    let r = proxy.only_record().await;
    assert_refused(&r, Reason::SniMismatch, Some(FRONT));
    assert!(got.lock().expect("got").is_empty(), "the origin saw bytes");
}

/// Only the record header rides behind the CONNECT head; the rest of the
/// fronted hello comes from the socket more than a second later (past an
/// armed second of the idle sweeper). The gate must join the early bytes
/// and the socket's into one hello and refuse it.
#[tokio::test]
async fn a_fronted_hello_split_between_the_connect_head_and_the_socket_is_refused() {
    let (origin, got) = keeping_origin(false).await;
    let proxy = proxy(origin.port(), "[limits]\ntunnel_idle_timeout = \"3s\"\n").await;
    let first = client_hello(FRONT);
    let mut s = connect_with(&proxy, origin.port(), &first[..5]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(&first[5..]).await.expect("write");
    read_to_end(&mut s).await;
    let r = proxy.only_record().await;
    assert_refused(&r, Reason::SniMismatch, Some(FRONT));
    assert!(got.lock().expect("got").is_empty(), "the origin saw bytes");
}

/// The control: a matching hello behind the head is replayed whole and
/// counted (so the refusal above is the check's, not a lost early buffer).
#[tokio::test]
async fn a_matching_hello_pipelined_behind_the_connect_head_is_replayed_whole() {
    let (origin, got) = keeping_origin(false).await;
    let proxy = proxy(origin.port(), "[limits]\ntunnel_idle_timeout = \"1s\"\n").await;
    let first = client_hello(KSN);
    let _s = connect_with(&proxy, origin.port(), &first).await;
    // The origin never answers: the tunnel idles out, its hello counted.
    let r = proxy.only_record().await;
    assert_eq!(*got.lock().expect("got"), first);
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!(r.decision, Decided::Bypass, "{r:#?}");
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
    assert_eq!(r.bytes_up, first.len() as u64, "{r:#?}");
}

/// Trickle `bytes` in `pieces` writes `gap` apart.
async fn trickle(s: &mut TcpStream, bytes: &[u8], pieces: usize, gap: Duration) {
    for piece in bytes.chunks(bytes.len().div_ceil(pieces)) {
        s.write_all(piece).await.expect("write");
        s.flush().await.expect("flush");
        tokio::time::sleep(gap).await;
    }
}

/// The hello trickles in over 3 s while the upstream's traffic keeps the
/// tunnel from idling out (1 s), so the idle sweeper wakes this tunnel and
/// it re-arms several times with its gate half-way through the hello: the
/// gate must survive each wake and still judge the whole hello.
async fn trickled_hello(name: &str) -> (TestProxy, Arc<Mutex<Vec<u8>>>, Vec<u8>) {
    let (origin, got) = keeping_origin(true).await;
    let proxy = proxy(
        origin.port(),
        "[limits]\ntunnel_idle_timeout = \"1s\"\nheader_read_timeout = \"10s\"\n",
    )
    .await;
    let mut s = open(&proxy, origin.port()).await;
    let first = client_hello(name);
    trickle(&mut s, &first, 8, Duration::from_millis(400)).await;
    (proxy, got, first)
}

#[tokio::test]
async fn a_hello_trickled_across_idle_sweeps_is_still_checked() {
    let (proxy, got, _) = trickled_hello(FRONT).await;
    let r = proxy.only_record().await;
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.reason, Some(Reason::SniMismatch), "{r:#?}");
    assert_eq!(r.bytes_up, 0, "{r:#?}");
    assert!(r.bytes_down >= 4, "the upstream's ticks passed: {r:#?}");
    assert!(got.lock().expect("got").is_empty(), "the origin saw bytes");
}

/// The control: the same trickle naming the CONNECT host goes through whole.
#[tokio::test]
async fn a_matching_hello_trickled_across_idle_sweeps_goes_through_whole() {
    let (proxy, got, first) = trickled_hello(KSN).await;
    let deadline = Instant::now() + WAIT;
    while got.lock().expect("got").len() < first.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*got.lock().expect("got"), first);
    assert!(proxy.audit.records().is_empty(), "the tunnel is still open");
}

/// The upstream says "bye" and half-closes; the client reads it and stays
/// silent. One direction is done and the other idle: the time-out must
/// still end the tunnel (on time, once, with exact counts).
#[tokio::test]
async fn a_tunnel_whose_upstream_half_closed_still_idles_out() {
    let origin = tcp_origin(|mut s| async move {
        let _ = s.write_all(b"bye").await;
        let _ = s.shutdown().await;
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let proxy = proxy(origin.port(), "[limits]\ntunnel_idle_timeout = \"1s\"\n").await;
    let mut s = open(&proxy, origin.port()).await;
    let started = Instant::now();
    let mut bye = [0u8; 3];
    tokio::time::timeout(WAIT, s.read_exact(&mut bye))
        .await
        .expect("bye in time")
        .expect("bye");
    assert_eq!(&bye, b"bye");
    let r = proxy.only_record().await;
    let took = started.elapsed();
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (0, 3), "{r:#?}");
    assert!(took >= Duration::from_millis(900), "ended after {took:?}");
    assert!(took < Duration::from_millis(3500), "ended after {took:?}");
}

/// Many short tunnels open and close (their idle slots freed and reused)
/// around one live tunnel: it keeps working while it has traffic, is not
/// ended early by a slot another tunnel left, and idles out on time once
/// quiet. One record each.
#[tokio::test]
async fn tunnels_closing_around_a_live_one_never_end_it_early() {
    let origin = echo_origin().await;
    let proxy = proxy(origin.port(), "[limits]\ntunnel_idle_timeout = \"2s\"\n").await;
    let mut live = open(&proxy, origin.port()).await;
    let mut churned = 0;
    let mut last = Instant::now();
    for round in 0..8 {
        let mut short = Vec::new();
        for _ in 0..4 {
            let mut s = open(&proxy, origin.port()).await;
            s.write_all(b"x").await.expect("write");
            short.push(s);
        }
        for mut s in short {
            let mut b = [0u8; 1];
            tokio::time::timeout(WAIT, s.read_exact(&mut b))
                .await
                .expect("echo in time")
                .expect("echo");
            if round % 2 == 0 {
                reset(s);
            } else {
                drop(s);
            }
            churned += 1;
        }
        live.write_all(b"tick").await.expect("live write");
        let mut b = [0u8; 4];
        tokio::time::timeout(WAIT, live.read_exact(&mut b))
            .await
            .expect("the live tunnel still echoes")
            .expect("live read");
        assert_eq!(&b, b"tick");
        last = Instant::now();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    read_to_end(&mut live).await;
    let quiet = last.elapsed();
    assert!(
        quiet >= Duration::from_millis(1900),
        "ended after {quiet:?}"
    );
    let recs = proxy.exactly(churned + 1).await;
    let timeouts: Vec<&Record> = recs
        .iter()
        .filter(|r| r.reason == Some(Reason::Timeout))
        .collect();
    assert_eq!(timeouts.len(), 1, "{recs:#?}");
    assert_eq!((timeouts[0].bytes_up, timeouts[0].bytes_down), (32, 32));
}

/// The hard cancel at the end of the drain ends every tunnel, whatever
/// state its relay is in: a checked side still silent, a hello half-read
/// by the gate, copying, and one direction done with the other silent.
/// Each gets one `shutdown` record with exact counts, and the drain ends.
#[tokio::test]
async fn shutdown_ends_tunnels_in_every_relay_state_with_one_record_each() {
    let echo = echo_origin().await;
    // Echoes, and keeps its side open after the client's EOF.
    let holding = tcp_origin(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let catalog = rule("Kaspersky KSN lookup", &[KSN], echo.port(), "bypass", "")
        + &rule("KSN held", &[KSN], holding.port(), "bypass", "");
    let (settings, dir) = load(&config(&[KSN], ""), &catalog);
    let mut settings = settings;
    settings.server.shutdown_grace = Duration::from_millis(500);
    let proxy = TestProxy::start_settings(settings, dir).await;
    let audit = proxy.audit.clone();

    // A checked side still silent.
    let mut silent = open(&proxy, echo.port()).await;
    // Half a hello in the gate.
    let mut half = open(&proxy, echo.port()).await;
    let first = client_hello(KSN);
    half.write_all(&first[..first.len() / 2])
        .await
        .expect("write");
    // Copying (non-TLS bytes, echoed).
    let mut copying = open(&proxy, echo.port()).await;
    copying.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, copying.read_exact(&mut b))
        .await
        .expect("echo in time")
        .expect("echo");
    // The client half-closed after its bytes: up done, down silent.
    let mut half_closed = open(&proxy, holding.port()).await;
    half_closed.write_all(b"abc").await.expect("write");
    tokio::time::timeout(WAIT, half_closed.read_exact(&mut [0u8; 3]))
        .await
        .expect("echo in time")
        .expect("echo");
    half_closed.shutdown().await.expect("half-close");
    // Let the gate read the half hello.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stopped = tokio::time::timeout(Duration::from_secs(8), proxy.stop()).await;
    assert!(stopped.is_ok(), "the drain did not end");
    for (what, s) in [
        ("silent", &mut silent),
        ("half hello", &mut half),
        ("copying", &mut copying),
        ("half closed", &mut half_closed),
    ] {
        let (_, ended) = read_until_close(s).await;
        assert!(ended.is_some(), "{what}: the tunnel stayed open");
    }
    let recs = audit.wait_for(WAIT, |r| r.len() >= 4).await;
    assert_eq!(recs.len(), 4, "{recs:#?}");
    let mut counts: Vec<(u64, u64)> = recs
        .iter()
        .map(|r| {
            assert_eq!(r.reason, Some(Reason::Shutdown), "{r:#?}");
            (r.bytes_up, r.bytes_down)
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [(0, 0), (0, 0), (3, 3), (4, 4)], "{recs:#?}");
}

/// CPU time (utime + stime, clock ticks) of the calling thread: a
/// `#[tokio::test]` runs its whole runtime, the proxy's tasks and the idle
/// sweeper included, on this one thread.
fn thread_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("thread stat");
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Idle tunnels, checked ones still silent and ones that have carried
/// bytes, cost no CPU: nothing wakes between armed seconds (a sweeper that
/// spun or a tunnel woken over and over would burn the whole wait).
#[tokio::test]
async fn idle_tunnels_cost_no_cpu() {
    let origin = echo_origin().await;
    let proxy = proxy(origin.port(), "").await;
    let mut tunnels = Vec::new();
    for i in 0..200 {
        let mut s = open(&proxy, origin.port()).await;
        if i % 2 == 0 {
            s.write_all(b"ping").await.expect("write");
            let mut b = [0u8; 4];
            tokio::time::timeout(WAIT, s.read_exact(&mut b))
                .await
                .expect("echo in time")
                .expect("echo");
        }
        tunnels.push(s);
    }
    // Settle (the connections' own work done), then measure a quiet span
    // that crosses armed seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = thread_ticks();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let spent = thread_ticks() - before;
    assert!(
        spent <= 5,
        "{spent} ticks of CPU over 2.5 s with 200 idle tunnels"
    );
    assert!(
        proxy.audit.records().is_empty(),
        "every tunnel is still open"
    );
    drop(tunnels);
}

/// A client that never reads while the upstream floods it: the tunnel
/// holds at most a bounded backlog (a copy's scratch-sized remainder, or a
/// splice pipe), stops reading the upstream, and since nothing moves any
/// more it idles out like a silent one.
#[tokio::test]
async fn a_client_that_never_reads_a_flood_is_timed_out_with_a_bounded_backlog() {
    let origin = tcp_origin(|mut s| async move {
        let block = vec![0x5au8; 64 * 1024];
        while s.write_all(&block).await.is_ok() {}
    })
    .await;
    let proxy = proxy(origin.port(), "[limits]\ntunnel_idle_timeout = \"1s\"\n").await;
    let s = open(&proxy, origin.port()).await;
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(64 * 1024);
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    // Socket buffers on both sides plus what the proxy holds: a few MB at
    // most, never the endless flood.
    assert!(r.bytes_down < 32 * 1024 * 1024, "{r:#?}");
    drop(s);
}
