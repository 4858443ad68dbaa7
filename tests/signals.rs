#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Lifecycle tests against the real binary, run as a subprocess: SIGHUP
//! reload (catalog, audit file), the file watch, `/metrics` as OpenMetrics,
//! SIGTERM drain, and `run` with a broken configuration.
//!
//! Each test writes `egress-proxy.toml` and `catalog.toml` into a temp dir,
//! starts `egress-proxy run --config …` on port 0 and reads the bound
//! addresses off its log. Origins run in the test's runtime on loopback;
//! every name is mapped to 127.0.0.1 by `dns.static`.
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");
/// Bound on every wait that is not itself what a test measures.
const WAIT: Duration = Duration::from_secs(10);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const DENIED_NOT_IN_CATALOG: &str =
    r#"egress_transactions_total{decision="deny",rule="",reason="not_in_catalog"}"#;

// === the proxy process ===

/// The config file text: port 0 everywhere, loopback clients, `names`
/// mapped to 127.0.0.1, the audit log in `audit.log` beside the config.
fn config(names: &[&str], grace: &str, watch: bool) -> String {
    let statics: Vec<String> = names
        .iter()
        .map(|n| format!("\"{n}\" = [\"127.0.0.1\"]"))
        .collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n\n\
         [clients]\nallow = [\"127.0.0.0/8\"]\n\n\
         [dns]\nstatic = {{ {} }}\nallow_private = [\"127.0.0.0/8\"]\n\n\
         [policy]\ncatalog = \"catalog.toml\"\nwatch = {watch}\n\n\
         [audit]\npath = \"audit.log\"\n",
        statics.join(", ")
    )
}

/// One catalog rule.
fn rule(name: &str, host: &str, port: u16) -> String {
    format!("[[rule]]\nname = \"{name}\"\nhosts = [\"{host}\"]\nports = [{port}]\naction = \"allow\"\n\n")
}

/// A running `egress-proxy run`; killed on drop (a failing test leaves nothing behind).
struct Running {
    child: Child,
    dir: tempfile::TempDir,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.parse().ok())
}

impl Running {
    /// Write the files and start the binary; returns once both listeners are bound.
    async fn start(config: &str, catalog: &str) -> Running {
        Running::start_env(config, catalog, &[]).await
    }

