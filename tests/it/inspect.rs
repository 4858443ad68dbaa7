//! TLS inspection of `allow` tunnels with our CA (issue 5).
use std::sync::Arc;

use egress_proxy::audit::{Decided, Reason, Record};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

pub(crate) const HOST: &str = "cls.sophosxl.net";

/// A CA made by `ca generate` in the proxy's temp dir, the origin's
/// certificate as an extra root, and a catalog for `HOST` on `port`.
pub(crate) fn inspecting_config(
    dir: &std::path::Path,
    origin_pem: &str,
    extra_rules: &str,
    port: u16,
) -> (String, String) {
    inspecting_config_with(dir, origin_pem, extra_rules, port, "")
}

/// [`inspecting_config`] with `extra_config` sections (`[rates]`, `[auth]` …).
pub(crate) fn inspecting_config_with(
    dir: &std::path::Path,
    origin_pem: &str,
    extra_rules: &str,
    port: u16,
    extra_config: &str,
) -> (String, String) {
    egress_proxy::tls::ca::generate(&dir.join("certs"), false).expect("ca generate");
    std::fs::write(dir.join("origin.pem"), origin_pem).expect("origin pem");
    let cfg = config(
        &[HOST, "ksn1.kaspersky-labs.com"],
        &format!("[tls]\nca_cert = \"certs/ca.pem\"\nca_key = \"certs/ca.key\"\nextra_roots = [\"origin.pem\"]\n\n{extra_config}"),
    );
    let catalog = format!(
        "[[rule]]\nname = \"Sophos Cloud Lookups\"\nhosts = [\"{HOST}\"]\nports = [{port}]\naction = \"allow\"\n{extra_rules}"
    );
    (cfg, catalog)
}

/// Start a proxy whose config refers to files in its own temp dir.
pub(crate) async fn start_in(dir: tempfile::TempDir, cfg: &str, catalog: &str) -> TestProxy {
    let path = dir.path().join("egress-proxy.toml");
    std::fs::write(&path, cfg).expect("config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("catalog");
    let settings = egress_proxy::config::Settings::from_toml(
        egress_proxy::config::ConfigSource::File(path),
        cfg,
        Vec::new(),
    )
    .unwrap_or_else(|e| panic!("config must load:\n{e}"));
    TestProxy::start_settings(settings, dir).await
}

/// A client that trusts only our CA (read back from the proxy's dir).
pub(crate) fn client_trusting_ca(proxy: &TestProxy) -> reqwest::Client {
    crypto();
    let pem = std::fs::read(proxy.dir.path().join("certs/ca.pem")).expect("ca.pem");
    let ca = rustls::pki_types::CertificateDer::from_pem_slice_compat(&pem);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("add ca");
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy"))
        .use_preconfigured_tls(tls)
        .timeout(WAIT)
        .build()
        .expect("client")
}

trait FromPemCompat {
    fn from_pem_slice_compat(pem: &[u8]) -> rustls::pki_types::CertificateDer<'static>;
}

impl FromPemCompat for rustls::pki_types::CertificateDer<'static> {
    fn from_pem_slice_compat(pem: &[u8]) -> Self {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem).expect("pem")
    }
}

fn inner(records: &[Record]) -> Vec<&Record> {
    records.iter().filter(|r| r.url.is_some()).collect()
}

#[tokio::test]
async fn inspected_requests_chain_to_our_ca_and_each_gets_a_record() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config(dir.path(), &origin.cert.cert_pem, "", origin.addr.port());
    let proxy = start_in(dir, &cfg, &catalog).await;
    let client = client_trusting_ca(&proxy);
    let url = format!("https://{HOST}:{}/lookup?q=1", origin.addr.port());
    // The client trusts only our CA: success proves the leaf chains to it.
    for _ in 0..3 {
        let resp = client.get(&url).send().await.expect("inspected request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "tls hello");
    }
    drop(client);
    let recs = proxy.audit.wait_for(WAIT, |r| r.len() >= 4).await;
    let inner = inner(&recs);
    assert_eq!(
        inner.len(),
        3,
        "one record per inner request (keep-alive): {recs:#?}"
    );
    for r in &inner {
        assert_eq!(r.decision, Decided::Inspect);
        assert_eq!(r.url.as_deref(), Some(url.as_str()));
        assert_eq!(r.status, Some(200));
        assert_eq!(r.bytes_down, 9);
        assert_eq!(r.rule.as_deref(), Some("Sophos Cloud Lookups"));
    }
    let tunnel: Vec<&Record> = recs.iter().filter(|r| r.url.is_none()).collect();
    assert_eq!(tunnel.len(), 1, "one tunnel record: {recs:#?}");
    assert_eq!(tunnel[0].decision, Decided::Inspect);
    assert_eq!(tunnel[0].status, Some(200));
    assert_eq!(tunnel[0].sni.as_deref(), Some(HOST));
    assert!(tunnel[0].bytes_up > 0 && tunnel[0].bytes_down > 0);
    assert_eq!(
        origin.snis.lock().expect("snis").len(),
        1,
        "one upstream TLS connection, reused"
    );
}

