//! Upstream connections kept across inspected tunnels: what is shared, and
//! what never is.
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::inspect::{client_trusting_ca, inspecting_config_with, start_in, HOST};
use crate::support::*;

/// An origin counting its connections: each serves requests (GET, no body)
/// until the proxy closes it, or until it idles `idle_close` between
/// requests.
///
/// Paths: `/` 200 "ok"; `/ntlm`, `/negotiate`, `/basic` a 401 asking for
/// that scheme; `/slow` a 1 MB body written 1 KB per 20 ms; `/who` 200 with
/// the connection's number as the body.
async fn keep_origin(idle_close: Option<Duration>) -> CountingOrigin {
    CountingOrigin::start(&[HOST], move |mut tls, n| async move {
        serve(&mut tls, n, idle_close).await;
        let _ = tls.shutdown().await;
    })
    .await
}

async fn serve<S>(s: &mut S, n: usize, idle_close: Option<Duration>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let head = match idle_close {
            Some(d) => match tokio::time::timeout(d, next_head(s, &mut buf)).await {
                Ok(h) => h,
                Err(_) => return,
            },
            None => next_head(s, &mut buf).await,
        };
        let Some(head) = head else { return };
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let resp = match path.as_str() {
            "/ntlm" => "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: NTLM\r\ncontent-length: 0\r\n\r\n".to_string(),
            "/negotiate" => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: negotiate\r\ncontent-length: 0\r\n\r\n".to_string(),
            "/basic" => "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"x\"\r\ncontent-length: 0\r\n\r\n".to_string(),
            "/who" => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{n}", n.to_string().len()),
            "/slow" => {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..1000 {
                    if s.write_all(&[b'x'; 1000]).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
            _ => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
        };
        if s.write_all(resp.as_bytes()).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// The next request head (GET, no body), or None at EOF.
async fn next_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

async fn kept_proxy(origin: &CountingOrigin, limits: &str) -> TestProxy {
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        "",
        origin.addr.port(),
        limits,
    );
    start_in(dir, &cfg, &catalog).await
}

fn url(origin: &CountingOrigin, path: &str) -> String {
    format!("https://{HOST}:{}{path}", origin.addr.port())
}

fn tunnels(recs: &[Record]) -> usize {
    recs.iter().filter(|r| r.url.is_none()).count()
}

/// One inspected tunnel with one request, ended (its record written, so its
/// upstream connection went back to the pool if it could).
async fn one_tunnel(proxy: &TestProxy, origin: &CountingOrigin, path: &str) -> (u16, String) {
    let before = tunnels(&proxy.audit.records());
    let client = client_trusting_ca(proxy);
    let resp = client
        .get(url(origin, path))
        .send()
        .await
        .expect("inspected request");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    drop(client);
    proxy.audit.wait_for(WAIT, |r| tunnels(r) > before).await;
    (status, body)
}

#[tokio::test]
async fn the_next_inspected_tunnel_to_a_host_reuses_the_last_ones_upstream_connection() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "").await;
    for _ in 0..3 {
        assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "1".into()));
    }
    assert_eq!(
        origin.accepted(),
        1,
        "one upstream connection for three tunnels"
    );
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 2);
    let recs = proxy.audit.records();
    assert_eq!(
        recs.len(),
        6,
        "a record per tunnel and per request: {recs:#?}"
    );
    for r in &recs {
        assert_eq!(r.decision, Decided::Inspect);
        assert_eq!(
            r.upstream,
            Some(origin.addr),
            "upstream on every record: {r:#?}"
        );
        assert_eq!(r.status, Some(200));
    }
}

