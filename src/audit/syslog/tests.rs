use super::*;
use crate::audit::Decided;
use std::io::Read as _;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::SystemTime;

use crate::reason::Reason;

fn record() -> Record {
    let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
    let mut r = Record::new(0xabc, "192.0.2.10:40000".parse().unwrap(), ts);
    r.method = Some(http::Method::GET);
    r.host = Some("example.com".into());
    r.port = Some(80);
    r.url = Some("http://example.com/a\"b]c\\d".into());
    r.reason = Some(Reason::NotInCatalog);
    r.status = Some(403);
    r.duration_ms = 2;
    r
}

fn text(r: &Record, limit: Option<usize>) -> String {
    let mut out = Vec::new();
    Formatter::with("gw-01", 4321).format(r, &mut out, limit);
    String::from_utf8(out).unwrap()
}

#[test]
fn destinations_parse() {
    let d = Destination::parse("udp://127.0.0.1:5514").unwrap();
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Udp, "127.0.0.1", 5514)
    );
    let d = Destination::parse("tcp://siem.example.net").unwrap();
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Tcp, "siem.example.net", 514)
    );
    let d = Destination::parse("tcp://[::1]:6514").unwrap();
    assert_eq!((d.host.as_str(), d.port), ("::1", 6514));
    assert_eq!(d.to_string(), "tcp://[::1]:6514");
    assert_eq!(Destination::parse("udp://[::1]").unwrap().port, 514);
    let d = Destination::parse("tls://siem.example.net").unwrap();
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Tls, "siem.example.net", 6514)
    );
    assert_eq!(d.to_string(), "tls://siem.example.net:6514");
    for bad in [
        "udp://",
        "udp://:514",
        "udp://host:0",
        "udp://host:99999",
        "udp://host:x",
        "udp://::1:514",
        "udp://[::1",
        "udp://[::1]514",
        "udp://host:514/path",
        "udp://user@host:514",
        "http://host:514",
        "tcp://ho st:514",
        "tls://host:6514/x",
        "syslog+tls://host:6514",
    ] {
        assert!(Destination::parse(bad).is_err(), "{bad} must not parse");
    }
}

#[test]
fn a_denial_is_a_notice_with_every_field_escaped() {
    let t = text(&record(), None);
    let want = "<133>1 2026-01-02T03:04:05.680Z gw-01 egress-proxy 4321 audit \
                    [egress@32473 ts=\"2026-01-02T03:04:05.678Z\" id=\"0000000000000abc\" \
                    client=\"192.0.2.10:40000\" method=\"GET\" host=\"example.com\" port=\"80\" \
                    url=\"http://example.com/a\\\"b\\]c\\\\d\" decision=\"deny\" reason=\"not_in_catalog\" \
                    status=\"403\" bytes_up=\"0\" bytes_down=\"0\" duration_ms=\"2\"] {";
    assert!(t.starts_with(want), "{t}\n{want}");
    let json = &t[t.find("] {").unwrap() + 2..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v, serde_json::to_value(record()).unwrap());
}

#[test]
fn an_allowed_transaction_is_info_and_absent_fields_are_left_out() {
    let mut r = record();
    r.decision = Decided::Bypass;
    r.method = Some(http::Method::CONNECT);
    r.url = None;
    r.reason = None;
    r.status = Some(200);
    r.user = Some(Arc::from("gateway"));
    r.rule = Some(Arc::from("KSN"));
    r.sni = Some("example.com".into());
    r.ech = true;
    r.upstream = Some("[2001:db8::1]:443".parse().unwrap());
    let t = text(&r, None);
    assert!(t.starts_with("<134>1 "), "{t}");
    assert!(!t.contains(" url=") && !t.contains(" reason="), "{t}");
    for p in [
        " user=\"gateway\"",
        " rule=\"KSN\"",
        " sni=\"example.com\"",
        " ech=\"true\"",
        " upstream=\"[2001:db8::1\\]:443\"",
    ] {
        assert!(t.contains(p), "{p} missing: {t}");
    }
}

#[test]
fn the_hostname_is_printable_ascii_or_nil() {
    assert!(text(&record(), None).contains(" gw-01 egress-proxy "));
    let mut out = Vec::new();
    Formatter::with(" \n", 1).format(&record(), &mut out, None);
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("Z - egress-proxy 1 audit "));
}

