//! Egress through an `https://` parent: TLS to the parent, verified for
//! its name against `[tls] extra_roots`, tested against Debian's Squid
//! listening with `https_port` (a certificate for `localhost` made here).
//! Tunnels through it run on a socket pair the proxy relays through the TLS
//! session: bulk transfers (spliced past their threshold), the SNI check
//! and inspection are exercised through it.
use std::path::Path;
use std::sync::Arc;

use egress_proxy::audit::{Decided, Reason};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::parent::{
    echo_back, get, inspected_request_through, Squid, FRONT, ORIGIN, PRIVATE, TLS as TLS_NAME,
};
use crate::support::*;

/// A proxy whose parent is the TLS `squid`, trusting `roots` (a PEM path).
async fn proxy(
    squid: &Squid,
    roots: Option<&Path>,
    upstream: &str,
    statics: &[(&str, &str)],
    catalog: &str,
) -> TestProxy {
    let tls = roots
        .map(|p| format!("[tls]\nextra_roots = [\"{}\"]\n", p.display()))
        .unwrap_or_default();
    let extra = format!(
        "[upstream]\nparent = \"{}\"\n{upstream}\n\n{tls}",
        squid.url()
    );
    let cfg = config_with(&ConfigOpts {
        statics,
        allow_private: &["127.0.0.0/8"],
        extra: &extra,
        ..ConfigOpts::default()
    });
    TestProxy::start(&cfg, catalog).await
}

/// A TLS Squid and the PEM file that trusts it.
fn tls_squid() -> Option<(Squid, TestCert, tempfile::TempDir)> {
    let cert = self_signed(&["localhost"]);
    let squid = Squid::start_tls(false, Some(&cert))?;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("parent.pem"), &cert.cert_pem).expect("write");
    Some((squid, cert, dir))
}

