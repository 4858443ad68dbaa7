//! Squid's native access.log line for a record (`audit.format = "squid"`).
use std::io::{self, Write};
use std::time::SystemTime;

use super::*;
use crate::reason::Reason;

/// Squid's native access.log line (`logformat squid`, Squid 4 and later):
/// `time elapsed client code/status bytes method URL user hierarchy/peer type`,
/// that is `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
///
/// As in Squid, `time` is when the transaction ended (the record's `ts`
/// plus `duration_ms`), `bytes` is what was sent to the client (here the
/// body or payload bytes, `bytes_down`, without headers), and a missing
/// status is `000`. Fields that could hold a space are percent-escaped so
/// every line splits into exactly ten fields. README "Audit formats" gives
/// the mapping both ways.
pub(super) fn squid_line(out: &mut Vec<u8>, r: &Record) -> io::Result<()> {
    let end =
        r.ts.checked_add(std::time::Duration::from_millis(r.duration_ms))
            .unwrap_or(r.ts)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
    let tag = squid_tag(r);
    // Squid's error suffixes mark a transfer that ended badly; a request
    // refused or never processed has none.
    let suffix = match tag {
        "TCP_MISS" | "TCP_TUNNEL" => squid_suffix(r.reason),
        _ => "",
    };
    write!(
        out,
        "{}.{:03} {:>6} {} {}{}/{:03} {} {} ",
        end.as_secs(),
        end.subsec_millis(),
        r.duration_ms,
        r.client.ip(),
        tag,
        suffix,
        r.status.unwrap_or(0),
        r.bytes_down,
        r.method.as_ref().map_or("-", http::Method::as_str),
    )?;
    match (&r.url, &r.host, r.port) {
        (Some(u), _, _) => squid_field(out, u),
        (None, Some(h), Some(p)) if h.contains(':') => {
            out.push(b'[');
            squid_field(out, h);
            write!(out, "]:{p}")?;
        }
        (None, Some(h), Some(p)) => {
            squid_field(out, h);
            write!(out, ":{p}")?;
        }
        (None, Some(h), None) => squid_field(out, h),
        _ => out.push(b'-'),
    }
    out.push(b' ');
    match r.user.as_deref() {
        Some(u) if !u.is_empty() => squid_field(out, u),
        _ => out.push(b'-'),
    }
    match r.upstream {
        // Through a parent proxy (it answered): Squid's own tag for that.
        Some(a) if r.parent_status.is_some() => write!(out, " FIRSTUP_PARENT/{} -", a.ip()),
        Some(a) => write!(out, " HIER_DIRECT/{} -", a.ip()),
        None => write!(out, " HIER_NONE/- -"),
    }
}

/// The result tag (`%Ss` without its suffix), from Squid's own set:
/// `TCP_DENIED` for a refusal by policy, client ACL, authentication or rate
/// limit (and for a tunnel closed by the SNI/ECH check); `NONE_NONE` for a
/// request that was never processed (unparsable or oversized head, the
/// connection cap, shutdown, a client that sent no request); `TCP_TUNNEL`
/// for any other CONNECT; `TCP_MISS` for any other request (forwarded, or
/// failed upstream: the status tells which).
fn squid_tag(r: &Record) -> &'static str {
    let connect = r.method.as_ref() == Some(&http::Method::CONNECT);
    if r.decision != Decided::Deny {
        return if connect { "TCP_TUNNEL" } else { "TCP_MISS" };
    }
    match r.reason {
        // A tunnel refused after its 200: the SNI/ECH check, or a malformed hello.
        Some(_) if connect && r.status == Some(200) => "TCP_DENIED",
        Some(reason) if reason.class().is_denial() => "TCP_DENIED",
        _ => "NONE_NONE",
    }
}

/// Squid's error suffix: `_TIMEDOUT` for a time-out, `_ABORTED` for a
/// transfer cut short by a peer or by shutdown; nothing otherwise.
fn squid_suffix(reason: Option<Reason>) -> &'static str {
    match reason {
        Some(Reason::Timeout) => "_TIMEDOUT",
        Some(Reason::ClientClosed | Reason::UpstreamReset | Reason::Shutdown) => "_ABORTED",
        _ => "",
    }
}

