//! QUIC endpoints with mutual TLS.
//!
//! Both ends present a certificate from the cluster CA and verify the other's against it;
//! TLS 1.3 only; the ALPN is the protocol version ([`shoal_proto::message::ALPN`]). A peer
//! without a valid certificate fails the handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_proto::message::{ALPN, NodeId};

use crate::ca::{self, NodeIdentity, SERVER_NAME};

/// UDP socket buffers shoal asks for: the kernel default (208 KiB) drops packets at QUIC
/// speeds. Capped by `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("certificate or key is not valid PEM: {0}")]
    Pem(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer's certificate names no shoal node")]
    NoIdentity,
    #[error(
        "the peer speaks another shoal protocol version (this node: {}): run the same shoal \
         release on every node and supernode",
        String::from_utf8_lossy(ALPN)
    )]
    Version,
}

/// TLS's `no_application_protocol` alert: the two ends offered no ALPN in common.
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// A failed handshake, saying so when the two ends speak different protocol versions.
fn connection_error(e: quinn::ConnectionError) -> TransportError {
    let code = match &e {
        quinn::ConnectionError::TransportError(t) => Some(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => Some(c.error_code),
        _ => None,
    };
    if code == Some(quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL)) {
        TransportError::Version
    } else {
        TransportError::Connection(e)
    }
}

/// A QUIC endpoint that accepts and opens mutually authenticated connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub inner: quinn::Endpoint,
}

impl Endpoint {
    /// Binds `addr` with `identity`'s certificate.
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<Self, TransportError> {
        Self::bind_speaking(addr, identity, ALPN)
    }

    /// Binds `addr`, speaking protocol version `alpn` (another than [`ALPN`] only in tests
    /// of what a node of another release sees).
    fn bind_speaking(
        addr: SocketAddr,
        identity: &NodeIdentity,
        alpn: &[u8],
    ) -> Result<Self, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots(&identity.ca_pem)?);
        let chain =
            vec![CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).map_err(pem)?];
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(pem)?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TransportError::Pem(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![alpn.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![alpn.to_vec()];

        let transport = Arc::new(transport_config());
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(|e| TransportError::Pem(e.to_string()))?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client).map_err(|e| TransportError::Pem(e.to_string()))?,
        ));
        client.transport_config(transport);
        let socket = udp_socket(addr)?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
        let mut inner = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )?;
        inner.set_default_client_config(client);
        Ok(Self { inner })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Connects to a peer and checks who it is.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, NodeId), TransportError> {
        let conn = self
            .inner
            .connect(addr, SERVER_NAME)?
            .await
            .map_err(connection_error)?;
        let node = peer_node(&conn)?;
        Ok((conn, node))
    }

    /// The next connection attempt, before its handshake; `None` once the endpoint is
    /// closed. A server completes each handshake in a task of its own
    /// ([`Accepting::established`]): a handshake waits for the peer's packets (up to the
    /// idle timeout, 30 s), and one peer on a congested link must not hold up the others.
    pub async fn incoming(&self) -> Option<Accepting> {
        self.inner.accept().await.map(Accepting)
    }

    /// Accepts the next authenticated connection, one handshake at a time (for tools and
    /// tests that expect one peer; servers use [`Endpoint::incoming`]); `None` once the
    /// endpoint is closed. Handshake failures are logged and skipped.
    pub async fn accept(&self) -> Option<(quinn::Connection, NodeId)> {
        loop {
            if let Some(accepted) = self.incoming().await?.established().await {
                return Some(accepted);
            }
        }
    }
}

/// A connection attempt a server has received.
#[derive(Debug)]
pub struct Accepting(quinn::Incoming);

impl Accepting {
    /// Completes the handshake and checks the peer's certificate; a failure is logged and
    /// gives `None`.
    pub async fn established(self) -> Option<(quinn::Connection, NodeId)> {
        let remote = self.0.remote_address();
        match self
            .0
            .await
            .map_err(connection_error)
            .and_then(|c| peer_node(&c).map(|n| (c, n)))
        {
            Ok(accepted) => Some(accepted),
            Err(e) => {
                tracing::warn!(%remote, error = %e, "refused a peer");
                None
            }
        }
    }
}

fn pem(e: rustls_pki_types::pem::Error) -> TransportError {
    TransportError::Pem(e.to_string())
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(pem)?)?;
    Ok(roots)
}

/// The node id in the certificate the peer presented.
pub fn peer_node(conn: &quinn::Connection) -> Result<NodeId, TransportError> {
    let certs = conn.peer_identity().ok_or(TransportError::NoIdentity)?;
    let certs = certs
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TransportError::NoIdentity)?;
    let leaf = certs.first().ok_or(TransportError::NoIdentity)?;
    ca::node_of(leaf).map_err(|_| TransportError::NoIdentity)
}

