//! `docs/audit-record.schema.json` against the records the proxy really
//! writes: each proxy here has the JSON line writer (`LineSink`, what
//! `audit.path` gets) as a sink, a representative set of transactions goes
//! through it (allowed, refused for many reasons, tunnels, a refused SNI
//! inside a tunnel, an inspected request), and every line it wrote must
//! validate. The schema must also refuse what a record never is, so these
//! tests can fail.
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use egress_proxy::audit::{Decided, LineSink, Reason, Record};
use egress_proxy::config::{AuditFormat, ConfigSource, Settings};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use crate::inspect::{client_trusting_ca, inspecting_config};
use crate::support::*;

const SCHEMA: &str = include_str!("../../docs/audit-record.schema.json");

const UP: &str = "up.test";
const INTERNAL: &str = "internal.test";
const DOWN: &str = "down.test";
const KSN: &str = "ksn1.kaspersky-labs.com";

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("the schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).expect("the schema compiles")
}

/// What `instance` breaks in the schema, one line per error.
fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The bytes a `LineSink` wrote, shared with the test.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lines").clone()).expect("records are UTF-8")
    }
}

/// A proxy whose records also go through the JSON line writer into `Lines`.
async fn proxy_with_lines(settings: Settings, dir: tempfile::TempDir) -> (TestProxy, Lines) {
    let lines = Lines::default();
    let sink = LineSink::from_writer(Box::new(lines.clone()), AuditFormat::Json);
    let proxy = TestProxy::start_with_sinks(settings, dir, vec![Box::new(sink)]).await;
    (proxy, lines)
}

/// Wait for `n` records, then check that the writer wrote one line each
/// and that every line validates. Returns the records.
async fn assert_lines_validate(proxy: &TestProxy, lines: &Lines, n: usize) -> Vec<Record> {
    let records = proxy.exactly(n).await;
    let text = lines.text();
    let written: Vec<&str> = text.lines().collect();
    assert_eq!(written.len(), n, "one line per record:\n{text}");
    let v = validator();
    for line in written {
        let value: Value = serde_json::from_str(line).expect("each line is one JSON object");
        let errs = errors(&v, &value);
        assert!(
            errs.is_empty(),
            "{line}\ndoes not validate:\n{}",
            errs.join("\n")
        );
    }
    records
}

fn reasons(records: &[Record]) -> BTreeSet<&'static str> {
    records
        .iter()
        .filter_map(|r| r.reason.map(Reason::as_str))
        .collect()
}

fn load_in(dir: tempfile::TempDir, cfg: &str, catalog: &str) -> (Settings, tempfile::TempDir) {
    let path = dir.path().join("egress-proxy.toml");
    std::fs::write(&path, cfg).expect("config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("catalog");
    let settings = Settings::from_toml(ConfigSource::File(path), cfg, Vec::new())
        .unwrap_or_else(|e| panic!("config must load:\n{e}"));
    (settings, dir)
}

#[test]
fn the_schema_is_draft_2020_12_and_names_every_reason_and_decision() {
    let s = schema();
    if let Err(e) = jsonschema::draft202012::meta::validate(&s) {
        panic!("not a valid draft 2020-12 schema: {e}");
    }
    assert_eq!(s["additionalProperties"], json!(false));
    let listed: Vec<&str> = s["properties"]["reason"]["enum"]
        .as_array()
        .expect("reason enum")
        .iter()
        .map(|v| v.as_str().expect("a name"))
        .collect();
    let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        listed, all,
        "the schema's reasons are the proxy's, in the same order"
    );
    let decisions: Vec<&str> = s["properties"]["decision"]["enum"]
        .as_array()
        .expect("decision enum")
        .iter()
        .map(|v| v.as_str().expect("a name"))
        .collect();
    let every = [
        Decided::Allow,
        Decided::Bypass,
        Decided::Inspect,
        Decided::Deny,
        Decided::Report,
    ]
    .map(Decided::as_str);
    assert_eq!(decisions, every);
}

