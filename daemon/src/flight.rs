//! Shared registry fetches: however many clients ask for an uncached blob at once, the
//! registry sends it once.
//!
//! The first request for a digest starts a [`Flight`]: a task, independent of any client,
//! that streams the blob from the registry into a partial file in the store, hashing as it
//! goes. Every request for that digest (the first included) follows the flight by reading
//! the partial file up to what has been written. Only after the sha256 matches is the blob
//! [`FlightState::Verified`] and committed to the store; a mismatch discards it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::message::PieceSet;
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_registry_proxy::{ForwardHeaders, Registry, Upstream};
use shoal_transport::pieces::{Found, GroupHashes};
use tokio::sync::{mpsc, watch};

use crate::hashes::{BlobHashes, Checked};
use crate::metrics::{Metrics, Source};
use crate::p2p::{P2pFetch, Verdict};
use crate::store::{PartialBlob, Store, StoreError};
use crate::swarm::Swarm;

/// Bytes gathered before a write to the partial file; readers see progress in steps of at
/// most this much (or of `FLUSH_AFTER`, whichever comes first).
const WRITE_BATCH: usize = 256 * 1024;
const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// Batches queued for the writer: registry reads run ahead of disk writes by this many.
const WRITE_QUEUE: usize = 8;

/// Where a flight stands. Readers watch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlightState {
    /// Waiting for the registry's response headers.
    Connecting,
    /// The first `written` bytes are in the partial file.
    Running { written: u64 },
    /// Every byte written and the sha256 checked. Readers may send the whole blob; the
    /// commit to the store (sync and rename) follows and does not hold them up.
    Verified,
    /// Given up; readers that already answered finish from the registry on their own.
    Failed(FlightFailure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlightFailure {
    /// The registry did not answer 200 (or at all); nothing was written.
    BeforeStart { status: StatusCode, message: String },
    /// The registry's body broke off or the store could not take it.
    Interrupted(String),
    /// The bytes did not hash to the digest: they must not reach anyone.
    DigestMismatch,
}

/// One fetch of one blob from a registry into the store.
#[derive(Debug)]
pub struct Flight {
    pub digest: BlobDigest,
    pub len: u64,
    pub file: Arc<std::fs::File>,
    state: watch::Receiver<FlightState>,
    /// On the swarm path: the verified pieces and their hashes, which peers may have while
    /// the flight runs.
    pieces: Arc<Mutex<Option<Checked>>>,
}

impl Flight {
    /// A receiver of the flight's state, for one reader.
    pub fn watch(&self) -> watch::Receiver<FlightState> {
        self.state.clone()
    }

    /// The blob's layout and the pieces this flight has checked, once it knows them.
    pub fn held(&self) -> Option<(PieceLayout, PieceSet)> {
        let pieces = self.pieces.lock().unwrap_or_else(|p| p.into_inner());
        let checked = pieces.as_ref()?;
        Some((checked.hashes.layout(), checked.have.clone()))
    }

    /// The byte range of a piece this flight holds and has checked, for a peer.
    ///
    /// With `hashes`, also the piece hashes of its group (known for every checked piece).
    pub fn piece(&self, index: PieceIndex, hashes: bool) -> Option<Found> {
        let pieces = self.pieces.lock().unwrap_or_else(|p| p.into_inner());
        let checked = pieces.as_ref()?;
        if !checked.have.contains(index) {
            return None;
        }
        let group = hashes.then(|| checked.hashes.group_of(index)).flatten();
        Some(Found {
            file: self.file.clone(),
            range: checked.hashes.layout().range(index).ok()?,
            hashes: group.map_or(GroupHashes::None, |g| GroupHashes::Known(g.to_vec())),
        })
    }
}

/// What a flight needs to fetch a blob.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub registry: Registry,
    pub repository: String,
    pub path: String,
    pub headers: ForwardHeaders,
    pub digest: BlobDigest,
    pub len: u64,
}

/// The flights under way, by digest.
#[derive(Debug, Default)]
pub struct Flights {
    map: DashMap<BlobDigest, Arc<Flight>>,
    swarm: Option<Arc<Swarm>>,
}

impl Flights {
    /// Flights that use the swarm when there is one, else the registry alone.
    pub fn new(swarm: Option<Arc<Swarm>>) -> Self {
        Self {
            map: DashMap::new(),
            swarm,
        }
    }

    /// Piece requests given an upload slot, and a place beyond the slots, so far (none
    /// without a swarm).
    pub fn uploads_given(&self) -> (u64, u64) {
        self.swarm.as_ref().map_or((0, 0), |s| s.uploads_given())
    }

