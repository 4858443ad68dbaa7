//! rustls client configurations for re-originating TLS to origins:
//! verification always on, against the system roots plus `[tls] extra_roots`,
//! with the rule's client certificate where it has one.
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

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
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| ClientConfig::builder())
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
        let http1 = |mut c: ClientConfig| {
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
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
