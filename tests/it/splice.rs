//! Bulk tunnels: past `SPLICE_AFTER` bytes a direction moves on to
//! splice(2) through a pipe of its own. The bytes, their counts, half-close,
//! resets, the idle time-out and the pipe budget (`server.splice_pipes`)
//! must all behave exactly as on the copying path; the
//! `egress_tunnel_splices_total` counter shows which path ran.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use egress_proxy::audit::{Reason, Record};
use egress_proxy::proxy::tunnel::SPLICE_AFTER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::support::*;

const KSN: &str = "ksn1.kaspersky-labs.com";

/// A bypass rule for the KSN name on `ports`.
fn catalog(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "[[rule]]\nname = \"Kaspersky KSN lookup\"\nhosts = [\"{KSN}\"]\nports = [{}]\naction = \"bypass\"\n",
        ports.join(", ")
    )
}

/// A proxy for `origin`, with `server.splice_pipes` set when given.
async fn proxy(origin: SocketAddr, pipes: Option<usize>, extra: &str) -> TestProxy {
    proxy_for(&[origin.port()], pipes, extra).await
}

async fn proxy_for(ports: &[u16], pipes: Option<usize>, extra: &str) -> TestProxy {
    let (mut settings, dir) = load(&config(&[KSN], extra), &catalog(ports));
    settings.server.splice_pipes = pipes;
    TestProxy::start_settings(settings, dir).await
}

async fn open(proxy: &TestProxy, port: u16) -> TcpStream {
    open_tunnel(proxy.addr, &format!("{KSN}:{port}")).await
}

/// `egress_tunnel_splices_total` from the admin listener.
async fn splices(proxy: &TestProxy) -> u64 {
    proxy.metric("egress_tunnel_splices_total").await
}

fn assert_clean(r: &Record, up: u64, down: u64) {
    assert_eq!(r.reason, None, "a clean close has no reason: {r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (up, down), "{r:#?}");
}

#[tokio::test]
async fn bulk_both_ways_is_spliced_and_counted_exactly() {
    const TOTAL: usize = 8 * 1024 * 1024 + 13;
    let origin = echo_origin().await;
    let proxy = proxy(origin, None, "").await;
    assert_eq!(splices(&proxy).await, 0);
    let s = open(&proxy, origin.port()).await;
    echo_through(s, TOTAL).await;
    let r = proxy.only_record().await;
    assert_clean(&r, TOTAL as u64, TOTAL as u64);
    assert_eq!(splices(&proxy).await, 2, "both directions went bulk");
}

#[tokio::test]
async fn a_small_exchange_never_takes_a_pipe() {
    let origin = echo_origin().await;
    let proxy = proxy(origin, None, "").await;
    let s = open(&proxy, origin.port()).await;
    let small = usize::try_from(SPLICE_AFTER).expect("fits") - 1;
    echo_through(s, small).await;
    let r = proxy.only_record().await;
    assert_clean(&r, small as u64, small as u64);
    assert_eq!(splices(&proxy).await, 0);
}

#[tokio::test]
async fn no_pipes_means_copying_with_the_same_result() {
    const TOTAL: usize = 4 * 1024 * 1024 + 5;
    let origin = echo_origin().await;
    let proxy = proxy(origin, Some(0), "").await;
    let s = open(&proxy, origin.port()).await;
    echo_through(s, TOTAL).await;
    let r = proxy.only_record().await;
    assert_clean(&r, TOTAL as u64, TOTAL as u64);
    assert_eq!(splices(&proxy).await, 0, "splice_pipes = 0 never splices");
}

/// An origin that streams the pattern until told to stop, then resets;
/// `sent` counts what it wrote.
async fn streaming_origin(stop: Arc<Notify>, sent: Arc<AtomicU64>) -> SocketAddr {
    tcp_origin(move |mut s| {
        let stop = Arc::clone(&stop);
        let sent = Arc::clone(&sent);
        async move {
            let block: Vec<u8> = (0..251 * 64).map(pattern).collect();
            loop {
                tokio::select! {
                    r = s.write_all(&block) => {
                        if r.is_err() { return; }
                        sent.fetch_add(block.len() as u64, Ordering::SeqCst);
                    }
                    () = stop.notified() => break,
                }
            }
            reset(s);
        }
    })
    .await
}

/// Read from `s` until `n` bytes have arrived.
async fn read_at_least(s: &mut TcpStream, n: usize) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        let k = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("bytes keep coming")
            .expect("read");
        assert!(k > 0, "the tunnel closed early");
        got += k;
    }
    got
}

