//! What the node serves to peers: the checked pieces of its flights and the blobs in its
//! store, one piece at a time ([`shoal_transport::pieces`]) or a stripe on one stream
//! ([`shoal_transport::stripe`]).

use std::sync::Arc;

use shoal_proto::message::PieceSet;
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_transport::pieces::{Found, GroupHashes};
use shoal_transport::stripe::StripeHolder;
use tokio::sync::watch;

use crate::server::App;
use crate::swarm::Swarm;

/// The node's flights and store, as peers see them.
pub struct Held {
    app: Arc<App>,
    swarm: Arc<Swarm>,
}

impl Held {
    pub fn new(app: Arc<App>, swarm: Arc<Swarm>) -> Self {
        Self { app, swarm }
    }

    /// A piece (and its group's hashes when asked): a flight's checked piece, or a piece of
    /// a complete blob with the piece hashes kept from its pull, or else read from its file.
    pub fn find(&self, digest: &BlobDigest, index: PieceIndex, hashes: bool) -> Option<Found> {
        if let Some(flight) = self.app.flights.get(digest)
            && let Some(found) = flight.piece(index, hashes)
        {
            return Some(found);
        }
        let stored = self.app.store.open_complete(digest)?;
        let layout = PieceLayout::for_blob(stored.len).ok()?;
        let range = layout.range(index).ok()?;
        let kept = || stored.piece_hashes.as_ref()?.group_of(index);
        let hashes = if !hashes {
            GroupHashes::None
        } else if let Some(group) = kept() {
            GroupHashes::Known(group.to_vec())
        } else {
            // Stored before this daemon started, or fetched from the registry alone.
            self.app.metrics.group_rehashed();
            let group = layout.group_range(layout.group_of(index));
            let ranges = group.map(|i| layout.range(PieceIndex(i)));
            GroupHashes::FromFile(ranges.collect::<Result<_, _>>().ok()?)
        };
        Some(Found {
            file: stored.file,
            range,
            hashes,
        })
    }
}

impl StripeHolder for Held {
    fn held(&self, digest: &BlobDigest) -> Option<(PieceLayout, PieceSet)> {
        if let Some(flight) = self.app.flights.get(digest)
            && let Some(held) = flight.held()
        {
            return Some(held);
        }
        let stored = self.app.store.open_complete(digest)?;
        let layout = PieceLayout::for_blob(stored.len).ok()?;
        Some((layout, PieceSet::full(layout.count())))
    }

    fn piece(&self, digest: &BlobDigest, index: PieceIndex, hashes: bool) -> Option<Found> {
        self.find(digest, index, hashes)
    }

    fn news(&self) -> watch::Receiver<u64> {
        self.swarm.news.subscribe()
    }
}
