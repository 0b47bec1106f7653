//! The supernode's drivers: QUIC control and seed pieces, and the HTTP API (`/healthz`,
//! `/metrics`, `/status`, `/join`). The scheduling itself is [`crate::Scheduler`]'s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use shoal_proto::frame::{self, FrameDecoder, MAX_FRAME};
use shoal_proto::message::{
    CONTROL_PRIORITY, FromSupernode, NodeId, PieceSet, StreamKind, Task, ToSupernode, Uploads,
    feeds_tag,
};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_registry_proxy::{Upstream, UpstreamConfig};
use shoal_transport::pieces::{Found, GroupHashes, PieceLookup, answer_piece, stream_kind};
use shoal_transport::stripe::{StripeHolder, serve_stripe};
use shoal_transport::{ClusterCa, Endpoint, JoinToken};

use crate::seed::{Seed, SeedState};
use crate::{Scheduler, SchedulerConfig};

/// Longest a `Want` is held while the seed has no hashes beyond what the node knows.
pub const HOLD_WANT: Duration = Duration::from_millis(200);
/// How long more hashes are gathered once a held `Want` has new ones: a small blob's
/// hashes then come in one answer (`shoal bench swarm`, a 1 MiB blob in 16 pieces: +38 ms
/// over a direct GET without it, each further hash waiting for the node's next question).
pub const GATHER_HASHES: Duration = Duration::from_millis(10);
/// Pieces the seed sends at once: few, so that each is whole soon and its receiver can pass
/// it on (`shoal sim`: 64 here let a piece take 64 piece-times to arrive).
const SEED_UPLOADS: usize = 8;

#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub upstream: UpstreamConfig,
    /// Stripes a blob is cut into for stripe trees (0: none): each node is named a feed per
    /// stripe in its answers, and forwards one stripe to its children as it gets it.
    pub stripes: u32,
}

/// A running supernode.
pub struct Supernode {
    endpoint: Endpoint,
    pub quic_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub join_token: JoinToken,
    pub ca: Arc<ClusterCa>,
    tasks: tokio::task::JoinSet<()>,
}

impl Drop for Supernode {
    fn drop(&mut self) {
        // Closing the endpoint ends every connection, as if the process had died.
        self.endpoint
            .inner
            .close(0u32.into(), b"supernode stopping");
        self.tasks.abort_all();
    }
}

struct State {
    me: NodeId,
    quic_addr: SocketAddr,
    scheduler: Mutex<Scheduler>,
    seed: Seed,
    ca: Arc<ClusterCa>,
    join_token: JoinToken,
    decisions: AtomicU64,
    seed_bytes: AtomicU64,
    /// Bytes of answers sent to nodes (framed): control traffic on the link the seed uses.
    answer_bytes: AtomicU64,
    /// Open connections per node: a connected node is alive even when it has nothing to
    /// say (e.g. it holds whole blobs and pulls nothing).
    connected: Mutex<HashMap<NodeId, usize>>,
}