#[tokio::test]
async fn an_upstream_reset_mid_splice_is_recorded() {
    let stop = Arc::new(Notify::new());
    let sent = Arc::new(AtomicU64::new(0));
    let origin = streaming_origin(Arc::clone(&stop), Arc::clone(&sent)).await;
    let proxy = proxy(origin, None, "").await;
    let mut s = open(&proxy, origin.port()).await;
    let mut got = read_at_least(&mut s, 2 * 1024 * 1024).await;
    assert_eq!(splices(&proxy).await, 1, "the download went bulk");
    stop.notify_one();
    let (rest, ended) = read_until_close(&mut s).await;
    got += rest.len();
    assert!(ended.is_some(), "the client sees the tunnel end");
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::UpstreamReset), "{r:#?}");
    assert!(
        // A write cut short by the stop may have been partly read.
        r.bytes_down >= got as u64 && r.bytes_down <= sent.load(Ordering::SeqCst) + 251 * 64,
        "down {} between what the client got ({got}) and what the origin sent ({}): {r:#?}",
        r.bytes_down,
        sent.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_client_gone_mid_splice_is_recorded() {
    let stop = Arc::new(Notify::new());
    let sent = Arc::new(AtomicU64::new(0));
    let origin = streaming_origin(stop, sent).await;
    let proxy = proxy(origin, None, "").await;
    let mut s = open(&proxy, origin.port()).await;
    read_at_least(&mut s, 2 * 1024 * 1024).await;
    assert_eq!(splices(&proxy).await, 1, "the download went bulk");
    reset(s);
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::ClientClosed), "{r:#?}");
    assert!(r.bytes_down >= 2 * 1024 * 1024, "{r:#?}");
}

#[tokio::test]
async fn a_spliced_tunnel_that_goes_quiet_times_out() {
    const TOTAL: usize = 1024 * 1024;
    let origin = echo_origin().await;
    let proxy = proxy(origin, None, "[limits]\ntunnel_idle_timeout = \"1s\"\n").await;
    let mut s = open(&proxy, origin.port()).await;
    let block: Vec<u8> = (0..TOTAL).map(pattern).collect();
    let (mut rd, mut wr) = s.split();
    let (w, got) = tokio::join!(wr.write_all(&block), async {
        let mut back = vec![0u8; TOTAL];
        rd.read_exact(&mut back).await.map(|_| back)
    });
    w.expect("write");
    assert_eq!(got.expect("echoed"), block);
    assert_eq!(splices(&proxy).await, 2, "both directions went bulk");
    // Now silence, with the tunnel open: the idle time-out ends it.
    let (_, ended) = read_until_close(&mut s).await;
    assert!(ended.is_some(), "the proxy closes the quiet tunnel");
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (TOTAL as u64, TOTAL as u64));
}

#[tokio::test]
async fn a_spent_budget_leaves_the_rest_copying() {
    const TOTAL: usize = 4 * 1024 * 1024 + 1;
    let stop = Arc::new(Notify::new());
    let stream = streaming_origin(stop, Arc::new(AtomicU64::new(0))).await;
    let echo = echo_origin().await;
    let proxy = proxy_for(&[stream.port(), echo.port()], Some(1), "").await;
    // A download holds the one pipe while it runs...
    let mut download = open(&proxy, stream.port()).await;
    read_at_least(&mut download, 2 * 1024 * 1024).await;
    assert_eq!(splices(&proxy).await, 1);
    // ...so another bulk tunnel copies, byte-exact.
    let copied = open(&proxy, echo.port()).await;
    echo_through(copied, TOTAL).await;
    let r = proxy.only_record().await;
    assert_clean(&r, TOTAL as u64, TOTAL as u64);
    assert_eq!(
        splices(&proxy).await,
        1,
        "no second pipe under a budget of one"
    );
    // The pipe comes back with its tunnel: the next bulk tunnel gets it.
    reset(download);
    proxy.records(2).await;
    let spliced = open(&proxy, echo.port()).await;
    echo_through(spliced, TOTAL).await;
    // One direction or both (the second after the first gave the pipe back).
    assert!(splices(&proxy).await >= 2, "the freed pipe is used again");
    let records = proxy.exactly(3).await;
    assert_clean(&records[2], TOTAL as u64, TOTAL as u64);
}
