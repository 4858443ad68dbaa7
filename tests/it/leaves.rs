//! The inspection CA's leaf cache seen from outside: concurrent first
//! tunnels to one name mint one leaf (`egress_tls_leaves_minted_total`).
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use crate::inspect::{inspecting_config, start_in, HOST};
use crate::support::*;

/// `egress_tls_leaves_minted_total` from the admin listener.
async fn minted(proxy: &TestProxy) -> u64 {
    let mut s = TcpStream::connect(proxy.admin).await.expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("egress_tls_leaves_minted_total "))
        .unwrap_or_else(|| panic!("no leaf counter in:\n{body}"))
        .trim()
        .parse()
        .expect("a number")
}

/// A client trusting only the proxy's CA.
fn trusting_proxy_ca(proxy: &TestProxy) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    crypto();
    let pem = std::fs::read(proxy.dir.path().join("certs/ca.pem")).expect("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("pem"))
        .expect("root");
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

/// Open `n` tunnels, then send their ClientHellos at once; each must get
/// a leaf that chains to the proxy's CA and an answer through it.
async fn first_tunnels_at_once(proxy: &TestProxy, port: u16, n: usize) {
    let connector = trusting_proxy_ca(proxy);
    let start = Arc::new(Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (connector, start, addr) = (connector.clone(), Arc::clone(&start), proxy.addr);
        tasks.spawn(async move {
            let s = open_tunnel(addr, &format!("{HOST}:{port}")).await;
            start.wait().await;
            let mut tls = connector
                .connect(HOST.try_into().expect("name"), s)
                .await
                .expect("handshake with the proxy's leaf");
            tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let head = read_head(&mut tls).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("tunnel task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_tunnels_to_one_name_mint_one_leaf() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let port = origin.addr.port();
    let (cfg, catalog) = inspecting_config(dir.path(), &origin.cert.cert_pem, "", port);
    let proxy = start_in(dir, &cfg, &catalog).await;
    assert_eq!(minted(&proxy).await, 0, "nothing minted before a tunnel");
    first_tunnels_at_once(&proxy, port, 16).await;
    assert_eq!(
        minted(&proxy).await,
        1,
        "16 concurrent first tunnels to {HOST} share one leaf"
    );
    first_tunnels_at_once(&proxy, port, 4).await;
    assert_eq!(
        minted(&proxy).await,
        1,
        "later tunnels take it from the cache"
    );
}