impl State {
    fn scheduler(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connected(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, usize>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Supernode {
    /// Loads (or creates) the CA and join token, binds both ports and starts serving.
    pub async fn start(config: SupernodeConfig) -> anyhow::Result<Supernode> {
        let (ca, created) = ClusterCa::load_or_create(&config.data_dir.join("ca"))?;
        if created {
            tracing::info!(dir = %config.data_dir.display(), "created a cluster CA");
        }
        let join_token = load_or_create_token(&config, &ca)?;
        let me = NodeId(rand_id());
        let identity = ca.issue(me)?;
        let (endpoint, join) = bind_quic_and_join(config.listen, &identity).await?;
        let quic_addr = endpoint.local_addr()?;
        let api = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.api_listen))?;
        let api_addr = api.local_addr()?;
        let upstream = Upstream::new(&config.upstream)?;
        let seed = Seed::new(config.data_dir.join("seed"), upstream)?;
        let ca = Arc::new(ca);
        let state = Arc::new(State {
            me,
            quic_addr,
            scheduler: Mutex::new(Scheduler::new(SchedulerConfig {
                stripes: config.stripes,
                ..SchedulerConfig::default()
            })),
            seed,
            ca: ca.clone(),
            join_token: join_token.clone(),
            decisions: AtomicU64::new(0),
            seed_bytes: AtomicU64::new(0),
            answer_bytes: AtomicU64::new(0),
            connected: Mutex::new(HashMap::new()),
        });
        {
            let mut s = state.scheduler();
            s.add_seed(me);
            s.hello(Instant::now(), me, String::new(), quic_addr)?;
        }

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(accept_quic(endpoint.clone(), state.clone()));
        tasks.spawn(serve_api(api, state.clone()));
        tasks.spawn(serve_api(join, state.clone()));
        tasks.spawn(housekeeping(state));
        tracing::info!(%quic_addr, %api_addr, node = me.0, "supernode serving");
        Ok(Supernode {
            endpoint,
            quic_addr,
            api_addr,
            join_token,
            ca,
            tasks,
        })
    }
}

/// Binds QUIC (UDP) and, on the same port, TCP for `/join`: joining nodes know only the
/// supernode's address. With port 0 the pair is retried until both are free.
async fn bind_quic_and_join(
    listen: SocketAddr,
    identity: &shoal_transport::NodeIdentity,
) -> anyhow::Result<(Endpoint, tokio::net::TcpListener)> {
    let attempts = if listen.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let endpoint = Endpoint::bind(listen, identity)?;
        let quic_addr = endpoint.local_addr()?;
        match tokio::net::TcpListener::bind(quic_addr).await {
            Ok(join) => return Ok((endpoint, join)),
            Err(e) => {
                last = Some(anyhow::Error::from(e).context(format!(
                    "cannot listen on TCP {quic_addr} for joining nodes"
                )))
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn load_or_create_token(config: &SupernodeConfig, ca: &ClusterCa) -> anyhow::Result<JoinToken> {
    let path = config.data_dir.join("join-token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token: JoinToken = text
            .parse()
            .with_context(|| format!("{} is not a join token", path.display()))?;
        if token.check_ca(ca.cert_pem()).is_ok() {
            return Ok(token);
        }
        tracing::warn!(path = %path.display(), "join token names another CA; writing a new one");
    }
    let token = JoinToken::new(ca);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{token}")?;
    }
    tracing::info!(path = %path.display(), "join token written");
    Ok(token)
}

/// Keeps the seed known to the scheduler and forgets silent peers.
async fn housekeeping(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let connected: Vec<NodeId> = state.connected().keys().copied().collect();
        let mut s = state.scheduler();
        let _ = s.hello(now, state.me, String::new(), state.quic_addr);
        for node in connected {
            s.keep_alive(now, node);
        }
        s.expire(now);
    }
}

async fn accept_quic(endpoint: Endpoint, state: Arc<State>) {
    let uploads = shoal_transport::pieces::UploadLimits::new(SEED_UPLOADS, 0, 0);
    let seed_state = state.clone();
    let lookup: PieceLookup = Arc::new(move |digest, index, hashes| {
        let found = seed_state.seed.get(digest)?.piece(index, hashes)?;
        if hashes && matches!(found.hashes, GroupHashes::None) {
            // Asked for a group not hashed whole yet: nobody was told its hash either.
            return None;
        }
        let now = Instant::now();
        let mut scheduler = seed_state.scheduler();
        if !scheduler.seed_may_send(now, digest, index) {
            // Others have it, or the seed just sent it: "missing", ask them.
            return None;
        }
        scheduler.seed_sending(now, digest, index);
        drop(scheduler);
        seed_state
            .seed_bytes
            .fetch_add(found.range.end - found.range.start, Ordering::Relaxed);
        Some(found)
    });
    let stripes = Arc::new(SeedStripes(state.clone()));
    while let Some(accepting) = endpoint.incoming().await {
        let (state, lookup, uploads) = (state.clone(), lookup.clone(), uploads.clone());
        let stripes = stripes.clone();
        tokio::spawn(async move {
            let Some((conn, node)) = accepting.established().await else {
                return;
            };
            *state.connected().entry(node).or_default() += 1;
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let (state, lookup, uploads) = (state.clone(), lookup.clone(), uploads.clone());
                let stripes = stripes.clone();
                tokio::spawn(async move {
                    let result = match stream_kind(&mut recv).await {
                        Some(StreamKind::Piece) => answer_piece(send, recv, &lookup, &uploads)
                            .await
                            .map_err(|e| e.to_string()),
                        Some(StreamKind::Stripe) => serve_stripe(send, recv, &*stripes, &uploads)
                            .await
                            .map_err(|e| e.to_string()),
                        Some(StreamKind::Control) => control(&state, node, send, recv).await,
                        Some(StreamKind::Announce) => announcements(&state, node, recv).await,
                        None => Err("unknown stream kind".into()),
                    };
                    if let Err(e) = result {
                        tracing::debug!(node = node.0, error = %e, "stream failed");
                    }
                });
            }
            let last = {
                let mut connected = state.connected();
                let n = connected.entry(node).or_insert(1);
                *n -= 1;
                *n == 0 && connected.remove(&node).is_some()
            };
            if last {
                state.scheduler().leave(node);
                tracing::debug!(node = node.0, "node disconnected");
            }
        });
    }
}

/// The seed's blobs as stripe streams serve them: the pieces of groups whose hashes are
/// published, each sent once per stream (the roots of a blob's stripe trees ask for
/// theirs).
struct SeedStripes(Arc<State>);

impl StripeHolder for SeedStripes {
    fn held(&self, digest: &BlobDigest) -> Option<(PieceLayout, PieceSet)> {
        let blob = self.0.seed.get(digest)?;
        Some((blob.layout, blob.hashed()))
    }

