//! Piece transfer between nodes: one bidirectional stream per piece.
//!
//! The asker sends a [`PeerRequest`] frame; the holder answers with a [`PeerReply`] frame
//! and, for `Piece`, exactly `len` raw bytes. Asked for them, the holder puts the piece
//! hashes of the piece's group in the reply. The asker checks the length against the
//! layout, the hashes against the group hash it got from the supernode and the bytes
//! against their piece hash; this module only moves bytes and hashes.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_proto::frame::{self, FrameDecoder, FrameError};
use shoal_proto::message::{MAX_PEER_FRAME, PeerReply, PeerRequest, StreamKind, Uploads};
use shoal_proto::{BlobDigest, PieceHash, PieceIndex};

use crate::link::{self, LinkMeter};
use crate::stripe::{StripeHolder, serve_stripe};

/// Stripe streams a node serves at once: a feed has at most a stripe's worth of children
/// and a few more while they move ([`crate::stripe`]).
pub const MAX_STRIPE_STREAMS: usize = 2 * (shoal_proto::message::MAX_STRIPES as usize + 1);

/// Longest a peer may take to answer a request header.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// The peer does not have the piece, or is at its upload limit: ask another.
    #[error("peer does not have the piece")]
    Missing,
    #[error("peer is busy")]
    Busy,
    /// The peer broke the protocol (wrong length, wrong index, garbage): drop it.
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<FrameError> for PieceError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// Asks `conn` for a piece of `expected_len` bytes, and with `hashes` for the piece hashes
/// of its group (unchecked: the caller checks them against the group hash).
pub async fn fetch_piece(
    conn: &quinn::Connection,
    digest: BlobDigest,
    index: PieceIndex,
    expected_len: u32,
    hashes: bool,
) -> Result<Piece, PieceError> {
    let stream = |e: &dyn std::fmt::Display| PieceError::Stream(e.to_string());
    let asked = std::time::Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(&e))?;
    send.write_all(&[StreamKind::Piece as u8])
        .await
        .map_err(|e| stream(&e))?;
    send.write_all(&frame::encode(&PeerRequest::Piece {
        digest,
        index,
        hashes,
    }))
    .await
    .map_err(|e| stream(&e))?;
    send.finish().map_err(|e| stream(&e))?;

    let mut decoder = FrameDecoder::new(MAX_PEER_FRAME);
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if let Some(reply) = decoder.decode::<PeerReply>()? {
                return Ok(reply);
            }
            match recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(|e| stream(&e))?
            {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(PieceError::Protocol("stream ended before the reply".into())),
            }
        }
    })
    .await
    .map_err(|_| PieceError::Timeout(REQUEST_TIMEOUT))??;
    reply
        .validate()
        .map_err(|e| PieceError::Protocol(e.to_string()))?;
    let (len, group) = match reply {
        PeerReply::Missing => return Err(PieceError::Missing),
        PeerReply::Busy => return Err(PieceError::Busy),
        PeerReply::Piece {
            index: got,
            len,
            hashes: group,
        } if got == index && len == expected_len && group.is_empty() != hashes => {
            (len as usize, group)
        }
        PeerReply::Piece {
            index: got,
            len,
            hashes: group,
        } => {
            return Err(PieceError::Protocol(format!(
                "asked {index} of {expected_len} bytes (hashes: {hashes}), got {got} of {len} \
                 with {} hashes",
                group.len()
            )));
        }
    };
    // The bytes stay in the chunks QUIC delivered them in: no copy to make them contiguous.
    let mut piece = Piece {
        answered_in: asked.elapsed(),
        hashes: group,
        ..Piece::default()
    };
    let first = decoder.take_rest().freeze();
    if !first.is_empty() {
        piece.push(first);
    }
    while piece.len < len {
        match recv
            .read_chunk(len - piece.len, true)
            .await
            .map_err(|e| stream(&e))?
        {
            Some(chunk) => piece.push(chunk.bytes),
            None => {
                return Err(PieceError::Protocol(format!(
                    "piece ended after {} of {len} bytes",
                    piece.len
                )));
            }
        }
    }
    if piece.len > len {
        return Err(PieceError::Protocol("piece longer than announced".into()));
    }
    Ok(piece)
}

/// Buffers one `pwritev` takes at most (Linux's `IOV_MAX`).
const MAX_IOV: usize = 1024;

