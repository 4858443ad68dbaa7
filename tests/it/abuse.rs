//! Protocol abuse on the plain proxy port, over raw sockets: request
//! smuggling (Content-Length with Transfer-Encoding, conflicting lengths,
//! malformed or misplaced `chunked`, obs-fold, NUL), targets that hide or
//! bend the host (userinfo, empty host, CONNECT with a path, a bad or doubled
//! port, an absolute URI), pipelining behind a refusal, and bytes that are
//! not HTTP/1 at all (a TLS ClientHello, the HTTP/2 preface, random bytes).
//!
//! Every case checks, against an origin that keeps every byte it receives
//! ([`TapOrigin`]): the status DESIGN.md gives (hyper's bare 400 or a close
//! where hyper refuses while parsing), exactly one audit record with the
//! reason, that the origin never saw the request, and that the proxy still
//! serves a normal request afterwards.
//!
//! Origin-form, asterisk-form, `u:p@` userinfo, `http://:port/`, CONNECT
//! without a port and the port 0 / 70000 of an absolute URI are in
//! `refusals.rs::bad_request_targets`; these are the cases it does not have.

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

const REPO: &str = "repo.clearswift.net";
const RULE: &str = "Clearswift updates";
/// Mapped to 127.0.0.1 but in no rule.
const OTHER: &str = "example.com";

/// A recording origin and a proxy whose only rule allows it.
struct Bench {
    origin: TapOrigin,
    proxy: TestProxy,
}

impl Bench {
    async fn start() -> Bench {
        let origin = TapOrigin::start().await;
        let catalog = format!(
            "[[rule]]\nname = \"{RULE}\"\nhosts = [\"{REPO}\"]\nports = [{}]\naction = \"allow\"\n",
            origin.port()
        );
        let proxy = TestProxy::start(&config(&[REPO, OTHER], ""), &catalog).await;
        Bench { origin, proxy }
    }

    /// `repo.clearswift.net:<origin port>`.
    fn host(&self) -> String {
        format!("{REPO}:{}", self.origin.port())
    }

    /// Send `input` on a fresh connection and read until the proxy closes.
    /// Panics if it does not close within `WAIT`.
    async fn send(&self, what: &str, input: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(self.proxy.addr).await.expect("connect");
        s.write_all(input).await.expect("write");
        let (out, ended) = read_until_close(&mut s).await;
        assert!(
            ended.is_some(),
            "{what}: the proxy kept the connection open: {:?}",
            String::from_utf8_lossy(&out)
        );
        out
    }

    /// A normal request on a fresh connection still gets the origin's
    /// answer, and its record is the `n`th.
    async fn still_serves(&self, what: &str, n: usize) {
        let req = format!(
            "GET http://{0}/after HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            self.host()
        );
        let resp = parse_response(&self.send(what, req.as_bytes()).await);
        assert_eq!(resp.status, 200, "{what}: the next request: {}", resp.head);
        assert_eq!(resp.body_text(), "hello", "{what}");
        let recs = self.proxy.exactly(n).await;
        let last = &recs[n - 1];
        assert_eq!(
            (last.status, last.reason, last.decision),
            (Some(200), None, Decided::Allow),
            "{what}: {last:#?}"
        );
    }
}

/// The record id a proxy refusal body names (`id: <16 hex digits>`).
fn body_id(body: &str) -> Option<String> {
    let rest = &body[body.find("id: ")? + 4..];
    let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (id.len() == 16).then_some(id)
}

/// How a refusal reached the client.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// hyper's parser: a bare 400 without our header.
    Hyper,
    /// The proxy's own refusal: `X-Egress-Error`, a body with the record id.
    Proxy,
    /// Nothing: the connection was closed.
    Closed,
}

