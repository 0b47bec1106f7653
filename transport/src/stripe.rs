//! Stripes: a node asks its feed once for a stripe of a blob, and the feed sends the
//! stripe's pieces the node lacks, in order and as it gets them, on that one stream.
//!
//! The asker sends a [`StripeRequest`] frame on a [`StreamKind::Stripe`] stream; the holder
//! answers with [`PeerReply::Piece`] frames, each followed by exactly `len` raw bytes. It
//! sends a group's piece hashes with the first piece of that group on the stream (when it
//! knows them), and only pieces it has checked. It ends the stream once it has sent the
//! whole stripe, or answers `Missing` or `Busy` and ends it at once. The asker checks every
//! header against the layout and the stripe; this module only moves bytes and hashes.

use std::time::Duration;

use bytes::Bytes;
use shoal_proto::frame::{self, FrameDecoder};
use shoal_proto::message::{MAX_PEER_FRAME, PeerReply, PieceSet, StreamKind, StripeRequest};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use tokio::sync::watch;

use crate::pieces::{Found, GroupHashes, Piece, PieceError, UploadLimits};

/// Longest a stripe stream waits for the holder's next piece (or for the holder to begin
/// its own pull of the blob) before it ends: the asker then gets the rest elsewhere. Long,
/// since the holder may wait on its own feed.
pub const STRIPE_IDLE: Duration = Duration::from_secs(30);
/// Longest an asker may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a node serves stripes from.
pub trait StripeHolder: Send + Sync + 'static {
    /// The blob's layout and the pieces of it the holder has checked, if it has any.
    fn held(&self, digest: &BlobDigest) -> Option<(PieceLayout, PieceSet)>;
    /// A held piece's place, with its group's piece hashes when `hashes` (and known).
    fn piece(&self, digest: &BlobDigest, index: PieceIndex, hashes: bool) -> Option<Found>;
    /// Changes whenever the holder has new pieces, of any blob.
    fn news(&self) -> watch::Receiver<u64>;
    /// `bytes` of a piece were sent on a stripe stream.
    fn sent(&self, _bytes: u64) {}
}

/// A node that serves no stripes: every stripe stream is answered `Missing`.
impl StripeHolder for () {
    fn held(&self, _: &BlobDigest) -> Option<(PieceLayout, PieceSet)> {
        None
    }

    fn piece(&self, _: &BlobDigest, _: PieceIndex, _: bool) -> Option<Found> {
        None
    }

    fn news(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }
}

fn stream_error(e: impl std::fmt::Display) -> PieceError {
    PieceError::Stream(e.to_string())
}

/// Answers one stripe stream whose kind byte has been read, within `uploads`' stripe
/// streams and pace.
pub async fn serve_stripe(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    holder: &dyn StripeHolder,
    uploads: &UploadLimits,
) -> Result<(), PieceError> {
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(MAX_PEER_FRAME as usize))
        .await
        .map_err(|_| PieceError::Timeout(REQUEST_TIMEOUT))?
        .map_err(stream_error)?;
    let mut decoder = FrameDecoder::new(MAX_PEER_FRAME);
    decoder.push(&bytes);
    let Some(request) = decoder.decode::<StripeRequest>()? else {
        return Err(PieceError::Protocol("stripe request incomplete".into()));
    };
    let Some(_stream) = uploads.stripe_stream() else {
        return refuse(&mut send, PeerReply::Busy).await;
    };
    let mut news = holder.news();
    // The asker may learn of its feed before the feed has begun its own pull: wait for it.
    let layout = loop {
        news.borrow_and_update();
        if let Some((layout, _)) = holder.held(&request.digest) {
            break layout;
        }
        tokio::select! {
            changed = tokio::time::timeout(STRIPE_IDLE, news.changed()) => match changed {
                Ok(Ok(())) => continue,
                _ => return refuse(&mut send, PeerReply::Missing).await,
            },
            _ = send.stopped() => return Ok(()),
        }
    };
    request
        .validate(layout)
        .map_err(|e| PieceError::Protocol(e.to_string()))?;
    // Pieces the asker has, or was sent: never sent (again).
    let mut skip = request.have.clone();
    let mut hashes_sent_for = None;
    let mut held: Option<PieceSet> = None;
    loop {
        news.borrow_and_update();
        // A blob held whole stays whole while the stream runs: not looked up again (a
        // stored blob's lookup opens its file).
        if !held.as_ref().is_some_and(PieceSet::is_full) {
            let Some((_, now)) = holder.held(&request.digest) else {
                return refuse(&mut send, PeerReply::Missing).await;
            };
            held = Some(now);
        }
        let held = held.as_ref().expect("looked up above");
        let mut unsent = (request.stripe..layout.count())
            .step_by(request.stripes as usize)
            .map(PieceIndex)
            .filter(|i| !skip.contains(*i))
            .peekable();
        if unsent.peek().is_none() {
            return send.finish().map_err(stream_error);
        }
        let next = unsent.find(|i| held.contains(*i));
        let Some(index) = next else {
            tokio::select! {
                changed = tokio::time::timeout(STRIPE_IDLE, news.changed()) => match changed {
                    Ok(Ok(())) => continue,
                    // The holder is going away, or has had nothing new for long.
                    _ => return send.finish().map_err(stream_error),
                },
                _ = send.stopped() => return Ok(()),
            }
        };
        let group = layout.group_of(index);
        let with_hashes = hashes_sent_for != Some(group);
        let Some(Found {
            file,
            range,
            hashes,
        }) = holder.piece(&request.digest, index, with_hashes)
        else {
            return refuse(&mut send, PeerReply::Missing).await;
        };
        let len = range.end - range.start;
        if let Some(rate) = &uploads.rate {
            rate.take(len).await;
        }
        let (piece, hashes) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, range.start)?;
            let hashes = match hashes {
                GroupHashes::Known(hashes) => hashes,
                GroupHashes::FromFile(ranges) => crate::pieces::hash_ranges(&file, ranges)?,
                GroupHashes::None => Vec::new(),
            };
            Ok::<_, std::io::Error>((buf, hashes))
        })
        .await
        .map_err(stream_error)?
        .map_err(stream_error)?;
        if !hashes.is_empty() {
            hashes_sent_for = Some(group);
        }
        let header = PeerReply::Piece {
            index,
            len: len as u32,
            hashes,
        };
        send.write_all(&frame::encode(&header))
            .await
            .map_err(stream_error)?;
        send.write_chunk(Bytes::from(piece))
            .await
            .map_err(stream_error)?;
        holder.sent(len);
        skip.insert(index);
    }
}