/// A piece's bytes, in the chunks they arrived in.
#[derive(Debug, Clone, Default)]
pub struct Piece {
    pub chunks: Vec<Bytes>,
    pub len: usize,
    /// From the request to the peer's answer (the piece's header): a round trip, with
    /// whatever queues the request and the answer waited in.
    pub answered_in: Duration,
    /// The piece hashes of the piece's group, as the peer sent them (unchecked), when
    /// asked for.
    pub hashes: Vec<PieceHash>,
}

impl Piece {
    pub fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    /// Writes the piece at `offset` of `file`. Blocks.
    ///
    /// All chunks in one vectored write (a few for more than [`MAX_IOV`] chunks): the
    /// kernel then fills each page of the file at once. Written chunk by chunk (QUIC
    /// delivers about 1.2 KB at a time), every page was first zeroed and then filled in
    /// small pieces: a seventh of all CPU time in `shoal bench scale-out` on loopback;
    /// one write per piece made that run's p50 4-5% shorter (three interleaved pairs).
    pub fn write_at(&self, file: &File, mut offset: u64) -> std::io::Result<()> {
        let mut slices: Vec<std::io::IoSlice<'_>> = self
            .chunks
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MAX_IOV)];
            let written = rustix::io::pwritev(file, batch, offset)?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            offset += written as u64;
            std::io::IoSlice::advance_slices(&mut rest, written);
        }
        Ok(())
    }

    /// The bytes in one buffer (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// Where a holder finds a piece (if it has it) and, when asked (the `bool`), the piece
/// hashes of its group.
pub type PieceLookup = Arc<dyn Fn(&BlobDigest, PieceIndex, bool) -> Option<Found> + Send + Sync>;

/// A piece a holder has: its bytes' place in a file, and its group's piece hashes.
#[derive(Debug)]
pub struct Found {
    pub file: Arc<File>,
    pub range: Range<u64>,
    pub hashes: GroupHashes,
}

/// The piece hashes of a found piece's group.
#[derive(Debug)]
pub enum GroupHashes {
    /// Not asked for, or not known: the asker gets "missing" if it asked.
    None,
    Known(Vec<PieceHash>),
    /// Hashed from the file as the piece is read: the byte ranges of the group's pieces
    /// (a complete blob, checked against its digest, held without its piece hashes).
    FromFile(Vec<Range<u64>>),
}

/// Reads the kind byte that starts every stream.
pub async fn stream_kind(recv: &mut quinn::RecvStream) -> Option<StreamKind> {
    let mut kind = [0u8; 1];
    tokio::time::timeout(REQUEST_TIMEOUT, recv.read_exact(&mut kind))
        .await
        .ok()?
        .ok()?;
    StreamKind::from_byte(kind[0])
}

/// How long a piece request waits for an upload slot when all are taken, before the
/// answer is `Busy`. Waiting requests take slots as they free, in the order they came
/// (tokio's semaphore is fair). Answered "busy" at once, a request lost the slot to
/// whichever asker came back first, a round trip and a rest later: nodes with nothing in
/// flight starved while others kept eight requests going, and a freed slot sat idle for
/// a round trip (`shoal bench --netns`, 40 nodes, 16 MiB, 25 mbit: p50 2.74x and 2.58x
/// S/B busy at once, 2.45x and 2.29x waiting; see docs/benchmarks.md).
pub const SLOT_WAIT: Duration = Duration::from_millis(100);

/// What a node lets out: pieces sent at once (over it, peers wait up to [`SLOT_WAIT`], as
/// many at most as there are slots, and others are told `Busy`) and bytes per second.
/// When it knows its link, it sends up to [`link::EXTRA_UPLOADS`] pieces
/// beyond its slots while the connections it serves send under [`link::ROOM_BELOW`] of it.
#[derive(Debug)]
pub struct UploadLimits {
    slots: tokio::sync::Semaphore,
    pub rate: Option<crate::rate::ByteRate>,
    /// `slots`' size, and the most requests that wait for one.
    total: usize,
    waiting: AtomicUsize,
    /// Pieces beyond the slots, and what the link sends; only when the link is known.
    extra: tokio::sync::Semaphore,
    link: Option<Link>,
    /// Requests given a slot, and a place beyond the slots, so far.
    given: AtomicU64,
    given_beyond: AtomicU64,
    /// Stripe streams served at once ([`MAX_STRIPE_STREAMS`]).
    stripe_streams: tokio::sync::Semaphore,
}

