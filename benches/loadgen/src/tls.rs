//! TLS for the bench: the TLS origin's CA and leaf (generated at start, ECDSA
//! P-256 like the proxy's leaves) and the clients' configuration, which trusts
//! the CA files it is given: the origin's CA when direct or through a tunnel
//! the proxy does not inspect, the proxy's own CA when it inspects.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The one application protocol spoken inside the TLS connections.
const HTTP_11: &[u8] = b"http/1.1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS origin's server configuration and its CA certificate (PEM).
pub struct OriginTls {
    pub server: Arc<ServerConfig>,
    pub ca_pem: String,
}

/// A new CA and a leaf from it for `name` and 127.0.0.1; the server sends
/// `tickets` TLS 1.3 session tickets after each handshake.
pub fn origin(name: &str, tickets: usize) -> Result<OriginTls, String> {
    let e = |e: rcgen::Error| format!("generating the origin's certificates: {e}");
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "loadgen origin CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(e)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec![name.to_string()]).map_err(e)?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    leaf.distinguished_name = dn;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().map_err(e)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(e)?;

    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("origin certificate: {e}"))?;
    server.alpn_protocols = vec![HTTP_11.to_vec()];
    // By default nothing can be resumed: loadgen's clients never resume, so
    // the origin spends nothing on tickets they would not use. With tickets
    // (stateless, as most web servers issue them), a proxy that re-originates
    // TLS and keeps its client sessions can resume its side.
    server.send_tls13_tickets = tickets;
    if tickets > 0 {
        server.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    }
    Ok(OriginTls {
        server: Arc::new(server),
        ca_pem,
    })
}

/// What a TLS client needs: its configuration and the name it asks for (SNI)
/// and verifies.
pub struct Client {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// A client trusting the certificates in the PEM files `cas`, sending SNI
/// `name`, without session resumption: every connection is a full handshake.
pub fn client(cas: &[String], name: &str) -> Result<Client, String> {
    if cas.is_empty() {
        return Err(
            "TLS scenarios need --ca FILE (the CA the server's certificate is from)".into(),
        );
    }
    let mut roots = RootCertStore::empty();
    for path in cas {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--ca {path}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--ca {path}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("--ca {path}: no certificate in it"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("--ca {path}: not a usable CA: {e}"))?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![HTTP_11.to_vec()];
    config.resumption = Resumption::disabled();
    let name = ServerName::try_from(name.to_string())
        .map_err(|_| format!("--server-name {name:?} is not a DNS name or IP address"))?;
    Ok(Client {
        config: Arc::new(config),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_trusting_the_origin_ca_completes_a_handshake() {
        let o = origin("origin.test", 0).unwrap();
        let dir = std::env::temp_dir().join(format!("loadgen-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &o.ca_pem).unwrap();
        let c = client(&[ca.display().to_string()], "origin.test").unwrap();
        let mut cc = rustls::ClientConnection::new(Arc::clone(&c.config), c.name).unwrap();
        let mut sc = rustls::ServerConnection::new(Arc::clone(&o.server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            cc.write_tls(&mut buf).unwrap();
            sc.read_tls(&mut buf.as_slice()).unwrap();
            sc.process_new_packets().unwrap();
            let mut buf = Vec::new();
            sc.write_tls(&mut buf).unwrap();
            cc.read_tls(&mut buf.as_slice()).unwrap();
            cc.process_new_packets().unwrap();
            if !cc.is_handshaking() && !sc.is_handshaking() {
                break;
            }
        }
        assert!(!cc.is_handshaking(), "the handshake completed");
        assert_eq!(sc.server_name(), Some("origin.test"), "SNI was sent");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(client(&[], "origin.test").is_err(), "no CA, no client");
    }

    /// Pump records between the two until neither handshakes (or 10 rounds),
    /// then once more so the client reads tickets sent after the handshake.
    fn pump(cc: &mut rustls::ClientConnection, sc: &mut rustls::ServerConnection) {
        for _ in 0..10 {
            let mut buf = Vec::new();
            cc.write_tls(&mut buf).unwrap();
            sc.read_tls(&mut buf.as_slice()).unwrap();
            sc.process_new_packets().unwrap();
            let mut buf = Vec::new();
            sc.write_tls(&mut buf).unwrap();
            cc.read_tls(&mut buf.as_slice()).unwrap();
            cc.process_new_packets().unwrap();
            if !cc.is_handshaking() && !sc.is_handshaking() && !sc.wants_write() {
                break;
            }
        }
    }

    #[test]
    fn with_tickets_a_resuming_client_resumes_and_without_it_cannot() {
        use rustls::HandshakeKind;
        for (tickets, second) in [(0, HandshakeKind::Full), (2, HandshakeKind::Resumed)] {
            let o = origin("origin.test", tickets).unwrap();
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(o.ca_pem.as_bytes()).unwrap())
                .unwrap();
            // a client that keeps sessions (rustls' default), as a proxy's may
            let config = Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            );
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let name = ServerName::try_from("origin.test").unwrap();
                let mut cc = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
                let mut sc = rustls::ServerConnection::new(Arc::clone(&o.server)).unwrap();
                pump(&mut cc, &mut sc);
                kinds.push(cc.handshake_kind());
            }
            assert_eq!(
                kinds,
                [Some(HandshakeKind::Full), Some(second)],
                "{tickets} tickets"
            );
        }
    }
}