#[tokio::test]
async fn inner_request_for_another_host_is_host_mismatch() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config(dir.path(), &origin.cert.cert_pem, "", origin.addr.port());
    let proxy = start_in(dir, &cfg, &catalog).await;
    crypto();
    let pem = std::fs::read(proxy.dir.path().join("certs/ca.pem")).expect("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice_compat(
            &pem,
        ))
        .expect("root");
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (status, stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(status, 200);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut s = connector
        .connect(HOST.try_into().expect("name"), stream)
        .await
        .expect("handshake with our leaf");
    s.write_all(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("x-egress-error: host_mismatch"), "{text}");
    let recs = proxy
        .audit
        .wait_for(WAIT, |r| {
            r.iter().any(|x| x.reason == Some(Reason::HostMismatch))
        })
        .await;
    let r = recs
        .iter()
        .find(|x| x.reason == Some(Reason::HostMismatch))
        .expect("host_mismatch record");
    assert_eq!(r.status, Some(403));
    assert_eq!(r.decision, Decided::Deny);
}

#[tokio::test]
async fn upstream_with_untrusted_certificate_is_upstream_tls() {
    let origin = TlsOrigin::start(HOST).await;
    let other = self_signed(&[HOST]);
    let dir = tempfile::tempdir().expect("dir");
    // Trust another certificate, not the origin's.
    let (cfg, catalog) = inspecting_config(dir.path(), &other.cert_pem, "", origin.addr.port());
    let proxy = start_in(dir, &cfg, &catalog).await;
    let client = client_trusting_ca(&proxy);
    let url = format!("https://{HOST}:{}/", origin.addr.port());
    let resp = client
        .get(&url)
        .send()
        .await
        .expect("an HTTP answer inside the tunnel");
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-egress-error"], "upstream_tls");
    drop(client);
    let recs = proxy.audit.wait_for(WAIT, |r| r.len() >= 2).await;
    assert!(
        recs.iter().any(|r| r.url.is_some()
            && r.reason == Some(Reason::UpstreamTls)
            && r.status == Some(502)),
        "{recs:#?}"
    );
    assert!(
        recs.iter()
            .any(|r| r.url.is_none() && r.reason == Some(Reason::UpstreamTls)),
        "the tunnel record says upstream_tls: {recs:#?}"
    );
}

#[tokio::test]
async fn bypass_rule_is_never_terminated_with_a_ca() {
    let origin = TlsOrigin::start("ksn1.kaspersky-labs.com").await;
    let dir = tempfile::tempdir().expect("dir");
    let bypass = format!(
        "\n[[rule]]\nname = \"Kaspersky KSN lookup\"\nhosts = [\"ksn1.kaspersky-labs.com\"]\nports = [{}]\naction = \"bypass\"\n",
        origin.addr.port()
    );
    let (cfg, catalog) = inspecting_config(dir.path(), &origin.cert.cert_pem, &bypass, 1);
    let proxy = start_in(dir, &cfg, &catalog).await;
    crypto();
    // The client trusts the origin's own certificate only: success proves
    // the bytes were spliced, not terminated by our CA.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy"))
        .use_preconfigured_tls(origin.client_config())
        .timeout(WAIT)
        .build()
        .expect("client");
    let url = format!("https://ksn1.kaspersky-labs.com:{}/", origin.addr.port());
    let resp = client.get(&url).send().await.expect("spliced request");
    assert_eq!(resp.text().await.expect("body"), "tls hello");
    drop(client);
    let recs = proxy.records(1).await;
    assert_eq!(recs[0].decision, Decided::Bypass);
    assert!(recs[0].url.is_none());
}

/// An origin that demands a client certificate signed by `client_ca`.
pub(crate) async fn mtls_origin(
    name: &str,
    client_ca: &rcgen::CertifiedKey<rcgen::KeyPair>,
) -> (std::net::SocketAddr, TestCert) {
    crypto();
    let cert = self_signed(&[name]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.cert.der().clone()).expect("client ca");
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .expect("verifier");
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"licence ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, cert)
}

