//! `audit.syslog` against a real rsyslog: Debian's `rsyslogd`, started here
//! on loopback with its own configuration (`-n -i pidfile -f conf`), with
//! an `imudp` input, a plain `imtcp` input, and two TLS `imtcp` inputs
//! (`StreamDriver.Mode=1`, the `ossl` or `gtls` driver): one anonymous, one
//! that requires a client certificate (`x509/certvalid`). The CA, the
//! server's and the client's certificates are generated here with rcgen.
//! Each input writes what it receives to its own file, which the test reads:
//! a denied request through the proxy must arrive there as an RFC 5424
//! message (rsyslog's parser found APP-NAME and MSGID) carrying its record.
//! An untrusted TLS server gets nothing; after rsyslog restarts, the TLS
//! sender reconnects and the next record arrives.
//!
//! Without rsyslogd (or its TLS driver) the test prints `SKIP: …` and
//! passes, unless `CI=true`, where it fails (`.ci/run` installs `rsyslog`
//! and `rsyslog-openssl`). `RSYSLOGD=/path` picks another binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/support.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egress_proxy::audit::{AuditSink, MemorySink, Tee};
use egress_proxy::Proxy;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use support::{config, crypto, load, WAIT};

const VENDOR: &str = "repo.clearswift.net";
const UNLISTED: &str = "example.com";

/// rsyslogd and a TLS driver, or why not.
fn rsyslogd() -> Result<(PathBuf, &'static str), String> {
    let bin = std::env::var_os("RSYSLOGD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/rsyslogd"));
    if !bin.is_file() {
        return Err(format!("rsyslogd not installed ({})", bin.display()));
    }
    for dir in [
        "/usr/lib/x86_64-linux-gnu/rsyslog",
        "/usr/lib/aarch64-linux-gnu/rsyslog",
        "/usr/lib/rsyslog",
    ] {
        if Path::new(dir).join("lmnsd_ossl.so").is_file() {
            return Ok((bin, "ossl"));
        }
        if Path::new(dir).join("lmnsd_gtls.so").is_file() {
            return Ok((bin, "gtls"));
        }
    }
    Err("no rsyslog TLS driver (rsyslog-openssl or rsyslog-gnutls)".into())
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}: CI=true requires it (.ci/run installs rsyslog and rsyslog-openssl)");
    }
    println!("SKIP: {why}");
}

/// A free loopback port (bound and released: rsyslog needs a number).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn certs(dir: &Path) -> Certs {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rsyslog test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(
        vec!["egress-proxy.test".into()],
        "egress-proxy.test",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Certs {
        ca: w("ca.pem", &ca.pem()),
        server_cert: w("server.pem", &server),
        server_key: w("server.key", &server_key),
        client_cert: w("client.pem", &client),
        client_key: w("client.key", &client_key),
    }
}

/// rsyslogd in the foreground, killed (by its pid) when dropped.
struct Rsyslog {
    child: Child,
    dir: PathBuf,
    udp: u16,
    tcp: u16,
    tls: u16,
    mtls: u16,
}

impl Rsyslog {
    fn start(bin: &Path, driver: &str, dir: &Path, c: &Certs) -> Rsyslog {
        let ports = (free_port(), free_port(), free_port(), free_port());
        Rsyslog::start_on(bin, driver, dir, c, ports)
    }

