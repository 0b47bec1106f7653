//! Stripe trees (`shoal sim --stripes K`), as shoald and shoal-supernode run them with
//! `shoal-supernode --stripes K` (`shoal_transport::stripe`, `shoal_daemon::feeds`).
//!
//! Who feeds whom is the blob's supernode's: its scheduler keeps [`StripeTrees`] per task
//! ([`shoal_supernode::SchedulerConfig::stripes`]), which a node joins when it first asks
//! for the blob. Piece `i` is in stripe `i % k`, each node forwards one stripe down a
//! k-ary tree of the stripe's forwarders, and the other nodes hang under them as leaves. A
//! node that receives a piece of the stripe it forwards sends it on to each of its children
//! once it has checked it, unasked, one piece at a time per child (a stream per child); a
//! piece whose hash the node has not learnt yet waits for it. The seed sends a group's
//! pieces once the group is whole (its hash can go out). Every node then
//! sends one stripe at its whole upload and receives each stripe at 1/k of its download:
//! both links full by construction. Nodes still check each piece against the hashes from
//! the supernode, whose answers then carry no parents (and name a node's feeds only when
//! they changed); and a node fed by its streams asks the supernode every REFRESH, not as
//! soon as nothing is in flight, unless a piece waits for its hash.
//!
//! When nodes join late or leave, the trees mend and name the streams that moved: the old
//! stream ends, and the new source first sends, in order, the pieces of the stripe it has
//! and the node lacks, then each new one. Not modelled: the mesh beside the streams, which
//! shoald falls back to for a stripe whose stream ends or sends nothing for 3 s (here no
//! piece is asked for), a supernode that dies, and a forwarder that sends bad data.
//!
//! [`StripeTrees`]: shoal_supernode::stripes::StripeTrees

use std::collections::{HashMap, VecDeque};

use shoal_proto::PieceIndex;
use shoal_proto::message::NodeId;
use shoal_supernode::stripes::{Feed, StripeTrees};

use super::net::Host;
use super::{Answer, Sim, Src, Tag};

/// The push model's state.
pub struct Push {
    k: u32,
    hosts: HashMap<NodeId, Host>,
    /// Per pull and stripe: where its stream comes from now.
    feeds: Vec<Vec<Option<Source>>>,
    lines: Lines<(u64, Tag)>,
    /// Per pull: pieces queued for it on a stream or on their way (one flag per piece,
    /// made at the first).
    coming: Vec<Vec<bool>>,
    /// Per pull: the stripe its node forwards (read for every piece that arrives).
    forwards: Vec<Option<u32>>,
    /// Per pull: its node has been told its feeds as they are now (answers leave them out
    /// then, as shoal-supernode's do).
    feeds_told: Vec<bool>,
}

impl Push {
    /// `k` stripes; `ids[h]` is host `h`'s node; `pulls` node-blob pulls in all.
    pub fn new(k: u32, ids: impl IntoIterator<Item = NodeId>, pulls: usize) -> Self {
        Push {
            k,
            hosts: ids.into_iter().zip(0..).collect(),
            feeds: vec![vec![None; k as usize]; pulls],
            lines: Lines::new(),
            coming: vec![Vec::new(); pulls],
            forwards: vec![None; pulls],
            feeds_told: vec![false; pulls],
        }
    }

    /// The feeds an answer to `pull` names: all of them when they changed since it was
    /// last told (they count as told from now on), else none.
    pub fn feeds_to_tell(&mut self, pull: u32) -> usize {
        match std::mem::replace(&mut self.feeds_told[pull as usize], true) {
            true => 0,
            false => self.k as usize,
        }
    }

    /// Marks `piece` as coming to `pull` (of `count` pieces); false if it already was.
    fn expect(&mut self, pull: u32, piece: u32, count: u32) -> bool {
        let flags = &mut self.coming[pull as usize];
        if flags.is_empty() {
            flags.resize(count as usize, false);
        }
        let flag = &mut flags[piece as usize];
        !std::mem::replace(flag, true)
    }

    /// `piece` is no longer on its way to `pull` (it arrived, or its stream ended).
    fn not_coming(&mut self, pull: u32, piece: u32) {
        if let Some(flag) = self.coming[pull as usize].get_mut(piece as usize) {
            *flag = false;
        }
    }

