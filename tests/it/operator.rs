//! The operator's world (issue 9): the RFC 5424 copy of every record to a
//! syslog receiver on loopback (UDP and TCP, parsed here by a strict parser
//! of our own); a dead syslog server that must not slow the proxy or the
//! file copy; Squid-format lines for a tunnel, a forward and a denial; the
//! admin-token warning of `check` and `run`; the systemd unit and the
//! logrotate snippet checked by the system's own tools where they exist.
//!
//! The proxy runs in-process as `egress-proxy run` builds it: the audit sinks
//! come from the settings (`audit.path`, `audit.format`, `audit.syslog`), with
//! an in-memory copy beside them to compare against.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use egress_proxy::audit::{AuditSink, AuditWriter, Decided, LineSink, MemorySink, Record, Tee};
use egress_proxy::config::AuditPath;
use egress_proxy::Proxy;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{config, connect, crypto, echo_origin, load, raw, HttpOrigin, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// The catalog name the test configs map to 127.0.0.1.
const VENDOR: &str = "repo.clearswift.net";
const VENDOR_RULE: &str = "Clearswift updates";
/// A name no rule lists.
const UNLISTED: &str = "example.com";

fn catalog(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
    format!(
        "[[rule]]\nname = \"{VENDOR_RULE}\"\nhosts = [\"{VENDOR}\"]\nports = [{}]\naction = \"allow\"\n",
        ports.join(", ")
    )
}

// ---------------------------------------------------------------- the proxy as `run` builds it

/// A proxy whose audit sinks are made from its settings, as in `serve`:
/// the `audit.path` file (in `audit.format`) and `audit.syslog`, plus an
/// in-memory copy.
struct Op {
    addr: SocketAddr,
    admin: SocketAddr,
    memory: MemorySink,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    writer: Option<AuditWriter>,
}

impl Op {
    async fn start(config: &str, catalog: &str) -> Op {
        let (settings, dir) = load(config, catalog);
        let memory = MemorySink::new();
        let mut sinks: Vec<Box<dyn AuditSink>> = vec![Box::new(memory.clone())];
        if let AuditPath::File(_) = &settings.audit.path {
            let file = LineSink::open(settings.audit.path.clone(), settings.audit.format)
                .map(|s| s.log_query(settings.audit.log_query))
                .expect("open the audit file");
            sinks.insert(0, Box::new(file));
        }
        let (log, writer, metrics) =
            egress_proxy::start_audit_with(Box::new(Tee(sinks)), settings.audit.syslog.as_deref())
                .expect("audit writer");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().expect("admin addr");
        let proxy = Proxy::new(vec![listener], settings, log, metrics)
            .expect("proxy")
            .with_admin(admin_listener);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            proxy
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Op {
            addr,
            admin,
            memory,
            dir,
            stop: Some(stop),
            task: Some(task),
            writer: Some(writer),
        }
    }

    fn client(&self) -> reqwest::Client {
        crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(format!("http://{}", self.addr)).expect("proxy url"))
            .timeout(WAIT)
            .build()
            .expect("client")
    }

    async fn records(&self, n: usize) -> Vec<Record> {
        let got = self.memory.wait_for(WAIT, |r| r.len() >= n).await;
        assert!(
            got.len() >= n,
            "expected {n} records, got {}: {got:#?}",
            got.len()
        );
        got
    }

    /// The admin `/metrics` samples by series name.
    async fn metrics(&self) -> BTreeMap<String, f64> {
        let resp = raw(
            self.admin,
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let body = &resp[resp.find("\r\n\r\n").expect("head end") + 4..];
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// Stop, drain, and wait for the audit writer (every sink flushed);
    /// returns the in-memory records.
    async fn stop(mut self) -> (Vec<Record>, tempfile::TempDir) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("proxy stops")
                .expect("proxy task");
        }
        if let Some(w) = self.writer.take() {
            tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || w.join()))
                .await
                .expect("the audit writer finishes in time")
                .expect("writer join");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = std::mem::replace(&mut self.dir, dir);
        (self.memory.records(), dir)
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

// ---------------------------------------------------------------- a strict RFC 5424 parser

/// An SD-ELEMENT: its SD-ID and its params in order.
type SdElement = (String, Vec<(String, String)>);

/// One parsed RFC 5424 message.
#[derive(Debug)]
struct Syslog {
    pri: u8,
    timestamp: SystemTime,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    /// (SD-ID, params in order)
    sd: Vec<SdElement>,
    msg: String,
}

impl Syslog {
    fn params(&self, id: &str) -> BTreeMap<String, String> {
        let (_, p) = self
            .sd
            .iter()
            .find(|(i, _)| i == id)
            .unwrap_or_else(|| panic!("no SD element {id}: {self:#?}"));
        let map: BTreeMap<String, String> = p.iter().cloned().collect();
        assert_eq!(map.len(), p.len(), "a param repeats: {p:?}");
        map
    }
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.i..].chars().next()
    }

    fn eat(&mut self, c: char) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += c.len_utf8();
            Ok(())
        } else {
            Err(format!(
                "expected {c:?} at {}: {:?}",
                self.i,
                &self.s[self.i..]
            ))
        }
    }

    /// A header field: 1..=max PRINTUSASCII up to the next SP (which is eaten).
    fn field(&mut self, what: &str, max: usize) -> Result<&'a str, String> {
        let rest = &self.s[self.i..];
        let end = rest.find(' ').ok_or(format!("{what}: no SP after it"))?;
        let f = &rest[..end];
        if f.is_empty() || f.len() > max || !f.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(format!("{what}: {f:?} is not 1..={max} PRINTUSASCII"));
        }
        self.i += end + 1;
        Ok(f)
    }
}