/// A node's upload link as its served connections' counters show it.
#[derive(Debug)]
struct Link {
    capacity: f64,
    state: Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    meter: LinkMeter,
    /// Connections served, with the bytes each had sent when last read.
    conns: Vec<(quinn::Connection, u64)>,
    /// Bytes sent over all of them, closed ones included.
    total: u64,
}

impl LinkState {
    /// Adds what every connection sent since the last reading; forgets closed ones.
    fn count(&mut self) -> u64 {
        let mut total = self.total;
        self.conns.retain_mut(|(conn, last)| {
            let sent = conn.stats().udp_tx.bytes;
            total += sent.saturating_sub(*last);
            *last = sent;
            conn.close_reason().is_none()
        });
        self.total = total;
        total
    }

    fn has_room(&mut self, now: Instant, capacity: f64) -> bool {
        if self.meter.wants_sample(now) {
            let total = self.count();
            self.meter.sample(now, total);
        }
        self.meter
            .rate()
            .is_some_and(|rate| link::has_room(rate, capacity))
    }
}

/// One request counted among those waiting for a slot, until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UploadLimits {
    /// `slots` pieces at once, at most `bytes_per_second` (0: unlimited), on a link that
    /// sends `link_bytes_per_second` (0: unknown).
    pub fn new(slots: usize, bytes_per_second: u64, link_bytes_per_second: u64) -> Arc<Self> {
        let link = (link_bytes_per_second > 0).then(|| Link {
            capacity: link_bytes_per_second as f64,
            state: Mutex::default(),
        });
        Arc::new(Self {
            slots: tokio::sync::Semaphore::new(slots),
            rate: crate::rate::ByteRate::new(bytes_per_second),
            total: slots,
            waiting: AtomicUsize::new(0),
            extra: tokio::sync::Semaphore::new(if link.is_some() {
                link::EXTRA_UPLOADS
            } else {
                0
            }),
            link,
            given: AtomicU64::new(0),
            given_beyond: AtomicU64::new(0),
            stripe_streams: tokio::sync::Semaphore::new(MAX_STRIPE_STREAMS),
        })
    }

    /// A place for one more stripe stream, or `None` when [`MAX_STRIPE_STREAMS`] run.
    pub fn stripe_stream(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.stripe_streams.try_acquire().ok()
    }

    /// Counts what `conn` sends toward the link's use (when the link is known). Closed
    /// connections are let go here too, so that a node whose slots never fill does not
    /// keep every connection it ever served.
    pub fn watch(&self, conn: &quinn::Connection) {
        if let Some(link) = &self.link {
            let mut state = lock(&link.state);
            state.count();
            let sent = conn.stats().udp_tx.bytes;
            state.conns.push((conn.clone(), sent));
        }
    }

    /// A slot for one piece: at once, beyond the slots while the link has room, or after
    /// waiting up to `wait` behind fewer than `slots` other requests; `None` means busy.
    pub async fn slot(&self, wait: Duration) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if let Ok(permit) = self.slots.try_acquire() {
            self.given.fetch_add(1, Ordering::Relaxed);
            return Some(permit);
        }
        if let Some(link) = &self.link
            && self.extra.available_permits() > 0
            && lock(&link.state).has_room(Instant::now(), link.capacity)
            && let Ok(permit) = self.extra.try_acquire()
        {
            self.given_beyond.fetch_add(1, Ordering::Relaxed);
            return Some(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        if queued >= self.total {
            return None;
        }
        let permit = tokio::time::timeout(wait, self.slots.acquire())
            .await
            .ok()?
            .ok()?;
        self.given.fetch_add(1, Ordering::Relaxed);
        Some(permit)
    }

    /// Piece requests given one of the slots, and a place beyond them, so far.
    pub fn given(&self) -> (u64, u64) {
        (
            self.given.load(Ordering::Relaxed),
            self.given_beyond.load(Ordering::Relaxed),
        )
    }

    /// Pieces being sent now in the slots (not those beyond them), of at most how many.
    pub fn now(&self) -> Uploads {
        let clamp = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        Uploads {
            sending: clamp(self.total.saturating_sub(self.slots.available_permits())),
            slots: clamp(self.total),
        }
    }

    /// Bytes the watched connections have sent (`None` when the link is unknown).
    pub fn sent(&self) -> Option<u64> {
        Some(lock(&self.link.as_ref()?.state).count())
    }
}

