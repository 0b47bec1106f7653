//! The cluster CA, node certificates and join tokens.
//!
//! Every daemon and supernode holds a certificate from one cluster CA, and QUIC connections
//! between them authenticate both ends against it. An operator can bring the CA; otherwise
//! the supernode creates one in its data directory on first start.
//!
//! A node joins with a join token `shoal1.<secret>.<ca fingerprint>`: it makes its own key,
//! sends a certificate request with the secret, and checks that the CA certificate it gets
//! back has the fingerprint in the token, so that neither the private key nor trust in a
//! forged CA ever crosses the network.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use shoal_proto::message::NodeId;

/// The name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "shoal";
const NODE_CN_PREFIX: &str = "shoal-node-";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("join token is malformed (expected shoal1.<32 hex>.<64 hex>)")]
    BadToken,
    #[error("join token secret does not match")]
    WrongSecret,
    #[error("the CA certificate does not match the join token's fingerprint: refusing to trust it")]
    FingerprintMismatch,
    #[error("certificate names no shoal node")]
    NotANode,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A node's certificate and key, with the CA that issued it (all PEM).
#[derive(Clone)]
pub struct NodeIdentity {
    pub node: NodeId,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl ClusterCa {
    /// A new CA.
    pub fn generate() -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "shoal cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// A CA the operator brings, or the one saved before.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the parsed parameters gives an issuer object with the same name and
        // key; what peers trust stays the original certificate below.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca.key`, creating them on first use. Returns whether
    /// they were created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), CaError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert_path.exists() {
            let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            return Ok((Self::from_pem(&cert, &key)?, false));
        }
        let ca = Self::generate()?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, &ca.key.serialize_pem())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        Ok((ca, true))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// sha256 of the CA certificate (DER), as carried in join tokens.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint_pem(&self.cert_pem).expect("own certificate parses")
    }

    /// Issues a certificate and key for `node` (for supernodes and tests; joining nodes
    /// make their own key and send a request instead).
    pub fn issue(&self, node: NodeId) -> Result<NodeIdentity, CaError> {
        let key = KeyPair::generate()?;
        let cert = node_params(node)?.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeIdentity {
            node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Signs a node's certificate request, for the node id the CA assigns; the request's
    /// own names are ignored.
    pub fn sign_request(&self, csr_pem: &str, node: NodeId) -> Result<String, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = node_params(node)?;
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }
}

fn node_params(node: NodeId) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{NODE_CN_PREFIX}{}", node.0));
    Ok(params)
}

/// A node's side of joining: a fresh key and a certificate request for it.
pub fn node_request() -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// The node id a certificate (DER) was issued for.
pub fn node_of(cert: &CertificateDer<'_>) -> Result<NodeId, CaError> {
    let params = CertificateParams::from_ca_cert_der(cert)?;
    let text = match params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_owned(),
        _ => return Err(CaError::NotANode),
    };
    text.strip_prefix(NODE_CN_PREFIX)
        .and_then(|n| n.parse().ok())
        .map(NodeId)
        .ok_or(CaError::NotANode)
}

fn fingerprint_pem(pem: &str) -> Result<[u8; 32], CaError> {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: CertificateDer<'static>| c)
        .map_err(|_| CaError::NotANode)?;
    Ok(Sha256::digest(der.as_ref()).into())
}

fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// `shoal1.<secret>.<ca fingerprint>`: what a node needs to join a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: [u8; 16],
    pub ca_fingerprint: [u8; 32],
}

impl JoinToken {
    /// A new token for `ca`.
    pub fn new(ca: &ClusterCa) -> Self {
        Self {
            secret: rand::random(),
            ca_fingerprint: ca.fingerprint(),
        }
    }

    /// Checks a secret presented by a joining node, in constant time.
    pub fn check_secret(&self, secret: &[u8; 16]) -> Result<(), CaError> {
        let diff = self
            .secret
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(CaError::WrongSecret)
        }
    }

    /// Checks the CA certificate a node was sent against the token.
    pub fn check_ca(&self, ca_pem: &str) -> Result<(), CaError> {
        if fingerprint_pem(ca_pem)? == self.ca_fingerprint {
            Ok(())
        } else {
            Err(CaError::FingerprintMismatch)
        }
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shoal1.{}.{}",
            hex::encode(self.secret),
            hex::encode(self.ca_fingerprint)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken(<secret>, ca {})",
            hex::encode(&self.ca_fingerprint[..8])
        )
    }
}

impl FromStr for JoinToken {
    type Err = CaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some("shoal1"), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CaError::BadToken);
        };
        let mut token = JoinToken {
            secret: [0; 16],
            ca_fingerprint: [0; 32],
        };
        hex::decode_to_slice(secret, &mut token.secret).map_err(|_| CaError::BadToken)?;
        hex::decode_to_slice(fp, &mut token.ca_fingerprint).map_err(|_| CaError::BadToken)?;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (again, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(ca.fingerprint(), again.fingerprint());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn joining_checks_secret_and_ca() {
        let ca = ClusterCa::generate().unwrap();
        let token = JoinToken::new(&ca);
        let parsed: JoinToken = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains(&hex::encode(token.secret)));
        assert!(parsed.check_secret(&token.secret).is_ok());
        assert!(parsed.check_secret(&[0; 16]).is_err());
        assert!(parsed.check_ca(ca.cert_pem()).is_ok());
        let other = ClusterCa::generate().unwrap();
        assert!(matches!(
            parsed.check_ca(other.cert_pem()),
            Err(CaError::FingerprintMismatch)
        ));

        let (_key, csr) = node_request().unwrap();
        let cert = ca.sign_request(&csr, NodeId(42)).unwrap();
        let der: CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(node_of(&der).unwrap(), NodeId(42));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in [
            "",
            "shoal1",
            "shoal1.00.00",
            "shoal2.aa.bb",
            &format!("shoal1.{}.{}.x", "0".repeat(32), "0".repeat(64)),
            &format!("shoal1.{}.{}", "g".repeat(32), "0".repeat(64)),
        ] {
            assert!(t.parse::<JoinToken>().is_err(), "{t}");
        }
    }
}