/// RFC 5424 §6: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [SP MSG]`,
/// checked strictly (no NILVALUE where we always have a value).
fn parse_5424(text: &str) -> Result<Syslog, String> {
    let mut c = Cursor { s: text, i: 0 };
    c.eat('<')?;
    let close = text.find('>').ok_or("no '>'")?;
    let pri = &text[1..close];
    if pri.is_empty()
        || pri.len() > 3
        || !pri.bytes().all(|b| b.is_ascii_digit())
        || (pri.len() > 1 && pri.starts_with('0'))
    {
        return Err(format!("bad PRI {pri:?}"));
    }
    let pri: u8 = pri.parse().map_err(|_| "PRI")?;
    if pri > 191 {
        return Err(format!("PRI {pri} > 191"));
    }
    c.i = close + 1;
    c.eat('1')?;
    c.eat(' ')?;
    let ts = c.field("TIMESTAMP", 32)?;
    let timestamp = parse_timestamp(ts)?;
    let hostname = c.field("HOSTNAME", 255)?.to_string();
    let app_name = c.field("APP-NAME", 48)?.to_string();
    let procid = c.field("PROCID", 128)?.to_string();
    let msgid = c.field("MSGID", 32)?.to_string();
    let sd = parse_sd(&mut c)?;
    let msg = match c.peek() {
        None => String::new(),
        Some(' ') => {
            let m = &text[c.i + 1..];
            m.strip_prefix('\u{feff}').unwrap_or(m).to_string()
        }
        Some(other) => return Err(format!("{other:?} after the structured data")),
    };
    Ok(Syslog {
        pri,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.1-6 digits](Z|±HH:MM)`.
fn parse_timestamp(ts: &str) -> Result<SystemTime, String> {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return Err(format!("TIMESTAMP {ts:?}"));
    }
    let mut rest = &ts[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=6).contains(&n) {
            return Err(format!("TIME-SECFRAC of {ts:?}"));
        }
        rest = &frac[n..];
    }
    if rest != "Z" {
        // We always send UTC; an offset would be legal but is not what we write.
        return Err(format!("TIMESTAMP {ts:?} is not in UTC (Z)"));
    }
    humantime::parse_rfc3339(ts).map_err(|e| format!("TIMESTAMP {ts:?}: {e}"))
}

/// `-` or one or more `[SD-ID *(SP PARAM-NAME="PARAM-VALUE")]`, values
/// with only `\"`, `\\` and `\]` escaped, and no unescaped `"` `\` `]`.
fn parse_sd(c: &mut Cursor<'_>) -> Result<Vec<SdElement>, String> {
    if c.peek() == Some('-') {
        c.i += 1;
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    while c.peek() == Some('[') {
        c.i += 1;
        let id = sd_name(c)?;
        let mut params = Vec::new();
        while c.peek() == Some(' ') {
            c.i += 1;
            let name = sd_name(c)?;
            c.eat('=')?;
            c.eat('"')?;
            let mut value = String::new();
            loop {
                let ch = c.peek().ok_or("unterminated PARAM-VALUE")?;
                c.i += ch.len_utf8();
                match ch {
                    '"' => break,
                    ']' => return Err(format!("unescaped ']' in {name}")),
                    '\\' => {
                        let e = c.peek().ok_or("dangling '\\'")?;
                        if !matches!(e, '"' | '\\' | ']') {
                            return Err(format!(
                                "'\\{e}' in {name}: only \\\" \\\\ \\] are escapes"
                            ));
                        }
                        c.i += 1;
                        value.push(e);
                    }
                    ch => value.push(ch),
                }
            }
            params.push((name, value));
        }
        c.eat(']')?;
        out.push((id, params));
    }
    if out.is_empty() {
        return Err("no structured data".into());
    }
    Ok(out)
}

/// SD-NAME: 1..=32 PRINTUSASCII except `=`, SP, `]`, `"` (an SD-ID may hold one `@`).
fn sd_name(c: &mut Cursor<'_>) -> Result<String, String> {
    let rest = &c.s[c.i..];
    let n = rest
        .bytes()
        .take_while(|b| (33..=126).contains(b) && !matches!(b, b'=' | b' ' | b']' | b'"'))
        .count();
    if n == 0 || n > 32 {
        return Err(format!("bad SD-NAME at {:?}", rest));
    }
    c.i += n;
    Ok(rest[..n].to_string())
}