/// Answers `reply` and ends the stream.
async fn refuse(send: &mut quinn::SendStream, reply: PeerReply) -> Result<(), PieceError> {
    send.write_all(&frame::encode(&reply))
        .await
        .map_err(stream_error)?;
    send.finish().map_err(stream_error)
}

/// The asker's end of a stripe stream.
#[derive(Debug)]
pub struct StripeStream {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    layout: PieceLayout,
    request: StripeRequest,
    /// Pieces the asker had, or got on this stream: sent again, they break the protocol.
    got: PieceSet,
}

/// Asks `conn` for a stripe. The holder's refusal comes with the first [`StripeStream::next`].
pub async fn open_stripe(
    conn: &quinn::Connection,
    request: StripeRequest,
    layout: PieceLayout,
) -> Result<StripeStream, PieceError> {
    request
        .validate(layout)
        .map_err(|e| PieceError::Protocol(format!("a stripe request of ours: {e}")))?;
    let (mut send, recv) = conn.open_bi().await.map_err(stream_error)?;
    send.write_all(&[StreamKind::Stripe as u8])
        .await
        .map_err(stream_error)?;
    send.write_all(&frame::encode(&request))
        .await
        .map_err(stream_error)?;
    send.finish().map_err(stream_error)?;
    Ok(StripeStream {
        recv,
        decoder: FrameDecoder::new(MAX_PEER_FRAME),
        layout,
        got: request.have.clone(),
        request,
    })
}

impl StripeStream {
    /// The stripe this stream carries.
    pub fn stripe(&self) -> u32 {
        self.request.stripe
    }

    /// The next piece, with the hashes the holder sent with it (unchecked); `None` once the
    /// holder has ended the stream. Waits as long as the holder does: callers set deadlines.
    pub async fn next(&mut self) -> Result<Option<(PieceIndex, Piece)>, PieceError> {
        let reply = loop {
            if let Some(reply) = self.decoder.decode::<PeerReply>()? {
                break reply;
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) if self.decoder.pending() == 0 => return Ok(None),
                Ok(None) => return Err(PieceError::Protocol("stream ended inside a frame".into())),
                Err(e) => return Err(stream_error(e)),
            }
        };
        reply
            .validate()
            .map_err(|e| PieceError::Protocol(e.to_string()))?;
        let (index, len, hashes) = match reply {
            PeerReply::Missing => return Err(PieceError::Missing),
            PeerReply::Busy => return Err(PieceError::Busy),
            PeerReply::Piece { index, len, hashes } => (index, len, hashes),
        };
        let expected = self.layout.len_of(index).ok();
        if !self.request.holds(index) || self.got.contains(index) || expected != Some(len) {
            return Err(PieceError::Protocol(format!(
                "piece {index} of {len} bytes on stripe {} of {} (had it: {}, its length: {expected:?})",
                self.request.stripe,
                self.request.stripes,
                self.got.contains(index),
            )));
        }
        let len = len as usize;
        let mut piece = Piece {
            hashes,
            ..Piece::default()
        };
        let mut rest = self.decoder.take_rest();
        if rest.len() > len {
            // The next header came with this piece's last bytes.
            let after = rest.split_off(len);
            self.decoder.push(&after);
        }
        if !rest.is_empty() {
            piece.push(rest.freeze());
        }
        while piece.len < len {
            match self.recv.read_chunk(len - piece.len, true).await {
                Ok(Some(chunk)) => piece.push(chunk.bytes),
                Ok(None) => {
                    return Err(PieceError::Protocol(format!(
                        "piece {index} ended after {} of {len} bytes",
                        piece.len
                    )));
                }
                Err(e) => return Err(stream_error(e)),
            }
        }
        self.got.insert(index);
        Ok(Some((index, piece)))
    }
}