/// Check a `bad_request` refusal of the input `make` builds from the
/// bench's `host:port`: one response at most (400, either hyper's bare one
/// or the proxy's with `X-Egress-Error: bad_request` and the record id), or
/// a close when `may_close`; `Connection: close`; exactly one record,
/// `bad_request` 400 `deny`; nothing at the origin; and the proxy still
/// serves. Returns who answered.
async fn assert_bad_request(what: &str, may_close: bool, make: impl Fn(&str) -> Vec<u8>) -> Answer {
    let b = Bench::start().await;
    let input = make(&b.host());
    let out = b.send(what, &input).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let recs = b.proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(
        (r.status, r.reason, r.decision),
        (Some(400), Some(Reason::BadRequest), Decided::Deny),
        "{what}: {r:#?}"
    );
    let answer = if out.is_empty() {
        assert!(may_close, "{what}: closed without an answer");
        Answer::Closed
    } else {
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one response: {text}"
        );
        let resp = parse_response(&out);
        assert_eq!(resp.status, 400, "{what}: {text}");
        assert_eq!(resp.header("connection"), Some("close"), "{what}: {text}");
        match resp.header("x-egress-error") {
            None => {
                assert_eq!(resp.header("content-length"), Some("0"), "{what}: {text}");
                Answer::Hyper
            }
            Some(reason) => {
                assert_eq!(reason, "bad_request", "{what}: {text}");
                let id = body_id(&resp.body_text());
                assert_eq!(
                    id,
                    Some(r.id_string()),
                    "{what}: body names the record: {text}"
                );
                Answer::Proxy
            }
        }
    };
    b.origin.assert_untouched(what);
    b.still_serves(what, 2).await;
    answer
}

/// [`assert_bad_request`] for a text input with `{h}` standing for the
/// bench's `host:port`; no close without an answer.
async fn assert_bad_text(what: &str, template: &str) -> Answer {
    assert_bad_request(what, false, |h| template.replace("{h}", h).into_bytes()).await
}

// ================================================================ smuggling

/// The request of a CL.TE / TE.CL smuggling attempt: a chunked body of
/// `hello`, a Content-Length that would frame it differently, and a second
/// request (to an allowed URL) right behind it in the same write.
fn smuggling_attempt(host: &str, te_first: bool, content_length: usize) -> String {
    let (a, b) = (
        "Transfer-Encoding: chunked\r\n".to_string(),
        format!("Content-Length: {content_length}\r\n"),
    );
    let framing = if te_first { a + &b } else { b + &a };
    format!(
        "POST http://{host}/echo HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\
         5\r\nhello\r\n0\r\n\r\n\
         GET http://{host}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    )
}

/// RFC 9112 §6.1 lets a server handle a message with both headers by
/// Transfer-Encoding alone and close the connection after the response;
/// hyper does. The origin must then see one chunked request of 5 bytes and
/// no Content-Length, and the bytes behind it must never become a request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_framed_by_chunked_alone() {
    // Lengths that would (if used) cut the chunked body short, take the
    // smuggled request into the body, or read past the end.
    for te_first in [false, true] {
        for content_length in [0usize, 3, 6, 15 + 60, 100_000] {
            let what = format!("te_first={te_first} content-length={content_length}");
            let b = Bench::start().await;
            let input = smuggling_attempt(&b.host(), te_first, content_length);
            let mut s = TcpStream::connect(b.proxy.addr).await.expect("connect");
            s.write_all(input.as_bytes()).await.expect("write");
            let (out, ended) = read_until_close(&mut s).await;
            let text = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(
                ended,
                Some(true),
                "{what}: closed cleanly after the response: {text}"
            );
            assert_eq!(
                text.matches("HTTP/1.1 ").count(),
                1,
                "{what}: one response: {text}"
            );
            let resp = parse_response(&out);
            assert_eq!(resp.status, 200, "{what}: {text}");
            assert_eq!(
                resp.body_text(),
                "hello",
                "{what}: the echo of the chunked body"
            );
            assert_eq!(resp.header("connection"), Some("close"), "{what}: {text}");
            // Writing the next request on the closed connection goes nowhere.
            let late = format!(
                "GET http://{0}/late HTTP/1.1\r\nHost: {0}\r\n\r\n",
                b.host()
            );
            let _ = s.write_all(late.as_bytes()).await;

            let recs = b.proxy.exactly(1).await;
            let r = &recs[0];
            assert_eq!(
                (r.status, r.reason, r.decision, r.rule.as_deref()),
                (Some(200), None, Decided::Allow, Some(RULE)),
                "{what}: {r:#?}"
            );
            assert_eq!((r.bytes_up, r.bytes_down), (5, 5), "{what}: {r:#?}");
            assert!(
                r.url.as_deref().is_some_and(|u| u.ends_with("/echo")),
                "{what}: {r:#?}"
            );

            let seen = b.origin.seen();
            assert_eq!(
                seen.len(),
                1,
                "{what}: one request at the origin: {seen:#?}"
            );
            assert_eq!(
                (seen[0].method.as_str(), seen[0].uri.as_str()),
                ("POST", "/echo"),
                "{what}"
            );
            assert_eq!(seen[0].body_len, 5, "{what}: {seen:#?}");
            assert_eq!(seen[0].header("content-length"), None, "{what}: {seen:#?}");
            assert_eq!(
                seen[0].header("transfer-encoding"),
                Some("chunked"),
                "{what}: {seen:#?}"
            );
            let bytes = String::from_utf8_lossy(&b.origin.bytes()).into_owned();
            assert!(
                !bytes.contains("smuggled") && !bytes.contains("late"),
                "{what}: {bytes}"
            );
            assert_eq!(bytes.matches("HTTP/1.1").count(), 1, "{what}: {bytes}");
            assert_eq!(b.origin.accepts(), 1, "{what}");
            b.still_serves(&what, 2).await;
            let bytes = String::from_utf8_lossy(&b.origin.bytes()).into_owned();
            assert!(
                !bytes.contains("smuggled") && !bytes.contains("late"),
                "{what}: {bytes}"
            );
        }
    }
}

