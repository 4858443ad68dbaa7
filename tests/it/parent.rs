//! Egress through a parent proxy (`[upstream] parent`), tested against a
//! real one: Debian's Squid, started per test on loopback with a
//! configuration written here (no cache, logs and pid file in a temp dir,
//! foreground `-N`, `squid -k parse` first). Its `hosts_file` maps the test
//! names to 127.0.0.1, so the parent resolves them itself.
//!
//! Without Squid these tests print `SKIP: squid not installed` and pass,
//! unless `CI=true` (`.ci/run` installs it), where they fail. The tests that
//! need no parent (one that is down, a `route = "direct"` rule) always run.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_proxy::audit::{Decided, Reason, Record};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::inspect;
use crate::support::*;

pub(crate) const ORIGIN: &str = "origin.test";
pub(crate) const REFUSED: &str = "refused.test";
pub(crate) const TLS: &str = "tls.test";
pub(crate) const FRONT: &str = "front.test";
pub(crate) const PRIVATE: &str = "private.test";
const USER: &str = "alice";
const PASSWORD: &str = "wonder land";

/// A Squid parent on loopback, killed on drop.
pub(crate) struct Squid {
    pub(crate) addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
    /// Squid's service name (`-n`): the prefix of its shared-memory segments.
    service: String,
    /// Listening with TLS (`https_port`): its URL is `https://localhost:…`.
    tls: bool,
}

/// Squid's binary, or None (after SKIP) when it is not installed; with
/// `CI=true` a missing Squid fails the test.
fn squid_bin() -> Option<PathBuf> {
    let found = ["/usr/sbin/squid", "/usr/bin/squid"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "squid not installed, and CI=true: .ci/run installs Debian's squid"
        );
        println!("SKIP: squid not installed");
        eprintln!("SKIP: squid not installed");
    }
    found
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Squid {
    /// Start Squid refusing `refused.test` (`http_access deny`), and with
    /// `auth` requiring Basic credentials (`alice` / `wonder land`).
    pub(crate) fn start(auth: bool) -> Option<Squid> {
        Squid::start_tls(auth, None)
    }

    /// [`Squid::start`], listening with TLS (`https_port`, the
    /// certificate `cert` made for `localhost`) when one is given.
    pub(crate) fn start_tls(auth: bool, cert: Option<&TestCert>) -> Option<Squid> {
        let bin = squid_bin()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // Run as root, Squid drops to `proxy`: it must read and write here.
        chmod(d, 0o777);
        let hosts = format!(
            "127.0.0.1 {ORIGIN} {REFUSED} {TLS} {} localhost\n",
            inspect::HOST
        );
        write(d, "hosts", &hosts);
        let port = free_port();
        let mut access = format!("acl refused dstdomain {REFUSED}\nhttp_access deny refused\n");
        if auth {
            let out = Command::new("openssl")
                .args(["passwd", "-apr1", PASSWORD])
                .output()
                .expect("openssl passwd");
            assert!(out.status.success(), "openssl passwd -apr1 failed");
            let hash = String::from_utf8(out.stdout).expect("hash");
            write(d, "htpasswd", &format!("{USER}:{}\n", hash.trim()));
            access.push_str(&format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
                 auth_param basic realm parent\n\
                 acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n",
                d.join("htpasswd").display()
            ));
        } else {
            access.push_str("http_access allow all\n");
        }
        let listen = match cert {
            Some(c) => {
                write(d, "parent.pem", &c.cert_pem);
                write(d, "parent.key", &c.key_pem);
                format!(
                    "https_port 127.0.0.1:{port} tls-cert={d}/parent.pem tls-key={d}/parent.key",
                    d = d.display()
                )
            }
            None => format!("http_port 127.0.0.1:{port}"),
        };
        let conf = format!(
            "{listen}\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             cache deny all\ncache_mem 0 MB\n\
             hosts_file {d}/hosts\n\
             dns_nameservers 127.0.0.1\n\
             coredump_dir {d}\n\
             pinger_enable off\nnetdb_filename none\n\
             shutdown_lifetime 0 seconds\n\
             {access}",
            d = d.display()
        );
        write(d, "squid.conf", &conf);
        let conf_path = d.join("squid.conf");
        // Squid names its shared-memory segments after the service name
        // ("squid" unless -n): Debian's own squid service, or two parents
        // started at once by parallel tests, would collide on
        // /squid-cf__metadata.shm unless each has its own.
        let service = format!("egressit{port}");
        let parse = Command::new(&bin)
            .arg("-n")
            .arg(&service)
            .arg("-k")
            .arg("parse")
            .arg("-f")
            .arg(&conf_path)
            .output()
            .expect("squid -k parse");
        assert!(
            parse.status.success(),
            "squid -k parse: {}",
            String::from_utf8_lossy(&parse.stderr)
        );
        let child = Command::new(&bin)
            .arg("-n")
            .arg(&service)
            .arg("-N")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start squid");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let squid = Squid {
            addr,
            child,
            dir,
            service,
            tls: cert.is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "squid did not listen on {addr}: {}",
                squid.cache_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(squid)
    }

    pub(crate) fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    /// Wait until Squid's access.log has a line containing `needle`.
    pub(crate) async fn logged(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log =
                std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "squid never logged {needle:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed Squid leaves its segments behind; they are ours alone.
        let prefix = format!("{}-", self.service);
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    chmod(&p, 0o644);
}