/// The record as the SD params should carry it: every JSON field, as text.
fn expected_params(r: &Record) -> BTreeMap<String, String> {
    let v = serde_json::to_value(r).expect("record json");
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect()
}

/// Check one message against the record it carries.
fn check_message(m: &Syslog, r: &Record) {
    let severity = if r.decision == Decided::Deny { 5 } else { 6 };
    assert_eq!(
        m.pri,
        16 * 8 + severity,
        "local0, notice for deny, else info: {m:#?}"
    );
    assert_eq!(m.app_name, "egress-proxy");
    assert_eq!(m.procid, std::process::id().to_string());
    assert_eq!(m.msgid, "audit");
    assert!(!m.hostname.is_empty());
    // The time of the event: the end of the transaction, to the millisecond.
    let end = r.ts + Duration::from_millis(r.duration_ms);
    let diff = match m.timestamp.duration_since(end) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        diff < Duration::from_millis(1),
        "TIMESTAMP {:?} vs end {end:?}",
        m.timestamp
    );
    assert_eq!(m.sd.len(), 1, "one SD element: {:?}", m.sd);
    assert_eq!(
        m.params("egress@32473"),
        expected_params(r),
        "SD params carry the record"
    );
    let json: serde_json::Value = serde_json::from_str(&m.msg).expect("MSG is the JSON record");
    assert_eq!(
        json,
        serde_json::to_value(r).expect("json"),
        "MSG is the record"
    );
}

#[test]
fn the_parser_is_strict() {
    let good = "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [egress@32473 a=\"x\\]y\\\"z\\\\\"] {}";
    let m = parse_5424(good).unwrap();
    assert_eq!(m.params("egress@32473")["a"], "x]y\"z\\");
    for bad in [
        "<134>2 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x\"] {}",
        "<192>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x\"] {}",
        "<034>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x\"] {}",
        "<134>1 2026-01-02 03:04:05Z gw egress-proxy 1 audit [e a=\"x\"] {}",
        "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x]\"] {}",
        "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x\\n\"] {}",
        "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=\"x\"",
        "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit [e a=x] {}",
        "<134>1 2026-01-02T03:04:05.678Z gw egress-proxy 1 audit{}",
        "<134>1 2026-01-02T03:04:05.678Z  egress-proxy 1 audit [e a=\"x\"] {}",
    ] {
        assert!(parse_5424(bad).is_err(), "must not parse: {bad}");
    }
}

// ---------------------------------------------------------------- syslog receivers

/// What a receiver got, one message each.
type Inbox = Arc<Mutex<Vec<String>>>;

