//! The swarm path of a flight: pieces from peers and the seed, checked against their BLAKE3
//! hashes (learnt from parents, checked against the supernode's group hashes:
//! [`crate::hashes`]), written at their offsets, announced to the supernode, and streamed
//! to clients as they become contiguous. The [`Planner`] decides; this driver moves bytes. Pieces no peer
//! can give (or all of them, when progress stalls) come from the registry.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::{HeaderValue, Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::message::{FromSupernode, Origin, Task, ToSupernode};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_registry_proxy::Upstream;
use shoal_transport::pieces::{Piece, PieceError, fetch_piece};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::feeds::{self, Feeds};
use crate::flight::{FetchRequest, FlightState};
use crate::hashes::{Checked, HashError};
use crate::metrics::{Metrics, Source};
use crate::planner::{Failure, Planner, PlannerConfig, Request};
use crate::store::PartialBlob;
use crate::swarm::Swarm;

/// How often the driver asks the supernode for new hashes and parents, and announces.
pub const REFRESH: Duration = Duration::from_millis(200);
/// How soon it asks again when it has nothing in flight: the parents it knows have nothing
/// it lacks, as far as it knows, and fresh answers are what it needs (`shoal sim`, 100
/// nodes x 256 MiB at 1 Gbit/s: p50 1.58 x S/B at 25 ms, 1.98 x at 50 ms, 2.5 x at 200 ms).
pub const HUNGRY_ASK: Duration = Duration::from_millis(25);
/// How often new pieces are announced to the supernode (with how busy this node's upload
/// is): others learn of them this soon, not at the next question (`shoal sim`, 1,000 nodes
/// x 256 MiB at 1 Gbit/s, with the upload report: p50 1.46 x S/B, 1.68 x without either).
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(20);
/// Questions in a row the supernode may fail before the pull goes on without it. One late
/// answer is no reason: on a saturated link a control stream can wait seconds behind lost
/// packets (`shoal bench --netns`, 20 nodes at 50 mbit: one 3 s timeout sent a pull's
/// unhashed pieces, and through the shared connection every other pull's, to the registry).
/// Meanwhile peers keep serving what has hashes, and a stall still reaches the registry.
const SUPERNODE_FAILURES: u32 = 3;
/// Deadline for one piece from a peer.
const PIECE_DEADLINE: Duration = Duration::from_secs(10);
/// The error of a piece request a peer answered with "busy".
const BUSY: &str = "peer is busy";
/// Registry failures of single pieces before the flight gives up.
const MAX_REGISTRY_FAILURES: u32 = 5;

/// How a swarm fetch ended.
pub enum Verdict {
    /// Every byte is in and the whole blob matched its sha256.
    Verified,
    DigestMismatch,
    Interrupted(String),
}

pub struct P2pFetch<'a> {
    pub swarm: &'a Arc<Swarm>,
    pub upstream: &'a Upstream,
    pub metrics: &'a Metrics,
    pub req: &'a FetchRequest,
    pub partial: &'a PartialBlob,
    pub tx: &'a watch::Sender<FlightState>,
    /// Verified pieces and their hashes, which this node serves to peers while the flight
    /// runs.
    pub pieces: &'a Mutex<Option<Checked>>,
}

struct PieceResult {
    piece: PieceIndex,
    from: From,
    bytes: Result<Piece, String>,
    /// From the request to a peer's answer (the piece or "busy"), when it answered.
    answered_in: Option<Duration>,
    /// The piece came unasked on this stripe's stream.
    pushed: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Peer(SocketAddr),
    Registry,
}