    /// [`Running::start`] with `env` set for the process too.
    async fn start_env(config: &str, catalog: &str, env: &[(&str, &std::ffi::OsStr)]) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("egress-proxy.toml"), config).expect("write config");
        std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(dir.path().join("egress-proxy.toml"))
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("EGRESS_PROXY__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn egress-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line);
            }
        });
        let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut p = Running {
            child,
            dir,
            proxy: unbound,
            admin: unbound,
            log,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            for line in p.log.lock().unwrap().iter() {
                if line.contains("serving") {
                    p.proxy = address_after(line, "listen=").unwrap_or(p.proxy);
                }
                if line.contains("admin endpoints") {
                    p.admin = address_after(line, "admin=").unwrap_or(p.admin);
                }
            }
            if p.proxy != unbound && p.admin != unbound {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("egress-proxy exited at start ({status}):\n{}", p.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "egress-proxy did not log its addresses:\n{}",
                p.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Send a signal with kill(1): "-HUP", "-TERM".
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// Rewrite the catalog in place.
    fn write_catalog(&self, catalog: &str) {
        std::fs::write(self.path("catalog.toml"), catalog).expect("rewrite catalog");
    }

    /// Wait up to `within` for the process to exit.
    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET on the admin listener: (status, content type, body).
    async fn admin_get(&self, path: &str) -> (u16, String, String) {
        let raw = exchange(
            self.admin,
            // The admin listener answers only an IP-literal or localhost Host.
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.admin
            )
            .as_bytes(),
        )
        .await;
        let (status, headers, body) = split_response(&raw);
        let ctype = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        (status, ctype, String::from_utf8_lossy(&body).into_owned())
    }

    /// `/metrics`, validated as OpenMetrics text, as samples.
    async fn metrics(&self) -> HashMap<String, f64> {
        let (status, ctype, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ctype, OPENMETRICS);
        parse_openmetrics(&body)
    }

    /// Poll `/metrics` until `pred` holds (up to `WAIT`); returns the samples.
    async fn metrics_until(
        &self,
        what: &str,
        pred: impl Fn(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed {what}: {m:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain GET through the proxy; the status (0 when nothing came back).
    async fn get(&self, host: &str, port: u16) -> u16 {
        let raw = exchange(
            self.proxy,
            format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        split_response(&raw).0
    }

    /// Open a CONNECT tunnel; panics unless the proxy answers 200.
    async fn tunnel(&self, host: &str, port: u16) -> TcpStream {
        let mut s = TcpStream::connect(self.proxy)
            .await
            .expect("connect to proxy");
        s.write_all(
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write CONNECT");
        let head = read_head(&mut s).await.expect("CONNECT answer");
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT refused: {head}");
        s
    }

    /// The audit file `name` as JSON records (every line must parse).
    fn audit(&self, name: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Poll audit file `name` until a record satisfies `pred`.
    async fn audit_until(
        &self,
        name: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let recs = self.audit(name);
            if recs.iter().any(&pred) {
                return recs;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never got the record: {recs:#?}\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// === clients and origins ===

/// Write `bytes` on a fresh connection, read until it closes (bounded).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    out
}

/// Status, lower-cased headers and body (after the head, as received).
fn split_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new(), Vec::new());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

/// Read a head up to the blank line; None at EOF or after `WAIT`.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A raw TCP origin running `f` on each connection.
async fn tcp_origin<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

/// An HTTP origin answering every request with "hello".
async fn hello_origin() -> u16 {
    tcp_origin(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .await
                .is_err()
            {
                break;
            }
        }
    })
    .await
    .port()
}

/// A TCP echo origin.
async fn echo_origin() -> u16 {
    tcp_origin(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
    .port()
}

/// Write `msg` into a tunnel and expect it echoed back.
async fn echoes(tunnel: &mut TcpStream, msg: &[u8]) {
    tunnel.write_all(msg).await.expect("write into the tunnel");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo read");
    assert_eq!(back, msg);
}

// === OpenMetrics text ===

/// Validate OpenMetrics text (comments are `# HELP|TYPE|UNIT name …`, every
/// other line `name value` or `name{labels} value`, `# EOF` last) and return
/// the samples keyed by the series as written (`name{labels}`).
fn parse_openmetrics(text: &str) -> HashMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n") || text.ends_with("# EOF"),
        "no trailing # EOF:\n{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let mut out = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            assert_eq!(i, lines.len() - 1, "# EOF before the end:\n{text}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let kind = words.next().unwrap_or("");
            let name = words.next().unwrap_or("");
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT") && is_metric_name(name),
                "bad comment line: {line:?}"
            );
            continue;
        }
        let (series, value) = sample(line).unwrap_or_else(|| panic!("bad sample line: {line:?}"));
        out.insert(series, value);
    }
    out
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name value [timestamp]` or `name{l="v",…} value [timestamp]`.
fn sample(line: &str) -> Option<(String, f64)> {
    let name_end = line.find(['{', ' '])?;
    if !is_metric_name(&line[..name_end]) {
        return None;
    }
    let mut series_end = name_end;
    if line[name_end..].starts_with('{') {
        series_end = name_end + labels_len(&line[name_end..])?;
    }
    let rest = line[series_end..].strip_prefix(' ')?;
    let mut parts = rest.split(' ');
    let value: f64 = parts.next()?.parse().ok()?;
    if let Some(ts) = parts.next() {
        ts.parse::<f64>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((line[..series_end].to_string(), value))
}

/// The length of a well-formed `{name="value",…}` at the start of `s`.
fn labels_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 1;
    if b.get(i) == Some(&b'}') {
        return Some(2);
    }
    loop {
        let start = i;
        while b
            .get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            i += 1;
        }
        if i == start
            || b[start].is_ascii_digit()
            || b.get(i) != Some(&b'=')
            || b.get(i + 1) != Some(&b'"')
        {
            return None;
        }
        i += 2;
        loop {
            match b.get(i)? {
                b'\\' => i += 2,
                b'"' => break,
                b'\n' => return None,
                _ => i += 1,
            }
        }
        i += 1;
        match b.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[test]
fn the_openmetrics_validator_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a counter\na_total 1\nb{x=\"1\",y=\"a\\\"b\"} 2.5\nc_bucket{le=\"+Inf\"} 3 1700000000\n# EOF\n";
    let m = parse_openmetrics(ok);
    assert_eq!(value(&m, "a_total"), 1.0);
    assert_eq!(value(&m, "b{x=\"1\",y=\"a\\\"b\"}"), 2.5);
    assert_eq!(value(&m, "c_bucket{le=\"+Inf\"}"), 3.0);
    for bad in [
        "a_total",
        "a_total x",
        "a{x=1} 1",
        "a{x=\"1\" 1",
        "1a 1",
        "a{x=\"1\"}1",
        "a 1 2 3",
    ] {
        assert!(sample(bad).is_none(), "accepted {bad:?}");
    }
    let no_eof = std::panic::catch_unwind(|| parse_openmetrics("a 1\n"));
    assert!(no_eof.is_err());
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_host_within_a_second_while_an_open_tunnel_keeps_working() {
    let web = hello_origin().await;
    let echo = echo_origin().await;
    let names = ["old.test", "new.test", "echo.test"];
    let before = rule("Echo", "echo.test", echo) + &rule("Old", "old.test", web);
    let p = Running::start(&config(&names, "5s", false), &before).await;

    let mut tunnel = p.tunnel("echo.test", echo).await;
    echoes(&mut tunnel, b"before the reload").await;
    assert_eq!(p.get("old.test", web).await, 200);
    assert_eq!(p.get("new.test", web).await, 403, "not in the catalog yet");

    p.write_catalog(&(before.clone() + &rule("New", "new.test", web)));
    p.signal("-HUP");
    let sent = Instant::now();
    let mut status = 0;
    while sent.elapsed() < Duration::from_secs(1) {
        status = p.get("new.test", web).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        200,
        "new host not reachable 1 s after SIGHUP:\n{}",
        p.stderr()
    );

    echoes(&mut tunnel, b"after the reload").await;
    assert_eq!(p.get("old.test", web).await, 200);
    let log = p.stderr();
    assert!(
        log.contains("rule added: \"New\""),
        "the reload logs the catalog diff:\n{log}"
    );
    let m = p.metrics().await;
    assert_eq!(value(&m, r#"egress_reloads_total{result="ok"}"#), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_catalog_on_sighup_keeps_the_old_policy_and_counts_a_failure() {
    let web = hello_origin().await;
    let names = ["old.test", "new.test"];
    let before = rule("Old", "old.test", web);
    let p = Running::start(&config(&names, "5s", false), &before).await;
    assert_eq!(p.get("old.test", web).await, 200);
    let m0 = p.metrics().await;
    let hash = |m: &HashMap<String, f64>| {
        m.keys()
            .find(|k| k.starts_with("egress_catalog_info{"))
            .cloned()
            .expect("egress_catalog_info")
    };

    // A valid new rule next to a broken one: none of it may take effect.
    let broken = before.clone()
        + &rule("New", "new.test", web)
        + "[[rule]]\nname = \"Broken\"\nhosts = [\"broken.test\"]\nports = [443]\naction = \"permit\"\n";
    p.write_catalog(&broken);
    p.signal("-HUP");
    let m = p
        .metrics_until("a failed reload", |m| {
            value(m, r#"egress_reloads_total{result="failed"}"#) >= 1.0
        })
        .await;
    assert_eq!(value(&m, r#"egress_reloads_total{result="failed"}"#), 1.0);
    assert_eq!(value(&m, r#"egress_reloads_total{result="ok"}"#), 0.0);
    assert_eq!(hash(&m), hash(&m0), "the loaded catalog did not change");

    assert_eq!(
        p.get("old.test", web).await,
        200,
        "old policy still in force"
    );
    assert_eq!(
        p.get("new.test", web).await,
        403,
        "nothing from the broken catalog applies"
    );
    // The log line reaches the reader thread on its own schedule.
    let deadline = Instant::now() + WAIT;
    while !p.stderr().contains("reload failed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = p.stderr();
    assert!(
        log.contains("reload failed"),
        "the failure is logged:\n{log}"
    );
    assert!(
        log.contains("Broken"),
        "the log names the broken rule:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_watch_reloads_an_edited_catalog_without_a_signal() {
    let web = hello_origin().await;
    let names = ["old.test", "new.test"];
    let before = rule("Old", "old.test", web);
    let p = Running::start(&config(&names, "5s", true), &before).await;
    assert_eq!(p.get("new.test", web).await, 403);
    // The watcher takes its first snapshot of the files when its task starts,
    // which may be just after the listeners log; do not edit before that.
    tokio::time::sleep(Duration::from_millis(300)).await;

    p.write_catalog(&(before + &rule("New", "new.test", web)));
    let edited = Instant::now();
    let mut status = 0;
    while edited.elapsed() < Duration::from_secs(5) {
        status = p.get("new.test", web).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        200,
        "the edited catalog was not picked up in 5 s:\n{}",
        p.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_audit_file_and_sighup_send_new_records_to_a_fresh_file() {
    let web = hello_origin().await;
    let names = ["old.test", "new.test"];
    let catalog = rule("Old", "old.test", web) + &rule("New", "new.test", web);
    let p = Running::start(&config(&names, "5s", false), &catalog).await;

    assert_eq!(p.get("old.test", web).await, 200);
    p.audit_until("audit.log", |r| r["host"] == "old.test")
        .await;
    std::fs::rename(p.path("audit.log"), p.path("audit.log.1")).expect("rotate");
    p.signal("-HUP");
    // The reopen creates the new file (before any record arrives).
    let deadline = Instant::now() + WAIT;
    while !p.path("audit.log").exists() {
        assert!(
            Instant::now() < deadline,
            "audit.log not reopened after SIGHUP:\n{}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(p.get("new.test", web).await, 200);
    let fresh = p
        .audit_until("audit.log", |r| r["host"] == "new.test")
        .await;
    assert!(
        fresh.iter().all(|r| r["host"] == "new.test"),
        "only the new record: {fresh:#?}"
    );
    assert_eq!(fresh.len(), 1, "{fresh:#?}");
    assert_eq!(fresh[0]["status"], 200);
    assert_eq!(fresh[0]["rule"], "New");
    let old = p.audit("audit.log.1");
    assert_eq!(
        old.len(),
        1,
        "the rotated file keeps the old record only: {old:#?}"
    );
    assert_eq!(old[0]["host"], "old.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_openmetrics_and_counters_move_with_traffic() {
    let web = hello_origin().await;
    let names = ["old.test", "denied.test"];
    let p = Running::start(&config(&names, "5s", false), &rule("Old", "old.test", web)).await;

    let (status, ctype, body) = p.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(ctype, OPENMETRICS);
    assert!(body.ends_with("# EOF\n"), "{body}");
    let m0 = parse_openmetrics(&body);
    for series in [
        "egress_audit_records_total",
        "egress_open_connections",
        "egress_catalog_rules",
    ] {
        assert!(m0.contains_key(series), "{series} missing:\n{body}");
    }
    assert_eq!(value(&m0, "egress_catalog_rules"), 1.0);
    let audited = value(&m0, "egress_audit_records_total");

    assert_eq!(p.get("denied.test", web).await, 403);
    let m = p
        .metrics_until("the denied transaction", |m| {
            value(m, DENIED_NOT_IN_CATALOG) > value(&m0, DENIED_NOT_IN_CATALOG)
        })
        .await;
    assert_eq!(value(&m, DENIED_NOT_IN_CATALOG), 1.0);
    assert!(value(&m, "egress_audit_records_total") > audited);

    assert_eq!(p.get("old.test", web).await, 200);
    let m = p
        .metrics_until("the allowed transaction", |m| {
            value(
                m,
                r#"egress_transactions_total{decision="allow",rule="Old",reason=""}"#,
            ) >= 1.0
        })
        .await;
    assert_eq!(value(&m, "egress_audit_records_total"), audited + 2.0);
    assert_eq!(
        value(&m, r#"egress_rule_down_bytes_total{rule="Old"}"#),
        5.0
    );
    assert!(
        m.keys()
            .all(|k| !k.contains("old.test") && !k.contains("denied.test")),
        "labels never carry raw hosts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_proxy_exits_0_at_once() {
    let mut p = Running::start(
        &config(&["old.test"], "5s", false),
        &rule("Old", "old.test", 8080),
    )
    .await;
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(3)).await;
    let Some(status) = status else {
        panic!(
            "an idle egress-proxy still running 3 s after SIGTERM:\n{}",
            p.stderr()
        );
    };
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
    let log = p.stderr();
    assert!(log.contains("stopped"), "{log}");
}

/// The next sd_notify datagram on `sock` (waits up to [`WAIT`]).
fn notification(sock: &std::os::unix::net::UnixDatagram, log: &dyn Fn() -> String) -> String {
    let mut buf = vec![0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no sd_notify message ({e}):\n{}", log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_then_reloading_and_ready_on_sighup_then_stopping() {
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut p = Running::start_env(
        &config(&["old.test"], "5s", false),
        &rule("Old", "old.test", 8080),
        &[("NOTIFY_SOCKET", sock_path.as_os_str())],
    )
    .await;
    let log = || p.stderr();

    let ready = notification(&sock, &log);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {ready:?}"));
    assert!(
        status.contains("catalog ") && status.contains("last reload: none"),
        "{status}"
    );
    // Ready means the ports answer.
    TcpStream::connect(p.proxy)
        .await
        .expect("the proxy port answers after READY=1");
    TcpStream::connect(p.admin)
        .await
        .expect("the admin port answers after READY=1");

    p.signal("-HUP");
    let reloading = notification(&sock, &log);
    let lines: Vec<&str> = reloading.lines().collect();
    assert!(lines.contains(&"RELOADING=1"), "{reloading}");
    let usec = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= in {reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|n| n > 0), "{reloading}");
    let ready = notification(&sock, &log);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("last reload: ok"), "{ready}");

    p.signal("-TERM");
    let stopping = notification(&sock, &log);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = p.wait_exit(WAIT).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", p.stderr());
}

/// An origin that sends its head at once, then `chunks` pieces of 100 bytes
/// every `every`.
async fn slow_origin(chunks: usize, every: Duration) -> u16 {
    tcp_origin(move |mut s| async move {
        if read_head(&mut s).await.is_none() {
            return;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            chunks * 100
        );
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for i in 0..chunks {
            tokio::time::sleep(every).await;
            let piece = [b'a' + u8::try_from(i % 26).unwrap_or(0); 100];
            if s.write_all(&piece).await.is_err() {
                return;
            }
        }
        let mut sink = [0u8; 512];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
    .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_slow_response_and_exits_0() {
    let slow = slow_origin(10, Duration::from_millis(150)).await;
    let mut p = Running::start(
        &config(&["slow.test"], "10s", false),
        &rule("Slow", "slow.test", slow),
    )
    .await;
    assert_eq!(p.admin_get("/readyz").await.0, 200);

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{}", p.proxy)).expect("proxy url"))
        .timeout(WAIT)
        .build()
        .expect("client");
    let mut resp = client
        .get(format!("http://slow.test:{slow}/"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("some body")
        .to_vec();
    assert!(body.len() < 1000, "the body is still coming");

    p.signal("-TERM");
    let term = Instant::now();
    let deadline = term + Duration::from_secs(1);
    loop {
        let (status, _, _) = p.admin_get("/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "the process must wait for the in-flight response"
    );
    while let Some(c) = resp.chunk().await.expect("rest of the body") {
        body.extend_from_slice(&c);
    }
    let want: Vec<u8> = (0..10u8).flat_map(|i| [b'a' + i; 100]).collect();
    assert_eq!(body.len(), 1000, "the complete body arrives");
    assert_eq!(body, want);
    drop(client);

    let status = p.wait_exit(WAIT).await;
    let took = term.elapsed();
    let Some(status) = status else {
        panic!(
            "egress-proxy still running {took:?} after SIGTERM (grace 10s), body done:\n{}",
            p.stderr()
        );
    };
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
    assert!(
        took < Duration::from_secs(10),
        "exited within the grace: {took:?}"
    );
    let recs = p.audit("audit.log");
    let r = recs
        .iter()
        .find(|r| r["host"] == "slow.test")
        .unwrap_or_else(|| panic!("no record for the drained request: {recs:#?}"));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["bytes_down"], 1000, "{r}");
    assert!(r.get("reason").is_none(), "a clean end has no reason: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_tunnel_open_past_the_grace_with_reason_shutdown() {
    let echo = echo_origin().await;
    let mut p = Running::start(
        &config(&["echo.test"], "1s", false),
        &rule("Echo", "echo.test", echo),
    )
    .await;
    let mut tunnel = p.tunnel("echo.test", echo).await;
    echoes(&mut tunnel, b"hello through the tunnel").await;

    p.signal("-TERM");
    let term = Instant::now();
    let status = p.wait_exit(Duration::from_secs(8)).await;
    let took = term.elapsed();
    let Some(status) = status else {
        panic!(
            "egress-proxy still running {took:?} after SIGTERM (grace 1s):\n{}",
            p.stderr()
        );
    };
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
    assert!(
        took >= Duration::from_millis(900),
        "the tunnel got its grace: {took:?}"
    );

    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, tunnel.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel was closed");
    let recs = p.audit("audit.log");
    let r = recs
        .iter()
        .find(|r| r["method"] == "CONNECT")
        .unwrap_or_else(|| panic!("no record for the cut tunnel: {recs:#?}"));
    assert_eq!(r["reason"], "shutdown", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["bytes_up"], 24, "{r}");
    assert_eq!(r["bytes_down"], 24, "{r}");
}

/// `egress-proxy run` on `config` and `catalog`: (exit code, stderr).
async fn run_to_exit(config: &str, catalog: &str) -> (Option<i32>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("egress-proxy.toml"), config).expect("write config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("egress-proxy.toml"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("run with a broken config did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        dir,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_broken_config_exits_1_and_prints_the_errors() {
    let good_catalog = rule("Old", "old.test", 8080);
    let unknown_key = config(&[], "5s", false).replace("[clients]", "bogus_key = 1\n\n[clients]");
    let (code, stderr, dir) = run_to_exit(&unknown_key, &good_catalog).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("bogus_key"),
        "names the unknown key: {stderr}"
    );
    assert!(!dir.path().join("audit.log").exists(), "nothing was served");

    let broken_catalog = good_catalog
        + "[[rule]]\nname = \"Broken\"\nhosts = [\"broken.test\"]\nports = [443]\naction = \"permit\"\n";
    let (code, stderr, dir) = run_to_exit(&config(&[], "5s", false), &broken_catalog).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("catalog.toml") && stderr.contains("Broken"),
        "names the broken rule: {stderr}"
    );
    assert!(!dir.path().join("audit.log").exists(), "nothing was served");
}

// === memory after a storm ===

/// Aborted transactions in the storm: a third each of partial heads (40 KB
/// of header, never finished), uploads cut mid-body, and tunnels reset
/// after 50 KB.
const STORM: usize = 1200;
/// Resident memory the proxy may keep above its baseline once quiet.
const QUIET_MARGIN_KIB: u64 = 32 * 1024;

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// An origin that reads and discards whatever each connection sends.
async fn sink_origin() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// The first bytes of aborted transaction `i`.
fn aborted(i: usize, port: u16) -> Vec<u8> {
    let host = format!("storm.test:{port}");
    match i % 3 {
        0 => {
            let mut b =
                format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nX-Pad: ").into_bytes();
            b.resize(b.len() + 40_000, b'a');
            b
        }
        1 => {
            let mut b = format!(
                "POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\n"
            )
            .into_bytes();
            b.resize(b.len() + 200_000, b'x');
            b
        }
        _ => {
            let mut b = format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
            b.resize(b.len() + 50_000, b'y');
            b
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_after_a_storm_of_aborted_transactions() {
    let port = sink_origin().await;
    let p = Running::start(
        &config(&["storm.test"], "5s", false),
        &rule("storm", "storm.test", port),
    )
    .await;
    let pid = p.child.id();
    // Warm up what is made once (metric series, the DNS map, the first
    // connection's buffers), then take the baseline.
    for i in 0..30 {
        let s = TcpStream::connect(p.proxy).await.unwrap();
        let mut s = s;
        s.write_all(&aborted(i, port)).await.unwrap();
        drop(s);
    }
    p.audit_until("audit.log", |_| true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_kib(pid);

    let mut open = Vec::with_capacity(STORM);
    for i in 0..STORM {
        let mut s = TcpStream::connect(p.proxy).await.unwrap();
        s.write_all(&aborted(i, port)).await.unwrap();
        open.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let peak = rss_kib(pid);
    for s in open {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }
    // A quiet moment with no request of any kind (a scrape of /metrics is
    // allocator activity too, and would hide memory kept while idle), then
    // check that every connection had ended by then.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = rss_kib(pid);
    let m = p.metrics().await;
    assert_eq!(m.get("egress_open_connections"), Some(&0.0), "{m:#?}");
    assert_eq!(m.get("egress_open_tunnels"), Some(&0.0), "{m:#?}");
    let records = p.audit("audit.log").len();
    eprintln!("RSS: baseline {base} KiB, storm peak {peak} KiB, quiet after {quiet} KiB; {records} records");
    assert!(
        peak > base + 2 * QUIET_MARGIN_KIB,
        "the storm did not load the proxy (baseline {base} KiB, peak {peak} KiB)"
    );
    assert!(
        quiet < base + QUIET_MARGIN_KIB,
        "RSS stayed at {quiet} KiB after the storm (baseline {base} KiB, peak {peak} KiB)"
    );
}

// === SIGTERM with a shutdown delay, and scale-out behind HAProxy ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_shutdown_delay_is_not_ready_but_still_serves() {
    let hello = hello_origin().await;
    let cfg = config(&["hello.test"], "5s", false)
        .replace("[server]\n", "[server]\nshutdown_delay = \"2s\"\n");
    let mut p = Running::start(&cfg, &rule("Hello", "hello.test", hello)).await;
    assert_eq!(p.admin_get("/readyz").await.0, 200);
    p.signal("-TERM");
    let deadline = Instant::now() + WAIT;
    while p.admin_get("/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never said 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not ready, and still serving new connections until the delay ends.
    assert_eq!(p.get("hello.test", hello).await, 200, "{}", p.stderr());
    let status = p.wait_exit(WAIT).await.expect("exits after the delay");
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
    assert!(
        p.stderr().contains("not ready, still accepting"),
        "{}",
        p.stderr()
    );
}

/// HAProxy from the `PATH` or /usr/sbin; `None` (a skip) outside CI.
fn haproxy_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "haproxy is not installed (.ci/run installs Debian's haproxy)"
        );
        eprintln!("SKIP: haproxy not installed");
    }
    found
}

/// A free loopback port: the replicas listen on fixed ports, so that a
/// restarted one comes back where HAProxy expects it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One replica as the README's recipe has it: PROXY v2 from the balancer
/// only, a shutdown delay above the balancer's check interval.
fn replica_config(port: u16, admin: u16) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         shutdown_grace = \"5s\"\nshutdown_delay = \"1s\"\n\
         proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n\n\
         [clients]\nallow = [\"127.0.0.0/8\"]\n\n\
         [dns]\nstatic = {{ \"origin.test\" = [\"127.0.0.1\"] }}\nallow_private = [\"127.0.0.0/8\"]\n\n\
         [policy]\ncatalog = \"catalog.toml\"\n\n[audit]\npath = \"audit.log\"\n"
    )
}

/// HAProxy in TCP mode in front of two replicas, health-checking `/readyz`.
struct Haproxy {
    child: Child,
    front: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    async fn start(bin: &PathBuf, replicas: [(u16, u16); 2]) -> Haproxy {
        let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let [(p1, a1), (p2, a2)] = replicas;
        let cfg = format!(
            "global\n    maxconn 2000\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    \
             retries 3\n    option redispatch\n\
             frontend egress\n    bind {front}\n    default_backend proxies\n\
             backend proxies\n    balance roundrobin\n    option httpchk\n    \
             http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost\n    \
             http-check expect status 200\n    \
             default-server inter 100ms fall 1 rise 1 send-proxy-v2\n    \
             server p1 127.0.0.1:{p1} check port {a1}\n    server p2 127.0.0.1:{p2} check port {a2}\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let h = Haproxy {
            child,
            front,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(front).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {front}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h
    }
}

/// A gateway on 127.0.0.2 (not HAProxy's 127.0.0.1) sending request `n`
/// through the balancer; Ok on a 200.
async fn gateway_get(front: SocketAddr, origin: u16, n: usize) -> Result<(), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .map_err(|e| e.to_string())?;
    let mut s = socket
        .connect(front)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!(
        "GET http://origin.test:{origin}/t/{n} HTTP/1.1\r\nHost: origin.test:{origin}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        ))
    }
}

/// A request the load sent, and how it ended.
type Sent = (usize, Result<(), String>);

/// Gateways sending requests through the balancer until `stop`.
fn start_load(
    front: SocketAddr,
    origin: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Sent>>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (0..4)
        .map(|_| {
            let (stop, next) = (Arc::clone(&stop), Arc::clone(&next));
            tokio::spawn(async move {
                let mut done = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    done.push((n, gateway_get(front, origin, n).await));
                }
                done
            })
        })
        .collect()
}

/// SIGTERM a replica, let it drain and exit, start it again on its ports.
async fn roll(old: &mut Running, config: &str, catalog: &str) -> Running {
    old.signal("-TERM");
    let status = old.wait_exit(WAIT).await.expect("the replica exits");
    assert_eq!(status.code(), Some(0), "{}", old.stderr());
    let new = Running::start(config, catalog).await;
    // Back in the pool after a check or two.
    tokio::time::sleep(Duration::from_millis(500)).await;
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_haproxy_loses_and_repeats_nothing() {
    let Some(bin) = haproxy_bin() else {
        return;
    };
    let origin = hello_origin().await;
    let catalog = rule("Origin", "origin.test", origin);
    let ports = [(free_port(), free_port()), (free_port(), free_port())];
    let configs = ports.map(|(p, a)| replica_config(p, a));
    let mut first = Running::start(&configs[0], &catalog).await;
    let mut second = Running::start(&configs[1], &catalog).await;
    let lb = Haproxy::start(&bin, ports).await;
    let deadline = Instant::now() + WAIT;
    while gateway_get(lb.front, origin, usize::MAX).await.is_err() {
        assert!(Instant::now() < deadline, "nothing through haproxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(lb.front, origin, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut first_again = roll(&mut first, &configs[0], &catalog).await;
    let mut second_again = roll(&mut second, &configs[1], &catalog).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::new();
    for worker in load {
        sent.extend(worker.await.expect("load worker"));
    }
    for r in [&mut first_again, &mut second_again] {
        r.signal("-TERM");
        r.wait_exit(WAIT).await.expect("the replica exits");
    }

    let failed: Vec<_> = sent.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        sent.len()
    );
    // Every transaction exactly once in the union of the replicas' records,
    // with the gateway's address as the client.
    let mut seen = std::collections::BTreeMap::new();
    let mut per_replica = Vec::new();
    for r in [&first, &second, &first_again, &second_again] {
        let records = r.audit("audit.log");
        per_replica.push(records.len());
        for rec in records {
            let url = rec["url"].as_str().unwrap_or_default().to_string();
            let Some(n) = url
                .rsplit_once("/t/")
                .and_then(|(_, n)| n.parse::<usize>().ok())
            else {
                continue;
            };
            assert!(
                rec["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("127.0.0.2:")),
                "recorded as HAProxy, not the gateway: {rec}"
            );
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    // The request that waited for HAProxy to see the replicas up.
    seen.remove(&usize::MAX);
    assert!(
        sent.len() > 100,
        "too little load to mean anything: {}",
        sent.len()
    );
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "every replica took part: {per_replica:?}"
    );
    for (n, _) in &sent {
        assert_eq!(
            seen.get(n),
            Some(&1),
            "transaction {n}: records {:?}",
            seen.get(n)
        );
    }
    assert_eq!(
        seen.len(),
        sent.len(),
        "records for transactions never sent"
    );
}