#[tokio::test]
async fn plain_requests_and_tunnels_go_through_an_https_parent() {
    let Some((squid, _cert, roots)) = tls_squid() else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let catalog = rule("web", &[ORIGIN], origin.port(), "allow", "")
        + &rule("echo", &[ORIGIN], echo.port(), "bypass", "");
    let p = proxy(
        &squid,
        Some(&roots.path().join("parent.pem")),
        "",
        &[],
        &catalog,
    )
    .await;

    let resp = get(p.addr, ORIGIN, origin.port(), "/a?b=1").await;
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert_eq!(resp.body_text(), "hello");
    squid
        .logged(&format!("GET http://{ORIGIN}:{}/a", origin.port()))
        .await;

    // Bulk both ways: past the splice threshold, through the socket pair.
    let s = open_tunnel(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    echo_back(s, 1_000_000).await;
    squid
        .logged(&format!("CONNECT {ORIGIN}:{}", echo.port()))
        .await;

    let recs = p.exactly(2).await;
    for r in &recs {
        assert_eq!((r.status, r.reason), (Some(200), None), "{r:#?}");
        assert_eq!(
            r.upstream,
            Some(squid.addr),
            "upstream names the parent: {r:#?}"
        );
        assert_eq!(r.parent_status, Some(200), "{r:#?}");
    }
    assert_eq!(
        (recs[1].bytes_up, recs[1].bytes_down),
        (1_000_000, 1_000_000)
    );
}

#[tokio::test]
async fn an_https_parent_whose_certificate_is_not_trusted_is_never_talked_to() {
    let Some((squid, _cert, _roots)) = tls_squid() else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let catalog = rule("web", &[ORIGIN], origin.port(), "allow", "")
        + &rule("echo", &[ORIGIN], echo.port(), "bypass", "");
    // No extra roots: the self-signed parent does not verify.
    let p = proxy(&squid, None, "", &[], &catalog).await;
    let resp = get(p.addr, ORIGIN, origin.port(), "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-egress-error"), Some("parent_unreachable"));
    let (status, _s) = connect(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    assert_eq!(status, 502, "no 200 before the parent's");
    for r in p.exactly(2).await {
        assert_eq!(r.reason, Some(Reason::ParentUnreachable), "{r:#?}");
        assert_eq!(r.parent_status, None, "{r:#?}");
    }
    assert!(origin.seen().is_empty());
    // Nothing reached Squid's HTTP layer: the handshake failed first.
    assert!(
        !squid.access_log().contains(ORIGIN),
        "{}",
        squid.access_log()
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_too() {
    let cert = self_signed(&["proxy.elsewhere.test"]);
    let Some(squid) = Squid::start_tls(false, Some(&cert)) else {
        return;
    };
    let roots = tempfile::tempdir().expect("dir");
    let pem = roots.path().join("parent.pem");
    std::fs::write(&pem, &cert.cert_pem).expect("write");
    let echo = echo_origin().await;
    let catalog = rule("echo", &[ORIGIN], echo.port(), "bypass", "");
    // Trusted, but issued for another name than the URL's `localhost`.
    let p = proxy(&squid, Some(&pem), "", &[], &catalog).await;
    let (status, _s) = connect(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    assert_eq!(status, 502);
    let r = p.only_record().await;
    assert_eq!(r.reason, Some(Reason::ParentUnreachable), "{r:#?}");
}

#[tokio::test]
async fn the_sni_check_and_local_resolution_work_through_an_https_parent() {
    let Some((squid, _cert, roots)) = tls_squid() else {
        return;
    };
    let origin = TlsOrigin::start(TLS_NAME).await;
    let web = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let catalog = rule("tls", &[TLS_NAME], origin.addr.port(), "bypass", "")
        + &rule("web", &[ORIGIN], web.port(), "allow", "")
        + &rule("echo", &[PRIVATE], echo.port(), "bypass", "");
    let statics = [
        (TLS_NAME, "127.0.0.1"),
        (ORIGIN, "127.0.0.1"),
        (PRIVATE, "10.1.2.3"),
    ];
    let p = proxy(
        &squid,
        Some(&roots.path().join("parent.pem")),
        "parent_resolve = \"local\"",
        &statics,
        &catalog,
    )
    .await;
    let connector = TlsConnector::from(Arc::new(origin.client_config()));
    let authority = format!("{TLS_NAME}:{}", origin.addr.port());

    // The right name: handshake and request through the bridged tunnel.
    let s = open_tunnel(p.addr, &authority).await;
    let name = ServerName::try_from(TLS_NAME.to_string()).expect("name");
    let mut tls = connector.connect(name, s).await.expect("handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).ends_with("tls hello"));
    squid
        .logged(&format!("CONNECT 127.0.0.1:{}", origin.addr.port()))
        .await;

    // A fronted name: refused inside the tunnel, never reaching the origin.
    let s = open_tunnel(p.addr, &authority).await;
    let front = ServerName::try_from(FRONT.to_string()).expect("name");
    assert!(connector.connect(front, s).await.is_err());
    let r = p.record_with(Reason::SniMismatch).await;
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.upstream, Some(squid.addr), "{r:#?}");
    assert_eq!(origin.snis.lock().expect("snis").len(), 1);

    // Plain HTTP inside a CONNECT to the vetted address, over TLS.
    let resp = get(p.addr, ORIGIN, web.port(), "/x").await;
    assert_eq!(resp.status, 200);
    squid
        .logged(&format!("CONNECT 127.0.0.1:{}", web.port()))
        .await;

    // A private answer is refused here; the parent never hears of it.
    let (status, _s) = connect(p.addr, &format!("{PRIVATE}:{}", echo.port())).await;
    assert_eq!(status, 403);
    p.record_with(Reason::PrivateAddress).await;
    assert!(!squid.access_log().contains("10.1.2.3"));
}

#[tokio::test]
async fn an_inspected_tunnel_goes_through_an_https_parent() {
    let Some((squid, cert, _roots)) = tls_squid() else {
        return;
    };
    inspected_request_through(&squid, Some(&cert.cert_pem)).await;
}