    /// The flight under way for `digest`, if any.
    pub fn get(&self, digest: &BlobDigest) -> Option<Arc<Flight>> {
        self.map.get(digest).map(|f| f.clone())
    }

    /// Joins the flight for `req.digest`, or starts one. Fails when the store cannot take
    /// the blob; the caller then streams from the registry without the store.
    pub fn join_or_start(
        self: &Arc<Self>,
        req: FetchRequest,
        store: &Arc<Store>,
        upstream: &Upstream,
        metrics: &Arc<Metrics>,
    ) -> Result<(Arc<Flight>, bool), StoreError> {
        match self.map.entry(req.digest) {
            Entry::Occupied(e) => Ok((e.get().clone(), false)),
            Entry::Vacant(e) => {
                let partial = store.begin(&req.digest, req.len)?;
                let (tx, rx) = watch::channel(FlightState::Connecting);
                let pieces = Arc::new(Mutex::new(None));
                let flight = Arc::new(Flight {
                    digest: req.digest,
                    len: req.len,
                    file: partial.file().clone(),
                    state: rx,
                    pieces: pieces.clone(),
                });
                e.insert(flight.clone());
                let task = FetchTask {
                    req,
                    partial,
                    tx,
                    upstream: upstream.clone(),
                    store: store.clone(),
                    metrics: metrics.clone(),
                    swarm: self.swarm.clone(),
                    pieces,
                };
                let flights = self.clone();
                let this = flight.clone();
                tokio::spawn(async move {
                    let digest = this.digest;
                    task.run().await;
                    flights.map.remove_if(&digest, |_, f| Arc::ptr_eq(f, &this));
                });
                Ok((flight, true))
            }
        }
    }
}

struct FetchTask {
    req: FetchRequest,
    partial: PartialBlob,
    tx: watch::Sender<FlightState>,
    upstream: Upstream,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    swarm: Option<Arc<Swarm>>,
    pieces: Arc<Mutex<Option<Checked>>>,
}

impl FetchTask {
    async fn run(self) {
        let FetchTask {
            req,
            partial,
            tx,
            upstream,
            store,
            metrics,
            swarm,
            pieces,
        } = self;
        let started = Instant::now();
        if let Some(swarm) = &swarm {
            let p2p = P2pFetch {
                swarm,
                upstream: &upstream,
                metrics: &metrics,
                req: &req,
                partial: &partial,
                tx: &tx,
                pieces: &pieces,
            };
            match p2p.run().await {
                Ok(verdict) => {
                    // The piece hashes go with the blob into the store: peers that ask this
                    // node for a group's hashes later get them without a second hashing.
                    let hashes = matches!(verdict, Verdict::Verified)
                        .then(|| {
                            let pieces = pieces.lock().unwrap_or_else(|p| p.into_inner());
                            pieces.as_ref().map(|c| Arc::new(c.hashes.clone()))
                        })
                        .flatten();
                    finish(verdict, partial, &tx, &store, &req, started, hashes).await;
                    // Stripe streams waiting on this blob find it whole in the store.
                    swarm.news.bump();
                    return;
                }
                Err(e) => {
                    tracing::warn!(digest = %req.digest, error = %e, "the swarm cannot serve this blob; fetching it from the registry");
                }
            }
        }
        let headers = req.headers.without_range();
        let mut resp = match upstream
            .send(Method::GET, &req.registry, &req.path, &headers)
            .await
        {
            Ok(resp) if resp.status() == StatusCode::OK => resp,
            Ok(resp) => {
                let status = resp.status();
                let message = format!("registry answered {status}");
                tx.send_replace(FlightState::Failed(FlightFailure::BeforeStart {
                    status,
                    message,
                }));
                return;
            }
            Err(e) => {
                let status = if e.is_timeout() {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                tracing::warn!(digest = %req.digest, error = %e, "blob fetch failed before it started");
                tx.send_replace(FlightState::Failed(FlightFailure::BeforeStart {
                    status,
                    message: e.to_string(),
                }));
                return;
            }
        };
        tx.send_replace(FlightState::Running { written: 0 });

        let (batches, writer) = spawn_writer(partial, tx, store.clone());
        let mut batch = BytesMut::with_capacity(WRITE_BATCH);
        let mut received = 0u64;
        let mut last_send = Instant::now();
        let outcome: Result<(), String> = loop {
            let chunk = match upstream.next_chunk(&mut resp).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) if batch.is_empty() => break Ok(()),
                Ok(None) => match batches.send(batch.split().freeze()).await {
                    Ok(()) => break Ok(()),
                    Err(_) => break Err("the store write failed".into()),
                },
                Err(e) => break Err(e.to_string()),
            };
            metrics.fetched(Source::Registry, chunk.len() as u64);
            received += chunk.len() as u64;
            if received > req.len {
                break Err(format!(
                    "registry sent more than the {} bytes it announced",
                    req.len
                ));
            }
            batch.extend_from_slice(&chunk);
            if batch.len() >= WRITE_BATCH || last_send.elapsed() >= FLUSH_AFTER {
                if batches.send(batch.split().freeze()).await.is_err() {
                    break Err("the store write failed".into());
                }
                last_send = Instant::now();
            }
        };
        drop(batches);
        let Ok(done) = writer.await else {
            // The writer panicked, and took the state sender with it: readers see it closed
            // and treat the flight as broken off.
            tracing::error!(digest = %req.digest, "blob writer panicked");
            return;
        };
        let WriterDone {
            partial,
            hasher,
            written,
            error,
            tx,
        } = done;
        if let Some(message) = error.or(outcome.err()) {
            tracing::warn!(digest = %req.digest, written, error = %message, "blob fetch interrupted");
            tx.send_replace(FlightState::Failed(FlightFailure::Interrupted(message)));
            return;
        }
        if written != req.len {
            let message = format!("registry sent {written} of {} bytes", req.len);
            tracing::warn!(digest = %req.digest, error = %message, "blob fetch interrupted");
            tx.send_replace(FlightState::Failed(FlightFailure::Interrupted(message)));
            return;
        }
        let got = BlobDigest::from_bytes(hasher.finalize().into());
        let verdict = if got == req.digest {
            Verdict::Verified
        } else {
            Verdict::DigestMismatch
        };
        finish(verdict, partial, &tx, &store, &req, started, None).await;
    }
}

