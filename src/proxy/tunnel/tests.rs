use super::*;

/// An idle tunnel's memory is mostly this future (its task), so its size
/// is watched: 1,352 bytes with rustc 1.95 and the locked tokio; a copy
/// buffer or the splice state inlined by mistake would add kilobytes.
#[tokio::test]
async fn an_idle_tunnel_future_stays_small() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    let splicer = Splicer::new(1, Counter::default());
    let fut = run(
        a,
        Bytes::new(),
        b,
        None,
        Duration::from_secs(1),
        CancellationToken::new(),
        &splicer,
    );
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 1536, "the tunnel future grew to {size} bytes");
}

#[test]
fn the_pipe_budget_is_a_small_share_of_the_descriptors() {
    assert_eq!(pipe_budget(20_000), 256);
    assert_eq!(pipe_budget(1024), 32);
    assert_eq!(pipe_budget(100), 3);
}

/// A checked tunnel (every bypass rule's default) whose upstream is silent
/// waits in the boxed watch of the upstream's first record: that state
/// stays per idle tunnel, so it must hold no read buffer.
#[tokio::test]
async fn the_watch_of_a_silent_upstream_stays_small() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (mut b, _) = l.accept().await.unwrap();
    let (mut from, _) = a.split();
    let (_, mut to) = b.split();
    let (count, last) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut dir = Dir {
        from: &mut from,
        from_side: Side::Upstream,
        to: &mut to,
        to_side: Side::Client,
        count: &count,
        last: &last,
        base: Instant::now(),
    };
    let signal = gate::RetrySignal::default();
    let fut = gate::watch_first(&mut dir, &signal);
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 256, "the watch future grew to {size} bytes");
}
