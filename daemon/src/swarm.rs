//! shoald as a member of the swarm: its identity, its connections to supernodes and peers,
//! and the server that gives pieces to other nodes.
//!
//! A blob maps to one supernode by rendezvous hashing over the configured list; when that
//! supernode cannot be reached, the next one in the blob's order takes over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};
use shoal_proto::BlobDigest;
use shoal_proto::frame::{self, FrameDecoder, MAX_FRAME};
use shoal_proto::message::{
    CONTROL_PRIORITY, FromSupernode, NodeId, Origin, StreamKind, ToSupernode, Uploads,
};
use shoal_transport::ca::{self, NodeIdentity};
use shoal_transport::pieces::{PieceLookup, UploadLimits, serve_pieces};
use shoal_transport::rate::ByteRate;
use shoal_transport::stripe::News;
use tokio::sync::mpsc;

use crate::dial::Dialer;
use crate::held::Held;
use crate::store::Store;
use shoal_transport::{Endpoint, JoinToken};

/// Deadline for connecting to a peer or supernode, and for a control answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// How shoald takes part in the swarm.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub peer_listen: SocketAddr,
    pub supernodes: Vec<SocketAddr>,
    pub zone: String,
    pub join_token: JoinToken,
    pub max_upload_peers: usize,
    /// Bytes per second sent to peers; 0 is unlimited.
    pub upload_rate: u64,
    /// Bytes per second taken from peers; 0 is unlimited.
    pub download_rate: u64,
    /// Bytes per second the node's link can send; 0 is unknown.
    pub upload_link: u64,
}

/// The node's swarm endpoint and connections.
#[derive(Debug)]
pub struct Swarm {
    pub me: NodeId,
    endpoint: Endpoint,
    peer_addr: SocketAddr,
    zone: String,
    supernodes: Vec<SocketAddr>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// One connection attempt per address at a time.
    dialer: Dialer<SocketAddr>,
    /// Pieces sent to peers at once, and their pace (`--max-upload-peers`, `--upload-rate`).
    uploads: Arc<UploadLimits>,
    /// Paces piece requests to peers (`--download-rate`).
    pub download_rate: Option<ByteRate>,
    /// The store whose whole blobs are announced to supernodes.
    holdings: std::sync::OnceLock<Arc<Store>>,
    /// Per supernode, the queue of announcements its stream sends ([`Swarm::announce`]).
    announcers: Mutex<HashMap<SocketAddr, mpsc::Sender<ToSupernode>>>,
    /// Bumped whenever a flight checks a piece or a blob completes: stripe streams wait on
    /// it for pieces to send.
    pub news: News,
}

impl Swarm {
    /// Gets (or reuses) the node's certificate and binds the peer endpoint.
    pub async fn start(config: &SwarmConfig, data_dir: &Path) -> anyhow::Result<Arc<Swarm>> {
        let identity = identity(data_dir, &config.join_token, &config.supernodes).await?;
        let endpoint = Endpoint::bind(config.peer_listen, &identity)?;
        let peer_addr = endpoint.local_addr()?;
        tracing::info!(node = identity.node.0, %peer_addr, supernodes = ?config.supernodes, "joined the swarm");
        Ok(Arc::new(Swarm {
            me: identity.node,
            endpoint,
            peer_addr,
            zone: config.zone.clone(),
            supernodes: config.supernodes.clone(),
            conns: Mutex::default(),
            dialer: Dialer::default(),
            uploads: UploadLimits::new(
                config.max_upload_peers,
                config.upload_rate,
                config.upload_link,
            ),
            download_rate: ByteRate::new(config.download_rate),
            holdings: std::sync::OnceLock::new(),
            announcers: Mutex::default(),
            news: News::default(),
        }))
    }

