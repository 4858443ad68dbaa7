use std::convert::Infallible;

use super::*;

/// A connection to an in-memory HTTP/1.1 server answering "ok"; `addr`
/// tells connections apart.
async fn conn(port: u16) -> Conn {
    let (a, b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            )))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(b), svc)
            .await;
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = match Conn::open(a, Some(addr)).await {
        Ok(c) => c,
        Err(r) => panic!("open: {r:?}"),
    };
    c.sender.ready().await.unwrap_or_else(|e| panic!("{e}"));
    c
}

/// A connection whose server end is gone.
async fn closed_conn() -> Conn {
    let (a, b) = tokio::io::duplex(1024);
    drop(b);
    let c = match Conn::open(a, None).await {
        Ok(c) => c,
        Err(r) => panic!("open: {r:?}"),
    };
    for _ in 0..100 {
        if c.sender.is_closed() {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("hyper never saw the close");
}

fn key(rule: Option<usize>, host: &str, port: u16) -> Key {
    Key {
        rule,
        target: Target {
            host: crate::target::Host::Name(host.into()),
            port,
        },
    }
}

fn pool() -> Pool {
    Pool::new(Duration::from_secs(30))
}

#[tokio::test]
async fn a_connection_goes_only_to_its_own_rule_host_and_port() {
    let p = pool();
    let mine = key(Some(1), "cls.sophosxl.net", 443);
    p.put(mine.clone(), conn(1).await);
    assert!(p.take(&key(Some(2), "cls.sophosxl.net", 443)).is_none());
    assert!(p.take(&key(None, "cls.sophosxl.net", 443)).is_none());
    assert!(p.take(&key(Some(1), "cls.sophosxl.net", 8443)).is_none());
    assert!(p.take(&key(Some(1), "sophosxl.net", 443)).is_none());
    assert_eq!(p.len(), 1);
    let taken = p.take(&mine).expect("its own key");
    assert!(taken.used, "a kept connection idled: it may be stale");
    assert!(p.is_empty());
    assert!(p.take(&mine).is_none(), "taken once");
}

#[tokio::test]
async fn the_newest_goes_first() {
    let p = pool();
    let k = key(None, "a.example", 443);
    p.put(k.clone(), conn(1).await);
    p.put(k.clone(), conn(2).await);
    assert_eq!(p.take(&k).and_then(|c| c.addr).map(|a| a.port()), Some(2));
    assert_eq!(p.take(&k).and_then(|c| c.addr).map(|a| a.port()), Some(1));
}

#[tokio::test]
async fn zero_keeps_none() {
    let p = Pool::new(Duration::ZERO);
    let k = key(None, "a.example", 443);
    p.put(k.clone(), conn(1).await);
    assert!(p.is_empty());
    assert!(p.take(&k).is_none());
}

#[tokio::test]
async fn closed_and_pinned_connections_are_not_kept() {
    let p = pool();
    let k = key(None, "a.example", 443);
    p.put(k.clone(), closed_conn().await);
    assert!(p.is_empty(), "closed: not kept");
    let mut pinned = conn(1).await;
    pinned.pinned = true;
    p.put(k.clone(), pinned);
    assert!(p.is_empty(), "pinned: not kept");
}

#[tokio::test]
async fn a_connection_closed_while_kept_is_not_handed_out() {
    let p = pool();
    let k = key(None, "a.example", 443);
    let (a, b) = tokio::io::duplex(1024);
    let mut c = match Conn::open(a, None).await {
        Ok(c) => c,
        Err(r) => panic!("open: {r:?}"),
    };
    c.sender.ready().await.unwrap_or_else(|e| panic!("{e}"));
    // Idle and open when kept; then the origin closes it.
    p.put(k.clone(), c);
    assert_eq!(p.len(), 1);
    drop(b);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(p.take(&k).is_none());
    assert!(p.is_empty(), "counted out");
}

#[tokio::test]
async fn bounded_per_key() {
    let p = pool();
    let k = key(None, "a.example", 443);
    for i in 0..=PER_KEY {
        p.put(k.clone(), conn(u16::try_from(i).unwrap_or(0)).await);
    }
    assert_eq!(p.len(), PER_KEY);
    p.put(key(None, "b.example", 443), conn(1).await);
    assert_eq!(p.len(), PER_KEY + 1, "another key has room");
}

#[tokio::test]
async fn bounded_in_all() {
    let p = pool();
    for i in 0..TOTAL + 3 {
        let host = format!("h{}.example", i / PER_KEY);
        p.put(key(None, &host, 443), conn(1).await);
    }
    assert_eq!(p.len(), TOTAL);
}

#[tokio::test]
async fn the_janitor_closes_what_idles_past_the_time_out_and_comes_back() {
    let p = Pool::new(Duration::from_millis(200));
    let k = key(None, "a.example", 443);
    for _ in 0..2 {
        p.put(k.clone(), conn(1).await);
        assert_eq!(p.len(), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(p.is_empty(), "expired by the janitor");
        assert!(!p.lock().janitor, "the janitor ended with the pool empty");
    }
}

#[tokio::test]
async fn the_janitor_ends_with_its_pool() {
    let p = Pool::new(Duration::from_millis(200));
    p.put(key(None, "a.example", 443), conn(1).await);
    let weak = Arc::downgrade(&p.inner);
    drop(p);
    assert!(
        weak.upgrade().is_none(),
        "only the pool held its connections"
    );
}

#[test]
fn connection_bound_schemes_pin_and_per_request_ones_do_not() {
    let pinned = |name: &str, value: &str| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            let mut c = conn(1).await;
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap_or(header::AUTHORIZATION),
                http::HeaderValue::from_str(value).unwrap_or(http::HeaderValue::from_static("")),
            );
            c.note_auth(&h);
            c.pinned
        })
    };
    assert!(pinned("authorization", "NTLM TlRMTVNTUAAB"));
    assert!(pinned("authorization", "Negotiate YIIG"));
    assert!(pinned("www-authenticate", "NTLM"));
    assert!(pinned("www-authenticate", "negotiate"));
    assert!(pinned("proxy-authorization", "ntlm abc"));
    assert!(pinned("proxy-authenticate", "Negotiate"));
    assert!(pinned("authorization", "Kerberos YIIG"));
    assert!(!pinned("authorization", "Basic dXNlcjpwYXNz"));
    assert!(pinned("www-authenticate", "Basic realm=\"x\", NTLM"));
    assert!(!pinned("www-authenticate", "Basic realm=\"ntlm\""));
    assert!(!pinned("authorization", "NTLMv2 abc"));
    assert!(!pinned("x-authorization", "NTLM abc"));
}