#[test]
fn the_schema_refuses_what_a_record_never_is() {
    let v = validator();
    let mut r = Record::new(
        0x0123_4567_89ab_cdef,
        "192.0.2.10:40000".parse().expect("addr"),
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_767_323_045_678),
    );
    r.method = Some(http::Method::CONNECT);
    r.host = Some(KSN.into());
    r.port = Some(443);
    r.decision = Decided::Bypass;
    r.rule = Some(Arc::from("Kaspersky KSN lookup"));
    r.upstream = Some("[2001:db8::7]:443".parse().expect("addr"));
    r.sni = Some(KSN.into());
    r.ech = true;
    r.status = Some(200);
    let mut out = Vec::new();
    r.write_json(&mut out);
    let good: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(errors(&v, &good), Vec::<String>::new(), "{good}");

    let bad = |edit: &dyn Fn(&mut serde_json::Map<String, Value>), what: &str| {
        let mut value = good.clone();
        edit(value.as_object_mut().expect("object"));
        assert!(
            !v.is_valid(&value),
            "the schema must refuse {what}: {value}"
        );
    };
    bad(
        &|m| {
            m.insert("extra".into(), json!(1));
        },
        "an unknown field",
    );
    bad(
        &|m| {
            m.insert("port".into(), json!("443"));
        },
        "a string port",
    );
    bad(
        &|m| {
            m.insert("port".into(), json!(443.5));
        },
        "a fractional port",
    );
    bad(
        &|m| {
            m.insert("port".into(), json!(0));
        },
        "port 0",
    );
    bad(
        &|m| {
            m.insert("status".into(), json!("200"));
        },
        "a string status",
    );
    bad(
        &|m| {
            m.insert("bytes_up".into(), json!(-1));
        },
        "negative bytes",
    );
    bad(
        &|m| {
            m.insert("duration_ms".into(), json!("3"));
        },
        "a string duration",
    );
    bad(
        &|m| {
            m.insert("decision".into(), json!("maybe"));
        },
        "an unknown decision",
    );
    bad(
        &|m| {
            m.insert("reason".into(), json!("because"));
        },
        "an unknown reason",
    );
    bad(
        &|m| {
            m.insert("reason".into(), Value::Null);
        },
        "a null reason",
    );
    bad(
        &|m| {
            m.insert("rule".into(), json!(""));
        },
        "an empty rule name",
    );
    bad(
        &|m| {
            m.insert("ech".into(), json!(false));
        },
        "ech false",
    );
    bad(
        &|m| {
            m.insert("ts".into(), json!("2026-01-02 03:04:05"));
        },
        "a ts that is not RFC 3339 with milliseconds",
    );
    bad(
        &|m| {
            m.insert("id".into(), json!("abc"));
        },
        "a short id",
    );
    bad(
        &|m| {
            m.remove("bytes_down");
        },
        "a missing byte count",
    );
    bad(
        &|m| {
            m.remove("decision");
        },
        "a missing decision",
    );
    bad(
        &|m| {
            m.remove("port");
        },
        "a host without a port",
    );
}

#[tokio::test]
async fn plain_http_records_and_refusals_validate() {
    let origin = HttpOrigin::start().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cfg = config_with(&ConfigOpts {
        statics: &[
            (UP, "127.0.0.1"),
            (DOWN, "127.0.0.1"),
            (INTERNAL, "10.1.2.3"),
        ],
        allow_private: &["127.0.0.0/8"],
        ..ConfigOpts::default()
    });
    let catalog = [
        rule(
            "up",
            &[UP],
            origin.port(),
            "allow",
            "methods = [\"GET\", \"HEAD\"]",
        ),
        rule("internal", &[INTERNAL], 80, "allow", ""),
        rule("down", &[DOWN], closed, "allow", ""),
    ]
    .concat();
    let (settings, dir) = load(&cfg, &catalog);
    let (proxy, lines) = proxy_with_lines(settings, dir).await;
    let p = origin.port();
    let sends: Vec<(String, &str)> = vec![
        (
            format!("GET http://{UP}:{p}/hello?q=1 HTTP/1.1\r\nHost: {UP}:{p}\r\nConnection: close\r\n\r\n"),
            "200",
        ),
        (
            format!("POST http://{UP}:{p}/ HTTP/1.1\r\nHost: {UP}\r\nContent-Length: 0\r\n\r\n"),
            "method_not_allowed",
        ),
        (
            format!("GET http://{UP}:{p}/ HTTP/1.1\r\nHost: {UP}\r\nContent-Length: 5\r\n\r\nhello"),
            "body_not_allowed",
        ),
        (
            format!("GET http://{UP}:1/ HTTP/1.1\r\nHost: {UP}:1\r\n\r\n"),
            "port_not_allowed",
        ),
        (
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".into(),
            "not_in_catalog",
        ),
        (
            "GET http://203.0.113.45/ HTTP/1.1\r\nHost: 203.0.113.45\r\n\r\n".into(),
            "ip_literal",
        ),
        (
            format!("GET http://{INTERNAL}/ HTTP/1.1\r\nHost: {INTERNAL}\r\n\r\n"),
            "private_address",
        ),
        (
            format!("GET http://{DOWN}:{closed}/ HTTP/1.1\r\nHost: {DOWN}\r\n\r\n"),
            "upstream_connect_failed",
        ),
        (
            "GET /origin-form HTTP/1.1\r\nHost: example.com\r\n\r\n".into(),
            "bad_request",
        ),
        (
            // hyper answers this one itself (a bare 400); the record is still written.
            format!("CONNECT {UP}:{p}/path HTTP/1.1\r\nHost: {UP}\r\n\r\n"),
            "400 Bad Request",
        ),
    ];
    let n = sends.len();
    for (wire, want) in &sends {
        let answer = raw(proxy.addr, wire.as_bytes()).await;
        assert!(answer.contains(want), "{wire:?} → {answer}");
    }
    let records = assert_lines_validate(&proxy, &lines, n).await;
    let seen = reasons(&records);
    for want in [
        "method_not_allowed",
        "body_not_allowed",
        "port_not_allowed",
        "not_in_catalog",
        "ip_literal",
        "private_address",
        "upstream_connect_failed",
        "bad_request",
    ] {
        assert!(seen.contains(want), "no {want} record: {records:#?}");
    }
    let ok = records
        .iter()
        .find(|r| r.reason.is_none())
        .expect("the allowed GET");
    assert_eq!(ok.decision, Decided::Allow);
    assert!(ok.upstream.is_some() && ok.url.is_some(), "{ok:#?}");
}