/// Ends a flight: a verified blob goes to readers at once and then into the store, with
/// its piece hashes when they are known.
async fn finish(
    verdict: Verdict,
    partial: PartialBlob,
    tx: &watch::Sender<FlightState>,
    store: &Store,
    req: &FetchRequest,
    started: Instant,
    piece_hashes: Option<Arc<BlobHashes>>,
) {
    match verdict {
        Verdict::Verified => {}
        Verdict::DigestMismatch => {
            tracing::error!(
                digest = %req.digest, registry = %req.registry,
                "fetched bytes do not match the digest; discarded, clients' connections cut"
            );
            tx.send_replace(FlightState::Failed(FlightFailure::DigestMismatch));
            return;
        }
        Verdict::Interrupted(message) => {
            tracing::warn!(digest = %req.digest, error = %message, "blob fetch interrupted");
            tx.send_replace(FlightState::Failed(FlightFailure::Interrupted(message)));
            return;
        }
    }
    tx.send_replace(FlightState::Verified);
    match tokio::task::spawn_blocking(move || partial.commit()).await {
        Ok(Ok(())) => {
            if let Some(hashes) = piece_hashes {
                store.keep_piece_hashes(&req.digest, hashes);
            }
            tracing::debug!(digest = %req.digest, bytes = req.len, elapsed = ?started.elapsed(), "blob stored");
        }
        Ok(Err(e)) => {
            let e = store.io_error(e);
            tracing::warn!(digest = %req.digest, error = %e, "could not commit a verified blob to the store");
        }
        Err(e) => tracing::warn!(digest = %req.digest, error = %e, "commit task failed"),
    }
}

/// What the writer hands back when its input ends or a write fails.
struct WriterDone {
    partial: PartialBlob,
    hasher: Sha256,
    written: u64,
    error: Option<String>,
    tx: watch::Sender<FlightState>,
}

/// Hashes and writes batches on a blocking thread, so that receiving from the registry,
/// hashing and writing overlap; reports progress to readers after every write.
fn spawn_writer(
    partial: PartialBlob,
    tx: watch::Sender<FlightState>,
    store: Arc<Store>,
) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<WriterDone>) {
    let (batches, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let handle = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(bytes) = rx.blocking_recv() {
            hasher.update(&bytes);
            if let Err(e) = partial.write_at(written, &bytes) {
                let error = Some(store.io_error(e).to_string());
                return WriterDone {
                    partial,
                    hasher,
                    written,
                    error,
                    tx,
                };
            }
            written += bytes.len() as u64;
            tx.send_replace(FlightState::Running { written });
        }
        WriterDone {
            partial,
            hasher,
            written,
            error: None,
            tx,
        }
    });
    (batches, handle)
}