    /// Pieces taken off a stream before they were sent.
    fn dropped(&mut self, items: Vec<(u64, Tag)>) {
        for (_, tag) in items {
            if let Tag::Piece { pull, piece, .. } = tag {
                self.not_coming(pull, piece);
            }
        }
    }

    fn stripe(&self, piece: u32) -> u32 {
        piece % self.k
    }
}

/// Where a stream of a stripe comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Seed,
    Node(Host),
}

/// A pull's stream of a stripe now comes from elsewhere.
#[derive(Debug, Clone, Copy)]
struct Moved {
    pull: u32,
    stripe: u32,
    from: Option<Source>,
    to: Option<Source>,
}

impl Sim {
    fn push(&self) -> &Push {
        self.push.as_ref().expect("push trees")
    }

    fn push_mut(&mut self) -> &mut Push {
        self.push.as_mut().expect("push trees")
    }

    /// `blob`'s stripe trees, at the supernode that seeds it.
    fn trees(&self, blob: u32) -> Option<&StripeTrees> {
        let b = &self.blobs[blob as usize];
        self.sns[b.ranked[0]].scheduler.stripe_trees(&b.digest)
    }

    /// The node the seed sends `piece` of `blob` to.
    pub(super) fn push_root(&self, blob: u32, piece: u32) -> Option<Host> {
        let root = self.trees(blob)?.root(self.push().stripe(piece))?;
        self.push().hosts.get(&root).copied()
    }

    /// Whom `node` sends `piece` of `blob` on to once it has it (none unless it forwards
    /// the piece's stripe).
    pub(super) fn push_children(&self, node: Host, blob: u32, piece: u32) -> Vec<Host> {
        let push = self.push();
        let pull = self.pull_of(node, blob);
        if push.forwards[pull as usize] != Some(push.stripe(piece)) {
            return Vec::new();
        }
        let Some(trees) = self.trees(blob) else {
            return Vec::new();
        };
        let id = super::node_id(node);
        let children = trees.children(id);
        children
            .iter()
            .filter_map(|c| push.hosts.get(c).copied())
            .collect()
    }

    /// `piece` goes on the stream from `from` to `to` (for `pull`), after those before it,
    /// unless the pull has it or it is coming.
    pub(super) fn push_to(
        &mut self,
        t: f64,
        from: Host,
        to: Host,
        pull: u32,
        piece: u32,
        src: Src,
    ) {
        let p = &self.pulls[pull as usize];
        let has = p
            .planner
            .as_ref()
            .is_none_or(|l| l.have.contains(PieceIndex(piece)));
        let skip = p.done || has || self.left[to as usize];
        let layout = self.blobs[p.blob as usize].layout;
        let len = u64::from(layout.len_of(PieceIndex(piece)).unwrap_or(0));
        let push = self.push_mut();
        if skip || !push.expect(pull, piece, layout.count()) {
            return;
        }
        let tag = Tag::Piece {
            pull,
            piece,
            src,
            extra: false,
        };
        if let Some(item) = push.lines.queue(from, to, (len, tag)) {
            self.start_pushed(t, from, to, item);
        }
    }

    /// A piece came down the stream from `from` to `to`. The next on that stream goes,
    /// and the receiver sends this one on to its children in the piece's stripe.
    pub(super) fn pushed(&mut self, t: f64, from: Host, to: Host, pull: u32, piece: u32) {
        let push = self.push_mut();
        push.not_coming(pull, piece);
        if let Some((len, tag)) = push.lines.ended(from, to) {
            // Its bytes follow the last one's on the stream: no gap on the link.
            self.net.start(from, to, len, tag);
        }
        let p = &self.pulls[pull as usize];
        // As the daemon does: a piece goes on once checked, against the hash it may still
        // wait for (`Sim::hashes_in` sends it on).
        if piece >= p.hashes_in {
            return;
        }
        let blob = p.blob;
        for child in self.push_children(to, blob, piece) {
            let pull = self.pull_of(child, blob);
            self.push_to(t, to, child, pull, piece, Src::Peer);
        }
    }

