//! The SNI check of spliced tunnels against the lenient peer: Go's
//! `crypto/tls` as the origin behind a bypass rule.
//!
//! OpenSSL and rustls refuse a warning alert before the ClientHello, a first
//! record whose version is not `0x03xx`, and an alert between the fragments
//! of a hello; Go takes all three and completes the handshake for whatever
//! name the hello carries. So each case is first sent *directly* to the Go
//! origin (it must complete a handshake for the fronted name: the case is a
//! real bypass against a real stack), then through the proxy, which must
//! refuse it before a byte reaches the origin (`bad_request`, a
//! `decode_error` alert), while a clean hello still goes through.
//!
//! The origin is `tests/fixtures/go-tls-origin/main.go`, built once per test
//! run with Debian's `golang-go` (`.ci/run` installs it). Without Go the
//! tests print `SKIP: go not installed` and pass, unless `CI=true`, where a
//! missing Go fails them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use egress_proxy::audit::{Decided, Reason};
use egress_proxy::proxy::peek::{tls_alert, ALERT_DECODE_ERROR};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

/// A bypass rule's host, as in the shipped catalog.
const KSN: &str = "ksn1.kaspersky-labs.com";
/// The name a fronting client wants to reach instead.
const EVIL: &str = "evil.example";

// ---------------------------------------------------------------- the Go origin

/// Build the Go origin once; `None` when Go is not installed (outside CI).
fn go_origin_binary() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let bin = out.join("go-tls-origin");
        let src =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-tls-origin/main.go");
        let status = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .env("GOCACHE", out.join("go-cache"))
            .env("GOPATH", out.join("go-path"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .status();
        match status {
            Ok(s) if s.success() => Ok(bin),
            Ok(s) => Err(format!("go build failed: {s}")),
            Err(e) => Err(format!("go: {e}")),
        }
    });
    match built {
        Ok(bin) => Some(bin.clone()),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the lenient TLS origin needs Go (apt-get install golang-go): {e}")
        }
        Err(e) => {
            eprintln!("SKIP: go not installed ({e})");
            None
        }
    }
}

/// The running Go origin and the lines it printed.
struct GoOrigin {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    cert: TestCert,
    _dir: tempfile::TempDir,
}