/// Write `s` as one whitespace-free field: bytes outside printable ASCII,
/// space and `%` are percent-encoded (Squid escapes such bytes the same way).
fn squid_field(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b);
        } else {
            out.push(b'%');
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn record() -> Record {
        // 2026-01-02T03:04:05.678Z
        let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        Record::new(1, "192.0.2.10:40000".parse().unwrap(), ts)
    }

    fn line(r: &Record) -> String {
        let mut out = Vec::new();
        squid_line(&mut out, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_spliced_tunnel_is_tcp_tunnel_with_host_and_port() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.decision = Decided::Bypass;
        r.rule = Some(Arc::from("Kaspersky KSN lookup"));
        r.upstream = Some("203.0.113.7:443".parse().unwrap());
        r.status = Some(200);
        r.bytes_up = 517;
        r.bytes_down = 4242;
        r.duration_ms = 1500;
        // The time is the end: ts + 1.5 s.
        assert_eq!(
            line(&r),
            "1767323047.178   1500 192.0.2.10 TCP_TUNNEL/200 4242 CONNECT \
             ksn1.kaspersky-labs.com:443 - HIER_DIRECT/203.0.113.7 -"
        );
    }

    #[test]
    fn through_a_parent_the_peer_is_firstup_parent() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.decision = Decided::Bypass;
        r.upstream = Some("10.0.0.3:8080".parse().unwrap());
        r.parent_status = Some(200);
        r.status = Some(200);
        assert!(
            line(&r).ends_with(" - FIRSTUP_PARENT/10.0.0.3 -"),
            "{}",
            line(&r)
        );
    }

    #[test]
    fn a_forwarded_request_is_tcp_miss_with_the_url() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.host = Some("repo.clearswift.net".into());
        r.port = Some(80);
        r.url = Some("http://repo.clearswift.net/update/list.xml?x=1".into());
        r.decision = Decided::Allow;
        r.rule = Some(Arc::from("Clearswift updates"));
        r.upstream = Some("[2001:db8::5]:80".parse().unwrap());
        r.user = Some(Arc::from("gateway"));
        r.status = Some(200);
        r.bytes_down = 5;
        r.duration_ms = 12;
        assert_eq!(
            line(&r),
            "1767323045.690     12 192.0.2.10 TCP_MISS/200 5 GET \
             http://repo.clearswift.net/update/list.xml?x=1 gateway HIER_DIRECT/2001:db8::5 -"
        );
    }

    #[test]
    fn a_policy_refusal_is_tcp_denied_without_a_peer() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.host = Some("example.com".into());
        r.port = Some(80);
        r.url = Some("http://example.com/".into());
        r.reason = Some(Reason::NotInCatalog);
        r.status = Some(403);
        assert_eq!(
            line(&r),
            "1767323045.678      0 192.0.2.10 TCP_DENIED/403 0 GET http://example.com/ - HIER_NONE/- -"
        );
        // Authentication and rate limits are refusals too, as in Squid (TCP_DENIED/407).
        r.reason = Some(Reason::AuthRequired);
        r.status = Some(407);
        assert!(line(&r).contains(" TCP_DENIED/407 "), "{}", line(&r));
        r.reason = Some(Reason::RateLimited);
        r.status = Some(429);
        assert!(line(&r).contains(" TCP_DENIED/429 "), "{}", line(&r));
    }

    #[test]
    fn a_denied_connect_to_an_ipv6_literal_brackets_the_address() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("2001:db8::1".into());
        r.port = Some(443);
        r.reason = Some(Reason::IpLiteral);
        r.status = Some(403);
        let l = line(&r);
        assert!(
            l.contains(" TCP_DENIED/403 0 CONNECT [2001:db8::1]:443 - HIER_NONE/- -"),
            "{l}"
        );
    }

    #[test]
    fn a_tunnel_closed_by_the_sni_check_is_denied_with_status_200() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.reason = Some(Reason::SniMismatch);
        r.sni = Some("www.example.com".into());
        r.upstream = Some("203.0.113.7:443".parse().unwrap());
        r.status = Some(200);
        let l = line(&r);
        assert!(l.contains(" TCP_DENIED/200 0 CONNECT "), "{l}");
        // A malformed hello inside the tunnel too.
        r.reason = Some(Reason::BadRequest);
        assert!(line(&r).contains(" TCP_DENIED/200 "), "{}", line(&r));
    }

    #[test]
    fn abnormal_ends_carry_squids_suffixes() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.url = Some("http://a.example/".into());
        r.decision = Decided::Allow;
        r.status = Some(200);
        r.reason = Some(Reason::ClientClosed);
        assert!(line(&r).contains(" TCP_MISS_ABORTED/200 "), "{}", line(&r));
        r.reason = Some(Reason::UpstreamReset);
        assert!(line(&r).contains(" TCP_MISS_ABORTED/200 "), "{}", line(&r));
        r.reason = Some(Reason::Timeout);
        r.status = Some(504);
        assert!(line(&r).contains(" TCP_MISS_TIMEDOUT/504 "), "{}", line(&r));
        // An upstream that cannot be reached: a miss with the error status.
        r.reason = Some(Reason::UpstreamConnectFailed);
        r.status = Some(502);
        assert!(line(&r).contains(" TCP_MISS/502 "), "{}", line(&r));
        r.method = Some(http::Method::CONNECT);
        r.url = None;
        r.host = Some("a.example".into());
        r.port = Some(443);
        r.status = Some(200);
        r.reason = Some(Reason::ClientClosed);
        assert!(
            line(&r).contains(" TCP_TUNNEL_ABORTED/200 "),
            "{}",
            line(&r)
        );
    }

    #[test]
    fn requests_never_processed_are_none_none() {
        let mut r = record();
        r.reason = Some(Reason::BadRequest);
        r.status = Some(400);
        assert_eq!(
            line(&r),
            "1767323045.678      0 192.0.2.10 NONE_NONE/400 0 - - - HIER_NONE/- -"
        );
        // A head that never came (time-out, or the client closed first).
        r.reason = Some(Reason::Timeout);
        r.status = None;
        assert!(line(&r).contains(" NONE_NONE/000 "), "{}", line(&r));
        r.reason = Some(Reason::ClientClosed);
        assert!(line(&r).contains(" NONE_NONE/000 "), "{}", line(&r));
        r.reason = Some(Reason::Shutdown);
        r.status = Some(503);
        assert!(line(&r).contains(" NONE_NONE/503 "), "{}", line(&r));
        r.reason = Some(Reason::ConnectionLimit);
        r.status = Some(503);
        assert!(line(&r).contains(" NONE_NONE/503 "), "{}", line(&r));
    }

    #[test]
    fn fields_never_contain_spaces() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.url = Some("http://a.example/".into());
        r.decision = Decided::Allow;
        r.user = Some(Arc::from("gate way%ü"));
        r.status = Some(200);
        r.duration_ms = 1_234_567;
        let l = line(&r);
        assert!(l.contains(" gate%20way%25%C3%BC "), "{l}");
        // Elapsed wider than six digits just grows, as in Squid.
        assert!(l.contains(" 1234567 192.0.2.10 "), "{l}");
        assert_eq!(l.split(' ').filter(|f| !f.is_empty()).count(), 10, "{l}");
    }
}
