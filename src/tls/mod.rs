//! TLS material for inspecting `allow` tunnels when a CA is configured: the
//! CA and its bounded leaf cache ([`ca`]), the rustls client configurations
//! for origins ([`client`]), and our server side (a leaf for the CONNECT
//! host). The data path that uses them (terminate, re-originate, relay each
//! request) is `proxy::inspect`; nothing here touches a connection.
pub mod ca;
pub mod client;

use std::io;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::reason::Reason;

/// What inspection needs: the CA and the upstream client configurations.
pub struct Inspector {
    pub ca: Arc<ca::Ca>,
    pub upstreams: client::Upstreams,
}

struct OneCert(Arc<CertifiedKey>);

impl std::fmt::Debug for OneCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneCert")
    }
}

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The one application protocol inspected tunnels speak.
pub const HTTP_11: &[u8] = b"http/1.1";

/// Our side of a client's TLS: a leaf for `host` (the CONNECT host) from
/// our CA, speaking HTTP/1.1 only.
///
/// # Errors
/// `upstream_tls` when no leaf can be minted (logged here).
pub fn server_config(ca: &ca::Ca, host: &str) -> Result<Arc<rustls::ServerConfig>, Reason> {
    let leaf = ca.leaf(host).map_err(|e| {
        tracing::error!(error = %e, "cannot mint a leaf certificate");
        Reason::UpstreamTls
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| Reason::UpstreamTls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(leaf)));
    server.alpn_protocols = vec![HTTP_11.to_vec()];
    // This configuration serves one tunnel, so a session stored in it could
    // never be resumed: issue no TLS 1.3 tickets (two per handshake by
    // default, each stored, encrypted and sent for nothing) and keep no cache.
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(server))
}

/// True when `e` comes from rustls (a refused certificate, a bad record).
pub fn is_tls_error(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