/// A UDP socket with large buffers; says so when the kernel gives less.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        (
            "send",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        let _ = set(&socket, SOCKET_BUFFER);
        let got = get(&socket)?;
        // Linux reports twice what it grants.
        if got < SOCKET_BUFFER {
            tracing::warn!(
                wanted = SOCKET_BUFFER,
                got,
                "UDP {what} buffer smaller than wanted: packets may drop at high rates; \
                 raise net.core.rmem_max and net.core.wmem_max to at least {SOCKET_BUFFER}"
            );
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Bytes a connection may have sent but not yet acknowledged. quinn's default (10 MB) lets
/// a node uploading to many peers hold 10 MB of piece data per peer; 4 MiB still covers the
/// bandwidth-delay product of a 10 Gbit/s link at 3 ms, and keeps an uploader with 8 peers
/// well under 64 MiB (`shoal bench swarm` measures it).
const SEND_WINDOW: u64 = 4 << 20;

fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.send_window(SEND_WINDOW);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterCa;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn nodes_of_one_ca_connect_and_know_each_other() {
        let ca = ClusterCa::generate().unwrap();
        let a = Endpoint::bind(local(), &ca.issue(NodeId(1)).unwrap()).unwrap();
        let b = Endpoint::bind(local(), &ca.issue(NodeId(2)).unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (conn, who) = a.accept().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let got = recv.read_to_end(1024).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
            who
        });
        let (conn, who) = b.connect(addr).await.unwrap();
        assert_eq!(who, NodeId(1));
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"piece").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(1024).await.unwrap(), b"piece");
        conn.close(0u32.into(), b"done");
        assert_eq!(server.await.unwrap(), NodeId(2));
    }

    #[tokio::test]
    async fn a_node_of_another_protocol_version_is_told_so() {
        let ca = ClusterCa::generate().unwrap();
        let new = Endpoint::bind(local(), &ca.issue(NodeId(1)).unwrap()).unwrap();
        let old =
            Endpoint::bind_speaking(local(), &ca.issue(NodeId(2)).unwrap(), b"shoal/0").unwrap();
        let addr = new.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let accepting = new.incoming().await.unwrap();
            accepting.0.await.map_err(connection_error)
        });
        let error = old.connect(addr).await.unwrap_err();
        assert!(matches!(error, TransportError::Version), "{error}");
        assert!(
            error.to_string().contains(&*String::from_utf8_lossy(ALPN)),
            "{error}"
        );
        let error = server.await.unwrap().unwrap_err();
        assert!(matches!(error, TransportError::Version), "{error}");
    }

    /// A peer that sends its first handshake packet and nothing more (its link dropped
    /// everything after): the server must still accept others meanwhile.
    #[tokio::test]
    async fn a_stalled_handshake_does_not_hold_up_other_peers() {
        let ca = ClusterCa::generate().unwrap();
        let server = Endpoint::bind(local(), &ca.issue(NodeId(1)).unwrap()).unwrap();
        let server_addr = server.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let mut peers = Vec::new();
            while let Some(accepting) = server.incoming().await {
                let (tx, peer) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Some((conn, node)) = accepting.established().await {
                        let _ = tx.send((conn, node));
                    }
                });
                peers.push(peer);
                if peers.len() == 2 {
                    return peers.pop().unwrap().await.map(|(_, node)| node);
                }
            }
            panic!("the endpoint closed");
        });
        // A one-way relay: the staller's first datagram reaches the server, nothing else
        // does in either direction.
        let relay = tokio::net::UdpSocket::bind(local()).await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let (n, _) = relay.recv_from(&mut buf).await.unwrap();
            relay.send_to(&buf[..n], server_addr).await.unwrap();
            while relay.recv_from(&mut buf).await.is_ok() {}
        });
        let staller = Endpoint::bind(local(), &ca.issue(NodeId(2)).unwrap()).unwrap();
        let stalled = tokio::spawn(async move { staller.connect(relay_addr).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;

        let good = Endpoint::bind(local(), &ca.issue(NodeId(3)).unwrap()).unwrap();
        let deadline = std::time::Duration::from_secs(5);
        let (_conn, who) = tokio::time::timeout(deadline, good.connect(server_addr))
            .await
            .expect("a good peer waited behind a stalled handshake")
            .unwrap();
        assert_eq!(who, NodeId(1));
        let node = tokio::time::timeout(deadline, accepted)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(node, Ok(NodeId(3)));
        stalled.abort();
    }

    #[tokio::test]
    async fn a_node_of_another_ca_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let a = Endpoint::bind(local(), &ca.issue(NodeId(1)).unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        tokio::spawn(async move { while a.accept().await.is_some() {} });
        let stranger = Endpoint::bind(local(), &other.issue(NodeId(3)).unwrap()).unwrap();
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(10), stranger.connect(addr))
                .await
                .unwrap();
        assert!(
            result.is_err(),
            "a certificate from another CA was accepted"
        );
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let a = Endpoint::bind(local(), &ca.issue(NodeId(1)).unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let accepted = tokio::spawn(async move { a.accept().await.map(|(_, n)| n) });
        // Trusts the CA, but has no certificate of its own.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(ca.cert_pem()).unwrap())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut anon = quinn::Endpoint::client(local()).unwrap();
        anon.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).unwrap(),
        )));
        let result = async {
            let conn = anon.connect(addr, SERVER_NAME)?.await?;
            // In TLS 1.3 the client's (missing) certificate is judged after the client
            // thinks the handshake is done: the refusal arrives on first use.
            let (mut send, mut recv) = conn.open_bi().await?;
            let _ = send.write_all(b"x").await;
            let _ = send.finish();
            recv.read_to_end(16)
                .await
                .map_err(|e| TransportError::Pem(e.to_string()))?;
            Ok::<_, TransportError>(())
        };
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), result).await;
        assert!(
            matches!(result, Ok(Err(_))),
            "the anonymous client was not refused: {result:?}"
        );
        let served = tokio::time::timeout(std::time::Duration::from_secs(2), accepted).await;
        assert!(
            !matches!(served, Ok(Ok(Some(_)))),
            "an anonymous client was accepted"
        );
    }
}