impl GoOrigin {
    /// Start it with a certificate for `names`; `None` without Go.
    fn start(names: &[&str]) -> Option<GoOrigin> {
        let bin = go_origin_binary()?;
        let cert = self_signed(names);
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, &cert.cert_pem).unwrap();
        std::fs::write(&key_path, &cert.key_pem).unwrap();
        let mut child = Command::new(bin)
            .arg(&cert_path)
            .arg(&key_path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Go origin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.strip_prefix("port ") {
                    Some(port) => drop(tx.send(port.parse::<u16>().ok())),
                    None => kept.lock().unwrap().push(line),
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .flatten()
            .expect("the Go origin did not say its port");
        Some(GoOrigin {
            child,
            port,
            lines,
            cert,
            _dir: dir,
        })
    }

    /// Wait until it has printed `n` connection lines; return them all.
    async fn lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if lines.len() >= n || Instant::now() > deadline {
                assert!(lines.len() >= n, "the Go origin printed {lines:?}");
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn connector(&self) -> TlsConnector {
        crypto();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.cert_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for GoOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- a client that edits its first flight

type Edit = Box<dyn FnOnce(&[u8]) -> Vec<u8> + Send>;

/// A stream whose first write (rustls's ClientHello records) goes out edited.
struct EditFirst<S> {
    inner: S,
    edit: Option<Edit>,
    pending: Vec<u8>,
    claimed: usize,
}

impl<S> EditFirst<S> {
    fn new(inner: S, edit: impl FnOnce(&[u8]) -> Vec<u8> + Send + 'static) -> Self {
        EditFirst {
            inner,
            edit: Some(Box::new(edit)),
            pending: Vec::new(),
            claimed: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EditFirst<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EditFirst<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(edit) = this.edit.take() {
            this.pending = edit(buf);
            this.claimed = buf.len();
        }
        if this.claimed == 0 {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        while !this.pending.is_empty() {
            match Pin::new(&mut this.inner).poll_write(cx, &this.pending) {
                Poll::Ready(Ok(n)) => drop(this.pending.drain(..n)),
                other => return other,
            }
        }
        Poll::Ready(Ok(std::mem::take(&mut this.claimed)))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------- the edits

/// A warning alert (`unexpected_message`... level 1 = warning, 0x5a = user_canceled).
const WARNING_ALERT: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x5a];

fn alert_first(hello: &[u8]) -> Vec<u8> {
    let mut out = WARNING_ALERT.to_vec();
    out.extend_from_slice(hello);
    out
}

fn record_version(major: u8, minor: u8) -> impl FnOnce(&[u8]) -> Vec<u8> {
    move |hello: &[u8]| {
        let mut out = hello.to_vec();
        out[1] = major;
        out[2] = minor;
        out
    }
}

/// The hello's first record cut in two, with a warning alert between.
fn alert_between_fragments(hello: &[u8]) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    let (payload, after) = hello[5..].split_at(len);
    let (a, b) = payload.split_at(40);
    let mut out = Vec::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        if i == 1 {
            out.extend_from_slice(&WARNING_ALERT);
        }
        out.extend_from_slice(&hello[..3]);
        out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(after);
    out
}

type EditFn = fn(&[u8]) -> Vec<u8>;

fn cases() -> Vec<(&'static str, EditFn)> {
    vec![
        ("a warning alert before the hello", alert_first as EditFn),
        ("first record version 00 00", |h| {
            record_version(0x00, 0x00)(h)
        }),
        ("first record version 02 00", |h| {
            record_version(0x02, 0x00)(h)
        }),
        ("a warning alert between fragments", alert_between_fragments),
    ]
}

// ---------------------------------------------------------------- helpers

/// A TLS handshake for `name` over `io`, its first flight edited; returns
/// what the server said first, or the error.
async fn handshake<S>(origin: &GoOrigin, io: S, name: &str, edit: EditFn) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let io = EditFirst::new(io, edit);
    let mut tls = tokio::time::timeout(WAIT, origin.connector().connect(name, io))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut line = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, tls.read(&mut line))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&line[..n]).trim().to_owned())
}

async fn bypass_proxy(origin: &GoOrigin) -> TestProxy {
    let catalog = rule("Kaspersky KSN lookup", &[KSN], origin.port, "bypass", "");
    TestProxy::start(&config(&[KSN], ""), &catalog).await
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn go_completes_each_edited_hello_for_the_name_it_carries() {
    let Some(origin) = GoOrigin::start(&[KSN, EVIL]) else {
        return;
    };
    for (i, (what, edit)) in cases().into_iter().enumerate() {
        let s = TcpStream::connect(("127.0.0.1", origin.port))
            .await
            .unwrap();
        let said = handshake(&origin, s, EVIL, edit).await;
        assert_eq!(said.as_deref(), Ok(&*format!("hello {EVIL}")), "{what}");
        let lines = origin.lines(i + 1).await;
        assert_eq!(lines[i], format!("sni {EVIL}"), "{what}");
    }
}

#[tokio::test]
async fn the_proxy_refuses_each_edited_hello_before_the_origin_sees_it() {
    let Some(origin) = GoOrigin::start(&[KSN, EVIL]) else {
        return;
    };
    for (i, (what, edit)) in cases().into_iter().enumerate() {
        let proxy = bypass_proxy(&origin).await;
        let tunnel = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
        let said = handshake(&origin, tunnel, EVIL, edit).await;
        assert!(said.is_err(), "{what}: {said:?}");
        let r = proxy.only_record().await;
        assert_eq!(r.decision, Decided::Deny, "{what}: {r:#?}");
        assert_eq!(r.reason, Some(Reason::BadRequest), "{what}: {r:#?}");
        assert_eq!(r.status, Some(200), "{what}: {r:#?}");
        assert_eq!(r.bytes_up, 0, "{what}: nothing forwarded: {r:#?}");
        // The proxy dialled the origin before its 200 and closed that
        // connection unused: the origin saw a failed handshake, no name.
        let lines = origin.lines(i + 1).await;
        assert!(lines[i].starts_with("fail "), "{what}: {lines:?}");
        assert!(lines.iter().all(|l| !l.contains(EVIL)), "{what}: {lines:?}");
    }
}

#[tokio::test]
async fn the_refusal_is_a_decode_error_alert() {
    let Some(origin) = GoOrigin::start(&[KSN, EVIL]) else {
        return;
    };
    let proxy = bypass_proxy(&origin).await;
    let mut s = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
    s.write_all(&WARNING_ALERT).await.unwrap();
    let (got, _) = read_until_close(&mut s).await;
    assert_eq!(got, tls_alert(ALERT_DECODE_ERROR));
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::BadRequest), "{r:#?}");
}

#[tokio::test]
async fn an_sslv2_compatible_hello_is_refused() {
    let Some(origin) = GoOrigin::start(&[KSN]) else {
        return;
    };
    let proxy = bypass_proxy(&origin).await;
    let mut s = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
    // SSLv2 record header (length 0x2e), CLIENT-HELLO, version 3.1, ...
    s.write_all(&[
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ])
    .await
    .unwrap();
    let (got, _) = read_until_close(&mut s).await;
    assert_eq!(got, tls_alert(ALERT_DECODE_ERROR));
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::BadRequest), "{r:#?}");
    assert_eq!(r.bytes_up, 0, "{r:#?}");
}