/// A proxy whose parent is `parent`, with `upstream` lines added to the
/// `[upstream]` section, static names (for local resolution and direct
/// routes) and `catalog`.
pub(crate) async fn proxy(
    parent: &str,
    upstream: &str,
    statics: &[(&str, &str)],
    catalog: &str,
) -> TestProxy {
    let extra = format!("[upstream]\nparent = \"{parent}\"\n{upstream}\n");
    let cfg = config_with(&ConfigOpts {
        statics,
        allow_private: &["127.0.0.0/8"],
        extra: &extra,
        ..ConfigOpts::default()
    });
    TestProxy::start(&cfg, catalog).await
}

/// A raw GET through the proxy.
pub(crate) async fn get(proxy: SocketAddr, host: &str, port: u16, path: &str) -> RawResponse {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    let head = format!(
        "GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    read_response(&mut s).await
}

/// Send `total` pattern bytes through an echo tunnel and read them back,
/// then close. Not [`echo_through`]: Squid ends a tunnel at the first
/// half-close, so the bytes must come back before the client closes.
pub(crate) async fn echo_back(s: TcpStream, total: usize) {
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let data: Vec<u8> = (0..total).map(pattern).collect();
        wr.write_all(&data).await.expect("write");
        wr
    });
    let mut back = vec![0u8; total];
    tokio::time::timeout(WAIT, rd.read_exact(&mut back))
        .await
        .expect("the bytes came back in time")
        .expect("read");
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    drop(writer.await.expect("writer"));
}

pub(crate) fn assert_parent_refusal(r: &Record, parent_status: u16) {
    assert_eq!(r.status, Some(502), "{r:#?}");
    assert_eq!(r.reason, Some(Reason::ParentRefused), "{r:#?}");
    assert_eq!(r.parent_status, Some(parent_status), "{r:#?}");
}

// ================================================================ plain HTTP

#[tokio::test]
async fn plain_get_goes_through_the_parent_in_absolute_form() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let catalog = rule("origin", &[ORIGIN], origin.port(), "allow", "");
    // No static name: the parent resolves (parent_resolve = "parent").
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let resp = get(p.addr, ORIGIN, origin.port(), "/a?b=1").await;
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert_eq!(resp.body_text(), "hello");
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/a?b=1");
    let via = seen[0].header("via").unwrap_or_default();
    assert!(
        via.contains("squid"),
        "the origin saw it via Squid: {via:?}"
    );
    squid
        .logged(&format!("GET http://{ORIGIN}:{}/a", origin.port()))
        .await;
    let r = p.only_record().await;
    assert_eq!(r.status, Some(200), "{r:#?}");
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(r.upstream, Some(squid.addr), "upstream names the parent");
    assert_eq!(r.parent_status, Some(200), "{r:#?}");
    let metrics = admin_client()
        .get(format!("http://{}/metrics", p.admin))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("egress_upstream_routes_total{route=\"parent\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_parent_refusal_of_a_plain_request_is_parent_refused() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let catalog = rule("refused", &[REFUSED], origin.port(), "allow", "");
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let resp = get(p.addr, REFUSED, origin.port(), "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-egress-error"), Some("parent_refused"));
    assert!(origin.seen().is_empty());
    assert_parent_refusal(&p.only_record().await, 403);
}

