//! rustls client configurations for re-originating TLS to origins:
//! verification always on, against the system roots plus `[tls] extra_roots`,
//! with the rule's client certificate where it has one.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, NamedGroup, RootCertStore};

use crate::config::Settings;

/// Client-side TLS errors at load time.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, what: impl ToString) -> ClientTlsError {
    ClientTlsError::File {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

/// The trust store: system roots plus the extra PEM files.
///
/// # Errors
/// An extra roots file is missing or holds no certificate.
pub fn roots(extra: &[std::path::PathBuf]) -> Result<RootCertStore, ClientTlsError> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "system root certificates: partial load");
    }
    let (added, _ignored) = store.add_parsable_certificates(native.certs);
    tracing::debug!(added, "system root certificates");
    for p in extra {
        let certs = CertificateDer::pem_file_iter(p)
            .map_err(|e| file_err(p, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(p, e))?;
        if certs.is_empty() {
            return Err(file_err(p, "no certificate in this PEM file"));
        }
        for c in certs {
            store.add(c).map_err(|e| file_err(p, e))?;
        }
    }
    Ok(store)
}

/// Load a client certificate chain and key (PEM).
///
/// # Errors
/// A file is missing or does not parse.
pub fn client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ClientTlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in this PEM file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    Ok((chain, key))
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    // Explicit provider: one crypto provider across crates (ring).
    ClientConfig::builder_with_provider(Arc::new(upstream_provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| ClientConfig::builder())
}

/// ring's suites, AES-128-GCM first. As a client the proxy states its own
/// preference (origins mostly follow the client's order), and AES-128-GCM
/// with SHA-256 costs less per handshake than ring's first choice,
/// AES-256-GCM with SHA-384 (the transcript hash and key schedule run on
/// SHA-384 there, which this CPU class does not accelerate): the same
/// suite Chrome and Go prefer. Nothing weaker is added and nothing removed.
fn upstream_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Shards of rustls' in-memory session store, so that more TLS 1.3 tickets
/// per origin are kept: each shard keeps at most 8 per server name (rustls'
/// `MAX_TLS13_TICKETS_PER_SERVER`), and with more than 8 new inspected
/// tunnels to one origin at once the others found none and made full
/// handshakes (76 % resumed with 16 concurrent tunnels, 51 % with 32; every
/// one but the first with 8). Tickets go to the shards in turn and are taken
/// newest shard first; key-exchange hints and TLS 1.2 sessions (one per
/// server anyway) live in the first shard. Each shard bounds its server names
/// like rustls' default store (256), so this holds at most `SHARDS` times as
/// much.
#[derive(Debug)]
struct Sessions {
    shards: Vec<ClientSessionMemoryCache>,
    next: AtomicUsize,
}

/// 8 shards: up to 64 TLS 1.3 tickets per origin.
const SHARDS: usize = 8;

impl Sessions {
    fn new() -> Self {
        Sessions {
            shards: (0..SHARDS)
                .map(|_| ClientSessionMemoryCache::new(256))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.shards[0].set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.shards[0].kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.shards[0].set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.shards[0].tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.shards[0].remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % SHARDS;
        self.shards[i].insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        // newest first: the shard written last, then the ones before it
        let last = self.next.load(Ordering::Relaxed) + SHARDS - 1;
        (0..SHARDS).find_map(|k| self.shards[(last - k) % SHARDS].take_tls13_ticket(server_name))
    }
}

/// Per-rule client configurations for one settings snapshot.
pub struct Upstreams {
    default: Arc<ClientConfig>,
    /// Indexed by rule: Some where the rule presents a client certificate.
    per_rule: Vec<Option<Arc<ClientConfig>>>,
}

impl Upstreams {
    /// Build from the snapshot's roots and rules.
    ///
    /// # Errors
    /// A roots or client-certificate file cannot be used.
    pub fn new(settings: &Settings) -> Result<Self, ClientTlsError> {
        let roots = Arc::new(roots(&settings.tls.extra_roots)?);
        // Each configuration keeps its own sessions (one made with a rule's
        // client certificate is never resumed by another), for as long as
        // this snapshot serves.
        let http1 = |mut c: ClientConfig| {
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            c.resumption = Resumption::store(Arc::new(Sessions::new()));
            Arc::new(c)
        };
        let default = http1(
            builder()
                .with_root_certificates(Arc::clone(&roots))
                .with_no_client_auth(),
        );
        let mut per_rule = Vec::with_capacity(settings.policy.rules().len());
        for r in settings.policy.rules() {
            per_rule.push(match &r.client_cert {
                Some((cert, key)) => {
                    let (chain, key) = client_cert(cert, key)?;
                    let c = builder()
                        .with_root_certificates(Arc::clone(&roots))
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| ClientTlsError::Config(format!("rule \"{}\": {e}", r.name)))?;
                    Some(http1(c))
                }
                None => None,
            });
        }
        Ok(Upstreams { default, per_rule })
    }

