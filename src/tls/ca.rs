//! The inspection CA: load it, mint leaf certificates for CONNECT hosts
//! (cached, bounded in count, reused until near expiry), and `ca generate`.
//!
//! The CA key never leaves this module; leaves are short-lived ECDSA P-256.
//! Concurrent first requests for one name mint one leaf: the others wait for
//! it (a few hundred microseconds) instead of minting their own.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Leaves are valid this long.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf is replaced when less than this is left.
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// At most this many leaves are cached.
pub const LEAF_CACHE_MAX: usize = 1024;

/// CA errors.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Parse { path: PathBuf, what: String },
    #[error("cannot mint a certificate: {0}")]
    Mint(String),
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Cached {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    used: u64,
}

/// A loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cache: Mutex<(HashMap<String, Cached>, u64)>,
    /// Names being minted now, each with the lock its minter holds.
    minting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Leaves minted (cache misses), exported as `egress_tls_leaves_minted_total`.
    minted: Counter,
}

impl Ca {
    /// Load a CA certificate and its key (PEM).
    ///
    /// # Errors
    /// A file is missing or does not parse as a CA certificate / private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, CaError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Parse {
            path: key.to_path_buf(),
            what: format!("not a private key in PEM: {e}"),
        })?;
        let ca_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Parse {
                path: cert.to_path_buf(),
                what: format!("not a certificate in PEM: {e}"),
            })?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key_pair).map_err(|e| CaError::Parse {
            path: cert.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
        Ok(Ca {
            issuer,
            ca_der,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new((HashMap::new(), 0)),
            minting: Mutex::new(HashMap::new()),
            minted: Counter::default(),
        })
    }

    /// Count minted leaves in `counter` (the metric) instead of a counter of its own.
    #[must_use]
    pub fn with_mint_counter(mut self, counter: Counter) -> Ca {
        self.minted = counter;
        self
    }

    /// Leaves minted since start.
    pub fn minted(&self) -> u64 {
        self.minted.get()
    }

    /// The CA certificate (DER), e.g. to trust it in tests.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A leaf for `host` (a DNS name or an IP literal), from the cache when
    /// it has more than [`LEAF_RENEW_BEFORE`] left.
    ///
    /// # Errors
    /// Minting failed.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        if let Some(key) = self.cached_leaf(host) {
            return Ok(key);
        }
        // One minter per name: the first caller holds the name's lock while it
        // mints; the others wait on it, then find the new leaf in the cache.
        // The lock is never held across an await (this is synchronous code).
        let turn = match self.minting.lock() {
            Ok(mut m) => Arc::clone(m.entry(host.to_string()).or_default()),
            Err(_) => Arc::default(),
        };
        let _minter = turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let res = match self.cached_leaf(host) {
            Some(key) => Ok(key),
            None => self.mint_and_cache(host),
        };
        if let Ok(mut m) = self.minting.lock() {
            if m.get(host).is_some_and(|t| Arc::ptr_eq(t, &turn)) {
                m.remove(host);
            }
        }
        res
    }

    /// The cached leaf for `host` if it has more than [`LEAF_RENEW_BEFORE`] left.
    fn cached_leaf(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let now = SystemTime::now();
        let mut guard = self.cache.lock().ok()?;
        let (map, tick) = &mut *guard;
        *tick += 1;
        let t = *tick;
        let c = map.get_mut(host)?;
        if c.not_after > now + LEAF_RENEW_BEFORE {
            c.used = t;
            return Some(Arc::clone(&c.key));
        }
        None
    }

    fn mint_and_cache(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let (key, not_after) = self.mint(host, SystemTime::now())?;
        self.minted.inc();
        if let Ok(mut guard) = self.cache.lock() {
            let (map, tick) = &mut *guard;
            if map.len() >= LEAF_CACHE_MAX && !map.contains_key(host) {
                // Evict the least recently used leaf.
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, c)| c.used)
                    .map(|(h, _)| h.clone())
                {
                    map.remove(&oldest);
                }
            }
            map.insert(
                host.to_string(),
                Cached {
                    key: Arc::clone(&key),
                    not_after,
                    used: *tick,
                },
            );
        }
        Ok(key)
    }

    /// Leaves in the cache now.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.0.len()).unwrap_or(0)
    }

    fn mint(
        &self,
        host: &str,
        now: SystemTime,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), CaError> {
        let mint_err = |e: rcgen::Error| CaError::Mint(e.to_string());
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.to_string().try_into().map_err(mint_err)?),
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let not_after = now + LEAF_LIFETIME;
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf_key = KeyPair::generate().map_err(mint_err)?;
        let cert = params
            .signed_by(&leaf_key, &self.issuer)
            .map_err(mint_err)?;
        let key_der = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let signing = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| CaError::Mint(e.to_string()))?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        Ok((Arc::new(CertifiedKey::new(chain, signing)), not_after))
    }
}

fn read(p: &Path) -> Result<String, CaError> {
    fs::read_to_string(p).map_err(|source| CaError::Read {
        path: p.to_path_buf(),
        source,
    })
}

/// Create a CA in `out` as `ca.pem` and `ca.key` (key mode 0600). Existing
/// files are only overwritten with `force`.
///
/// # Errors
/// The files exist (without `force`), or cannot be written.
pub fn generate(out: &Path, force: bool) -> Result<(PathBuf, PathBuf), CaError> {
    let cert_path = out.join("ca.pem");
    let key_path = out.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() && !force {
            return Err(CaError::Exists(p.clone()));
        }
    }
    let mint_err = |e: rcgen::Error| CaError::Mint(e.to_string());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "egress-proxy inspection CA");
    dn.push(DnType::OrganizationName, "egress-proxy");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
    let key = KeyPair::generate().map_err(mint_err)?;
    let cert = params.self_signed(&key).map_err(mint_err)?;
    fs::create_dir_all(out).map_err(|source| CaError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_loads_and_mints_cached_bounded_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate(dir.path(), false).unwrap();
        assert!(matches!(
            generate(dir.path(), false),
            Err(CaError::Exists(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ca = Ca::load(&cert, &key).unwrap();
        let a = ca.leaf("repo.clearswift.net").unwrap();
        let b = ca.leaf("repo.clearswift.net").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second leaf comes from the cache");
        assert_eq!(a.cert.len(), 2, "leaf + CA");
        ca.leaf("127.0.0.1").unwrap();
        for i in 0..LEAF_CACHE_MAX + 10 {
            ca.leaf(&format!("h{i}.example.com")).unwrap();
        }
        assert_eq!(ca.cached(), LEAF_CACHE_MAX);
        assert!(generate(dir.path(), true).is_ok(), "--force overwrites");
    }

    #[test]
    fn concurrent_first_requests_for_one_name_mint_once() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate(dir.path(), false).unwrap();
        let ca = Ca::load(&cert, &key).unwrap();
        // Twenty names, each asked for by eight threads at once: racing
        // minters would show as more than one leaf for some name.
        for round in 0..20u64 {
            let host = format!("h{round}.sophosxl.net");
            let start = std::sync::Barrier::new(8);
            let leaves: Vec<Arc<CertifiedKey>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            ca.leaf(&host).unwrap()
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert_eq!(ca.minted(), round + 1, "one leaf per name");
            assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
        }
        assert!(
            ca.minting.lock().unwrap().is_empty(),
            "no minter left behind"
        );
    }
}
