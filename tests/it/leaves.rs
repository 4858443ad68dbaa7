//! The inspection CA's leaf cache seen from outside: concurrent first
//! tunnels to one name mint one leaf (`egress_tls_leaves_minted_total`);
//! and the proxy's side of an inspected handshake issues no session tickets
//! (its configuration serves one tunnel: none could ever be resumed).
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::Barrier;

use crate::inspect::{inspecting_config, start_in, HOST};
use crate::support::*;

/// `egress_tls_leaves_minted_total` from the admin listener.
async fn minted(proxy: &TestProxy) -> u64 {
    proxy.metric("egress_tls_leaves_minted_total").await
}

/// A client configuration trusting only the proxy's CA.
pub(crate) fn proxy_ca_config(proxy: &TestProxy) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    crypto();
    let pem = std::fs::read(proxy.dir.path().join("certs/ca.pem")).expect("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("pem"))
        .expect("root");
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client trusting only the proxy's CA.
fn trusting_proxy_ca(proxy: &TestProxy) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(proxy_ca_config(proxy)))
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

/// A client session store that only counts the TLS 1.3 tickets it is given.
#[derive(Debug, Default)]
struct CountTickets(std::sync::atomic::AtomicUsize);

impl rustls::client::ClientSessionStore for CountTickets {
    fn set_kx_hint(&self, _: rustls::pki_types::ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: rustls::pki_types::ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(
        &self,
        _: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &rustls::pki_types::ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: rustls::pki_types::ServerName<'static>,
        _: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn take_tls13_ticket(
        &self,
        _: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

#[tokio::test]
async fn an_inspected_handshake_issues_no_session_tickets() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let port = origin.addr.port();
    let (cfg, catalog) = inspecting_config(dir.path(), &origin.cert.cert_pem, "", port);
    let proxy = start_in(dir, &cfg, &catalog).await;
    let tickets = Arc::new(CountTickets::default());
    let mut config = proxy_ca_config(&proxy);
    config.resumption = rustls::client::Resumption::store(Arc::clone(&tickets) as _);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let s = open_tunnel(proxy.addr, &format!("{HOST}:{port}")).await;
    let mut tls = connector
        .connect(HOST.try_into().expect("name"), s)
        .await
        .expect("handshake with the proxy's leaf");
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // Tickets come right after the handshake, before the response.
    assert_eq!(
        tickets.0.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no ticket from a configuration that serves one tunnel"
    );
}
