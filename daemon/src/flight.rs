//! Shared registry fetches: however many clients ask for an uncached blob at once, the
//! registry sends it once.
//!
//! The first request for a digest starts a [`Flight`]: a task, independent of any client,
//! that streams the blob from the registry into a partial file in the store, hashing as it
//! goes. Every request for that digest (the first included) follows the flight by reading
//! the partial file up to what has been written. Only after the sha256 matches is the blob
//! [`FlightState::Verified`] and committed to the store; a mismatch discards it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::BlobDigest;
use shoal_registry_proxy::{ForwardHeaders, Registry, Upstream};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::{PartialBlob, Store, StoreError};

/// Bytes gathered before a write to the partial file; readers see progress in steps of at
/// most this much (or of `FLUSH_AFTER`, whichever comes first).
const WRITE_BATCH: usize = 256 * 1024;
const FLUSH_AFTER: Duration = Duration::from_millis(5);

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
}

impl Flight {
    /// A receiver of the flight's state, for one reader.
    pub fn watch(&self) -> watch::Receiver<FlightState> {
        self.state.clone()
    }
}

/// What a flight needs to fetch a blob.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub registry: Registry,
    pub path: String,
    pub headers: ForwardHeaders,
    pub digest: BlobDigest,
    pub len: u64,
}

/// The flights under way, by digest.
#[derive(Debug, Default)]
pub struct Flights {
    map: DashMap<BlobDigest, Arc<Flight>>,
}

impl Flights {
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
                let flight = Arc::new(Flight {
                    digest: req.digest,
                    len: req.len,
                    file: partial.file().clone(),
                    state: rx,
                });
                e.insert(flight.clone());
                let task = FetchTask {
                    req,
                    partial,
                    tx,
                    upstream: upstream.clone(),
                    store: store.clone(),
                    metrics: metrics.clone(),
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
        } = self;
        let started = Instant::now();
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

        let mut writer = Writer {
            partial,
            hasher: Sha256::new(),
            written: 0,
        };
        let mut batch = BytesMut::with_capacity(WRITE_BATCH);
        let mut last_flush = Instant::now();
        let outcome: Result<(), String> = loop {
            match upstream.next_chunk(&mut resp).await {
                Ok(Some(chunk)) => {
                    metrics.fetched(chunk.len() as u64);
                    if writer.written + (batch.len() + chunk.len()) as u64 > req.len {
                        break Err(format!(
                            "registry sent more than the {} bytes it announced",
                            req.len
                        ));
                    }
                    batch.extend_from_slice(&chunk);
                    if batch.len() >= WRITE_BATCH || last_flush.elapsed() >= FLUSH_AFTER {
                        if let Err(e) = writer.flush(&mut batch, &store).await {
                            break Err(e);
                        }
                        last_flush = Instant::now();
                        tx.send_replace(FlightState::Running {
                            written: writer.written,
                        });
                    }
                }
                Ok(None) => break writer.flush(&mut batch, &store).await,
                Err(e) => break Err(e.to_string()),
            }
        };
        if let Err(message) = outcome {
            tracing::warn!(digest = %req.digest, written = writer.written, error = %message, "blob fetch interrupted");
            tx.send_replace(FlightState::Failed(FlightFailure::Interrupted(message)));
            return;
        }
        tx.send_replace(FlightState::Running {
            written: writer.written,
        });
        if writer.written != req.len {
            let message = format!("registry sent {} of {} bytes", writer.written, req.len);
            tracing::warn!(digest = %req.digest, error = %message, "blob fetch interrupted");
            tx.send_replace(FlightState::Failed(FlightFailure::Interrupted(message)));
            return;
        }
        let got = BlobDigest::from_bytes(writer.hasher.finalize().into());
        if got != req.digest {
            tracing::error!(
                digest = %req.digest, got = %got, registry = %req.registry,
                "registry sent bytes that do not match the digest; discarded, clients' connections cut"
            );
            tx.send_replace(FlightState::Failed(FlightFailure::DigestMismatch));
            return;
        }
        tx.send_replace(FlightState::Verified);
        let partial = writer.partial;
        match tokio::task::spawn_blocking(move || partial.commit()).await {
            Ok(Ok(())) => {
                tracing::debug!(digest = %req.digest, bytes = req.len, elapsed = ?started.elapsed(), "blob stored");
            }
            Ok(Err(e)) => {
                let e = store.io_error(e);
                tracing::warn!(digest = %req.digest, error = %e, "could not commit a verified blob to the store");
            }
            Err(e) => tracing::warn!(digest = %req.digest, error = %e, "commit task failed"),
        }
    }
}

/// The writing end of a flight: appends to the partial file and hashes, off the runtime.
struct Writer {
    partial: PartialBlob,
    hasher: Sha256,
    written: u64,
}

impl Writer {
    async fn flush(&mut self, batch: &mut BytesMut, store: &Store) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let bytes = batch.split().freeze();
        let offset = self.written;
        // Move the writer state into the blocking task and back; a placeholder is never
        // observed because `self` is not reachable from anywhere else meanwhile.
        let partial_file = self.partial.file().clone();
        let mut hasher = std::mem::take(&mut self.hasher);
        let (hasher, result) = tokio::task::spawn_blocking(move || {
            hasher.update(&bytes);
            let result = std::os::unix::fs::FileExt::write_all_at(&*partial_file, &bytes, offset);
            (hasher, result.map(|()| bytes.len()))
        })
        .await
        .map_err(|e| e.to_string())?;
        self.hasher = hasher;
        match result {
            Ok(n) => {
                self.written += n as u64;
                Ok(())
            }
            Err(e) => Err(store.io_error(e).to_string()),
        }
    }
}