#[test]
fn a_huge_record_is_cut_to_a_well_formed_datagram() {
    let mut r = record();
    r.url = Some(format!("http://example.com/{}", "é]".repeat(20_000)));
    let t = text(&r, Some(MAX_DATAGRAM));
    assert!(t.len() <= MAX_DATAGRAM, "{}", t.len());
    assert!(t.contains(" truncated=\"true\"] {"), "{t}");
    assert!(
        t.contains(" duration_ms=\"2\""),
        "every field is still there"
    );
    // A cut value ends cleanly: no dangling escape before the closing quote.
    let url = &t[t.find(" url=\"").unwrap() + 6..t.find("\" decision=").unwrap()];
    assert!(!url.ends_with('\\') || url.ends_with("\\\\"), "{url}");
    // A record that fits is not marked.
    assert!(!text(&record(), Some(MAX_DATAGRAM)).contains("truncated"));
    // A medium record keeps its structured data whole and cuts only the JSON.
    r.url = Some(format!("http://example.com/{}", "x".repeat(5000)));
    let t = text(&r, Some(MAX_DATAGRAM));
    assert!(
        t.len() <= MAX_DATAGRAM && t.contains(&"x".repeat(5000)),
        "{}",
        t.len()
    );
    assert!(t.contains(" truncated=\"true\"]"));
}

#[test]
fn a_full_queue_drops_and_counts_without_waiting() {
    // A TCP server that never accepts: the sender blocks in backoff.
    let dest = Destination::parse("tcp://127.0.0.1:1").unwrap();
    let counters = Counters::default();
    let mut sink =
        SyslogSink::start_with(dest, counters.clone(), Formatter::with("h", 1), 4).unwrap();
    let batch = vec![record(); 100];
    let t = Instant::now();
    sink.write(&batch).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // At most the queue plus the one in hand are kept.
    assert!(counters.dropped.get() >= 95, "{}", counters.dropped.get());
    assert_eq!(counters.sent.get(), 0);
    drop(sink);
    assert_eq!(
        counters.dropped.get(),
        100,
        "what was left is counted at close"
    );
}

/// Read one octet-counted frame.
fn frame(s: &mut std::net::TcpStream) -> Option<String> {
    let mut len = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        if b[0] == b' ' {
            break;
        }
        len.push(b[0]);
    }
    let n: usize = std::str::from_utf8(&len).ok()?.parse().ok()?;
    let mut msg = vec![0u8; n];
    s.read_exact(&mut msg).ok()?;
    String::from_utf8(msg).ok()
}

#[test]
fn tcp_frames_are_octet_counted_and_the_sender_reconnects() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", l.local_addr().unwrap());
    let counters = Counters::default();
    let settings = crate::config::SyslogSettings {
        url,
        extra_roots: Vec::new(),
        client_cert: None,
    };
    let mut sink = SyslogSink::start(&settings, counters.clone()).unwrap();
    let mut r = record();
    sink.write(std::slice::from_ref(&r)).unwrap();
    let (mut c1, _) = l.accept().unwrap();
    c1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let m = frame(&mut c1).unwrap();
    assert!(
        m.starts_with("<133>1 ") && m.contains("id=\"0000000000000abc\""),
        "{m}"
    );
    // The server goes away; the next messages arrive on a new connection.
    drop(c1);
    std::thread::sleep(IDLE_CHECK + Duration::from_millis(100));
    r.id = 0xdef;
    sink.write(std::slice::from_ref(&r)).unwrap();
    let (mut c2, _) = l.accept().unwrap();
    c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let m = frame(&mut c2).unwrap();
    assert!(m.contains("id=\"0000000000000def\""), "{m}");
    drop(sink);
    assert_eq!((counters.sent.get(), counters.dropped.get()), (2, 0));
}

#[test]
fn a_batch_goes_out_as_one_datagram_per_record_in_order() {
    // One write's batch of records: every record is its own datagram, in
    // order, none lost or merged.
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Room for every datagram before the test reads (the kernel caps it at
    // net.core.rmem_max, 208 KiB by default, doubled; 135 messages take
    // about 300 KiB with their overhead), so none is dropped on a busy machine.
    socket2::SockRef::from(&rx)
        .set_recv_buffer_size(1 << 20)
        .unwrap();
    let url = format!("udp://{}", rx.local_addr().unwrap());
    let counters = Counters::default();
    let settings = crate::config::SyslogSettings {
        url,
        extra_roots: Vec::new(),
        client_cert: None,
    };
    let mut sink = SyslogSink::start(&settings, counters.clone()).unwrap();
    let n = 135;
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = record();
            r.id = i as u64;
            r
        })
        .collect();
    sink.write(&records).unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    for i in 0..n {
        let len = rx.recv(&mut buf).unwrap();
        let m = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(m.starts_with("<133>1 "), "{m}");
        assert_eq!(
            m.matches("<133>1 ").count(),
            1,
            "one message a datagram: {m}"
        );
        assert!(m.contains(&format!("id=\"{i:016x}\"")), "datagram {i}: {m}");
    }
    drop(sink);
    assert_eq!((counters.sent.get(), counters.dropped.get()), (n as u64, 0));
}