#[tokio::test]
async fn tunnel_records_and_a_refused_sni_validate() {
    let origin = TlsOrigin::start(KSN).await;
    let cfg = config(&[KSN], "");
    let catalog = rule(
        "Kaspersky KSN lookup",
        &[KSN],
        origin.addr.port(),
        "bypass",
        "",
    );
    let (settings, dir) = load(&cfg, &catalog);
    let (proxy, lines) = proxy_with_lines(settings, dir).await;
    let authority = format!("{KSN}:{}", origin.addr.port());
    let connector = TlsConnector::from(Arc::new(origin.client_config()));

    // A clean bypassed tunnel: TLS to the origin, one request, closed.
    let s = open_tunnel(proxy.addr, &authority).await;
    let name = ServerName::try_from(KSN.to_string()).expect("name");
    let mut tls = connector
        .connect(name, s)
        .await
        .expect("handshake through the tunnel");
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {KSN}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(String::from_utf8_lossy(&answer).ends_with("tls hello"));
    drop(tls);

    // Domain fronting: a ClientHello for another name is refused inside the tunnel.
    let s = open_tunnel(proxy.addr, &authority).await;
    let front = ServerName::try_from("www.example.com".to_string()).expect("name");
    assert!(
        connector.connect(front, s).await.is_err(),
        "the fronted handshake must fail"
    );

    // A CONNECT the policy refuses before any 200.
    let (status, _s) = connect(proxy.addr, &format!("{KSN}:8443")).await;
    assert_eq!(status, 403);

    let records = assert_lines_validate(&proxy, &lines, 3).await;
    assert!(reasons(&records).contains("sni_mismatch"), "{records:#?}");
    assert!(
        reasons(&records).contains("port_not_allowed"),
        "{records:#?}"
    );
    let clean = records
        .iter()
        .find(|r| r.reason.is_none())
        .expect("the clean tunnel");
    assert_eq!(clean.decision, Decided::Bypass);
    assert_eq!(clean.sni.as_deref(), Some(KSN));
    assert!(clean.bytes_up > 0 && clean.bytes_down > 0, "{clean:#?}");
}

#[tokio::test]
async fn an_inspected_tunnel_and_its_request_validate() {
    let origin = TlsOrigin::start(crate::inspect::HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config(dir.path(), &origin.cert.cert_pem, "", origin.addr.port());
    let (settings, dir) = load_in(dir, &cfg, &catalog);
    let (proxy, lines) = proxy_with_lines(settings, dir).await;
    let client = client_trusting_ca(&proxy);
    let url = format!(
        "https://{}:{}/lookup?q=1",
        crate::inspect::HOST,
        origin.addr.port()
    );
    let resp = client.get(&url).send().await.expect("inspected request");
    assert_eq!(resp.status(), 200);
    drop(resp);
    drop(client);
    let records = assert_lines_validate(&proxy, &lines, 2).await;
    assert!(
        records.iter().all(|r| r.decision == Decided::Inspect),
        "{records:#?}"
    );
    assert!(records
        .iter()
        .any(|r| r.url.as_deref() == Some(url.as_str())));
}

#[tokio::test]
async fn a_record_with_a_client_group_validates() {
    let origin = HttpOrigin::start().await;
    let cfg = config(
        &[UP],
        "[clients.groups]\nweb = [\"127.0.0.2/32\"]\nall-loopback = [\"127.0.0.0/8\"]\n",
    );
    let catalog = rule("up", &[UP], origin.port(), "allow", "clients = [\"web\"]");
    let (settings, dir) = load_in(tempfile::tempdir().expect("tempdir"), &cfg, &catalog);
    let (proxy, lines) = proxy_with_lines(settings, dir).await;
    let get = format!(
        "GET http://{UP}:{p}/ HTTP/1.1\r\nHost: {UP}:{p}\r\nConnection: close\r\n\r\n",
        p = origin.port()
    );
    let web = "127.0.0.2".parse().expect("ip");
    let r = parse_response(&raw_bytes_from(web, proxy.addr, get.as_bytes()).await);
    assert_eq!(r.status, 200, "{}", r.head);
    let records = assert_lines_validate(&proxy, &lines, 1).await;
    assert_eq!(records[0].client_group.as_deref(), Some("all-loopback,web"));
    assert!(lines
        .text()
        .contains("\"client_group\":\"all-loopback,web\""));
}