async fn udp_receiver() -> (SocketAddr, Inbox) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let addr = sock.local_addr().expect("addr");
    let inbox: Inbox = Arc::default();
    let got = Arc::clone(&inbox);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = sock.recv(&mut buf).await {
            let text = String::from_utf8(buf[..n].to_vec()).expect("a datagram is UTF-8");
            got.lock().unwrap().push(text);
        }
    });
    (addr, inbox)
}

/// A TCP receiver reading RFC 6587 octet-counted frames: `LEN SP MSG`,
/// LEN without leading zeros. A framing error fails the test.
async fn tcp_receiver() -> (SocketAddr, Inbox) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let addr = listener.local_addr().expect("addr");
    let inbox: Inbox = Arc::default();
    let got = Arc::clone(&inbox);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    let mut len = Vec::new();
                    match r.read_until(b' ', &mut len).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let digits = &len[..len.len() - 1];
                    let framed = len.ends_with(b" ")
                        && !digits.is_empty()
                        && digits.len() <= 9
                        && digits[0] != b'0'
                        && digits.iter().all(u8::is_ascii_digit);
                    if !framed {
                        got.lock().unwrap().push(format!(
                            "FRAMING ERROR: {:?}",
                            String::from_utf8_lossy(&len)
                        ));
                        return;
                    }
                    let n: usize = std::str::from_utf8(digits).unwrap().parse().unwrap();
                    let mut msg = vec![0u8; n];
                    if r.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    got.lock()
                        .unwrap()
                        .push(String::from_utf8(msg).expect("UTF-8 message"));
                }
            });
        }
    });
    (addr, inbox)
}

async fn wait_inbox(inbox: &Inbox, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = inbox.lock().unwrap().clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A denied and an allowed request; each record reaches the receiver as a
/// well-formed RFC 5424 message that carries it, and the sent counter says so.
async fn records_reach_syslog(scheme: &str, receiver: (SocketAddr, Inbox)) {
    let (at, inbox) = receiver;
    let origin = HttpOrigin::start().await;
    let extra = format!("[audit]\nsyslog = \"{scheme}://{at}\"\n");
    let op = Op::start(&config(&[VENDOR], &extra), &catalog(&[origin.port()])).await;
    let client = op.client();
    let denied = client
        .get(format!("http://{UNLISTED}/x?\"q\"=]"))
        .send()
        .await
        .expect("denied request");
    assert_eq!(denied.status(), 403);
    let allowed = client
        .get(format!("http://{VENDOR}:{}/hello", origin.port()))
        .send()
        .await
        .expect("allowed request");
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.text().await.unwrap(), "hello");

    let records = op.records(2).await;
    let got = wait_inbox(&inbox, 2).await;
    assert_eq!(got.len(), 2, "one message per record: {got:#?}");
    let mut ids = Vec::new();
    for text in &got {
        let m = parse_5424(text).unwrap_or_else(|e| panic!("not RFC 5424 ({e}): {text}"));
        let id = m.params("egress@32473")["id"].clone();
        let r = records
            .iter()
            .find(|r| r.id_string() == id)
            .unwrap_or_else(|| panic!("no record {id}"));
        check_message(&m, r);
        ids.push((r.decision, r.reason));
    }
    ids.sort_by_key(|(d, _)| d.as_str());
    assert_eq!(ids[0].0, Decided::Allow);
    assert_eq!(ids[1].0, Decided::Deny);
    let deadline = Instant::now() + WAIT;
    loop {
        let m = op.metrics().await;
        if m.get("egress_syslog_sent_total") == Some(&2.0) {
            assert_eq!(m.get("egress_syslog_dropped_total"), Some(&0.0));
            break;
        }
        assert!(Instant::now() < deadline, "sent counter: {m:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    op.stop().await;
}

#[tokio::test]
async fn records_reach_a_udp_syslog_receiver_as_rfc5424() {
    records_reach_syslog("udp", udp_receiver().await).await;
}

#[tokio::test]
async fn records_reach_a_tcp_syslog_receiver_octet_counted() {
    records_reach_syslog("tcp", tcp_receiver().await).await;
}

// ---------------------------------------------------------------- a dead syslog server

/// A loopback port with nothing listening (bound, then released).
async fn dead_port(udp: bool) -> u16 {
    if udp {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.local_addr().expect("addr").port()
    } else {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    }
}

/// 200 requests with the syslog server down: all complete quickly, all
/// records reach the file copy and the in-memory copy, and the syslog
/// counters are on /metrics.
async fn dead_syslog_does_not_slow_the_proxy(scheme: &str) {
    let port = dead_port(scheme == "udp").await;
    let origin = HttpOrigin::start().await;
    let extra =
        format!("[audit]\npath = \"audit.log\"\nsyslog = \"{scheme}://127.0.0.1:{port}\"\n");
    let op = Op::start(&config(&[VENDOR], &extra), &catalog(&[origin.port()])).await;
    let client = op.client();
    let started = Instant::now();
    for i in 0..200 {
        let url = if i % 2 == 0 {
            format!("http://{VENDOR}:{}/n{i}", origin.port())
        } else {
            format!("http://{UNLISTED}/n{i}")
        };
        let resp = client.get(url).send().await.expect("request completes");
        assert_eq!(resp.status(), if i % 2 == 0 { 200 } else { 403 });
        let _ = resp.bytes().await;
    }
    let records = op.records(200).await;
    let took = started.elapsed();
    // Loopback requests take milliseconds; a proxy waiting on syslog would
    // take seconds per connect attempt.
    assert!(took < Duration::from_secs(20), "200 requests took {took:?}");
    let m = op.metrics().await;
    assert!(m.contains_key("egress_syslog_sent_total"), "{m:#?}");
    assert!(m.contains_key("egress_syslog_dropped_total"), "{m:#?}");
    if scheme == "tcp" {
        assert_eq!(
            m["egress_syslog_sent_total"], 0.0,
            "nothing can be sent to a closed TCP port"
        );
    }
    let stopping = Instant::now();
    let (_, dir) = op.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "stop took {:?}",
        stopping.elapsed()
    );
    let file = std::fs::read_to_string(dir.path().join("audit.log")).expect("audit file");
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 200, "the file copy is complete");
    for (line, r) in lines.iter().zip(&records) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        assert_eq!(v["id"], r.id_string());
    }
}