    /// A pushed piece's flow was cut (a host left): the stream from `from` to `to` ends.
    /// The stream the receiver has now for the piece's stripe, if another, sends it (it
    /// was on its way on an old stream when that one's source began its catch-up).
    pub(super) fn push_cut(&mut self, t: f64, from: Host, to: Host, pull: u32, piece: u32) {
        let push = self.push_mut();
        push.not_coming(pull, piece);
        let queued = push.lines.close(from, to);
        push.dropped(queued);
        let stripe = push.stripe(piece);
        let Some(source) = push.feeds[pull as usize][stripe as usize] else {
            return;
        };
        let host = self.source_host(source, pull);
        if host != from && self.source_has(source, pull, piece) {
            self.push_to(t, host, to, pull, piece, source.src());
        }
    }

    /// After `blob`'s supernode heard of a join or a leave: the streams its trees moved.
    /// Each old one ends, then each new source sends what it has of the stripe that the
    /// pull lacks, in order, and each new piece after.
    pub(super) fn restream(&mut self, t: f64, blob: u32) {
        let b = &self.blobs[blob as usize];
        let changes = self.sns[b.ranked[0]]
            .scheduler
            .take_stripe_changes(&b.digest);
        if changes.is_empty() {
            return;
        }
        let mut moved = Vec::new();
        for (id, stripe) in changes {
            let Some(&node) = self.push().hosts.get(&id) else {
                continue;
            };
            let feed = self.trees(blob).and_then(|trees| trees.feed(id, stripe));
            let to = feed.and_then(|feed| match feed {
                Feed::Seed => Some(Source::Seed),
                Feed::Node(parent) => self.push().hosts.get(&parent).map(|&h| Source::Node(h)),
            });
            let pull = self.pull_of(node, blob);
            let forwards = self.trees(blob).and_then(|trees| trees.stripe_of(id));
            let push = self.push_mut();
            // A node's own stripe changes only with a change of its feed of that stripe.
            push.forwards[pull as usize] = forwards;
            let from = std::mem::replace(&mut push.feeds[pull as usize][stripe as usize], to);
            if from != to {
                push.feeds_told[pull as usize] = false;
                moved.push(Moved {
                    pull,
                    stripe,
                    from,
                    to,
                });
            }
        }
        // Old streams end first, and take off only their own stripe's pieces: the same
        // source may now feed another stripe, whose catch-up is on the same stream.
        for m in &moved {
            let Some(from) = m.from else {
                continue;
            };
            let host = self.source_host(from, m.pull);
            let node = self.pulls[m.pull as usize].node;
            let push = self.push_mut();
            let k = push.k;
            let ours = |(_, tag): &(u64, Tag)| {
                matches!(tag, Tag::Piece { pull, piece, .. }
                    if *pull == m.pull && piece % k == m.stripe)
            };
            let queued = push.lines.close_if(host, node, ours);
            push.dropped(queued);
        }
        for m in &moved {
            let Some(to) = m.to else {
                continue;
            };
            let (host, node) = (
                self.source_host(to, m.pull),
                self.pulls[m.pull as usize].node,
            );
            let count = self.blobs[blob as usize].layout.count();
            let held: Vec<u32> = (m.stripe..count)
                .step_by(self.push().k as usize)
                .filter(|&i| self.source_has(to, m.pull, i))
                .collect();
            for piece in held {
                self.push_to(t, host, node, m.pull, piece, to.src());
            }
        }
    }

    /// The host a pull's stream comes from: a parent, or the blob's seed.
    fn source_host(&self, source: Source, pull: u32) -> Host {
        match source {
            Source::Node(parent) => parent,
            Source::Seed => self.seed_host(self.pulls[pull as usize].sn),
        }
    }

    /// Whether the source of a pull's stream has `piece`.
    fn source_has(&self, source: Source, pull: u32, piece: u32) -> bool {
        let p = &self.pulls[pull as usize];
        match source {
            // Only checked pieces: those whose hashes the holder has.
            Source::Node(parent) => {
                let from = &self.pulls[self.pull_of(parent, p.blob) as usize];
                piece < from.hashes_in
                    && from
                        .planner
                        .as_ref()
                        .is_some_and(|l| l.have.contains(PieceIndex(piece)))
            }
            Source::Seed => {
                let layout = self.blobs[p.blob as usize].layout;
                let seeded = self.sns[p.sn].seeded.get(&p.blob).copied().unwrap_or(0);
                piece < layout.pieces_in_groups(layout.whole_groups(seeded))
            }
        }
    }