/// The link's state stays whole whatever a holder of the lock did: it holds counters.
fn lock(state: &Mutex<LinkState>) -> std::sync::MutexGuard<'_, LinkState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Answers the piece requests and stripe streams of one connection until it closes,
/// within `uploads`. Other kinds of streams are refused.
pub async fn serve_pieces(
    conn: quinn::Connection,
    lookup: PieceLookup,
    stripes: Arc<dyn StripeHolder>,
    uploads: Arc<UploadLimits>,
) {
    uploads.watch(&conn);
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let (lookup, stripes, uploads) = (lookup.clone(), stripes.clone(), uploads.clone());
        tokio::spawn(async move {
            let served = match stream_kind(&mut recv).await {
                Some(StreamKind::Piece) => answer_piece(send, recv, &lookup, &uploads).await,
                Some(StreamKind::Stripe) => serve_stripe(send, recv, &*stripes, &uploads).await,
                _ => return,
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "piece request failed");
            }
        });
    }
}

/// The BLAKE3 hashes of these byte ranges of `file`. Blocks.
pub(crate) fn hash_ranges(file: &File, ranges: Vec<Range<u64>>) -> std::io::Result<Vec<PieceHash>> {
    let mut buf = Vec::new();
    ranges
        .into_iter()
        .map(|r| {
            buf.resize((r.end - r.start) as usize, 0);
            file.read_exact_at(&mut buf, r.start)?;
            Ok(PieceHash::of(&buf))
        })
        .collect()
}