#[tokio::test]
async fn a_dead_tcp_syslog_server_does_not_slow_the_proxy() {
    dead_syslog_does_not_slow_the_proxy("tcp").await;
}

#[tokio::test]
async fn a_dead_udp_syslog_server_does_not_slow_the_proxy() {
    dead_syslog_does_not_slow_the_proxy("udp").await;
}

// ---------------------------------------------------------------- Squid format

/// The documented shape: `time elapsed client code/status bytes method URL
/// user hierarchy/peer type`, time `seconds.millis`, elapsed right-aligned
/// in six columns. Returns the ten fields.
fn squid_fields(line: &str) -> Vec<&str> {
    let (time, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{line}"));
    let (secs, millis) = time
        .split_once('.')
        .unwrap_or_else(|| panic!("time: {line}"));
    assert!(
        secs.len() >= 10 && secs.bytes().all(|b| b.is_ascii_digit()),
        "time: {line}"
    );
    assert!(
        millis.len() == 3 && millis.bytes().all(|b| b.is_ascii_digit()),
        "time: {line}"
    );
    // Elapsed: at least six columns, right-aligned with spaces.
    let elapsed = rest.len() - rest.trim_start_matches(' ').len()
        + rest
            .trim_start_matches(' ')
            .find(' ')
            .expect("a space after elapsed");
    assert!(
        elapsed >= 6,
        "elapsed is right-aligned in 6 columns: {line:?}"
    );
    let fields: Vec<&str> = line.split(' ').filter(|f| !f.is_empty()).collect();
    assert_eq!(fields.len(), 10, "ten fields: {line:?}");
    assert!(
        fields[1].bytes().all(|b| b.is_ascii_digit()),
        "elapsed: {line}"
    );
    assert!(
        fields[2].parse::<std::net::IpAddr>().is_ok(),
        "client: {line}"
    );
    let (code, status) = fields[3].split_once('/').expect("code/status");
    assert!(
        code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
        "code: {line}"
    );
    assert!(
        status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()),
        "status: {line}"
    );
    assert!(
        fields[4].bytes().all(|b| b.is_ascii_digit()),
        "bytes: {line}"
    );
    assert!(
        fields[5].bytes().all(|b| b.is_ascii_uppercase()) || fields[5] == "-",
        "method: {line}"
    );
    let (hier, peer) = fields[8].split_once('/').expect("hierarchy/peer");
    assert!(hier.starts_with("HIER_"), "hierarchy: {line}");
    assert!(
        peer == "-" || peer.parse::<std::net::IpAddr>().is_ok(),
        "peer: {line}"
    );
    assert_eq!(fields[9], "-", "type: {line}");
    fields
}