#[tokio::test]
async fn a_clean_hello_still_reaches_go() {
    let Some(origin) = GoOrigin::start(&[KSN, EVIL]) else {
        return;
    };
    let proxy = bypass_proxy(&origin).await;
    let tunnel = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
    let said = handshake(&origin, tunnel, KSN, <[u8]>::to_vec).await;
    assert_eq!(said.as_deref(), Ok(&*format!("hello {KSN}")));
    assert_eq!(origin.lines(1).await, [format!("sni {KSN}")]);
    // The fronted name in a clean hello is the ordinary mismatch.
    let tunnel = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
    assert!(handshake(&origin, tunnel, EVIL, <[u8]>::to_vec)
        .await
        .is_err());
    // The first tunnel's record is written when it closes, which may come
    // after the second's refusal: find each by what it says.
    let records = proxy.records(2).await;
    let clean = records.iter().find(|r| r.reason.is_none());
    assert_eq!(
        clean.and_then(|r| r.sni.as_deref()),
        Some(KSN),
        "{records:#?}"
    );
    let fronted = records.iter().find(|r| r.reason.is_some());
    assert_eq!(
        fronted.and_then(|r| r.reason),
        Some(Reason::SniMismatch),
        "{records:#?}"
    );
    assert_eq!(
        fronted.and_then(|r| r.sni.as_deref()),
        Some(EVIL),
        "{records:#?}"
    );
}

/// Go answers a hello without a key share with a HelloRetryRequest; a
/// client that gives up there with a fatal alert (then, against the rule,
/// a hello for another name and more bytes behind it, and closes): Go gets
/// the alert itself (its error names it; a fatal close_notify is its EOF)
/// and nothing after it, and the tunnel is not a refusal.
#[tokio::test]
async fn go_gets_a_fatal_alert_after_its_hello_retry_and_nothing_behind_it() {
    use crate::attacks::{is_hrr, read_for, tls13_hello};
    let Some(origin) = GoOrigin::start(&[KSN, EVIL]) else {
        return;
    };
    let (random, session_id) = ([7u8; 32], [9u8; 32]);
    let cases: [(u8, &str); 2] = [(40, "handshake failure"), (0, "EOF")];
    for (i, (description, said)) in cases.into_iter().enumerate() {
        let proxy = bypass_proxy(&origin).await;
        let mut s = open_tunnel(proxy.addr, &format!("{KSN}:{}", origin.port)).await;
        s.write_all(&tls13_hello(KSN, false, &random, &session_id))
            .await
            .unwrap();
        let hrr = read_for(&mut s, Duration::from_millis(1000)).await;
        assert!(is_hrr(&hrr), "{hrr:?}");
        let mut flight = vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
        flight.extend(tls13_hello(EVIL, true, &random, &session_id));
        flight.extend(vec![0x16; 64 * 1024]);
        let _ = s.write_all(&flight).await;
        // The origin closes on the alert; its end comes through.
        let rest = tokio::time::timeout(WAIT, async {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            rest
        })
        .await
        .expect("the origin's end reaches the client");
        assert!(!rest.starts_with(&[0x16]), "no handshake answer: {rest:?}");
        let lines = origin.lines(i + 1).await;
        assert!(
            lines[i].starts_with("fail ") && lines[i].contains(said),
            "{lines:?}"
        );
        assert!(lines.iter().all(|l| !l.contains(EVIL)), "{lines:?}");
        drop(s);
        let r = proxy.only_record().await;
        assert_ne!(r.decision, Decided::Deny, "{r:#?}");
    }
}