    /// The configuration for rule `index` (its client certificate, if any).
    pub fn for_rule(&self, index: Option<usize>) -> Arc<ClientConfig> {
        index
            .and_then(|i| self.per_rule.get(i).cloned().flatten())
            .unwrap_or_else(|| Arc::clone(&self.default))
    }
}

/// TLS to an `https://` parent proxy: verified against the system roots
/// plus `[tls] extra_roots`, for the parent's host name (or IP address).
pub struct ParentTls {
    pub connector: tokio_rustls::TlsConnector,
    pub name: rustls::pki_types::ServerName<'static>,
}

impl ParentTls {
    /// Built when `[upstream] parent` is an `https://` URL.
    ///
    /// # Errors
    /// An extra roots file cannot be used, or the parent's host is not a
    /// name TLS can verify.
    pub fn new(settings: &Settings) -> Result<Option<Self>, ClientTlsError> {
        let Some(parent) = settings.parent.as_ref().filter(|p| p.tls) else {
            return Ok(None);
        };
        let name = rustls::pki_types::ServerName::try_from(parent.host.clone()).map_err(|_| {
            ClientTlsError::Config(format!(
                "upstream.parent: {:?} is not a name a TLS certificate can be checked for",
                parent.host
            ))
        })?;
        let config = builder()
            .with_root_certificates(roots(&settings.tls.extra_roots)?)
            .with_no_client_auth();
        Ok(Some(ParentTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::HandshakeKind;

    fn pump(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) {
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
                return;
            }
        }
        panic!("the handshake did not complete");
    }

    /// How many of `n` handshakes begun together (each takes its ticket when
    /// it starts) resume, after `n` sequential ones left their tickets.
    fn resumed_of_concurrent(resumption: Resumption, n: usize) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::super::ca::generate(dir.path(), false).unwrap();
        let ca = super::super::ca::Ca::load(&cert, &key).unwrap();
        // an origin that sends two tickets per handshake, as most do
        let mut server = (*super::super::server_config(&ca, "origin.test").unwrap()).clone();
        server.send_tls13_tickets = 2;
        server.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
        let server = Arc::new(server);
        let mut roots = RootCertStore::empty();
        roots.add(ca.certificate().clone()).unwrap();
        let mut client = builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = resumption;
        let client = Arc::new(client);
        let name = ServerName::try_from("origin.test").unwrap();
        let start = || {
            let c = rustls::ClientConnection::new(Arc::clone(&client), name.clone()).unwrap();
            (
                c,
                rustls::ServerConnection::new(Arc::clone(&server)).unwrap(),
            )
        };
        for _ in 0..n {
            let (mut c, mut s) = start();
            pump(&mut c, &mut s);
        }
        let mut together: Vec<_> = (0..n).map(|_| start()).collect();
        together
            .iter_mut()
            .map(|(c, s)| {
                pump(c, s);
                c.handshake_kind() == Some(HandshakeKind::Resumed)
            })
            .filter(|resumed| *resumed)
            .count()
    }

    #[test]
    fn sixteen_tunnels_at_once_to_one_origin_all_resume() {
        assert_eq!(
            resumed_of_concurrent(Resumption::store(Arc::new(Sessions::new())), 16),
            16
        );
        // rustls' own store keeps 8 tickets per server name: half start cold
        assert_eq!(resumed_of_concurrent(Resumption::default(), 16), 8);
    }

    #[test]
    fn an_origin_following_the_clients_order_gets_aes_128_gcm() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::super::ca::generate(dir.path(), false).unwrap();
        let ca = super::super::ca::Ca::load(&cert, &key).unwrap();
        // rustls' server takes the client's order, as OpenSSL's does by default
        let server = super::super::server_config(&ca, "origin.test").unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.certificate().clone()).unwrap();
        let client = Arc::new(
            builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let name = ServerName::try_from("origin.test").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        pump(&mut c, &mut s);
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        // the same suites as ring's defaults, only in another order
        let mut ours: Vec<_> = upstream_provider()
            .cipher_suites
            .iter()
            .map(|s| u16::from(s.suite()))
            .collect();
        let mut ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| u16::from(s.suite()))
            .collect();
        ours.sort_unstable();
        ring.sort_unstable();
        assert_eq!(ours, ring);
    }
}