    fn piece(&self, digest: &BlobDigest, index: PieceIndex, hashes: bool) -> Option<Found> {
        self.0.seed.get(digest)?.piece(index, hashes)
    }

    fn news(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.seed.news.subscribe()
    }

    fn sent(&self, bytes: u64) {
        self.0.seed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

async fn control(
    state: &State,
    node: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    // Answers go before the seed's piece bytes on the same connection: a node waits on
    // them, and they are small.
    let _ = send.set_priority(CONTROL_PRIORITY);
    let bytes = recv
        .read_to_end(MAX_FRAME as usize)
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::default();
    decoder.push(&bytes);
    let request: ToSupernode = decoder
        .decode()
        .map_err(|e| e.to_string())?
        .ok_or("incomplete request")?;
    request.validate().map_err(|e| e.to_string())?;
    let now = Instant::now();
    let reply = match request {
        ToSupernode::Hello {
            node: claimed,
            zone,
            peer_addr,
        } => {
            if claimed != node {
                return Err(format!("node {} claims to be {}", node.0, claimed.0));
            }
            state
                .scheduler()
                .hello(now, node, zone, peer_addr)
                .map_err(|e| e.to_string())?;
            None
        }
        ToSupernode::Want {
            digest,
            len,
            origin,
            known_groups,
            hold,
            fed,
            feeds_tag,
        } => {
            let known = Known {
                groups: known_groups,
                hold,
                fed,
                feeds_tag,
            };
            Some(want(state, node, now, digest, len, &origin, known).await)
        }
        ToSupernode::Have {
            digest,
            pieces,
            uploads,
        } => {
            have(state, node, now, &digest, &pieces, uploads)?;
            None
        }
        ToSupernode::BadPiece { peer, .. } => {
            state
                .scheduler()
                .bad_piece(now, node, peer)
                .map_err(|e| e.to_string())?;
            None
        }
        ToSupernode::Drop { digest } => {
            state.scheduler().drop_blob(node, &digest);
            None
        }
        ToSupernode::Holding { digest, len } => {
            // No seed starts: hashes come when some node asks for the blob.
            let layout = PieceLayout::for_blob(len).map_err(|e| e.to_string())?;
            let mut s = state.scheduler();
            s.want(now, node, digest, layout)
                .map_err(|e| e.to_string())?;
            let all: Vec<PieceIndex> = layout.pieces().collect();
            s.have(now, node, &digest, &all)
                .map_err(|e| e.to_string())?;
            None
        }
    };
    if let Some(reply) = reply {
        let bytes = frame::encode(&reply);
        state
            .answer_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    }
    send.finish().map_err(|e| e.to_string())
}

/// A node's announcements, frames on one stream for as long as it is connected. One
/// that cannot be taken (a blob the supernode forgot since) is skipped: the next ones may
/// be fine, and the node hears of it at its next question.
async fn announcements(
    state: &State,
    node: NodeId,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let mut decoder = FrameDecoder::default();
    while let Some(chunk) = recv
        .read_chunk(64 * 1024, true)
        .await
        .map_err(|e| e.to_string())?
    {
        decoder.push(&chunk.bytes);
        while let Some(msg) = decoder.decode::<ToSupernode>().map_err(|e| e.to_string())? {
            msg.validate().map_err(|e| e.to_string())?;
            let ToSupernode::Have {
                digest,
                pieces,
                uploads,
            } = msg
            else {
                return Err("not an announcement on the announcement stream".into());
            };
            if let Err(e) = have(state, node, Instant::now(), &digest, &pieces, uploads) {
                tracing::debug!(node = node.0, error = %e, "announcement not taken");
            }
        }
    }
    Ok(())
}

/// `node` holds these pieces now, and is this busy uploading.
fn have(
    state: &State,
    node: NodeId,
    now: Instant,
    digest: &shoal_proto::BlobDigest,
    pieces: &[PieceIndex],
    uploads: Uploads,
) -> Result<(), String> {
    let mut scheduler = state.scheduler();
    scheduler
        .have(now, node, digest, pieces)
        .map_err(|e| e.to_string())?;
    scheduler.uploads(now, node, uploads);
    Ok(())
}

/// What a node asking for a blob knows: its first `groups` group hashes; `hold`: it has
/// every piece of them and waits for more.
struct Known {
    groups: u32,
    hold: bool,
    /// Every stripe comes to the node on a stream: it needs no parents.
    fed: bool,
    /// The tag of the feeds the node has.
    feeds_tag: u32,
}

async fn want(
    state: &State,
    node: NodeId,
    now: Instant,
    digest: shoal_proto::BlobDigest,
    len: u64,
    origin: &shoal_proto::message::Origin,
    known: Known,
) -> FromSupernode {
    let refused = |reason: String| FromSupernode::Refused { reason };
    let layout = match PieceLayout::for_blob(len) {
        Ok(l) => l,
        Err(e) => return refused(e.to_string()),
    };
    if let Err(e) = state.scheduler().want(now, node, digest, layout) {
        return refused(e.to_string());
    }
    let seed = match state.seed.ensure(digest, layout, origin) {
        Ok(seed) => seed,
        Err(e) => return refused(e.to_string()),
    };
    let hold = if known.hold {
        HOLD_WANT
    } else {
        Duration::ZERO
    };
    let progress = seed
        .wait_beyond(known.groups as usize, hold, GATHER_HASHES)
        .await;
    if let SeedState::Failed(reason) = progress.state {
        return refused(format!("seed: {reason}"));
    }
    let mut s = state.scheduler();
    // The seed is offered for the pieces of whole groups only: the others' hashes cannot go
    // out yet, so nobody could take them. (`shoal sim`, 1,000 x 1 GiB in groups of 8: 1.35x
    // S/B before this and the node's `hold`, 1.29x with both.)
    let whole = layout.pieces_in_groups(progress.groups.len() as u32);
    let held: Vec<PieceIndex> = (0..whole).map(PieceIndex).collect();
    let _ = s.want(now, state.me, digest, layout);
    let _ = s.have(now, state.me, &digest, &held);
    let parents = match known.fed {
        true => Vec::new(),
        false => s.parents(now, node, &digest).unwrap_or_default(),
    };
    let feeds = s.feeds(node, &digest);
    let feeds = (feeds_tag(&feeds) != known.feeds_tag).then_some(feeds);
    state.decisions.fetch_add(1, Ordering::Relaxed);
    // Only the group hashes the node lacks: the rest would be resent with every question.
    let from = (known.groups as usize).min(progress.groups.len());
    let mut groups = progress.groups;
    FromSupernode::Task(Task {
        groups_from: from as u32,
        groups: groups.split_off(from),
        parents,
        feeds,
    })
}

async fn serve_api(listener: tokio::net::TcpListener, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(api(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn api(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/metrics") => {
            let (peers, tasks) = state.scheduler().counts();
            text(
                StatusCode::OK,
                format!(
                    "# TYPE shoal_supernode_peers gauge\nshoal_supernode_peers {peers}\n\
                     # TYPE shoal_supernode_tasks gauge\nshoal_supernode_tasks {tasks}\n\
                     # TYPE shoal_supernode_decisions counter\nshoal_supernode_decisions_total {}\n\
                     # TYPE shoal_supernode_seed_bytes counter\nshoal_supernode_seed_bytes_total {}\n\
                     # HELP shoal_supernode_answer_bytes Bytes of answers sent to nodes' questions (framed)\n\
                     # TYPE shoal_supernode_answer_bytes counter\nshoal_supernode_answer_bytes_total {}\n",
                    state.decisions.load(Ordering::Relaxed),
                    state.seed_bytes.load(Ordering::Relaxed),
                    state.answer_bytes.load(Ordering::Relaxed)
                ),
            )
        }
        (&Method::GET, "/status") => {
            let (peers, tasks, banned) = {
                let s = state.scheduler();
                let (peers, tasks) = s.counts();
                (peers, tasks, s.banned())
            };
            let body = serde_json::json!({
                "node": state.me.0, "quic": state.quic_addr.to_string(),
                "peers": peers, "tasks": tasks, "banned": banned,
            });
            text(StatusCode::OK, body.to_string())
        }
        (&Method::POST, "/join") => match join(state, req).await {
            Ok(body) => text(StatusCode::OK, body),
            Err((status, message)) => text(status, message),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// `POST /join` with `{"secret": "<hex>", "csr": "<PEM>"}`: a node certificate for a node
/// that knows the join token's secret.
async fn join(
    state: &State,
    req: Request<hyper::body::Incoming>,
) -> Result<String, (StatusCode, String)> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned());
    let body = http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| bad("body too large or broken"))?
        .to_bytes();
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| bad("body is not JSON"))?;
    let mut secret = [0u8; 16];
    hex::decode_to_slice(v["secret"].as_str().unwrap_or(""), &mut secret)
        .map_err(|_| bad("secret is not 32 hex"))?;
    state
        .join_token
        .check_secret(&secret)
        .map_err(|_| (StatusCode::FORBIDDEN, "wrong join secret".into()))?;
    let node = NodeId(rand_id());
    let cert = state
        .ca
        .sign_request(v["csr"].as_str().unwrap_or(""), node)
        .map_err(|e| bad(&format!("certificate request: {e}")))?;
    tracing::info!(node = node.0, "node joined");
    Ok(serde_json::json!({"node": node.0, "cert": cert, "ca": state.ca.cert_pem()}).to_string())
}
