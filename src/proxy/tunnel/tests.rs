use super::*;

/// An idle tunnel's memory is mostly this future (its task), so its size
/// is watched: 536 bytes in a test build with rustc 1.95 and the locked
/// tokio (1,352 with a timer and a cancellation waiter of its own and a
/// `select!` over async directions); a copy buffer or the splice state
/// inlined by mistake would add kilobytes.
#[tokio::test]
async fn an_idle_tunnel_future_stays_small() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    let t = Tunnel {
        upstream: b,
        check: None,
        idle: Duration::from_secs(1),
        idler: Idler::new(tokio_util::sync::CancellationToken::new()),
        splicer: Splicer::new(1, Counter::default()),
    };
    let fut = run(a, Bytes::new(), t);
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 640, "the tunnel future grew to {size} bytes");
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
    let (from, _) = a.split();
    let (_, to) = b.split();
    let count = AtomicU64::new(0);
    let clock = Clock {
        base: Instant::now(),
        last: AtomicU64::new(0),
    };
    let mut dir = Dir {
        from,
        from_side: Side::Upstream,
        to,
        to_side: Side::Client,
        count: &count,
        clock: &clock,
    };
    let signal = gate::RetrySignal::default();
    let fut = gate::watch_first(&mut dir, &signal);
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 256, "the watch future grew to {size} bytes");
}