#[tokio::test]
async fn conflicting_or_malformed_content_lengths_are_refused() {
    for (what, lengths) in [
        (
            "two different lengths",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ),
        ("two lengths in one line", "Content-Length: 5, 6\r\n"),
        ("a signed length", "Content-Length: +5\r\n"),
        ("a negative length", "Content-Length: -1\r\n"),
        ("a hex length", "Content-Length: 0x5\r\n"),
        ("a length with a space inside", "Content-Length: 5 5\r\n"),
        (
            "a length past u64",
            "Content-Length: 99999999999999999999999\r\n",
        ),
    ] {
        let template = format!(
            "POST http://{{h}}/echo HTTP/1.1\r\nHost: {{h}}\r\n{lengths}\r\nhello!GET http://{{h}}/smuggled HTTP/1.1\r\n\r\n"
        );
        assert_bad_text(what, &template).await;
    }
}

#[tokio::test]
async fn obs_folded_headers_are_refused() {
    for (what, fold) in [
        ("folded with spaces", "X-A: a\r\n  b\r\n"),
        ("folded with a tab", "X-A: a\r\n\tb\r\n"),
        (
            "folded transfer-encoding",
            "Transfer-Encoding: identity\r\n chunked\r\n",
        ),
        ("a fold before the first header", " X-A: a\r\n"),
    ] {
        let template = format!("POST http://{{h}}/echo HTTP/1.1\r\nHost: {{h}}\r\n{fold}Content-Length: 5\r\n\r\nhello");
        assert_bad_text(what, &template).await;
    }
}

#[tokio::test]
async fn malformed_transfer_encoding_is_refused() {
    for (what, te, version) in [
        (
            "chunked not last",
            "Transfer-Encoding: chunked, identity\r\n",
            "1.1",
        ),
        (
            "gzip after chunked",
            "Transfer-Encoding: chunked, gzip\r\n",
            "1.1",
        ),
        ("xchunked", "Transfer-Encoding: xchunked\r\n", "1.1"),
        ("chunked-x", "Transfer-Encoding: chunked-x\r\n", "1.1"),
        (
            "quoted chunked",
            "Transfer-Encoding: \"chunked\"\r\n",
            "1.1",
        ),
        ("identity alone", "Transfer-Encoding: identity\r\n", "1.1"),
        (
            "a later line not chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            "1.1",
        ),
        (
            "a space before the colon",
            "Transfer-Encoding : chunked\r\n",
            "1.1",
        ),
        (
            "chunked in HTTP/1.0",
            "Transfer-Encoding: chunked\r\n",
            "1.0",
        ),
    ] {
        let template = format!(
            "POST http://{{h}}/echo HTTP/{version}\r\nHost: {{h}}\r\n{te}\r\n\
             5\r\nhello\r\n0\r\n\r\nGET http://{{h}}/smuggled HTTP/1.1\r\nHost: {{h}}\r\n\r\n"
        );
        assert_bad_text(what, &template).await;
    }
}