    /// Serves pieces and stripes to peers until the endpoint closes.
    pub async fn serve(self: Arc<Self>, held: Arc<Held>) {
        let finder = held.clone();
        let lookup: PieceLookup =
            Arc::new(move |digest, index, hashes| finder.find(digest, index, hashes));
        while let Some(accepting) = self.endpoint.incoming().await {
            let (lookup, uploads, held) = (lookup.clone(), self.uploads.clone(), held.clone());
            tokio::spawn(async move {
                let Some((conn, node)) = accepting.established().await else {
                    return;
                };
                tracing::debug!(node = node.0, "peer connected");
                serve_pieces(conn, lookup, held, uploads).await;
            });
        }
    }

    /// The address peers reach this node at.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// How busy the node's upload is now (reported to supernodes with new pieces).
    pub fn uploads(&self) -> Uploads {
        self.uploads.now()
    }

    /// Piece requests given an upload slot, and a place beyond the slots, so far.
    pub fn uploads_given(&self) -> (u64, u64) {
        self.uploads.given()
    }

    /// A connection to `addr`, reused while it lives. A new connection to a supernode
    /// says hello before anyone else may use it: the supernode knows a node by its hello,
    /// and forgets it when that connection closes. Callers that waited for a failed
    /// attempt get its error ([`Dialer`]).
    pub async fn conn(&self, addr: SocketAddr) -> anyhow::Result<quinn::Connection> {
        let cached = || {
            self.lock_conns()
                .get(&addr)
                .filter(|c| c.close_reason().is_none())
                .cloned()
        };
        self.dialer
            .dial(&addr, cached, || async {
                let (conn, _node) =
                    tokio::time::timeout(CONTROL_TIMEOUT, self.endpoint.connect(addr))
                        .await
                        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??;
                if self.supernodes.contains(&addr) {
                    let hello = ToSupernode::Hello {
                        node: self.me,
                        zone: self.zone.clone(),
                        peer_addr: self.peer_addr,
                    };
                    exchange(&conn, &hello).await?;
                    self.announce_holdings(addr, &conn);
                }
                self.lock_conns().insert(addr, conn.clone());
                Ok(conn)
            })
            .await
    }

