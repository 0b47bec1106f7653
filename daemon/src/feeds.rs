//! The stripe streams of one pull: per stripe, one stream from the node the supernode
//! names as its feed ([`Task::feeds`](shoal_proto::message::Task)), which sends the
//! stripe's pieces unasked as it gets them ([`shoal_transport::stripe`]).
//!
//! A piece leaves its stream's task only once its group's hash is known, so that the pull
//! can check it at once; meanwhile the stream is not read, and the feed waits. The
//! [`Planner`](crate::planner::Planner) asks parents for a stripe's pieces again when
//! its stream ends or falls silent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shoal_proto::message::{PieceSet, StripeRequest, feeds_tag};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_transport::pieces::Piece;
use shoal_transport::stripe::open_stripe;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::swarm::Swarm;

/// Longest a piece waits in its stream for its group's hash before the stream is given up.
const HASH_WAIT: Duration = Duration::from_secs(10);
/// Longest the feed may take to accept a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// What a stripe stream brought.
#[derive(Debug)]
pub enum Event {
    /// A piece whose group's hash is known (its hashes as the feed sent them, unchecked).
    Piece {
        stripe: u32,
        from: SocketAddr,
        index: PieceIndex,
        piece: Piece,
    },
    /// The stream ended: the feed sent the whole stripe (`why` is `None`), or it failed.
    Ended {
        stripe: u32,
        from: SocketAddr,
        why: Option<String>,
    },
}

/// One stripe's feed, and its stream's task while it runs.
struct Stream {
    from: SocketAddr,
    task: Option<AbortHandle>,
}

/// The stripe streams of one pull.
pub struct Feeds {
    swarm: Arc<Swarm>,
    digest: BlobDigest,
    layout: PieceLayout,
    /// Per stripe of the current cut (empty: no stripes).
    streams: Vec<Option<Stream>>,
    tasks: JoinSet<()>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// Pieces whose hashes are known: those below this index.
    known: watch::Sender<u32>,
    /// Streams whose next piece waits for its hash.
    waiting: Arc<AtomicUsize>,
    /// The [`feeds_tag`] of the feeds last named.
    tag: u32,
}

impl Feeds {
    pub fn new(swarm: Arc<Swarm>, digest: BlobDigest, layout: PieceLayout) -> Self {
        let (tx, rx) = mpsc::channel(4);
        Self {
            swarm,
            digest,
            layout,
            streams: Vec::new(),
            tasks: JoinSet::new(),
            tx,
            rx,
            known: watch::Sender::new(0),
            waiting: Arc::default(),
            tag: 0,
        }
    }

    /// The tag of the feeds the supernode last named (0: none), for the next `Want`.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// Stripes the blob is cut into (0: none).
    pub fn stripes(&self) -> u32 {
        self.streams.len() as u32
    }

    /// Whether any stream runs, or what ended streams sent is still to be taken.
    pub fn is_active(&self) -> bool {
        !self.tasks.is_empty() || !self.rx.is_empty()
    }

    /// Whether a stream holds a piece until its hash comes: ask the supernode soon.
    pub fn waiting_for_hashes(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// The hashes of the pieces below `n` are known.
    pub fn hashes_known(&self, n: u32) {
        self.known.send_if_modified(|known| {
            let more = n > *known;
            *known = (*known).max(n);
            more
        });
    }

    /// The supernode named these feeds (one per stripe; none: no stripes; `None`: the
    /// same as before). A stream opens to each feed not streaming yet, asking for the
    /// pieces not in `have`; streams from feeds no longer named end. Returns the stripes
    /// whose streams opened.
    pub fn update(&mut self, feeds: Option<&[SocketAddr]>, have: &PieceSet) -> Vec<u32> {
        let Some(feeds) = feeds else {
            return Vec::new();
        };
        self.tag = feeds_tag(feeds);
        if feeds.len() != self.streams.len() {
            self.stop();
            self.streams = feeds.iter().map(|_| None).collect();
        }
        let mut opened = Vec::new();
        for (stripe, &from) in feeds.iter().enumerate() {
            let stripe = stripe as u32;
            let same = self.streams[stripe as usize]
                .as_ref()
                .is_some_and(|s| s.from == from);
            // A feed that ended or failed is not asked again until the supernode names
            // another; the stripe's pieces come from parents meanwhile.
            if same || from == self.swarm.peer_addr() {
                continue;
            }
            self.stop_stripe(stripe);
            let request = StripeRequest {
                digest: self.digest,
                stripe,
                stripes: feeds.len() as u32,
                have: have.clone(),
            };
            let task = self.tasks.spawn(stream(
                self.swarm.clone(),
                from,
                request,
                self.layout,
                self.known.subscribe(),
                self.waiting.clone(),
                self.tx.clone(),
            ));
            self.streams[stripe as usize] = Some(Stream {
                from,
                task: Some(task),
            });
            opened.push(stripe);
        }
        opened
    }

    /// Ends a stripe's stream (its feed is remembered, and not asked again).
    pub fn stop_stripe(&mut self, stripe: u32) {
        if let Some(Some(stream)) = self.streams.get_mut(stripe as usize)
            && let Some(task) = stream.task.take()
        {
            task.abort();
        }
    }

    /// Ends every stream and forgets the stripes.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
        self.streams.clear();
        self.tag = 0;
    }

    /// The next piece or end of a stream; pending while no stream runs.
    pub async fn next(&mut self) -> Event {
        loop {
            tokio::select! {
                Some(event) = self.rx.recv() => {
                    if let Event::Ended { stripe, from, .. } = &event
                        && let Some(Some(stream)) = self.streams.get_mut(*stripe as usize)
                        && stream.from == *from
                    {
                        stream.task = None;
                    }
                    return event;
                }
                // Finished tasks are let go (each sent its end first).
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                else => std::future::pending::<()>().await,
            }
        }
    }
}

/// One stream counted among those waiting for a hash, until dropped.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads one stripe stream until it ends, and passes each piece on once its hash is known.
async fn stream(
    swarm: Arc<Swarm>,
    from: SocketAddr,
    request: StripeRequest,
    layout: PieceLayout,
    mut known: watch::Receiver<u32>,
    waiting: Arc<AtomicUsize>,
    tx: mpsc::Sender<Event>,
) {
    let stripe = request.stripe;
    let request_digest = request.digest;
    let read = async {
        let conn = swarm.conn(from).await.map_err(|e| e.to_string())?;
        let mut stream = tokio::time::timeout(OPEN_TIMEOUT, open_stripe(&conn, request, layout))
            .await
            .map_err(|_| "the feed did not take the stream in time".to_owned())?
            .map_err(|e| e.to_string())?;
        loop {
            let Some((index, piece)) = stream.next().await.map_err(|e| e.to_string())? else {
                return Ok(());
            };
            tracing::trace!(digest = %request_digest, stripe, %from, piece = index.0, "stripe piece");
            if let Some(rate) = &swarm.download_rate {
                rate.take(piece.len as u64).await;
            }
            if *known.borrow() <= index.0 {
                let _waiting = Waiting::new(&waiting);
                let hashed = tokio::time::timeout(HASH_WAIT, known.wait_for(|n| *n > index.0));
                if !matches!(hashed.await, Ok(Ok(_))) {
                    return Err(format!(
                        "no hash came for piece {} in {HASH_WAIT:?}",
                        index.0
                    ));
                }
            }
            let event = Event::Piece {
                stripe,
                from,
                index,
                piece,
            };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    };
    let why = read.await.err();
    let _ = tx.send(Event::Ended { stripe, from, why }).await;
}