// ================================================================ tunnels

#[tokio::test]
async fn connect_through_the_parent_carries_bytes_both_ways() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let echo = echo_origin().await;
    let catalog = rule("echo", &[ORIGIN], echo.port(), "bypass", "");
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let s = open_tunnel(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    echo_back(s, 300_000).await;
    squid
        .logged(&format!("CONNECT {ORIGIN}:{}", echo.port()))
        .await;
    let r = p.only_record().await;
    assert_eq!((r.status, r.reason), (Some(200), None), "{r:#?}");
    assert_eq!(r.upstream, Some(squid.addr), "{r:#?}");
    assert_eq!(r.parent_status, Some(200), "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (300_000, 300_000), "{r:#?}");
}

#[tokio::test]
async fn the_sni_check_still_refuses_a_mismatch_through_the_parent() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let origin = TlsOrigin::start(TLS).await;
    let catalog = rule("tls", &[TLS], origin.addr.port(), "bypass", "");
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let connector = TlsConnector::from(Arc::new(origin.client_config()));

    // The right name: the handshake and a request go through.
    let s = open_tunnel(p.addr, &format!("{TLS}:{}", origin.addr.port())).await;
    let name = ServerName::try_from(TLS.to_string()).expect("name");
    let mut tls = connector.connect(name, s).await.expect("handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).ends_with("tls hello"));

    // A fronted name: refused inside the tunnel.
    let s = open_tunnel(p.addr, &format!("{TLS}:{}", origin.addr.port())).await;
    let front = ServerName::try_from(FRONT.to_string()).expect("name");
    assert!(connector.connect(front, s).await.is_err());
    let r = p.record_with(Reason::SniMismatch).await;
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.sni.as_deref(), Some(FRONT), "{r:#?}");
    assert_eq!(r.upstream, Some(squid.addr), "{r:#?}");
    assert_eq!(origin.snis.lock().expect("snis").len(), 1);
}

#[tokio::test]
async fn a_parent_refusal_of_a_connect_is_parent_refused_with_its_status() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let echo = echo_origin().await;
    let catalog = rule("refused", &[REFUSED], echo.port(), "bypass", "");
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let (status, _s) = connect(p.addr, &format!("{REFUSED}:{}", echo.port())).await;
    assert_eq!(status, 502, "the client gets no 200 before the parent's");
    let r = p.only_record().await;
    assert_parent_refusal(&r, 403);
    assert_eq!(r.decision, Decided::Bypass, "the policy's decision is kept");
    assert_eq!(r.upstream, Some(squid.addr), "{r:#?}");
    squid.logged("TCP_DENIED/403").await;
}

#[tokio::test]
async fn parent_credentials_missing_wrong_and_right() {
    let Some(squid) = Squid::start(true) else {
        return;
    };
    let echo = echo_origin().await;
    let origin = HttpOrigin::start().await;
    let catalog = rule("echo", &[ORIGIN], echo.port(), "bypass", "")
        + &rule("web", &[ORIGIN], origin.port(), "allow", "");
    let tunnel_to = format!("{ORIGIN}:{}", echo.port());

    // Missing: 407 from the parent.
    let p = proxy(&squid.url(), "", &[], &catalog).await;
    let (status, _s) = connect(p.addr, &tunnel_to).await;
    assert_eq!(status, 502);
    assert_parent_refusal(&p.only_record().await, 407);
    let resp = get(p.addr, ORIGIN, origin.port(), "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-egress-error"), Some("parent_refused"));
    assert_parent_refusal(&p.exactly(2).await[1], 407);
    drop(p);

    // Wrong password (in the URL).
    let wrong = format!("http://{USER}:nope@{}", squid.addr);
    let p = proxy(&wrong, "", &[], &catalog).await;
    let (status, _s) = connect(p.addr, &tunnel_to).await;
    assert_eq!(status, 502);
    assert_parent_refusal(&p.only_record().await, 407);
    drop(p);

    // Right (keys): the tunnel and a plain request go through.
    let keys = format!("parent_user = \"{USER}\"\nparent_password = \"{PASSWORD}\"");
    let p = proxy(&squid.url(), &keys, &[], &catalog).await;
    let s = open_tunnel(p.addr, &tunnel_to).await;
    echo_back(s, 10_000).await;
    let resp = get(p.addr, ORIGIN, origin.port(), "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "hello");
    // The parent's credentials never reach the origin, nor a record.
    assert!(origin.seen()[0].header("proxy-authorization").is_none());
    for r in p.exactly(2).await {
        assert_eq!((r.status, r.reason), (Some(200), None), "{r:#?}");
        assert!(!format!("{r:?}").contains("wonder"), "{r:#?}");
    }
    squid.logged(&format!(" {USER} ")).await;
}

