//! Client-facing TLS: certificate loading, SNI, ALPN, and development
//! certificates.
//!
//! Only TLS 1.2 and 1.3 are offered (rustls supports nothing older). The
//! direct-TLS listener (XEP-0368) advertises ALPN `xmpp-client`; the STARTTLS
//! listener needs no ALPN. With `[[tls.sni]]` entries, the certificate is
//! chosen by the name the client asks for, falling back to the default one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::config::{ConfigError, TlsConfig};

/// ALPN protocol id for XMPP client connections (XEP-0368).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// Loads a PEM certificate chain and key into a rustls `CertifiedKey`.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    at: &str,
) -> Result<Arc<CertifiedKey>, ConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ConfigError::new(format!("{at}.cert"), format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::new(format!("{at}.cert"), format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.cert"),
            format!("{}: no certificate found", cert.display()),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ConfigError::new(format!("{at}.key"), format!("{}: {e}", key.display())))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| ConfigError::new(format!("{at}.key"), format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        ConfigError::new(
            format!("{at}.key"),
            format!("key does not match the certificate: {e}"),
        )
    })?;
    Ok(Arc::new(ck))
}

/// Chooses a certificate by SNI, with a default for unknown or absent names.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default);
        Some(chosen.clone())
    }
}

/// The two client-facing TLS configurations.
#[derive(Clone)]
pub struct ServerTls {
    /// For STARTTLS upgrades on the plain listener.
    pub starttls: Arc<rustls::ServerConfig>,
    /// For the direct-TLS listener (ALPN `xmpp-client`).
    pub direct: Arc<rustls::ServerConfig>,
}

/// The client-facing TLS configurations in use, swapped whole by a reload.
/// Each handshake reads the current one; handshakes in flight finish on the
/// configuration they started with.
pub struct LiveTls {
    /// For STARTTLS upgrades on the plain listener.
    pub starttls: ArcSwap<rustls::ServerConfig>,
    /// For the direct-TLS listener (ALPN `xmpp-client`).
    pub direct: ArcSwap<rustls::ServerConfig>,
}

impl LiveTls {
    /// Serves `tls` until the next [`LiveTls::store`].
    pub fn new(tls: ServerTls) -> LiveTls {
        LiveTls {
            starttls: ArcSwap::new(tls.starttls),
            direct: ArcSwap::new(tls.direct),
        }
    }

    /// Serves `tls` from the next handshake on.
    pub fn store(&self, tls: ServerTls) {
        self.starttls.store(tls.starttls);
        self.direct.store(tls.direct);
    }
}

/// Builds both server configurations from `[tls]`.
pub fn server_tls(cfg: &TlsConfig) -> Result<ServerTls, ConfigError> {
    let default = load_certified_key(&cfg.cert, &cfg.key, "tls")?;
    let mut by_name = HashMap::new();
    for (i, s) in cfg.sni.iter().enumerate() {
        let ck = load_certified_key(&s.cert, &s.key, &format!("tls.sni[{i}]"))?;
        by_name.insert(s.domain.to_ascii_lowercase(), ck);
    }
    let resolver = Arc::new(SniResolver { default, by_name });
    let build = |alpn: bool| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::new("tls", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        if alpn {
            c.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
        }
        Ok::<_, ConfigError>(Arc::new(c))
    };
    Ok(ServerTls {
        starttls: build(false)?,
        direct: build(true)?,
    })
}

/// A client configuration trusting the CA certificates in a PEM file (for
/// TLS towards nodes).
pub fn client_config(roots_pem: &Path, at: &str) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(roots_pem)
        .map_err(|e| ConfigError::new(at, format!("{}: {e}", roots_pem.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::new(at, format!("{}: {e}", roots_pem.display())))?;
    client_config_from_der(certs).map_err(|e| ConfigError::new(at, e))
}

/// A client configuration trusting the given CA certificates.
pub fn client_config_from_der(
    certs: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CA certificate found".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

/// A development CA and a leaf certificate signed by it.
pub struct DevCerts {
    /// The CA certificate (PEM): what clients trust.
    pub ca_pem: String,
    /// The leaf certificate followed by the CA (PEM): what the proxy serves.
    pub chain_pem: String,
    /// The leaf's private key (PEM, PKCS#8).
    pub key_pem: String,
}

/// Generates a development CA and a leaf for `names` (DNS names or IP
/// addresses). For demos and tests only.
pub fn dev_certs(names: &[&str]) -> Result<DevCerts, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "prg-proxy development CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut leaf = CertificateParams::new(names.clone())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "localhost".into()),
    );
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    Ok(DevCerts {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    })
}

/// Parses PEM certificates from memory.
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_load_and_verify() {
        let d = dev_certs(&["example.com", "localhost"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, &d.chain_pem).unwrap();
        std::fs::write(&k, &d.key_pem).unwrap();
        let cfg = TlsConfig {
            cert: c.clone(),
            key: k.clone(),
            sni: vec![],
        };
        let t = server_tls(&cfg).unwrap();
        assert_eq!(t.direct.alpn_protocols, vec![b"xmpp-client".to_vec()]);
        assert!(t.starttls.alpn_protocols.is_empty());
        assert!(client_config_from_der(certs_from_pem(&d.ca_pem)).is_ok());
    }

    #[test]
    fn bad_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let cfg = TlsConfig {
            cert: missing.clone(),
            key: missing,
            sni: vec![],
        };
        let e = server_tls(&cfg).err().unwrap();
        assert_eq!(e.key, "tls.cert");
        let other = dev_certs(&["a.example"]).unwrap();
        let mine = dev_certs(&["b.example"]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, &mine.chain_pem).unwrap();
        std::fs::write(&k, &other.key_pem).unwrap();
        let e = load_certified_key(&c, &k, "tls").err().unwrap();
        assert_eq!(e.key, "tls.key");
    }
}