/// A CA for client certificates, and a gateway's certificate and key
/// signed by it.
pub(crate) fn client_ca_and_leaf() -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    rcgen::Certificate,
    rcgen::KeyPair,
) {
    crypto();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let client_ca = rcgen::CertifiedKey {
        cert: ca_params.self_signed(&ca_key).expect("ca"),
        signing_key: ca_key,
    };
    let issuer = rcgen::Issuer::from_params(&ca_params, &client_ca.signing_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["gateway.example".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    (client_ca, leaf, leaf_key)
}

#[tokio::test]
async fn client_certificate_is_presented_where_the_rule_asks() {
    let host = "applianceupdate.clearswift.com";
    let (client_ca, leaf, leaf_key) = client_ca_and_leaf();
    let (addr, origin_cert) = mtls_origin(host, &client_ca).await;

    for with_cert in [true, false] {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("licence-client.pem"), leaf.pem()).expect("cert");
        std::fs::write(
            dir.path().join("licence-client.key"),
            leaf_key.serialize_pem(),
        )
        .expect("key");
        let cc = if with_cert {
            "client_cert = { cert = \"licence-client.pem\", key = \"licence-client.key\" }\n"
        } else {
            ""
        };
        egress_proxy::tls::ca::generate(&dir.path().join("certs"), false).expect("ca");
        std::fs::write(dir.path().join("origin.pem"), &origin_cert.cert_pem).expect("origin pem");
        let cfg = config(
            &[host],
            "[tls]\nca_cert = \"certs/ca.pem\"\nca_key = \"certs/ca.key\"\nextra_roots = [\"origin.pem\"]\n",
        );
        let catalog = format!(
            "[[rule]]\nname = \"Clearswift license key validation\"\nhosts = [\"{host}\"]\nports = [{}]\naction = \"allow\"\n{cc}",
            addr.port()
        );
        let proxy = start_in(dir, &cfg, &catalog).await;
        let client = client_trusting_ca(&proxy);
        let resp = client
            .get(format!("https://{host}:{}/validate", addr.port()))
            .send()
            .await
            .expect("answer");
        if with_cert {
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.text().await.expect("body"), "licence ok");
        } else {
            assert_eq!(resp.status(), 502, "refused without the client certificate");
            assert_eq!(resp.headers()["x-egress-error"], "upstream_tls");
        }
    }
}

#[tokio::test]
async fn client_cert_on_a_bypass_rule_is_a_load_error() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("c.pem"), "x").expect("c");
    std::fs::write(dir.path().join("c.key"), "x").expect("k");
    let cfg = config(&[], "");
    let catalog = "[[rule]]\nname = \"licence\"\nhosts = [\"applianceupdate.clearswift.com\"]\nports = [443]\naction = \"bypass\"\nclient_cert = { cert = \"c.pem\", key = \"c.key\" }\n";
    let path = dir.path().join("egress-proxy.toml");
    std::fs::write(&path, &cfg).expect("config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("catalog");
    let Err(err) = egress_proxy::config::Settings::from_toml(
        egress_proxy::config::ConfigSource::File(path),
        &cfg,
        Vec::new(),
    ) else {
        panic!("a client_cert on a bypass rule must not load");
    };
    assert!(err.to_string().contains("client_cert"), "{err}");
}

#[test]
fn ca_generate_command_writes_a_loadable_ca_and_never_overwrites_without_force() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("certs");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
            .args(args)
            .output()
            .expect("run")
    };
    let out_s = out.to_str().expect("utf-8 path");
    let first = run(&["ca", "generate", "--out", out_s]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains("ca_cert") && stdout.contains("trust"),
        "says how to use it: {stdout}"
    );
    let mode = std::fs::metadata(out.join("ca.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read(out.join("ca.key")).expect("key");
    let second = run(&["ca", "generate", "--out", out_s]);
    assert_eq!(second.status.code(), Some(1), "refuses to overwrite");
    assert_eq!(
        std::fs::read(out.join("ca.key")).expect("key"),
        before,
        "key untouched"
    );
    let forced = run(&["ca", "generate", "--out", out_s, "--force"]);
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read(out.join("ca.key")).expect("key"),
        before,
        "--force replaces it"
    );
    let ca = egress_proxy::tls::ca::Ca::load(&out.join("ca.pem"), &out.join("ca.key"))
        .expect("loads back");
    assert_eq!(ca.leaf("repo.clearswift.net").expect("leaf").cert.len(), 2);
}