    /// Start on these ports (udp, tcp, tls, mtls): a restart keeps them.
    fn start_on(
        bin: &Path,
        driver: &str,
        dir: &Path,
        c: &Certs,
        (udp, tcp, tls, mtls): (u16, u16, u16, u16),
    ) -> Rsyslog {
        let d = dir.display();
        let tls_input = |port: u16, auth: &str, out: &str| {
            format!(
                "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"{out}\"\n\
                 \x20 streamDriver.name=\"{driver}\" streamDriver.mode=\"1\" streamDriver.authMode=\"{auth}\"\n\
                 \x20 streamDriver.CAFile=\"{ca}\" streamDriver.CertFile=\"{cert}\" streamDriver.KeyFile=\"{key}\")\n",
                ca = c.ca.display(),
                cert = c.server_cert.display(),
                key = c.server_key.display(),
            )
        };
        let ruleset = |name: &str| {
            format!(
                "ruleset(name=\"{name}\") {{ action(type=\"omfile\" file=\"{d}/{name}.log\" template=\"seen\") }}\n"
            )
        };
        let conf = format!(
            "global(workDirectory=\"{d}\" maxMessageSize=\"64k\"\n\
             \x20 defaultNetstreamDriverCAFile=\"{ca}\" defaultNetstreamDriverCertFile=\"{cert}\" defaultNetstreamDriverKeyFile=\"{key}\")\n\
             module(load=\"imudp\")\n\
             module(load=\"imtcp\" maxSessions=\"100\")\n\
             template(name=\"seen\" type=\"string\" string=\"%app-name%|%msgid%|%rawmsg%\\n\")\n\
             {r_udp}{r_tcp}{r_tls}{r_mtls}\
             input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\" ruleset=\"udp\")\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\" ruleset=\"tcp\")\n\
             {i_tls}{i_mtls}",
            ca = c.ca.display(),
            cert = c.server_cert.display(),
            key = c.server_key.display(),
            r_udp = ruleset("udp"),
            r_tcp = ruleset("tcp"),
            r_tls = ruleset("tls"),
            r_mtls = ruleset("mtls"),
            i_tls = tls_input(tls, "anon", "tls"),
            i_mtls = tls_input(mtls, "x509/certvalid", "mtls"),
        );
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-n")
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("rsyslogd.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
            .spawn()
            .expect("start rsyslogd");
        let mut r = Rsyslog {
            child,
            dir: dir.to_path_buf(),
            udp,
            tcp,
            tls,
            mtls,
        };
        // Ready when every TCP input accepts.
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [tcp, tls, mtls] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(s) = r.child.try_wait().unwrap() {
                    panic!("rsyslogd exited ({s}):\n{}", r.diagnostics());
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd not listening on {port}:\n{}",
                    r.diagnostics()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        r
    }

    fn diagnostics(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!(
            "config:\n{}\nstdout:\n{}\nstderr:\n{}",
            read("rsyslog.conf"),
            read("rsyslogd.out"),
            read("rsyslogd.err")
        )
    }

    /// Wait for a line of `<input>.log` that contains `needle`.
    async fn wait_line(&self, input: &str, needle: &str) -> String {
        let path = self.dir.join(format!("{input}.log"));
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{input}: no message with {needle:?}; {} holds:\n{text}\n{}",
                path.display(),
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy whose audit copy goes to `audit.syslog` as `extra` configures;
/// one denied request; the record's id.
async fn deny_one(extra: &str) -> (String, MemorySink) {
    crypto();
    let (settings, _dir) = load(&config(&[VENDOR], extra), "");
    let memory = MemorySink::new();
    let sinks: Vec<Box<dyn AuditSink>> = vec![Box::new(memory.clone())];
    let (log, writer, metrics) =
        egress_proxy::start_audit_with(Box::new(Tee(sinks)), settings.audit.syslog.as_deref())
            .expect("audit writer");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let proxy = Proxy::new(vec![listener], settings, log, metrics).expect("proxy");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        proxy
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{addr}")).unwrap())
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = client
        .get(format!("http://{UNLISTED}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let got = memory.wait_for(WAIT, |r| !r.is_empty()).await;
    let id = got[0].id_string();
    let _ = stop.send(());
    let _ = task.await;
    // Dropping the writer flushes the syslog queue (within a bounded wait).
    drop(writer);
    (id, memory)
}

fn check_line(line: &str, id: &str) {
    let mut parts = line.splitn(3, '|');
    assert_eq!(parts.next(), Some("egress-proxy"), "APP-NAME: {line}");
    assert_eq!(parts.next(), Some("audit"), "MSGID: {line}");
    let raw = parts.next().unwrap();
    assert!(raw.starts_with('<'), "PRI first: {raw}");
    assert!(raw.contains(&format!("id=\"{id}\"")), "{raw}");
    assert!(raw.contains(&format!("\"host\":\"{UNLISTED}\"")), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_rsyslog_over_udp_tcp_and_tls() {
    let (bin, driver) = match rsyslogd() {
        Ok(x) => x,
        Err(why) => return skip_or_fail(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let rs = Rsyslog::start(&bin, driver, dir.path(), &c);

    let (id, _) = deny_one(&format!(
        "[audit]\nsyslog = \"udp://127.0.0.1:{}\"\n",
        rs.udp
    ))
    .await;
    check_line(&rs.wait_line("udp", &id).await, &id);

    let (id, _) = deny_one(&format!(
        "[audit]\nsyslog = \"tcp://127.0.0.1:{}\"\n",
        rs.tcp
    ))
    .await;
    check_line(&rs.wait_line("tcp", &id).await, &id);

    // TLS: the server's certificate is for "localhost", issued by a CA
    // trusted through [tls] extra_roots.
    let ca = c.ca.display();
    let (id, _) = deny_one(&format!(
        "[tls]\nextra_roots = [\"{ca}\"]\n[audit]\nsyslog = \"tls://localhost:{}\"\n",
        rs.tls
    ))
    .await;
    check_line(&rs.wait_line("tls", &id).await, &id);

    // An input that requires a client certificate: presented from
    // audit.syslog_client_cert.
    let (id, _) = deny_one(&format!(
        "[tls]\nextra_roots = [\"{ca}\"]\n[audit]\nsyslog = \"tls://localhost:{}\"\n\
         syslog_client_cert = {{ cert = \"{}\", key = \"{}\" }}\n",
        rs.mtls,
        c.client_cert.display(),
        c.client_key.display()
    ))
    .await;
    check_line(&rs.wait_line("mtls", &id).await, &id);
}

/// Without the CA in `extra_roots` the server is not trusted: nothing is
/// delivered (the sink keeps retrying, the proxy does not wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_rsyslog_tls_server_gets_nothing() {
    let (bin, driver) = match rsyslogd() {
        Ok(x) => x,
        Err(why) => return skip_or_fail(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let rs = Rsyslog::start(&bin, driver, dir.path(), &c);
    let (id, _) = deny_one(&format!(
        "[audit]\nsyslog = \"tls://localhost:{}\"\n",
        rs.tls
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(dir.path().join("tls.log")).unwrap_or_default();
    assert!(
        !text.contains(&id),
        "delivered to an untrusted server: {text}"
    );
}

/// The TLS sender reconnects (with backoff) when rsyslog restarts: a record
/// written after the restart arrives on a new TLS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_sender_reconnects_after_rsyslog_restarts() {
    use egress_proxy::audit::syslog::{Counters, SyslogSink};
    use egress_proxy::audit::Record;
    use egress_proxy::config::SyslogSettings;

    let (bin, driver) = match rsyslogd() {
        Ok(x) => x,
        Err(why) => return skip_or_fail(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let rs = Rsyslog::start(&bin, driver, dir.path(), &c);
    let ports = (rs.udp, rs.tcp, rs.tls, rs.mtls);
    let settings = SyslogSettings {
        url: format!("tls://localhost:{}", rs.tls),
        extra_roots: vec![c.ca.clone()],
        client_cert: None,
    };
    let counters = Counters::default();
    let mut sink = SyslogSink::start(&settings, counters.clone()).unwrap();
    let record = |id: u64| {
        let mut r = Record::new(
            id,
            "127.0.0.1:40000".parse().unwrap(),
            std::time::SystemTime::now(),
        );
        r.host = Some(UNLISTED.into());
        r
    };
    sink.write(&[record(0x1001)]).unwrap();
    rs.wait_line("tls", "id=\"0000000000001001\"").await;

    drop(rs);
    let rs = Rsyslog::start_on(&bin, driver, dir.path(), &c, ports);
    // Past the idle check: the sender sees the old connection closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.write(&[record(0x1002)]).unwrap();
    rs.wait_line("tls", "id=\"0000000000001002\"").await;
    assert_eq!(counters.sent.get(), 2);
    assert_eq!(counters.dropped.get(), 0);
}