    /// QUIC's estimate of the round trip to `addr`, while connected.
    pub fn round_trip(&self, addr: SocketAddr) -> Option<std::time::Duration> {
        self.lock_conns().get(&addr).map(quinn::Connection::rtt)
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, quinn::Connection>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The supernodes in the order this blob should try them.
    pub fn ranked(&self, digest: &BlobDigest) -> Vec<SocketAddr> {
        rendezvous(digest, &self.supernodes)
    }

    /// The supernode after `lost` in the order this blob tries them, if any.
    pub fn next_supernode(&self, digest: &BlobDigest, lost: SocketAddr) -> Option<SocketAddr> {
        let ranked = self.ranked(digest);
        let at = ranked.iter().position(|a| *a == lost)?;
        ranked.get(at + 1).copied()
    }

    /// Sends a control message; returns the answer for messages that have one.
    pub async fn control(
        &self,
        supernode: SocketAddr,
        msg: &ToSupernode,
    ) -> anyhow::Result<Option<FromSupernode>> {
        let conn = self.conn(supernode).await?;
        exchange(&conn, msg).await
    }

    /// Sets what the node holds, for announcing it to supernodes it connects to.
    pub fn set_holdings(&self, store: Arc<Store>) {
        let _ = self.holdings.set(store);
    }

    /// Tells a newly connected supernode which whole blobs this node holds (those that map
    /// to it first), so that a restarted supernode learns the swarm again.
    fn announce_holdings(&self, supernode: SocketAddr, conn: &quinn::Connection) {
        let Some(store) = self.holdings.get() else {
            return;
        };
        let mine: Vec<ToSupernode> = store
            .complete_blobs()
            .into_iter()
            .filter(|(digest, _)| self.ranked(digest).first() == Some(&supernode))
            .map(|(digest, len)| ToSupernode::Holding { digest, len })
            .collect();
        if mine.is_empty() {
            return;
        }
        let conn = conn.clone();
        tokio::spawn(async move {
            for msg in mine {
                if let Err(e) = exchange(&conn, &msg).await {
                    tracing::debug!(%supernode, error = %e, "announcing a held blob failed");
                    return;
                }
            }
        });
    }

    /// Asks the blob's supernodes, in order, for its task.
    pub async fn want(
        &self,
        digest: BlobDigest,
        len: u64,
        origin: &Origin,
    ) -> anyhow::Result<(SocketAddr, FromSupernode)> {
        let msg = ToSupernode::Want {
            digest,
            len,
            origin: origin.clone(),
            known_groups: 0,
            hold: true,
            fed: false,
            feeds_tag: 0,
        };
        let mut last = None;
        for supernode in self.ranked(&digest) {
            match self.control(supernode, &msg).await {
                Ok(Some(reply)) => return Ok((supernode, reply)),
                Ok(None) => last = Some(anyhow::anyhow!("{supernode} sent no task")),
                Err(e) => {
                    tracing::warn!(%supernode, error = %e, "supernode unreachable; trying the next");
                    self.forget(supernode);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no supernode configured")))
    }

    /// Sends a message that has no answer, without waiting.
    pub fn notify(self: &Arc<Self>, supernode: SocketAddr, msg: ToSupernode) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.control(supernode, &msg).await {
                tracing::debug!(%supernode, error = %e, "notification lost");
            }
        });
    }

    /// Announces new pieces to a supernode without waiting: frames on one stream per
    /// supernode, opened again on the current connection when it breaks. Announcements are
    /// a hint for the scheduler; when the supernode cannot take them as fast as they come
    /// ([`ANNOUNCE_QUEUE`] waiting), newer ones are dropped, as are those a broken stream
    /// loses.
    pub fn announce(self: &Arc<Self>, supernode: SocketAddr, msg: ToSupernode) {
        let mut announcers = self.announcers.lock().unwrap_or_else(|p| p.into_inner());
        let queue = announcers.entry(supernode).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(ANNOUNCE_QUEUE);
            tokio::spawn(announce_to(self.clone(), supernode, rx));
            tx
        });
        if let Err(e) = queue.try_send(msg) {
            tracing::debug!(%supernode, error = %e, "announcement dropped");
        }
    }

    /// Drops a broken connection, so that the next use reconnects (and greets again).
    pub fn forget(&self, addr: SocketAddr) {
        if let Some(conn) = self.lock_conns().remove(&addr) {
            // Requests still waiting on it fail now instead of at their deadlines.
            conn.close(0u32.into(), b"unreachable");
        }
    }
}

/// Announcements waiting for a supernode's stream.
const ANNOUNCE_QUEUE: usize = 256;

/// Sends a supernode the announcements queued for it, as frames on one stream.
async fn announce_to(
    swarm: Arc<Swarm>,
    supernode: SocketAddr,
    mut queue: mpsc::Receiver<ToSupernode>,
) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(msg) = queue.recv().await {
        let frame = frame::encode(&msg);
        let sent = tokio::time::timeout(CONTROL_TIMEOUT, async {
            if stream.is_none() {
                stream = Some(open_announcements(&swarm, supernode).await?);
            }
            let send = stream.as_mut().expect("just opened");
            send.write_all(&frame).await?;
            anyhow::Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("took over {CONTROL_TIMEOUT:?}")));
        if let Err(e) = sent {
            tracing::debug!(%supernode, error = %e, "announcement lost; the stream opens again with the next");
            stream = None;
        }
    }
}

async fn open_announcements(
    swarm: &Swarm,
    supernode: SocketAddr,
) -> anyhow::Result<quinn::SendStream> {
    let conn = swarm.conn(supernode).await?;
    let (mut send, _) = conn.open_bi().await?;
    let _ = send.set_priority(CONTROL_PRIORITY);
    send.write_all(&[StreamKind::Announce as u8]).await?;
    Ok(send)
}