#[tokio::test]
async fn squid_lines_for_a_tunnel_a_forward_and_a_denial() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let extra = "[audit]\npath = \"audit.log\"\nformat = \"squid\"\n";
    let op = Op::start(
        &config(&[VENDOR], extra),
        &catalog(&[origin.port(), echo.port()]),
    )
    .await;

    // A tunnel: CONNECT, 4 bytes each way, client closes.
    let (status, mut s) = connect(op.addr, &format!("{VENDOR}:{}", echo.port())).await;
    assert_eq!(status, 200);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    drop(s);
    op.records(1).await;
    // A forward and a denial.
    let client = op.client();
    let ok = client
        .get(format!("http://{VENDOR}:{}/hello", origin.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.text().await.unwrap(), "hello");
    // With a query string: Squid's strip_query_terms, by default.
    let no = client
        .get(format!("http://{UNLISTED}/?token=s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(no.status(), 403);
    op.records(3).await;
    let (records, dir) = op.stop().await;
    let file = std::fs::read_to_string(dir.path().join("audit.log")).expect("audit file");
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 3, "{file}");

    for (line, r) in lines.iter().zip(&records) {
        let f = squid_fields(line);
        let end = (r.ts + Duration::from_millis(r.duration_ms))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            f[0],
            format!("{}.{:03}", end.as_secs(), end.subsec_millis()),
            "{line}"
        );
        assert!(line.contains(&format!(" {:>6} ", r.duration_ms)), "{line}");
        assert_eq!(f[1], r.duration_ms.to_string());
        assert_eq!(f[2], r.client.ip().to_string());
        assert_eq!(f[4], r.bytes_down.to_string());
        assert_eq!(f[7], "-", "no proxy auth: user -");
    }
    let tunnel = lines[0];
    assert_eq!(
        &squid_fields(tunnel)[3..9],
        &[
            "TCP_TUNNEL/200",
            "4",
            "CONNECT",
            format!("{VENDOR}:{}", echo.port()).as_str(),
            "-",
            "HIER_DIRECT/127.0.0.1",
        ]
    );
    let forward = lines[1];
    assert_eq!(
        &squid_fields(forward)[3..9],
        &[
            "TCP_MISS/200",
            "5",
            "GET",
            format!("http://{VENDOR}:{}/hello", origin.port()).as_str(),
            "-",
            "HIER_DIRECT/127.0.0.1",
        ]
    );
    let denial = lines[2];
    assert_eq!(
        &squid_fields(denial)[3..9],
        &[
            "TCP_DENIED/403",
            "0",
            "GET",
            format!("http://{UNLISTED}/?").as_str(),
            "-",
            "HIER_NONE/-",
        ]
    );
    assert!(!file.contains("s3cret"), "{file}");
    // The record itself (and the syslog copy) keeps the full URL.
    assert_eq!(
        records[2].url.as_deref(),
        Some(format!("http://{UNLISTED}/?token=s3cret").as_str())
    );
}

// ---------------------------------------------------------------- the admin-token warning

fn config_files(admin: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{admin}\n\n[policy]\ncatalog = \"catalog.toml\"\n"
    );
    std::fs::write(dir.path().join("egress-proxy.toml"), cfg).unwrap();
    std::fs::write(dir.path().join("catalog.toml"), catalog(&[443])).unwrap();
    dir
}