#[tokio::test]
async fn parent_resolve_local_asks_for_the_vetted_address_and_refuses_private_ones() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    let echo = echo_origin().await;
    let origin = HttpOrigin::start().await;
    let catalog = rule("echo", &[ORIGIN, PRIVATE], echo.port(), "bypass", "")
        + &rule("web", &[ORIGIN], origin.port(), "allow", "");
    let statics = [(ORIGIN, "127.0.0.1"), (PRIVATE, "10.1.2.3")];
    let p = proxy(
        &squid.url(),
        "parent_resolve = \"local\"",
        &statics,
        &catalog,
    )
    .await;

    let s = open_tunnel(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    echo_back(s, 1000).await;
    squid
        .logged(&format!("CONNECT 127.0.0.1:{}", echo.port()))
        .await;

    // Plain HTTP: inside a CONNECT to the vetted address, the name in Host.
    let resp = get(p.addr, ORIGIN, origin.port(), "/x").await;
    assert_eq!(resp.status, 200);
    squid
        .logged(&format!("CONNECT 127.0.0.1:{}", origin.port()))
        .await;
    let r = p.exactly(2).await.remove(1);
    assert_eq!(r.upstream, Some(squid.addr), "{r:#?}");
    assert_eq!(r.parent_status, Some(200), "{r:#?}");
    let host = origin.seen()[0].header("host").map(str::to_string);
    assert_eq!(host, Some(format!("{ORIGIN}:{}", origin.port())));

    // A private answer is refused here; the parent never hears of it.
    let (status, _s) = connect(p.addr, &format!("{PRIVATE}:{}", echo.port())).await;
    assert_eq!(status, 403);
    let r = p.record_with(Reason::PrivateAddress).await;
    assert_eq!(r.upstream, None, "{r:#?}");
    assert!(!squid.access_log().contains("10.1.2.3"));
}

#[tokio::test]
async fn an_inspected_tunnel_dials_its_upstream_through_the_parent() {
    let Some(squid) = Squid::start(false) else {
        return;
    };
    inspected_request_through(&squid, None).await;
}