/// One control message and its answer (if it has one), within the control deadline.
async fn exchange(
    conn: &quinn::Connection,
    msg: &ToSupernode,
) -> anyhow::Result<Option<FromSupernode>> {
    tokio::time::timeout(CONTROL_TIMEOUT, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let _ = send.set_priority(CONTROL_PRIORITY);
        send.write_all(&[StreamKind::Control as u8]).await?;
        send.write_all(&frame::encode(msg)).await?;
        send.finish()?;
        let bytes = recv.read_to_end(MAX_FRAME as usize).await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        let mut decoder = FrameDecoder::default();
        decoder.push(&bytes);
        let reply: FromSupernode = decoder.decode()?.context("incomplete answer")?;
        reply.validate()?;
        Ok(Some(reply))
    })
    .await
    .map_err(|_| anyhow::anyhow!("supernode did not answer within {CONTROL_TIMEOUT:?}"))?
}

/// The node's certificate: from `DATA_DIR/identity` when it was issued by the token's CA,
/// else obtained now by joining.
async fn identity(
    data_dir: &Path,
    token: &JoinToken,
    supernodes: &[SocketAddr],
) -> anyhow::Result<NodeIdentity> {
    let dir = data_dir.join("identity");
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    if let (Ok(cert_pem), Ok(key_pem), Ok(ca_pem), Ok(node)) = (
        read("cert.pem"),
        read("key.pem"),
        read("ca.pem"),
        read("node"),
    ) && token.check_ca(&ca_pem).is_ok()
        && let Ok(node) = node.trim().parse()
    {
        return Ok(NodeIdentity {
            node: NodeId(node),
            cert_pem,
            key_pem,
            ca_pem,
        });
    }
    let mut last = None;
    for supernode in supernodes {
        match join(*supernode, token).await {
            Ok(identity) => {
                save(&dir, &identity)?;
                return Ok(identity);
            }
            Err(e) => {
                tracing::warn!(%supernode, error = %e, "joining through this supernode failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no supernode configured")))
        .context("cannot join the swarm")
}

async fn join(supernode: SocketAddr, token: &JoinToken) -> anyhow::Result<NodeIdentity> {
    let (key, csr) = ca::node_request()?;
    let body = serde_json::json!({"secret": hex::encode(token.secret), "csr": csr});
    let resp = reqwest::Client::new()
        .post(format!("http://{supernode}/join"))
        .timeout(Duration::from_secs(10))
        .body(body.to_string())
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("supernode refused the join ({status}): {}", text.trim());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let ca_pem = v["ca"].as_str().context("no CA in the answer")?.to_owned();
    token.check_ca(&ca_pem)?;
    Ok(NodeIdentity {
        node: NodeId(v["node"].as_u64().context("no node id in the answer")?),
        cert_pem: v["cert"]
            .as_str()
            .context("no certificate in the answer")?
            .to_owned(),
        key_pem: key.serialize_pem(),
        ca_pem,
    })
}

fn save(dir: &Path, identity: &NodeIdentity) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir)?;
    for (name, text, mode) in [
        ("cert.pem", identity.cert_pem.as_str(), 0o644),
        ("ca.pem", identity.ca_pem.as_str(), 0o644),
        ("key.pem", identity.key_pem.as_str(), 0o600),
        ("node", &identity.node.0.to_string(), 0o644),
    ] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(dir.join(name))?;
        f.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Rendezvous hashing: `supernodes` in the order a blob tries them. Every node computes
/// the same order, and losing one supernode moves only the blobs it had.
pub fn rendezvous(digest: &BlobDigest, supernodes: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut ranked: Vec<([u8; 32], SocketAddr)> = supernodes
        .iter()
        .map(|a| {
            let score = Sha256::new()
                .chain_update(digest.as_bytes())
                .chain_update(a.to_string())
                .finalize();
            (score.into(), *a)
        })
        .collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
    ranked.into_iter().map(|(_, a)| a).collect()
}