/// Answers one piece request whose kind byte has been read.
pub async fn answer_piece(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    lookup: &PieceLookup,
    uploads: &UploadLimits,
) -> Result<(), PieceError> {
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(MAX_PEER_FRAME as usize))
        .await
        .map_err(|_| PieceError::Timeout(REQUEST_TIMEOUT))?
        .map_err(|e| PieceError::Stream(e.to_string()))?;
    let mut decoder = FrameDecoder::new(MAX_PEER_FRAME);
    decoder.push(&bytes);
    let Some(PeerRequest::Piece {
        digest,
        index,
        hashes,
    }) = decoder.decode::<PeerRequest>()?
    else {
        return Err(PieceError::Protocol("request frame incomplete".into()));
    };
    let reply = |r: PeerReply| frame::encode(&r);
    let Some(_permit) = uploads.slot(SLOT_WAIT).await else {
        send.write_all(&reply(PeerReply::Busy))
            .await
            .map_err(|e| PieceError::Stream(e.to_string()))?;
        return send.finish().map_err(|e| PieceError::Stream(e.to_string()));
    };
    let found = lookup(&digest, index, hashes)
        .filter(|found| !hashes || !matches!(found.hashes, GroupHashes::None));
    let Some(Found {
        file,
        range,
        hashes: group,
    }) = found
    else {
        send.write_all(&reply(PeerReply::Missing))
            .await
            .map_err(|e| PieceError::Stream(e.to_string()))?;
        return send.finish().map_err(|e| PieceError::Stream(e.to_string()));
    };
    let len = (range.end - range.start) as usize;
    if let Some(rate) = &uploads.rate {
        rate.take(len as u64).await;
    }
    let (piece, group) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start)?;
        let group = match group {
            GroupHashes::None => Vec::new(),
            GroupHashes::Known(hashes) => hashes,
            GroupHashes::FromFile(ranges) => hash_ranges(&file, ranges)?,
        };
        Ok::<_, std::io::Error>((buf, group))
    })
    .await
    .map_err(|e| PieceError::Stream(e.to_string()))?
    .map_err(|e| PieceError::Stream(e.to_string()))?;
    send.write_all(&reply(PeerReply::Piece {
        index,
        len: len as u32,
        hashes: if hashes { group } else { Vec::new() },
    }))
    .await
    .map_err(|e| PieceError::Stream(e.to_string()))?;
    // Handing quinn the buffer itself saves the copy `write_all` would make.
    send.write_chunk(Bytes::from(piece))
        .await
        .map_err(|e| PieceError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| PieceError::Stream(e.to_string()))?;
    // The slot is taken until the peer has the bytes, not until quinn has buffered them:
    // otherwise a node takes piece after piece into its send buffer, all share its link,
    // and each takes so long that askers give up (`shoal bench --netns`, 20 nodes at 50
    // mbit: 157 pieces abandoned after 10 s).
    // Either way the slot is free: all bytes acknowledged, the peer stopped reading (it
    // drops the stream once it has the piece's bytes), or the connection is gone.
    tokio::time::timeout(REQUEST_TIMEOUT, send.stopped())
        .await
        .map_err(|_| PieceError::Timeout(REQUEST_TIMEOUT))?
        .map(|_| ())
        .map_err(|e| PieceError::Stream(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterCa, Endpoint};
    use shoal_proto::PieceLayout;
    use shoal_proto::message::NodeId;

    #[tokio::test]
    async fn pieces_cross_between_two_nodes() {
        let ca = ClusterCa::generate().unwrap();
        let holder = Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ca.issue(NodeId(1)).unwrap(),
        )
        .unwrap();
        let asker = Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ca.issue(NodeId(2)).unwrap(),
        )
        .unwrap();
        let blob: Vec<u8> = (0..(3u32 << 20) + 7).map(|i| (i % 251) as u8).collect();
        let digest = BlobDigest::of(&blob);
        let layout = PieceLayout::for_blob(blob.len() as u64).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&blob, 0).unwrap();
        let file = Arc::new(file);
        // Piece 0's group hashes are known; the others' are hashed from the file; the
        // group of the last piece is not known.
        let last = PieceIndex(layout.count() - 1);
        let lookup: PieceLookup = Arc::new(move |d, i, want| {
            let hashes = match i.0 {
                _ if !want => GroupHashes::None,
                0 => GroupHashes::Known(vec![PieceHash::of(b"known")]),
                _ if i == last => GroupHashes::None,
                _ => GroupHashes::FromFile(vec![layout.range(i).ok()?]),
            };
            (*d == digest).then(|| {
                Some(Found {
                    file: file.clone(),
                    range: layout.range(i).ok()?,
                    hashes,
                })
            })?
        });
        let addr = holder.local_addr().unwrap();
        // A link of 1 TiB/s: known, so the bytes sent are counted.
        let limits = UploadLimits::new(8, 0, 1 << 40);
        let served = limits.clone();
        tokio::spawn(async move {
            while let Some((conn, _)) = holder.accept().await {
                tokio::spawn(serve_pieces(
                    conn,
                    lookup.clone(),
                    Arc::new(()),
                    served.clone(),
                ));
            }
        });
        let (conn, _) = asker.connect(addr).await.unwrap();
        for i in layout.pieces() {
            let piece = fetch_piece(&conn, digest, i, layout.len_of(i).unwrap(), false)
                .await
                .unwrap();
            let r = layout.range(i).unwrap();
            assert_eq!(piece.to_vec(), &blob[r.start as usize..r.end as usize]);
            assert!(piece.hashes.is_empty());
        }
        let with_hashes = |i: u32| {
            let len = layout.len_of(PieceIndex(i)).unwrap();
            fetch_piece(&conn, digest, PieceIndex(i), len, true)
        };
        assert_eq!(
            with_hashes(0).await.unwrap().hashes,
            [PieceHash::of(b"known")]
        );
        assert_eq!(
            with_hashes(1).await.unwrap().hashes,
            [PieceHash::of(&blob[64 << 10..128 << 10])],
            "hashed from the file"
        );
        let asked = fetch_piece(&conn, digest, last, layout.len_of(last).unwrap(), true).await;
        assert!(
            matches!(asked, Err(PieceError::Missing)),
            "hashes asked for and not known: {asked:?}"
        );
        let sent = limits.sent().unwrap();
        assert!(sent >= blob.len() as u64, "{sent} bytes counted");
        assert_eq!(UploadLimits::new(8, 0, 0).sent(), None);
        let other = BlobDigest::of(b"other");
        assert!(matches!(
            fetch_piece(&conn, other, PieceIndex(0), 1, false).await,
            Err(PieceError::Missing)
        ));
        assert!(matches!(
            fetch_piece(&conn, digest, PieceIndex(0), 5, false).await,
            Err(PieceError::Protocol(_))
        ));
        // A closed connection is let go, and what it sent still counts.
        conn.close(0u32.into(), b"done");
        let watched = || lock(&limits.link.as_ref().unwrap().state).conns.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while watched() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = limits.sent();
        }
        assert_eq!(watched(), 0, "the closed connection is let go");
        assert!(limits.sent().unwrap() >= sent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_its_turn_for_a_slot_and_no_longer_than_told() {
        let limits = UploadLimits::new(2, 0, 0);
        let wait = Duration::from_millis(100);
        let first = limits.slot(wait).await.expect("a free slot at once");
        let _second = limits.slot(wait).await.expect("a free slot at once");
        let ms = Duration::from_millis;
        let (a, b, third) = tokio::join!(
            limits.slot(wait),
            async {
                tokio::time::sleep(ms(1)).await;
                limits.slot(wait).await.is_some()
            },
            async {
                // Two wait (as many as there are slots): a third is busy at once.
                tokio::time::sleep(ms(2)).await;
                let third = tokio::time::timeout(Duration::ZERO, limits.slot(wait)).await;
                tokio::time::sleep(ms(10)).await;
                drop(first);
                matches!(third, Ok(None))
            },
        );
        assert!(third, "a third waiter is told busy at once");
        assert!(a.is_some(), "the first to wait gets the freed slot");
        assert!(!b, "the second gives up after its wait");
        assert_eq!(limits.now().sending, 2);
        drop(a);
        // Nobody is counted as waiting any more.
        let _again = limits.slot(wait).await.expect("a free slot");
        assert!(limits.slot(wait).await.is_none(), "waits and gives up");
    }

    /// Limits of one slot on a link of 1 MB/s whose meter saw `sent` bytes in 100 ms.
    fn one_slot_on_a_link_that_sent(sent: u64) -> Arc<UploadLimits> {
        let limits = UploadLimits::new(1, 0, 1_000_000);
        let mut state = lock(&limits.link.as_ref().unwrap().state);
        let now = Instant::now();
        state.meter.sample(now - Duration::from_millis(100), 0);
        state
            .meter
            .sample(now - Duration::from_millis(50), sent / 2);
        state.total = sent;
        drop(state);
        limits
    }

    #[tokio::test]
    async fn a_node_sends_beyond_its_slots_while_its_link_has_room() {
        let wait = Duration::from_millis(20);
        // 10 KB in 100 ms: 100 KB/s of 1 MB/s.
        let limits = one_slot_on_a_link_that_sent(10_000);
        let first = limits.slot(wait).await.expect("the slot");
        let second = limits.slot(wait).await.expect("room on the link");
        let third = limits.slot(wait).await.expect("room on the link");
        assert_eq!(link::EXTRA_UPLOADS, 2);
        assert!(limits.slot(wait).await.is_none(), "no more than 2 beyond");
        assert_eq!(limits.now().sending, 1, "the slots' count only");
        drop(second);
        assert!(limits.slot(wait).await.is_some(), "a place beyond freed");
        assert_eq!(limits.given(), (1, 3));
        drop((first, third));
    }

    #[tokio::test]
    async fn a_node_whose_link_is_busy_keeps_to_its_slots() {
        let wait = Duration::from_millis(20);
        // 95 KB in 100 ms: 950 KB/s of 1 MB/s.
        let limits = one_slot_on_a_link_that_sent(95_000);
        let _first = limits.slot(wait).await.expect("the slot");
        assert!(limits.slot(wait).await.is_none(), "the link is busy");
        // A node that does not know its link never goes beyond its slots.
        let unknown = UploadLimits::new(1, 0, 0);
        let _only = unknown.slot(wait).await.expect("the slot");
        assert!(unknown.slot(wait).await.is_none());
    }

    #[test]
    fn a_piece_of_many_chunks_is_written_whole_at_its_offset() {
        // More chunks than one vectored write takes, of uneven sizes.
        let bytes: Vec<u8> = (0..3000u32 * 7).map(|i| (i % 241) as u8).collect();
        let mut piece = Piece::default();
        let (mut at, mut size) = (0, 1);
        while at < bytes.len() {
            let end = (at + size).min(bytes.len());
            piece.push(Bytes::copy_from_slice(&bytes[at..end]));
            (at, size) = (end, size % 13 + 1);
        }
        assert!(piece.chunks.len() > MAX_IOV);
        let file = tempfile::tempfile().unwrap();
        piece.write_at(&file, 5000).unwrap();
        let mut back = vec![0u8; 5000 + bytes.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[5000..], &bytes[..]);
        assert!(back[..5000].iter().all(|&b| b == 0));
    }
}