/// An inspected request through `squid` (whose certificate, for a TLS
/// parent, is `parent_pem`): it reaches the origin, Squid logs the CONNECT,
/// and both records name the parent as their upstream.
pub(crate) async fn inspected_request_through(squid: &Squid, parent_pem: Option<&str>) {
    let origin = TlsOrigin::start(inspect::HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let upstream = format!("[upstream]\nparent = \"{}\"\n", squid.url());
    // One roots file for both: the origin's certificate and the parent's.
    let roots = format!("{}{}", origin.cert.cert_pem, parent_pem.unwrap_or_default());
    let (cfg, catalog) =
        inspect::inspecting_config_with(dir.path(), &roots, "", origin.addr.port(), &upstream);
    let p = inspect::start_in(dir, &cfg, &catalog).await;
    let client = inspect::client_trusting_ca(&p);
    let url = format!("https://{}:{}/lookup", inspect::HOST, origin.addr.port());
    let resp = client.get(&url).send().await.expect("inspected request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "tls hello");
    drop(client);
    squid
        .logged(&format!("CONNECT {}:{}", inspect::HOST, origin.addr.port()))
        .await;
    let recs = p.audit.wait_for(WAIT, |r| r.len() >= 2).await;
    let tunnel = recs
        .iter()
        .find(|r| r.url.is_none())
        .expect("tunnel record");
    assert_eq!(tunnel.decision, Decided::Inspect, "{tunnel:#?}");
    assert_eq!(tunnel.upstream, Some(squid.addr), "{tunnel:#?}");
    assert_eq!(tunnel.parent_status, Some(200), "{tunnel:#?}");
    let inner = recs.iter().find(|r| r.url.is_some()).expect("inner record");
    assert_eq!(inner.url.as_deref(), Some(url.as_str()));
    assert_eq!(inner.status, Some(200), "{inner:#?}");
    // The parent, not the tunnel socket's peer (through a TLS parent, one
    // end of a socket pair).
    assert_eq!(inner.upstream, Some(squid.addr), "{inner:#?}");
}

#[test]
fn explain_names_the_route() {
    let cfg = config_with(&ConfigOpts {
        extra: "[upstream]\nparent = \"http://u:secret@proxy.corp.example:8080\"\n",
        ..ConfigOpts::default()
    });
    let catalog = rule("ksn", &["ksn.example"], 443, "bypass", "")
        + &rule(
            "mirror",
            &["mirror.example"],
            80,
            "allow",
            "route = \"direct\"",
        );
    let (settings, _dir) = load(&cfg, &catalog);
    let ex = egress_proxy::operator::cli::explain_routed(&settings, "ksn.example:443", None)
        .expect("explain")
        .to_string();
    assert!(
        ex.contains("route:    parent: through http://proxy.corp.example:8080"),
        "{ex}"
    );
    assert!(!ex.contains("secret"), "{ex}");
    let ex = egress_proxy::operator::cli::explain_routed(&settings, "http://mirror.example/", None)
        .expect("explain")
        .to_string();
    assert!(ex.contains("route:    direct"), "{ex}");
}

// ================================================================ no parent needed

#[tokio::test]
async fn a_parent_that_is_down_is_parent_unreachable() {
    let down = format!("http://127.0.0.1:{}", free_port());
    let echo = echo_origin().await;
    let origin = HttpOrigin::start().await;
    let catalog = rule("echo", &[ORIGIN], echo.port(), "bypass", "")
        + &rule("web", &[ORIGIN], origin.port(), "allow", "");
    let p = proxy(&down, "", &[], &catalog).await;
    let (status, _s) = connect(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    assert_eq!(status, 502);
    let resp = get(p.addr, ORIGIN, origin.port(), "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-egress-error"), Some("parent_unreachable"));
    for r in p.exactly(2).await {
        assert_eq!(r.reason, Some(Reason::ParentUnreachable), "{r:#?}");
        assert_eq!((r.status, r.parent_status), (Some(502), None), "{r:#?}");
    }
}

#[tokio::test]
async fn a_direct_route_bypasses_the_parent() {
    // The parent is down: only a direct route can succeed.
    let down = format!("http://127.0.0.1:{}", free_port());
    let echo = echo_origin().await;
    let origin = HttpOrigin::start().await;
    let direct = "route = \"direct\"";
    let catalog = rule("echo", &[ORIGIN], echo.port(), "bypass", direct)
        + &rule("web", &[ORIGIN], origin.port(), "allow", direct);
    let p = proxy(&down, "", &[(ORIGIN, "127.0.0.1")], &catalog).await;
    let s = open_tunnel(p.addr, &format!("{ORIGIN}:{}", echo.port())).await;
    echo_back(s, 1000).await;
    let resp = get(p.addr, ORIGIN, origin.port(), "/").await;
    assert_eq!(resp.status, 200);
    let recs = p.exactly(2).await;
    assert_eq!(recs[0].upstream, Some(echo), "{:#?}", recs[0]);
    assert_eq!(recs[1].upstream, Some(origin.addr), "{:#?}", recs[1]);
    assert!(recs.iter().all(|r| r.parent_status.is_none()));
}