#[tokio::test]
async fn tunnels_at_once_each_get_a_connection_and_later_ones_reuse_them() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "").await;
    // Two tunnels open at once: two connections (one request each in flight).
    let a = client_trusting_ca(&proxy);
    let b = client_trusting_ca(&proxy);
    let (ra, rb) = tokio::join!(
        a.get(url(&origin, "/who")).send(),
        b.get(url(&origin, "/who")).send()
    );
    let mut seen = vec![
        ra.expect("a").text().await.expect("a body"),
        rb.expect("b").text().await.expect("b body"),
    ];
    seen.sort();
    assert_eq!(seen, ["1", "2"]);
    drop((a, b));
    proxy.audit.wait_for(WAIT, |r| tunnels(r) == 2).await;
    // Both went back: two more tunnels at once make no new connection.
    let a = client_trusting_ca(&proxy);
    let b = client_trusting_ca(&proxy);
    let (ra, rb) = tokio::join!(
        a.get(url(&origin, "/who")).send(),
        b.get(url(&origin, "/who")).send()
    );
    assert_eq!(ra.expect("a").status(), 200);
    assert_eq!(rb.expect("b").status(), 200);
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_tunnel_that_leaves_mid_response_does_not_hand_its_connection_on() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "").await;
    let client = client_trusting_ca(&proxy);
    let resp = client
        .get(url(&origin, "/slow"))
        .send()
        .await
        .expect("slow head");
    assert_eq!(resp.status(), 200);
    // Read a little of the million bytes, then leave.
    let mut resp = resp;
    let first = resp.chunk().await.expect("a chunk");
    assert!(first.is_some());
    drop(resp);
    drop(client);
    proxy.audit.wait_for(WAIT, |r| tunnels(r) == 1).await;
    // The next tunnel gets its own answer on a new connection, never the
    // rest of the first one's body.
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "2".into()));
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_connection_that_carried_ntlm_or_negotiate_stays_with_its_tunnel() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "").await;
    // The origin asks for a connection-bound login: not handed on.
    assert_eq!(one_tunnel(&proxy, &origin, "/ntlm").await.0, 401);
    assert_eq!(one_tunnel(&proxy, &origin, "/negotiate").await.0, 401);
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "3".into()));
    // A client sending one on its own: the same.
    let before = tunnels(&proxy.audit.records());
    let client = client_trusting_ca(&proxy);
    let resp = client
        .get(url(&origin, "/"))
        .header(
            "authorization",
            "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
        )
        .send()
        .await
        .expect("ntlm request");
    assert_eq!(resp.status(), 200);
    drop(client);
    proxy.audit.wait_for(WAIT, |r| tunnels(r) > before).await;
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "4".into()));
    // A per-request scheme (Basic) does not tie the connection: reused.
    assert_eq!(one_tunnel(&proxy, &origin, "/basic").await.0, 401);
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "4".into()));
    assert_eq!(origin.accepted(), 4);
}

#[tokio::test]
async fn a_kept_connection_the_origin_closed_is_not_handed_out() {
    let origin = keep_origin(Some(Duration::from_millis(300))).await;
    let proxy = kept_proxy(&origin, "").await;
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "1".into()));
    // The origin closes it.
    origin.wait_closed(1).await;
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "2".into()));
    let recs = proxy.audit.records();
    assert!(recs.iter().all(|r| r.status == Some(200)), "{recs:#?}");
}

#[tokio::test]
async fn a_request_after_the_origin_closed_the_tunnels_connection_goes_on_a_new_one() {
    let origin = keep_origin(Some(Duration::from_millis(300))).await;
    let proxy = kept_proxy(&origin, "").await;
    let client = client_trusting_ca(&proxy);
    let first = client
        .get(url(&origin, "/who"))
        .send()
        .await
        .expect("first");
    assert_eq!(first.text().await.expect("body"), "1");
    // The origin closes it.
    origin.wait_closed(1).await;
    // Same tunnel (the client keeps it), the upstream gone: dialled again.
    let second = client
        .get(url(&origin, "/who"))
        .send()
        .await
        .expect("second");
    assert_eq!(second.status(), 200);
    assert_eq!(second.text().await.expect("body"), "2");
    drop(client);
    let recs = proxy.audit.wait_for(WAIT, |r| tunnels(r) == 1).await;
    assert_eq!(recs.len(), 3, "one tunnel, two requests: {recs:#?}");
    assert_eq!(tunnels(&recs), 1, "the client kept one tunnel: {recs:#?}");
    for r in &recs {
        assert_eq!(r.status, Some(200), "{r:#?}");
        assert_eq!(r.upstream, Some(origin.addr));
        assert_ne!(r.reason, Some(Reason::UpstreamReset));
    }
}

