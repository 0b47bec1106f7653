//! Response bodies of blobs: from a stored file, following a flight, or from the registry.
//!
//! A [`BlobReader`] yields the bytes `[pos, end)` of one blob. Following a flight it reads
//! the partial file as far as it is written, but holds back the blob's last byte until the
//! digest is verified: a client never holds a complete blob that shoal has not checked.
//! If the flight breaks off, the reader carries on from the registry with a `Range` request
//! of its own; if the flight's bytes fail the digest, the reader fails, which cuts the
//! client's connection.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http::{HeaderValue, Method, StatusCode};
use shoal_registry_proxy::{ForwardHeaders, Registry, Upstream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::flight::{Flight, FlightFailure, FlightState};
use crate::metrics::{Metrics, Source};
use crate::store::Lease;

/// Bytes read from disk per chunk sent. Small enough that eight slow readers stay far below
/// the memory target, large enough that the blocking-pool hop is noise.
const READ_CHUNK: usize = 512 * 1024;

/// What the reader takes bytes from.
pub enum Feed {
    /// A complete, verified file.
    Stored(Arc<File>),
    /// A partial file being written by a flight.
    Following(Arc<Flight>, watch::Receiver<FlightState>),
    /// A registry response body.
    Registry(reqwest::Response),
}

/// How to reach the registry if the flight fails mid-way.
pub struct Fallback {
    pub upstream: Upstream,
    pub registry: Registry,
    pub path: String,
    pub headers: ForwardHeaders,
}

pub struct BlobReader {
    pub feed: Feed,
    pub pos: u64,
    pub end: u64,
    pub total: u64,
    pub fallback: Option<Fallback>,
    pub metrics: Arc<Metrics>,
    pub lease: Option<Lease>,
    buf: BytesMut,
    ahead: Option<ReadAhead>,
    done: bool,
}

/// A read of the next chunk, started before it was asked for.
struct ReadAhead {
    pos: u64,
    len: usize,
    task: JoinHandle<(BytesMut, io::Result<()>)>,
}

impl BlobReader {
    pub fn new(feed: Feed, pos: u64, end: u64, total: u64, metrics: Arc<Metrics>) -> Self {
        BlobReader {
            feed,
            pos,
            end,
            total,
            fallback: None,
            metrics,
            lease: None,
            buf: BytesMut::new(),
            ahead: None,
            done: false,
        }
    }

    /// The bytes as a stream.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send {
        futures_util::stream::unfold(self, |mut reader| async move {
            reader.next().await.map(|r| (r, reader))
        })
    }

    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        if self.done || self.pos >= self.end {
            return None;
        }
        let result = self.read().await;
        match &result {
            Ok(chunk) => self.pos += chunk.len() as u64,
            Err(_) => self.done = true,
        }
        Some(result)
    }

    async fn read(&mut self) -> io::Result<Bytes> {
        loop {
            let available = match &mut self.feed {
                Feed::Stored(_) => self.end,
                Feed::Registry(resp) => {
                    let fallback = self
                        .fallback
                        .as_ref()
                        .ok_or_else(|| io::Error::other("no registry"))?;
                    let chunk = fallback
                        .upstream
                        .next_chunk(resp)
                        .await
                        .map_err(io::Error::other)?;
                    let chunk = chunk.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "registry body ended early")
                    })?;
                    self.metrics.fetched(Source::Registry, chunk.len() as u64);
                    let room = (self.end - self.pos) as usize;
                    return Ok(if chunk.len() > room {
                        chunk.slice(..room)
                    } else {
                        chunk
                    });
                }
                Feed::Following(_, state) => {
                    match wait_for_bytes(state, self.pos, self.total).await {
                        Ok(available) => available.min(self.end),
                        Err(FlightFailure::DigestMismatch) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "blob failed its sha256 check",
                            ));
                        }
                        Err(failure) => {
                            tracing::info!(
                                pos = self.pos,
                                ?failure,
                                "shared fetch failed; continuing from the registry"
                            );
                            self.feed = Feed::Registry(self.resume_from_registry().await?);
                            continue;
                        }
                    }
                }
            };
            let file = match &self.feed {
                Feed::Stored(file) => file.clone(),
                Feed::Following(flight, _) => flight.file.clone(),
                Feed::Registry(_) => unreachable!("returned above"),
            };
            let len = (available - self.pos).min(READ_CHUNK as u64) as usize;
            return self.read_file(file, len).await;
        }
    }

    async fn read_file(&mut self, file: Arc<File>, len: usize) -> io::Result<Bytes> {
        let task = match self.ahead.take() {
            Some(ahead) if ahead.pos == self.pos && ahead.len == len => ahead.task,
            _ => self.spawn_read(file.clone(), self.pos, len),
        };
        let (mut buf, result) = task.await.map_err(io::Error::other)?;
        result?;
        let chunk = buf.split().freeze();
        self.buf = buf;
        // A stored blob's next chunk is known: read it while this one goes to the client,
        // so that disk reads and socket writes overlap.
        let next = self.pos + len as u64;
        if matches!(self.feed, Feed::Stored(_)) && next < self.end {
            let len = (self.end - next).min(READ_CHUNK as u64) as usize;
            self.ahead = Some(ReadAhead {
                pos: next,
                len,
                task: self.spawn_read(file, next, len),
            });
        }
        Ok(chunk)
    }

    fn spawn_read(
        &mut self,
        file: Arc<File>,
        pos: u64,
        len: usize,
    ) -> JoinHandle<(BytesMut, io::Result<()>)> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // Reclaims an earlier chunk's allocation once the client side has dropped it: fresh
        // memory is slow to touch on this kind of VM.
        buf.reserve(len);
        buf.resize(len, 0);
        tokio::task::spawn_blocking(move || {
            let result = file.read_exact_at(&mut buf, pos);
            (buf, result)
        })
    }

    async fn resume_from_registry(&self) -> io::Result<reqwest::Response> {
        let fb = self
            .fallback
            .as_ref()
            .ok_or_else(|| io::Error::other("shared fetch failed"))?;
        let mut headers = fb.headers.without_range();
        let range = format!("bytes={}-{}", self.pos, self.end - 1);
        headers.range = Some(HeaderValue::from_str(&range).map_err(io::Error::other)?);
        let resp = fb
            .upstream
            .send(Method::GET, &fb.registry, &fb.path, &headers)
            .await
            .map_err(io::Error::other)?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            return Ok(resp);
        }
        Err(io::Error::other(format!(
            "registry answered {} to a resume at byte {}",
            resp.status(),
            self.pos
        )))
    }
}

/// Waits until the flight has bytes past `pos` and returns how far the reader may read.
async fn wait_for_bytes(
    state: &mut watch::Receiver<FlightState>,
    pos: u64,
    total: u64,
) -> Result<u64, FlightFailure> {
    loop {
        match &*state.borrow_and_update() {
            FlightState::Verified => return Ok(total),
            // The last byte waits for the digest check.
            FlightState::Running { written } if (*written).min(total - 1) > pos => {
                return Ok((*written).min(total - 1));
            }
            FlightState::Failed(f) => return Err(f.clone()),
            FlightState::Running { .. } | FlightState::Connecting => {}
        }
        if state.changed().await.is_err() {
            // The fetch task ended without a final word: treat it as broken off.
            if *state.borrow() == FlightState::Verified {
                return Ok(total);
            }
            return Err(FlightFailure::Interrupted("fetch task ended".into()));
        }
    }
}