fn command(dir: &Path, verb: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg(verb)
        .arg("--config")
        .arg(dir.join("egress-proxy.toml"))
        .current_dir(dir)
        .env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("EGRESS_PROXY__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn check_output(admin: &str) -> String {
    let dir = config_files(admin);
    let out = command(dir.path(), "check").output().expect("run check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    text
}

#[test]
fn check_warns_about_a_public_admin_listener_without_a_token() {
    let text = check_output("admin_listen = \"0.0.0.0:0\"");
    assert!(
        text.contains("warning: server.admin_listen = \"0.0.0.0:0\" is not a loopback address and server.admin_token is not set"),
        "{text}"
    );
    let text = check_output("admin_listen = \"[::]:0\"");
    assert!(text.contains("server.admin_token is not set"), "{text}");
    for quiet in [
        "admin_listen = \"0.0.0.0:0\"\nadmin_token = \"s3cret-token\"",
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"[::1]:0\"",
    ] {
        let text = check_output(quiet);
        assert!(!text.contains("admin_token"), "{quiet}: {text}");
        assert!(text.contains("configuration OK"), "{text}");
    }
}

#[test]
fn run_logs_the_admin_warning() {
    let dir = config_files("admin_listen = \"0.0.0.0:0\"");
    let mut child = command(dir.path(), "run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("server.admin_token is not set") => break true,
            Ok(l) => seen.push(l),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "no warning in the log:\n{}", seen.join("\n"));
}

// ---------------------------------------------------------------- packaging

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    if !tool("systemd-analyze") {
        println!("SKIP: systemd-analyze not available");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egress-proxy.service"),
    )
    .expect("config/egress-proxy.service");
    for key in [
        "ExecStart=/usr/bin/egress-proxy run --config /etc/egress-proxy/egress-proxy.toml",
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/log/egress-proxy",
        "LimitNOFILE=65536",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == key), "the unit lacks {key}");
    }
    // verify needs ExecStart's binary to exist: a copy of the one built.
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("egress-proxy");
    std::fs::copy(BIN, &bin).expect("copy the binary");
    let path = dir.path().join("egress-proxy.service");
    let unit = unit.replace("/usr/bin/egress-proxy", bin.to_str().expect("utf-8"));
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys but says so: any word about our unit fails.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("egress-proxy") || l.contains("Unknown") || l.contains("ignoring"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// The key lines of a TOML file: no comments, no blank lines.
fn key_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn the_packaged_config_is_the_shipped_one_but_for_the_audit_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("config/egress-proxy.toml")).expect("shipped");
    let packaged = std::fs::read_to_string(root.join("config/packaged/egress-proxy.toml"))
        .expect("config/packaged/egress-proxy.toml");
    let want: Vec<String> = key_lines(&shipped)
        .into_iter()
        .map(|l| {
            if l == "path = \"-\"" {
                "path = \"/var/log/egress-proxy/audit.log\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(
        key_lines(&packaged),
        want,
        "config/packaged/egress-proxy.toml must set what config/egress-proxy.toml sets, \
         except [audit] path (a file, not the journal)"
    );
    // It loads as /etc/egress-proxy would hold it: next to the vendor catalog.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("egress-proxy.toml");
    std::fs::write(&cfg, &packaged).expect("config");
    std::fs::copy(
        root.join("config/catalog.toml"),
        dir.path().join("catalog.toml"),
    )
    .expect("catalog");
    let s = egress_proxy::config::Settings::load(Some(&cfg), Vec::new())
        .unwrap_or_else(|e| panic!("the packaged config must load:\n{e}"));
    assert_eq!(
        s.audit.path,
        AuditPath::File("/var/log/egress-proxy/audit.log".into())
    );
    assert_eq!(
        s.policy_settings.catalog.as_deref(),
        Some(dir.path().join("catalog.toml").as_path())
    );
}

#[test]
fn logrotate_accepts_the_snippet() {
    if !tool("logrotate") {
        println!("SKIP: logrotate not available");
        return;
    }
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/logrotate"))
            .expect("config/logrotate");
    for key in [
        "daily",
        "rotate 14",
        "compress",
        "delaycompress",
        "missingok",
        "notifempty",
        "postrotate",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == key),
            "the snippet lacks {key}"
        );
    }
    assert!(
        text.contains("kill -s HUP egress-proxy.service"),
        "postrotate sends SIGHUP"
    );
    // A dry run on a copy that points at a temp folder with one log.
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("audit.log"), "x\n").unwrap();
    let conf = dir.path().join("egress-proxy");
    std::fs::write(
        &conf,
        text.replace("/var/log/egress-proxy", logs.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("logrotate")
        .arg("-d")
        .arg("-f")
        .arg("-s")
        .arg(dir.path().join("state"))
        .arg(&conf)
        .output()
        .expect("logrotate");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !all.contains("error:"),
        "logrotate -d:\n{all}"
    );
    assert!(all.contains("running postrotate script"), "{all}");
}