/// A holder's news of new pieces: bump it whenever one is checked.
#[derive(Debug)]
pub struct News(watch::Sender<u64>);

impl Default for News {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl News {
    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// A holder for tests: one blob whose pieces are held as they are added.
#[cfg(test)]
struct TestHolder {
    digest: BlobDigest,
    layout: PieceLayout,
    file: std::sync::Arc<std::fs::File>,
    held: std::sync::Mutex<PieceSet>,
    news: News,
}

#[cfg(test)]
impl StripeHolder for TestHolder {
    fn held(&self, digest: &BlobDigest) -> Option<(PieceLayout, PieceSet)> {
        (*digest == self.digest).then(|| (self.layout, self.held.lock().unwrap().clone()))
    }

    fn piece(&self, digest: &BlobDigest, index: PieceIndex, hashes: bool) -> Option<Found> {
        let held = self.held(digest)?.1.contains(index);
        let range = self.layout.range(index).unwrap();
        held.then(|| Found {
            file: self.file.clone(),
            range: range.clone(),
            // A group of one piece, for the test.
            hashes: match hashes {
                true => GroupHashes::FromFile(vec![range]),
                false => GroupHashes::None,
            },
        })
    }

    fn news(&self) -> watch::Receiver<u64> {
        self.news.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterCa, Endpoint};
    use shoal_proto::PieceHash;
    use shoal_proto::message::NodeId;
    use std::os::unix::fs::FileExt as _;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_stripe_comes_in_order_as_the_holder_gets_it_and_ends_when_whole() {
        let ca = ClusterCa::generate().unwrap();
        let bind = |n| {
            Endpoint::bind(
                "127.0.0.1:0".parse().unwrap(),
                &ca.issue(NodeId(n)).unwrap(),
            )
        };
        let (holder_end, asker) = (bind(1).unwrap(), bind(2).unwrap());
        let blob: Vec<u8> = (0..(1u32 << 20) + 9).map(|i| (i % 253) as u8).collect();
        let digest = BlobDigest::of(&blob);
        let layout = PieceLayout::for_blob(blob.len() as u64).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&blob, 0).unwrap();
        let holder = Arc::new(TestHolder {
            digest,
            layout,
            file: Arc::new(file),
            held: std::sync::Mutex::new(PieceSet::empty(layout.count())),
            news: News::default(),
        });
        let add = |pieces: &[u32]| {
            let mut held = holder.held.lock().unwrap();
            pieces.iter().for_each(|i| held.insert(PieceIndex(*i)));
            drop(held);
            holder.news.bump();
        };
        // Stripe 1 of 3; the asker has piece 1 already; the holder has 4, 7 and 9.
        add(&[0, 4, 7, 9]);
        let addr = holder_end.local_addr().unwrap();
        let limits = UploadLimits::new(8, 0, 0);
        let serving = holder.clone();
        tokio::spawn(async move {
            while let Some((conn, _)) = holder_end.accept().await {
                tokio::spawn(crate::pieces::serve_pieces(
                    conn,
                    Arc::new(|_, _, _| None),
                    serving.clone(),
                    limits.clone(),
                ));
            }
        });
        let (conn, _) = asker.connect(addr).await.unwrap();
        let mut have = PieceSet::empty(layout.count());
        have.insert(PieceIndex(1));
        let request = |digest, have| StripeRequest {
            digest,
            stripe: 1,
            stripes: 3,
            have,
        };
        let mut stream = open_stripe(&conn, request(digest, have), layout)
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut next = async || {
            let (i, piece) = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("in time")
                .unwrap()
                .expect("a piece");
            let r = layout.range(i).unwrap();
            assert_eq!(piece.to_vec(), &blob[r.start as usize..r.end as usize]);
            (i.0, piece.hashes)
        };
        for _ in 0..2 {
            got.push(next().await);
        }
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            [4, 7],
            "held pieces of the stripe, in order; not the one the asker has"
        );
        let range = |i| layout.range(PieceIndex(i)).unwrap();
        let hash = |i| PieceHash::of(&blob[range(i).start as usize..range(i).end as usize]);
        assert_eq!(
            got[0].1,
            [hash(4)],
            "a group's hashes come with its first piece"
        );
        // Pieces that come later are sent as they come, lower ones first.
        add(&[13, 10]);
        assert_eq!(next().await.0, 10);
        assert_eq!(next().await.0, 13);
        let rest: Vec<u32> = (16..layout.count()).step_by(3).collect();
        add(&rest);
        for i in rest {
            assert_eq!(next().await.0, i);
        }
        let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        assert!(
            matches!(end, Ok(Ok(None))),
            "the whole stripe was sent: {end:?}"
        );
        // A blob the holder does not have yet is waited for, a while.
        let other = request(BlobDigest::of(b"other"), PieceSet::empty(layout.count()));
        let mut waiting = open_stripe(&conn, other, layout).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), waiting.next()).await;
        assert!(waited.is_err(), "still waiting: {waited:?}");
    }
}