#[tokio::test]
async fn kept_connections_close_once_idle_past_the_time_out() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "[limits]\nupstream_idle_timeout = \"1s\"\n").await;
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await.0, 200);
    assert_eq!(origin.closed(), 0, "kept open for the next tunnel");
    // Closed by the proxy within the time-out and half of it.
    origin.wait_closed(1).await;
    // A later tunnel makes a new one.
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "2".into()));
}

#[tokio::test]
async fn upstream_idle_timeout_zero_keeps_none() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "[limits]\nupstream_idle_timeout = \"0s\"\n").await;
    for n in 1..=3 {
        assert_eq!(
            one_tunnel(&proxy, &origin, "/who").await,
            (200, n.to_string())
        );
    }
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 0);
    // Each closed with its tunnel.
    origin.wait_closed(3).await;
}

#[tokio::test]
async fn a_reload_starts_with_no_kept_connection_and_closes_the_old_ones() {
    let origin = keep_origin(None).await;
    let proxy = kept_proxy(&origin, "").await;
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "1".into()));
    let path = proxy.dir.path().join("egress-proxy.toml");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");
    // Under the new snapshot (its rules might vet another way): a new one.
    assert_eq!(one_tunnel(&proxy, &origin, "/who").await, (200, "2".into()));
    // The old snapshot's kept connection closes with it.
    origin.wait_closed(1).await;
}

/// A client from `src` that trusts only the proxy's CA.
fn client_from(proxy: &TestProxy, src: &str) -> reqwest::Client {
    crypto();
    let pem = std::fs::read(proxy.dir.path().join("certs/ca.pem")).expect("ca.pem");
    let ca = reqwest::Certificate::from_pem(&pem).expect("ca");
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy"))
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .local_address(src.parse::<std::net::IpAddr>().expect("ip"))
        .timeout(WAIT)
        .build()
        .expect("client")
}

#[tokio::test]
async fn a_connection_made_under_one_rule_is_never_handed_to_a_tunnel_under_another() {
    let origin = keep_origin(None).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, _) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        "",
        origin.addr.port(),
        "[clients.groups]\nweb = [\"127.0.0.2/32\"]\n",
    );
    // The same host under two rules: the web group's first, everyone's after.
    let port = origin.addr.port();
    let catalog = rule("web", &[HOST], port, "allow", "clients = [\"web\"]")
        + &rule("everyone", &[HOST], port, "allow", "");
    let proxy = start_in(dir, &cfg, &catalog).await;
    let mut seen = Vec::new();
    for src in ["127.0.0.2", "127.0.0.1", "127.0.0.2", "127.0.0.1"] {
        let before = tunnels(&proxy.audit.records());
        let client = client_from(&proxy, src);
        let resp = client
            .get(url(&origin, "/who"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        seen.push(resp.text().await.expect("body"));
        drop(client);
        proxy.audit.wait_for(WAIT, |r| tunnels(r) > before).await;
    }
    assert_eq!(
        seen,
        ["1", "2", "1", "2"],
        "each rule's tunnels keep to their own connection"
    );
    for r in proxy.audit.records() {
        let want = if r.client.ip().to_string() == "127.0.0.2" {
            "web"
        } else {
            "everyone"
        };
        assert_eq!(r.rule.as_deref(), Some(want), "{r:#?}");
    }
}
