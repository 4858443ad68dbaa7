//! PROXY protocol v1/v2 from a load balancer in front (issue 7): the carried
//! address is the client in records, ACLs and limits; a bad header is refused.
//! Only `server.proxy_protocol_from` (here 127.0.0.1) may send one; other
//! peers (here 127.0.0.2) are served as themselves, or refused if they try.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use egress_proxy::audit::{Decided, Reason};

use crate::support::*;

const UPDATE: &str = "repo.clearswift.net";
/// Resolves to loopback but is in no rule.
const STRANGER: &str = "example.com";

fn catalog(port: u16) -> String {
    format!("[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"{UPDATE}\"]\nports = [{port}]\naction = \"allow\"\n")
}

/// `proxy_protocol = true` from 127.0.0.1, clients from 203.0.113.0/24,
/// 10.0.0.0/24 and loopback, and `extra` sections.
async fn setup(extra: &str) -> (TestProxy, HttpOrigin) {
    let origin = HttpOrigin::start().await;
    let statics = [(UPDATE, "127.0.0.1"), (STRANGER, "127.0.0.1")];
    let cfg = config_with(&ConfigOpts {
        statics: &statics,
        allow_private: &["127.0.0.0/8"],
        clients: &["203.0.113.0/24", "10.0.0.0/24", "127.0.0.0/8"],
        server: "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]",
        extra,
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(origin.port())).await;
    (proxy, origin)
}

fn get(host: &str, port: u16) -> String {
    format!(
        "GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    )
}

fn v1(src: &str, src_port: u16) -> String {
    format!("PROXY TCP4 {src} 127.0.0.1 {src_port} 3128\r\n")
}

/// A v2 PROXY header for TCP over IPv4, built by hand: the 12-byte
/// signature, version/command, family/protocol, length, then 12 address bytes.
fn v2(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    assert_eq!(h.len(), 28);
    h
}

/// A v2 PROXY header for TCP over IPv6 (36 address bytes).
fn v2_tcp6(src: Ipv6Addr, src_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x21); // AF_INET6, STREAM
    h.extend_from_slice(&36u16.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&3128u16.to_be_bytes());
    h
}

/// A peer in `clients.allow` but not in `proxy_protocol_from`.
const UNTRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Send one write (header and request together) and parse the answer.
async fn send(proxy: SocketAddr, bytes: &[u8]) -> RawResponse {
    parse_response(&raw_bytes(proxy, bytes).await)
}

#[tokio::test]
async fn v1_header_sets_the_recorded_client() {
    let (proxy, origin) = setup("").await;
    let mut bytes = v1("203.0.113.9", 5555).into_bytes();
    bytes.extend_from_slice(get(STRANGER, origin.port()).as_bytes());
    let r = send(proxy.addr, &bytes).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(r.header("x-egress-error"), Some("not_in_catalog"));
    let recs = proxy.exactly(1).await;
    assert_eq!(
        recs[0].client,
        "203.0.113.9:5555".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(recs[0].reason, Some(Reason::NotInCatalog));
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn v1_header_then_an_allowed_request_reaches_the_origin_untouched() {
    let (proxy, origin) = setup("").await;
    let mut bytes = v1("203.0.113.10", 40000).into_bytes();
    bytes.extend_from_slice(get(UPDATE, origin.port()).as_bytes());
    let r = send(proxy.addr, &bytes).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body_text(), "hello");
    let recs = proxy.exactly(1).await;
    assert_eq!(
        recs[0].client,
        "203.0.113.10:40000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(recs[0].decision, Decided::Allow);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].uri, "/");
}

#[tokio::test]
async fn v2_header_sets_the_recorded_client() {
    let (proxy, origin) = setup("").await;
    let mut bytes = v2(
        Ipv4Addr::new(203, 0, 113, 9),
        5555,
        Ipv4Addr::LOCALHOST,
        3128,
    );
    bytes.extend_from_slice(get(STRANGER, origin.port()).as_bytes());
    let r = send(proxy.addr, &bytes).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(r.header("x-egress-error"), Some("not_in_catalog"));
    let recs = proxy.exactly(1).await;
    assert_eq!(
        recs[0].client,
        "203.0.113.9:5555".parse::<SocketAddr>().unwrap()
    );
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn v2_local_command_keeps_the_peer_address() {
    let (proxy, origin) = setup("").await;
    let mut bytes = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    bytes.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]); // version 2, LOCAL, UNSPEC, no addresses
    bytes.extend_from_slice(get(STRANGER, origin.port()).as_bytes());
    let r = send(proxy.addr, &bytes).await;
    assert_eq!(r.status, 403, "{}", r.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].client.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[tokio::test]
async fn a_carried_address_outside_clients_allow_is_refused() {
    let (proxy, origin) = setup("").await;
    for header in [
        v1("198.51.100.7", 5555).into_bytes(),
        v2(
            Ipv4Addr::new(198, 51, 100, 7),
            5555,
            Ipv4Addr::LOCALHOST,
            3128,
        ),
    ] {
        let mut bytes = header;
        bytes.extend_from_slice(get(UPDATE, origin.port()).as_bytes());
        let r = send(proxy.addr, &bytes).await;
        assert_eq!(r.status, 403, "{}", r.head);
        assert_eq!(r.header("x-egress-error"), Some("client_not_allowed"));
    }
    let recs = proxy.exactly(2).await;
    for r in &recs {
        assert_eq!(r.reason, Some(Reason::ClientNotAllowed));
        assert_eq!(r.status, Some(403));
        assert_eq!(r.client, "198.51.100.7:5555".parse::<SocketAddr>().unwrap());
    }
    assert!(
        origin.seen().is_empty(),
        "the origin never sees a refused client"
    );
}

#[tokio::test]
async fn a_garbage_or_missing_proxy_header_is_refused_before_any_request() {
    let (proxy, origin) = setup("").await;
    let request = get(UPDATE, origin.port());
    for header in [
        b"PROXY GARBAGE 1 2 3\r\n".to_vec(),
        b"PROXY TCP4 999.0.113.9 127.0.0.1 5555 3128\r\n".to_vec(),
        Vec::new(), // no header at all: the allowed request alone
    ] {
        let mut bytes = header;
        bytes.extend_from_slice(request.as_bytes());
        let r = send(proxy.addr, &bytes).await;
        assert_eq!(r.status, 400, "refused: {}", r.head);
        assert_eq!(r.header("x-egress-error"), Some("bad_request"));
    }
    let recs = proxy.exactly(3).await;
    for r in &recs {
        assert_eq!(r.reason, Some(Reason::BadRequest), "{r:#?}");
        assert_eq!(r.decision, Decided::Deny);
        assert_eq!(
            r.client.ip(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "no carried address to trust"
        );
    }
    assert!(origin.seen().is_empty(), "the origin never sees anything");
}

#[tokio::test]
async fn limits_key_on_the_carried_address() {
    let (proxy, origin) = setup("[rates]\nper_client_requests = \"1/m\"\n").await;
    let request = get(UPDATE, origin.port());
    let with = |src: &str| {
        let mut b = v1(src, 6000).into_bytes();
        b.extend_from_slice(request.as_bytes());
        b
    };
    assert_eq!(send(proxy.addr, &with("203.0.113.20")).await.status, 200);
    assert_eq!(
        send(proxy.addr, &with("203.0.113.21")).await.status,
        200,
        "another carried client"
    );
    let r = send(proxy.addr, &with("203.0.113.20")).await;
    assert_eq!(r.status, 429, "the same carried client again: {}", r.head);
    let recs = proxy.exactly(3).await;
    let limited = recs
        .iter()
        .find(|r| r.reason == Some(Reason::RateLimited))
        .unwrap_or_else(|| panic!("a rate_limited record: {recs:#?}"));
    assert_eq!(
        limited.client.ip(),
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20))
    );
}

#[tokio::test]
async fn a_proxy_header_from_a_peer_outside_proxy_protocol_from_is_refused() {
    let (proxy, origin) = setup("").await;
    for header in [
        v1("203.0.113.9", 5555).into_bytes(),
        v2(
            Ipv4Addr::new(203, 0, 113, 9),
            5555,
            Ipv4Addr::LOCALHOST,
            3128,
        ),
    ] {
        let mut bytes = header;
        bytes.extend_from_slice(get(UPDATE, origin.port()).as_bytes());
        let r = parse_response(&raw_bytes_from(UNTRUSTED, proxy.addr, &bytes).await);
        assert_eq!(r.status, 403, "{}", r.head);
        assert_eq!(r.header("x-egress-error"), Some("client_not_allowed"));
    }
    let recs = proxy.exactly(2).await;
    for r in &recs {
        assert_eq!(r.reason, Some(Reason::ClientNotAllowed), "{r:#?}");
        assert_eq!(r.client.ip(), UNTRUSTED, "recorded as the real peer");
    }
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_peer_outside_proxy_protocol_from_without_a_header_is_served_as_itself() {
    let (proxy, origin) = setup("").await;
    let bytes = get(UPDATE, origin.port());
    let r = parse_response(&raw_bytes_from(UNTRUSTED, proxy.addr, bytes.as_bytes()).await);
    assert_eq!(r.status, 200, "{}", r.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].client.ip(), UNTRUSTED);
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test]
async fn a_v4_mapped_claim_is_the_ipv4_client_in_records_acls_and_rates() {
    let (proxy, origin) = setup("[rates]\nper_client_requests = \"1/m\"\n").await;
    let request = get(UPDATE, origin.port());
    let mapped = |v4: Ipv4Addr| v4.to_ipv6_mapped();
    let mut first = v2_tcp6(mapped(Ipv4Addr::new(10, 0, 0, 5)), 7000);
    first.extend_from_slice(request.as_bytes());
    assert_eq!(send(proxy.addr, &first).await.status, 200);
    // The same client spelled as IPv4: the same rate-limit key.
    let mut again = v1("10.0.0.5", 7001).into_bytes();
    again.extend_from_slice(request.as_bytes());
    assert_eq!(send(proxy.addr, &again).await.status, 429);
    // Outside clients.allow however it is spelled.
    let mut outside = v2_tcp6(mapped(Ipv4Addr::new(198, 51, 100, 7)), 7002);
    outside.extend_from_slice(request.as_bytes());
    let r = send(proxy.addr, &outside).await;
    assert_eq!(r.header("x-egress-error"), Some("client_not_allowed"));
    let recs = proxy.exactly(3).await;
    let clients: Vec<SocketAddr> = recs.iter().map(|r| r.client).collect();
    for want in ["10.0.0.5:7000", "10.0.0.5:7001", "198.51.100.7:7002"] {
        let want: SocketAddr = want.parse().unwrap();
        assert!(clients.contains(&want), "{want} in {clients:?}");
    }
}