impl P2pFetch<'_> {
    /// Runs the swarm path. An error means the swarm could not take the blob at all (no
    /// supernode answered, or it refused) and nothing was written: use the registry.
    pub async fn run(self) -> anyhow::Result<Verdict> {
        let req = self.req;
        let origin = Origin {
            registry: req.registry.to_string(),
            repository: req.repository.clone(),
            authorization: req
                .headers
                .authorization
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        // The supernode cuts the blob the same way: answers carry no layout.
        let layout = PieceLayout::for_blob(req.len)?;
        let (mut supernode, reply) = self.swarm.want(req.digest, req.len, &origin).await?;
        self.note_round_trip(supernode);
        let Task {
            groups_from,
            groups,
            parents,
            feeds: named,
        } = match checked(Some(reply), layout)? {
            Some(FromSupernode::Task(task)) => task,
            Some(FromSupernode::Refused { reason }) => {
                anyhow::bail!("supernode refused: {reason}")
            }
            None => anyhow::bail!("supernode sent no task"),
        };
        let now = Instant::now();
        let mut served = Checked::new(layout);
        served.hashes.add_groups(groups_from, groups);
        let mut planner = Planner::new(PlannerConfig::default(), layout, self.swarm.me, now);
        let known = served.hashes.pieces_known();
        planner.hashes_known(known);
        planner.offer(parents);
        let mut feeds = Feeds::new(self.swarm.clone(), req.digest, layout);
        feeds.hashes_known(known);
        let opened = feeds.update(named.as_deref(), planner.have());
        planner.feed(now, feeds.stripes(), &opened);
        *self.lock_pieces() = Some(served);
        // Children whose stripe streams came before this pull began find it now.
        self.swarm.news.bump();
        self.tx.send_replace(FlightState::Running { written: 0 });

        let mut jobs: JoinSet<PieceResult> = JoinSet::new();
        let mut announce = Vec::new();
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announce_tick = tokio::time::interval(ANNOUNCE_EVERY);
        announce_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // At most one question to the supernode at a time, and never in the way of pieces:
        // a supernode that stops answering must not slow the download.
        let mut supernode_lost = false;
        let mut supernode_failures = 0;
        // A supernode that took over the blob mid-pull hears of every piece this node has
        // with its first answer.
        let mut took_over = false;
        let mut asking: Option<tokio::task::JoinHandle<anyhow::Result<Option<FromSupernode>>>> =
            None;
        let mut registry_failures = 0;
        let mut prefix = 0u32;
        // The blob's sha256 over the pieces that arrived in order, as they arrive (the
        // rest is read back at the end): most of the second pass over the blob is saved.
        let mut sha = Some(Sha256::new());
        let mut hashed = 0u32;
        let mut fell_back = false;
        loop {
            for request in planner.next_requests(Instant::now()) {
                if let (Request::Registry { piece }, false) = (request, fell_back) {
                    fell_back = true;
                    tracing::warn!(digest = %req.digest, piece = piece.0, have = planner.have().iter().count(),
                        "the swarm is too slow for this blob: pieces come from the registry");
                }
                self.spawn(&mut jobs, request, layout);
            }
            if planner.is_complete() {
                break;
            }
            // With stripes, pieces on their way on streams keep a node busy: it asks every
            // REFRESH, not whenever nothing is in flight (`shoal sim --stripes`, 10,000
            // x 1 GiB: asking whenever idle, the seed's link carried 8 times the answers).
            let hungry =
                planner.in_flight() == 0 && (!feeds.is_active() || feeds.waiting_for_hashes());
            let done = tokio::select! {
                Some(done) = jobs.join_next() => {
                    let Ok(done) = done else { continue };
                    done
                }
                event = feeds.next(), if feeds.is_active() => match event {
                    feeds::Event::Piece { stripe, from, index, piece } => PieceResult {
                        piece: index,
                        from: From::Peer(from),
                        bytes: Ok(piece),
                        answered_in: None,
                        pushed: Some(stripe),
                    },
                    feeds::Event::Ended { stripe, from, why } => {
                        let digest = req.digest;
                        match why {
                            Some(why) => tracing::debug!(%digest, stripe, %from, %why, "stripe stream failed; its pieces come from parents"),
                            None => tracing::debug!(%digest, stripe, %from, "stripe stream done"),
                        }
                        planner.unfeed(stripe);
                        continue;
                    }
                },
                _ = announce_tick.tick(), if !announce.is_empty() => {
                    self.announce(supernode, std::mem::take(&mut announce));
                    continue;
                }
                // Ask every REFRESH, or soon when there is nothing to fetch (for example
                // because the hashes known are all fetched): the supernode holds such an
                // answer until the seed has more. Asking as each new hash appears would
                // cost the supernode a question per piece per node.
                _ = async {
                    if hungry && !supernode_lost {
                        tokio::time::sleep(HUNGRY_ASK).await;
                    } else {
                        refresh.tick().await;
                    }
                }, if asking.is_none() => {
                    if !announce.is_empty() {
                        self.announce(supernode, std::mem::take(&mut announce));
                    }
                    let msg = ToSupernode::Want {
                        digest: req.digest,
                        len: req.len,
                        origin: origin.clone(),
                        known_groups: self.with_checked(|c| c.hashes.groups_known()).unwrap_or(0),
                        // Every piece with a known hash is here, or a stripe stream holds a
                        // piece until its hash comes: wait for more hashes.
                        hold: feeds.waiting_for_hashes()
                            || self.with_checked(|c| c.hashes.pieces_known()).is_none_or(|known| prefix >= known),
                        // Streams bring every stripe: parents would go unused.
                        fed: planner.all_fed(Instant::now()),
                        feeds_tag: feeds.tag(),
                    };
                    let swarm = self.swarm.clone();
                    asking = Some(tokio::spawn(async move { swarm.control(supernode, &msg).await }));
                    continue;
                }
                answer = async { asking.as_mut().expect("guarded").await }, if asking.is_some() => {
                    asking = None;
                    let answer = answer.unwrap_or_else(|e| Err(e.into()));
                    match answer.and_then(|a| checked(a, layout)) {
                        Ok(Some(FromSupernode::Task(Task { groups_from, groups, parents, feeds: named }))) => {
                            self.note_round_trip(supernode);
                            supernode_lost = false;
                            supernode_failures = 0;
                            let known = self.with_checked(|c| {
                                c.hashes.add_groups(groups_from, groups);
                                c.hashes.pieces_known()
                            });
                            planner.hashes_known(known.unwrap_or(0));
                            feeds.hashes_known(known.unwrap_or(0));
                            let opened = feeds.update(named.as_deref(), planner.have());
                            planner.feed(Instant::now(), feeds.stripes(), &opened);
                            if std::mem::take(&mut took_over) {
                                announce.clear();
                                let checked = self.with_checked(|c| c.have.iter().collect());
                                self.announce(supernode, checked.unwrap_or_default());
                            }
                            planner.offer(parents);
                        }
                        Ok(Some(FromSupernode::Refused { reason })) => {
                            tracing::warn!(digest = %req.digest, %reason, "supernode gave up on the blob; the rest comes from the registry");
                            planner.registry_only();
                            feeds.stop();
                        }
                        Ok(None) => {}
                        Err(e) if !supernode_lost && supernode_failures + 1 < SUPERNODE_FAILURES => {
                            supernode_failures += 1;
                            tracing::info!(%supernode, error = %e, failures = supernode_failures, "supernode did not answer; asking again");
                        }
                        Err(e) => {
                            self.swarm.forget(supernode);
                            // The supernode was also the seed: it serves no more pieces.
                            planner.remove_parent(supernode);
                            // The next supernode in the blob's order takes over: it seeds the
                            // blob once more and its hashes come as its seed reads, while peers
                            // go on trading what has hashes. Only without one do the pieces
                            // nobody hashed come from the registry, each node fetching its own.
                            match self.swarm.next_supernode(&req.digest, supernode) {
                                Some(next) => {
                                    tracing::warn!(lost = %supernode, %next, error = %e, "supernode lost mid-pull; the next one takes the blob over");
                                    supernode = next;
                                    supernode_failures = 0;
                                    took_over = true;
                                }
                                None => {
                                    tracing::warn!(%supernode, error = %e, "supernode lost mid-pull; pieces it had not hashed come from the registry");
                                    planner.hashes_final();
                                    supernode_lost = true;
                                    feeds.stop();
                                }
                            }
                        }
                    }
                    continue;
                }
            };
            let now = Instant::now();
            if let Some(after) = done.answered_in {
                self.metrics.peer_answered(after);
            }
            let answered = done.answered_in.is_some() || done.pushed.is_some();
            if answered
                && let From::Peer(addr) = done.from
                && let Some(rtt) = self.swarm.round_trip(addr)
            {
                self.metrics.peer_round_trip(rtt);
            }
            let mut bytes = match done.bytes {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!(piece = done.piece.0, from = ?done.from, error = %e, "piece failed");
                    if done.from == From::Registry {
                        registry_failures += 1;
                        if registry_failures > MAX_REGISTRY_FAILURES {
                            return Ok(Verdict::Interrupted(format!("registry: {e}")));
                        }
                    }
                    let failure = if e == BUSY {
                        Failure::Busy
                    } else {
                        Failure::Unavailable
                    };
                    planner.failed(now, done.piece, failure);
                    continue;
                }
            };
            if planner.have().contains(done.piece) {
                // It came on its stripe's stream and from a parent too.
                planner.done(now, done.piece);
                continue;
            }
            // A piece is passed on only once checked against its hash: a registry
            // piece too (when its group's hashes are known), so that a node never
            // serves what it could not check.
            // (A registry piece comes with no hashes: it is checked if its group's
            // are known.)
            let offered = std::mem::take(&mut bytes.hashes);
            let verdict = self
                .with_checked(|c| c.hashes.check(done.piece, &bytes.chunks, offered))
                .unwrap_or(Err(HashError::GroupUnknown(done.piece)));
            let hash_checked = verdict.is_ok();
            if let (Err(e), Some(stripe)) = (&verdict, done.pushed) {
                // The stream's next pieces go to parents: the feed will not send this
                // one again.
                tracing::debug!(stripe, piece = done.piece.0, error = %e, "a piece from a stripe stream failed its check; the stripe comes from parents");
                feeds.stop_stripe(stripe);
                planner.unfeed(stripe);
            }
            match (verdict, done.from) {
                (Err(HashError::GroupUnknown(_)), From::Peer(_)) => {
                    // Asked before its group hash came (cannot happen: the planner
                    // asks only for pieces with one): not the peer's fault.
                    planner.failed(now, done.piece, Failure::Unavailable);
                    continue;
                }
                (Err(e), From::Peer(peer)) => {
                    tracing::warn!(%peer, piece = done.piece.0, digest = %req.digest, error = %e, "peer sent a bad piece; dropped and reported");
                    planner.failed(now, done.piece, Failure::BadData);
                    self.swarm.notify(
                        supernode,
                        ToSupernode::BadPiece {
                            digest: req.digest,
                            peer,
                            piece: done.piece,
                        },
                    );
                    continue;
                }
                _ => {}
            }
            let offset = layout.range(done.piece).map_err(anyhow::Error::from)?.start;
            let file = self.partial.file().clone();
            let len = bytes.len as u64;
            let mut in_order = sha.take_if(|_| done.piece.0 == hashed);
            let written = tokio::task::spawn_blocking(move || {
                if let Some(sha) = in_order.as_mut() {
                    bytes.chunks.iter().for_each(|c| sha.update(c));
                }
                bytes.write_at(&file, offset).map(|()| in_order)
            })
            .await;
            match written
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(Some(advanced)) => {
                    sha = Some(advanced);
                    hashed += 1;
                }
                Ok(None) => {}
                Err(e) => return Ok(Verdict::Interrupted(format!("store write: {e}"))),
            }
            let source = match done.from {
                From::Peer(addr) if addr == supernode => Source::Seed,
                From::Peer(..) => Source::Peer,
                From::Registry => Source::Registry,
            };
            self.metrics.fetched(source, len);
            match done.pushed {
                Some(_) => {
                    self.metrics.stripe_fetched(len);
                    planner.pushed(now, done.piece);
                }
                None => planner.done(now, done.piece),
            }
            // Only pieces checked against a hash are offered to others.
            if hash_checked {
                self.with_checked(|c| c.have.insert(done.piece));
                announce.push(done.piece);
                self.swarm.news.bump();
            }
            while prefix < layout.count() && planner.have().contains(PieceIndex(prefix)) {
                prefix += 1;
            }
            let written = layout
                .range(PieceIndex(prefix))
                .map_or(layout.blob_len(), |r| r.start);
            self.tx.send_replace(FlightState::Running { written });
        }
        if !announce.is_empty() {
            self.announce(supernode, announce);
        }
        jobs.abort_all();
        feeds.stop();
        if let Some(asking) = asking {
            asking.abort();
        }
        let (sha, from) = match sha {
            Some(sha) => {
                let from = layout
                    .range(PieceIndex(hashed))
                    .map_or(layout.blob_len(), |r| r.start);
                (sha, from)
            }
            None => (Sha256::new(), 0),
        };
        Ok(self.verify(sha, from).await)
    }

    fn note_round_trip(&self, supernode: SocketAddr) {
        if let Some(rtt) = self.swarm.round_trip(supernode) {
            self.metrics.supernode_round_trip(rtt);
        }
    }

    /// Tells the supernode of new pieces, and how busy this node's upload is.
    fn announce(&self, supernode: SocketAddr, pieces: Vec<PieceIndex>) {
        let msg = ToSupernode::Have {
            digest: self.req.digest,
            pieces,
            uploads: self.swarm.uploads(),
        };
        self.swarm.announce(supernode, msg);
    }

    fn lock_pieces(&self) -> std::sync::MutexGuard<'_, Option<Checked>> {
        self.pieces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` on what the flight has checked (set up once the supernode's first answer came).
    fn with_checked<R>(&self, f: impl FnOnce(&mut Checked) -> R) -> Option<R> {
        self.lock_pieces().as_mut().map(f)
    }

    fn spawn(&self, jobs: &mut JoinSet<PieceResult>, request: Request, layout: PieceLayout) {
        let digest = self.req.digest;
        match request {
            Request::Peer {
                parent: addr,
                piece,
            } => {
                tracing::trace!(%digest, piece = piece.0, parent = %addr, "asking a parent");
                let swarm = self.swarm.clone();
                let len = layout.len_of(piece).unwrap_or(0);
                let hashes = self
                    .with_checked(|c| c.hashes.lacks_group_of(piece))
                    .unwrap_or(true);
                jobs.spawn(async move {
                    if let Some(rate) = &swarm.download_rate {
                        rate.take(u64::from(len)).await;
                    }
                    let mut answered_in = None;
                    let fetched = tokio::time::timeout(PIECE_DEADLINE, async {
                        let conn = swarm.conn(addr).await.map_err(|e| e.to_string())?;
                        let asked = Instant::now();
                        let fetched = fetch_piece(&conn, digest, piece, len, hashes).await;
                        answered_in = match &fetched {
                            Ok(piece) => Some(piece.answered_in),
                            Err(PieceError::Busy) => Some(asked.elapsed()),
                            Err(_) => None,
                        };
                        fetched.map_err(|e| match e {
                            PieceError::Busy => BUSY.to_owned(),
                            e => e.to_string(),
                        })
                    })
                    .await
                    .unwrap_or_else(|_| Err("peer too slow".into()));
                    PieceResult {
                        piece,
                        from: From::Peer(addr),
                        bytes: fetched,
                        answered_in,
                        pushed: None,
                    }
                });
            }
            Request::Registry { piece } => {
                let (upstream, req) = (self.upstream.clone(), self.req.clone());
                let range = layout.range(piece).unwrap_or(0..0);
                jobs.spawn(async move {
                    let bytes = registry_range(&upstream, &req, range.start, range.end).await;
                    PieceResult {
                        piece,
                        from: From::Registry,
                        bytes,
                        answered_in: None,
                        pushed: None,
                    }
                });
            }
        }
    }

    /// Reads the blob back from `from` on, into `hasher` (which holds the bytes before
    /// it), and checks the sha256.
    async fn verify(&self, mut hasher: Sha256, from: u64) -> Verdict {
        let file = self.partial.file().clone();
        let (len, digest) = (self.req.len, self.req.digest);
        let checked = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = from;
            while pos < len {
                let n = (len - pos).min(buf.len() as u64) as usize;
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf[..n], pos)?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            Ok::<_, std::io::Error>(BlobDigest::from_bytes(hasher.finalize().into()))
        })
        .await;
        match checked {
            Ok(Ok(got)) if got == digest => Verdict::Verified,
            Ok(Ok(_)) => Verdict::DigestMismatch,
            Ok(Err(e)) => Verdict::Interrupted(e.to_string()),
            Err(e) => Verdict::Interrupted(e.to_string()),
        }
    }
}

/// Bytes `[start, end)` of the blob from the registry, with the client's credentials.
async fn registry_range(
    upstream: &Upstream,
    req: &FetchRequest,
    start: u64,
    end: u64,
) -> Result<Piece, String> {
    let mut piece = Piece::default();
    if start == end {
        return Ok(piece);
    }
    let mut headers = req.headers.without_range();
    headers.range = HeaderValue::from_str(&format!("bytes={start}-{}", end - 1)).ok();
    let mut resp = upstream
        .send(Method::GET, &req.registry, &req.path, &headers)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err(format!(
            "registry answered {} to a piece range",
            resp.status()
        ));
    }
    while let Some(chunk) = upstream
        .next_chunk(&mut resp)
        .await
        .map_err(|e| e.to_string())?
    {
        piece.push(chunk);
        if piece.len as u64 > end - start {
            return Err("registry sent more than the range".into());
        }
    }
    if piece.len as u64 != end - start {
        return Err("registry range ended early".into());
    }
    Ok(piece)
}

/// The supernode's answer, refused when its task does not fit the blob's layout (group
/// hashes past the last group, piece sets of another size): a supernode that sends such answers
/// is counted as failing, like one that does not answer.
fn checked(
    answer: Option<FromSupernode>,
    layout: PieceLayout,
) -> anyhow::Result<Option<FromSupernode>> {
    if let Some(FromSupernode::Task(task)) = &answer {
        task.validate(layout)
            .context("the supernode's answer does not fit the blob")?;
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_does_not_fit_the_blob_is_refused() {
        let layout = PieceLayout::for_blob(3 << 20).unwrap();
        let task = |groups_from, n| {
            Some(FromSupernode::Task(Task {
                groups_from,
                groups: vec![shoal_proto::GroupHash([1; 32]); n],
                parents: Vec::new(),
                feeds: None,
            }))
        };
        let count = layout.groups() as usize;
        assert!(checked(task(0, count), layout).is_ok());
        let err = checked(task(1, count), layout).unwrap_err();
        assert!(
            format!("{err:#}").contains("does not fit the blob"),
            "{err:#}"
        );
        let refused = Some(FromSupernode::Refused {
            reason: "registry said 401".into(),
        });
        assert!(checked(refused, layout).is_ok());
        assert!(checked(None, layout).unwrap().is_none());
    }
}