    /// A pushed piece's bytes leave now and arrive half a round trip later (on a stream
    /// that was idle: behind another piece they follow it at once).
    fn start_pushed(&mut self, t: f64, from: Host, to: Host, (len, tag): (u64, Tag)) {
        if self.rtt > 0.0 {
            self.answer(t + self.rtt / 2.0, Answer::Piece { from, to, len, tag });
        } else {
            self.net.start(from, to, len, tag);
        }
    }
}

impl Source {
    fn src(self) -> Src {
        match self {
            Source::Seed => Src::Seed,
            Source::Node(_) => Src::Peer,
        }
    }
}

/// Streams from a parent to a child: one piece on its way at a time, the rest queued.
#[derive(Debug)]
pub struct Lines<T> {
    lines: HashMap<(Host, Host), (bool, VecDeque<T>)>,
}

impl<T> Lines<T> {
    pub fn new() -> Self {
        Lines {
            lines: HashMap::new(),
        }
    }

    /// Queue `item` on the stream from `from` to `to`: returned if it goes now.
    pub fn queue(&mut self, from: Host, to: Host, item: T) -> Option<T> {
        let (busy, queue) = self.lines.entry((from, to)).or_default();
        if *busy {
            queue.push_back(item);
            None
        } else {
            *busy = true;
            Some(item)
        }
    }

    /// The piece on the stream from `from` to `to` arrived: the next one, if any, goes now.
    pub fn ended(&mut self, from: Host, to: Host) -> Option<T> {
        let (busy, queue) = self.lines.get_mut(&(from, to))?;
        let next = queue.pop_front();
        *busy = next.is_some();
        if !*busy {
            self.lines.remove(&(from, to));
        }
        next
    }

    /// The stream from `from` to `to` ends: the pieces queued on it are returned (the
    /// one on its way, if any, still arrives, and nothing follows it).
    pub fn close(&mut self, from: Host, to: Host) -> Vec<T> {
        self.close_if(from, to, |_| true)
    }

    /// The queued pieces of the stream from `from` to `to` that `drop` picks are taken off
    /// it and returned; the others stay, in order.
    pub fn close_if(&mut self, from: Host, to: Host, drop: impl Fn(&T) -> bool) -> Vec<T> {
        let Some((_, queue)) = self.lines.get_mut(&(from, to)) else {
            return Vec::new();
        };
        let mut dropped = Vec::new();
        for item in std::mem::take(queue) {
            if drop(&item) {
                dropped.push(item);
            } else {
                queue.push_back(item);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_stream_hands_back_what_it_had_queued() {
        let mut lines = Lines::new();
        assert_eq!(lines.queue(1, 2, 'a'), Some('a'));
        assert_eq!(lines.queue(1, 2, 'b'), None);
        assert_eq!(lines.queue(1, 2, 'c'), None);
        assert_eq!(lines.close(1, 2), vec!['b', 'c']);
        assert_eq!(lines.ended(1, 2), None);
        assert_eq!(lines.close(1, 2), Vec::<char>::new());
        // Only what is picked goes: a stream that carried one stripe and now carries
        // another keeps the new one's pieces.
        let mut lines = Lines::new();
        assert_eq!(lines.queue(3, 4, 1), Some(1));
        for piece in [5, 2, 9, 6] {
            assert_eq!(lines.queue(3, 4, piece), None);
        }
        assert_eq!(lines.close_if(3, 4, |p| p % 4 == 1), vec![5, 9]);
        assert_eq!(lines.ended(3, 4), Some(2));
        assert_eq!(lines.ended(3, 4), Some(6));
        assert_eq!(lines.ended(3, 4), None);
    }

    #[test]
    fn a_stream_sends_one_piece_at_a_time_in_order() {
        let mut lines = Lines::new();
        assert_eq!(lines.queue(1, 2, 'a'), Some('a'));
        assert_eq!(lines.queue(1, 2, 'b'), None);
        assert_eq!(lines.queue(1, 3, 'c'), Some('c'));
        assert_eq!(lines.queue(1, 2, 'd'), None);
        assert_eq!(lines.ended(1, 2), Some('b'));
        assert_eq!(lines.ended(1, 2), Some('d'));
        assert_eq!(lines.ended(1, 2), None);
        assert_eq!(lines.queue(1, 2, 'e'), Some('e'));
        assert_eq!(lines.ended(4, 5), None);
    }
}