#[tokio::test]
async fn nul_in_the_head_is_refused() {
    for (what, make) in [
        (
            "in a header value",
            "GET http://{h}/ HTTP/1.1\r\nHost: {h}\r\nX-A: a\0b\r\n\r\n",
        ),
        (
            "in a header name",
            "GET http://{h}/ HTTP/1.1\r\nHost: {h}\r\nX-\0A: a\r\n\r\n",
        ),
        (
            "in the host header",
            "GET http://{h}/ HTTP/1.1\r\nHost: {h}\0.evil\r\n\r\n",
        ),
        (
            "in the path",
            "GET http://{h}/a\0b HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "in the authority",
            "GET http://{h}\0.evil/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "in the method",
            "G\0T http://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "in the version",
            "GET http://{h}/ HTTP/1.\0\r\nHost: {h}\r\n\r\n",
        ),
        (
            "in a CONNECT authority",
            "CONNECT {h}\0 HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
    ] {
        assert_bad_text(what, make).await;
    }
}

/// A chunked body whose framing breaks after the head was accepted (an
/// invalid chunk size): the head may already be on its way, but the origin
/// never gets a complete request, the client never gets a 200, there is
/// one record and the proxy keeps serving.
#[tokio::test]
async fn malformed_chunked_body_never_completes_at_the_origin() {
    for (what, body) in [
        ("an invalid first chunk size", "zz\r\nhello\r\n0\r\n\r\n"),
        (
            "an invalid second chunk size",
            "5\r\nhello\r\nqq\r\nworld\r\n0\r\n\r\n",
        ),
        (
            "a chunk size past u64",
            "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("chunk data longer than its size", "3\r\nhello\r\n0\r\n\r\n"),
    ] {
        let b = Bench::start().await;
        let h = b.host();
        let input = format!(
            "POST http://{h}/echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n{body}\
             GET http://{h}/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n"
        );
        let out = b.send(what, input.as_bytes()).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(text.matches("HTTP/1.1 ").count() <= 1, "{what}: {text}");
        let resp = parse_response(&out);
        assert_ne!(resp.status, 200, "{what}: {text}");
        let recs = b.proxy.exactly(1).await;
        assert_ne!(recs[0].status, Some(200), "{what}: {:#?}", recs[0]);
        assert!(recs[0].reason.is_some(), "{what}: {:#?}", recs[0]);
        let bytes = String::from_utf8_lossy(&b.origin.bytes()).into_owned();
        assert!(
            !bytes.contains("0\r\n\r\n"),
            "{what}: a complete body reached the origin: {bytes:?}"
        );
        assert!(!bytes.contains("smuggled"), "{what}: {bytes:?}");
        b.still_serves(what, 2).await;
    }
}

/// DESIGN.md: bad framing is a `bad_request` (400): recorded so, with the
/// body bytes that went upstream before the framing broke, and answered 400
/// when the answer can still be sent.
#[tokio::test]
async fn malformed_chunked_body_is_a_bad_request() {
    for (what, body, up) in [
        ("an invalid first chunk size", "zz\r\nhello\r\n0\r\n\r\n", 0),
        (
            "an invalid second chunk size",
            "5\r\nhello\r\nqq\r\nworld\r\n0\r\n\r\n",
            5,
        ),
        (
            "a chunk size past u64",
            "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            0,
        ),
    ] {
        let b = Bench::start().await;
        let h = b.host();
        let input = format!(
            "POST http://{h}/echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let out = b.send(what, input.as_bytes()).await;
        let resp = parse_response(&out);
        let recs = b.proxy.exactly(1).await;
        let r = &recs[0];
        assert_eq!(
            (r.status, r.reason, r.decision),
            (Some(400), Some(Reason::BadRequest), Decided::Deny),
            "{what}: {r:#?}"
        );
        assert_eq!(r.bytes_up, up, "{what}: {r:#?}");
        assert_eq!(resp.status, 400, "{what}: {}", resp.head);
        assert_eq!(
            resp.header("x-egress-error"),
            Some("bad_request"),
            "{what}: {}",
            resp.head
        );
        b.still_serves(what, 2).await;
    }
}

// ================================================================ targets

#[tokio::test]
async fn userinfo_is_refused_whatever_host_it_hides() {
    // `repo…@example.com` goes to example.com in a URL parser and to repo in
    // a naive split: neither may be contacted.
    for (what, make) in [
        (
            "allowed host as userinfo",
            "GET http://{h}@example.com/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "user only",
            "GET http://user@{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "empty userinfo",
            "GET http://@{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "percent-encoded @ in userinfo",
            "GET http://a%40b@{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "CONNECT with user",
            "CONNECT user@{h} HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "CONNECT hiding another host",
            "CONNECT {h}@example.com:443 HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
    ] {
        assert_bad_text(what, make).await;
    }
}

#[tokio::test]
async fn empty_hosts_are_refused() {
    for (what, make) in [
        ("http:///", "GET http:/// HTTP/1.1\r\nHost: {h}\r\n\r\n"),
        (
            "http:///path",
            "GET http:///{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        ("http://:/", "GET http://:/ HTTP/1.1\r\nHost: {h}\r\n\r\n"),
        (
            "CONNECT :port",
            "CONNECT :443 HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "CONNECT []:port",
            "CONNECT []:443 HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "a lone dot",
            "GET http://.:80/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
    ] {
        assert_bad_text(what, make).await;
    }
}

#[tokio::test]
async fn connect_targets_other_than_host_port_are_refused() {
    for (what, make) in [
        ("a path", "CONNECT {h}/x HTTP/1.1\r\n"),
        ("a bare slash", "CONNECT {h}/ HTTP/1.1\r\n"),
        ("a query", "CONNECT {h}?x HTTP/1.1\r\n"),
        ("a fragment", "CONNECT {h}#x HTTP/1.1\r\n"),
        ("port 0", "CONNECT repo.clearswift.net:0 HTTP/1.1\r\n"),
        (
            "port 70000",
            "CONNECT repo.clearswift.net:70000 HTTP/1.1\r\n",
        ),
        (
            "port 65536",
            "CONNECT repo.clearswift.net:65536 HTTP/1.1\r\n",
        ),
        ("a doubled port", "CONNECT {h}:443 HTTP/1.1\r\n"),
        ("an empty port", "CONNECT repo.clearswift.net: HTTP/1.1\r\n"),
        (
            "a signed port",
            "CONNECT repo.clearswift.net:+443 HTTP/1.1\r\n",
        ),
        (
            "a hex port",
            "CONNECT repo.clearswift.net:0x1bb HTTP/1.1\r\n",
        ),
        ("no port", "CONNECT repo.clearswift.net HTTP/1.1\r\n"),
        ("an asterisk", "CONNECT * HTTP/1.1\r\n"),
        ("origin-form", "CONNECT / HTTP/1.1\r\n"),
        (
            "an unbracketed IPv6 address",
            "CONNECT ::1:443 HTTP/1.1\r\n",
        ),
        ("an unclosed bracket", "CONNECT [::1:443 HTTP/1.1\r\n"),
    ] {
        assert_bad_text(what, &format!("{make}Host: {{h}}\r\n\r\n")).await;
    }
}

/// RFC 9110 §9.3.6: CONNECT takes the authority-form only. An absolute URI
/// (whatever its scheme) is a malformed target.
#[tokio::test]
async fn connect_with_an_absolute_uri_is_refused() {
    for (what, make) in [
        ("http scheme", "CONNECT http://{h}/ HTTP/1.1\r\n"),
        ("https scheme", "CONNECT https://{h}/ HTTP/1.1\r\n"),
        ("ftp scheme", "CONNECT ftp://{h} HTTP/1.1\r\n"),
    ] {
        assert_bad_text(what, &format!("{make}Host: {{h}}\r\n\r\n")).await;
    }
}

#[tokio::test]
async fn targets_that_are_not_absolute_http_uris_are_refused() {
    for (what, make) in [
        (
            "authority-form on GET",
            "GET {h} HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "a network-path reference",
            "GET //{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "asterisk-form on GET",
            "GET * HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "origin-form with an absolute-looking path",
            "GET /http://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        (
            "a scheme without slashes",
            "GET http:{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
        ("ws scheme", "GET ws://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n"),
        (
            "file scheme",
            "GET file:///etc/passwd HTTP/1.1\r\nHost: {h}\r\n\r\n",
        ),
    ] {
        assert_bad_text(what, make).await;
    }
}

// ================================================================ pipelining

/// Whatever refuses the first request (hyper's parser, the target check,
/// the policy, a refused CONNECT), the requests pipelined behind it in the
/// same write are never read: one answer, one record, a close, and nothing
/// at the origin.
#[tokio::test]
async fn pipelined_requests_behind_a_refusal_never_reach_the_origin() {
    for (what, first, reason, status) in [
        ("behind a parser refusal", "POST http://{h}/ HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", Reason::BadRequest, 400),
        ("behind a bad target", "GET http://u@{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n", Reason::BadRequest, 400),
        ("behind a policy refusal", "GET http://example.com/ HTTP/1.1\r\nHost: {h}\r\n\r\n", Reason::NotInCatalog, 403),
        ("behind a refused CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", Reason::NotInCatalog, 403),
        ("behind a refused POST with a body", "POST http://example.com/ HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\n\r\nhello", Reason::NotInCatalog, 403),
    ] {
        let b = Bench::start().await;
        let h = b.host();
        let behind = format!(
            "GET http://{h}/second HTTP/1.1\r\nHost: {h}\r\n\r\n\
             CONNECT {h} HTTP/1.1\r\nHost: {h}\r\n\r\n\
             GET http://{h}/third HTTP/1.1\r\nHost: {h}\r\n\r\n"
        );
        let input = format!("{}{behind}", first.replace("{h}", &h));
        let out = b.send(what, input.as_bytes()).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{what}: one answer: {text}");
        let resp = parse_response(&out);
        assert_eq!(resp.status, status, "{what}: {text}");
        let recs = b.proxy.exactly(1).await;
        assert_eq!(
            (recs[0].status, recs[0].reason, recs[0].decision),
            (Some(status), Some(reason), Decided::Deny),
            "{what}: {:#?}",
            recs[0]
        );
        b.origin.assert_untouched(what);
        b.still_serves(what, 2).await;
    }
}

/// An allowed request, a refused one and an allowed one pipelined on one
/// kept-alive connection: the first is served, the second refused, the
/// connection closed, and the third never forwarded.
#[tokio::test]
async fn a_refusal_in_the_middle_of_a_pipeline_ends_it() {
    let b = Bench::start().await;
    let h = b.host();
    let input = format!(
        "GET http://{h}/first HTTP/1.1\r\nHost: {h}\r\n\r\n\
         GET http://example.com/refused HTTP/1.1\r\nHost: example.com\r\n\r\n\
         GET http://{h}/third HTTP/1.1\r\nHost: {h}\r\n\r\n"
    );
    let out = b.send("pipeline", input.as_bytes()).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "two answers: {text}");
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("HTTP/1.1 403 "), "{text}");
    assert!(text.contains("x-egress-error: not_in_catalog"), "{text}");
    let recs = b.proxy.exactly(2).await;
    assert_eq!(
        (recs[0].status, recs[0].reason),
        (Some(200), None),
        "{:#?}",
        recs[0]
    );
    assert_eq!(
        (recs[1].status, recs[1].reason),
        (Some(403), Some(Reason::NotInCatalog)),
        "{:#?}",
        recs[1]
    );
    let uris: Vec<String> = b.origin.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(
        uris,
        ["/first"],
        "only the first request reached the origin"
    );
    let bytes = String::from_utf8_lossy(&b.origin.bytes()).into_owned();
    assert!(
        !bytes.contains("/third") && !bytes.contains("refused"),
        "{bytes}"
    );
}

// ================================================================ not HTTP/1

/// `n` bytes from xorshift64* seeded with `seed` (deterministic, no crate).
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A TLS ClientHello, the HTTP/2 preface and random bytes on the plain
/// proxy port: a 400 or a close, one `bad_request` record (written from
/// hyper's connection error), and the proxy keeps serving.
#[tokio::test]
async fn bytes_that_are_not_http1_get_400_or_a_close() {
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("a TLS ClientHello".into(), client_hello(REPO)),
        (
            "the HTTP/2 preface".into(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "the HTTP/2 preface and a SETTINGS frame".into(),
            [
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
                &[0, 0, 0, 4, 0, 0, 0, 0, 0],
            ]
            .concat(),
        ),
        ("an SSH banner".into(), b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("HTTP/0.9".into(), b"GET /\r\n".to_vec()),
    ];
    for seed in [1u64, 0xdead_beef, 0x1234_5678_9abc_def0] {
        cases.push((
            format!("4 KiB of random bytes (seed {seed:#x})"),
            random_bytes(seed, 4096),
        ));
    }
    for (what, input) in &cases {
        let answer = assert_bad_request(what, true, |_| input.clone()).await;
        assert_ne!(
            answer,
            Answer::Proxy,
            "{what}: hyper refuses these while parsing"
        );
    }
}

/// A parser refusal on a kept-alive connection after a served request: the
/// served request keeps its record, the refusal (recorded from the
/// connection error) gets its own, and nothing else is written.
#[tokio::test]
async fn a_parser_refusal_after_a_served_request_has_its_own_record() {
    let b = Bench::start().await;
    let h = b.host();
    let input = format!(
        "GET http://{h}/first HTTP/1.1\r\nHost: {h}\r\n\r\n\
         GET http://{h}/second HTTP/1.1\r\nHost: {h}\r\nX-A: a\r\n folded\r\n\r\n"
    );
    let out = b.send("served then folded", input.as_bytes()).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("HTTP/1.1 400 "), "{text}");
    let recs: Vec<Record> = b.proxy.exactly(2).await;
    assert_eq!(
        (recs[0].status, recs[0].reason),
        (Some(200), None),
        "{:#?}",
        recs[0]
    );
    assert_eq!(
        (recs[1].status, recs[1].reason),
        (Some(400), Some(Reason::BadRequest)),
        "{:#?}",
        recs[1]
    );
    let uris: Vec<String> = b.origin.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/first"]);
}

/// Empty lines before a request line are allowed (RFC 9112 §2.2) and
/// skipped; a flood of them is a slow head like any other: closed by the
/// header read time-out, with a `timeout` record.
#[tokio::test]
async fn a_flood_of_empty_lines_is_closed_by_the_header_timeout() {
    let origin = TapOrigin::start().await;
    let catalog = format!(
        "[[rule]]\nname = \"{RULE}\"\nhosts = [\"{REPO}\"]\nports = [{}]\naction = \"allow\"\n",
        origin.port()
    );
    let cfg = config(&[REPO], "[limits]\nheader_read_timeout = \"1s\"\n");
    let proxy = TestProxy::start(&cfg, &catalog).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = std::time::Instant::now();
    s.write_all(&b"\r\n".repeat(2048)).await.expect("write");
    let (out, ended) = read_until_close(&mut s).await;
    assert!(
        ended.is_some(),
        "closed: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let resp = parse_response(&out);
    assert!(out.is_empty() || resp.status == 408, "{}", resp.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].reason, Some(Reason::Timeout), "{:#?}", recs[0]);
    origin.assert_untouched("CRLF flood");
}
