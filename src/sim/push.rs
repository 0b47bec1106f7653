//! Stripe trees with push, as a model (`shoal sim --push-stripes K`): a design that
//! shoald does not have yet, measured here before it is built.
//!
//! Who feeds whom is the supernode's [`StripeTrees`], each node joining in order: piece
//! `i` is in stripe `i % k`, each node forwards one stripe down a k-ary tree of the
//! stripe's forwarders, and the other nodes hang under them as leaves. A node that receives
//! a piece of the stripe it forwards sends it on to each of its children at once, unasked,
//! one piece at a time per child (a stream per child). Every node then sends one stripe at
//! its whole upload and receives each stripe at 1/k of its download: both links full by
//! construction. Nodes still check each piece against the hashes from the supernode,
//! whose answers then carry no parents; and a node fed by its streams asks the supernode
//! every REFRESH, not as soon as nothing is in flight.
//!
//! When nodes join late or leave, the trees mend and name the streams that moved: the old
//! stream ends, and the new source first sends, in order, the pieces of the stripe it has
//! and the node lacks, then each new one. Not modelled: the mesh beside the streams (no
//! piece is asked for), a supernode that dies, and a forwarder that sends bad data (its
//! subtree would fall back to asking).

use std::collections::{HashMap, HashSet, VecDeque};

use shoal_proto::PieceIndex;
use shoal_proto::message::NodeId;
use shoal_supernode::stripes::{Feed, StripeTrees};

use super::net::Host;
use super::{Answer, Sim, Src, Tag};

/// The push model's state.
pub struct Push {
    pub trees: Trees,
    lines: Lines<(u64, Tag)>,
    /// Per pull: pieces queued for it on a stream or on their way.
    coming: Vec<HashSet<u32>>,
}

impl Push {
    pub fn new(k: u32, ids: Vec<NodeId>, pulls: usize) -> Self {
        Push {
            trees: Trees::new(k, ids),
            lines: Lines::new(),
            coming: vec![HashSet::new(); pulls],
        }
    }
}

impl Sim {
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
        let push = self.push.as_mut().expect("push trees");
        if p.done || has || self.left[to as usize] || !push.coming[pull as usize].insert(piece) {
            return;
        }
        let layout = self.blobs[p.blob as usize].layout;
        let len = u64::from(layout.len_of(PieceIndex(piece)).unwrap_or(0));
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
        let push = self.push.as_mut().expect("push trees");
        push.coming[pull as usize].remove(&piece);
        if let Some((len, tag)) = push.lines.ended(from, to) {
            // Its bytes follow the last one's on the stream: no gap on the link.
            self.net.start(from, to, len, tag);
        }
        let blob = self.pulls[pull as usize].blob;
        for child in push.trees.children(to, piece) {
            let pull = self.pull_of(child, blob);
            self.push_to(t, to, child, pull, piece, Src::Peer);
        }
    }

    /// A pushed piece's flow was cut (a host left): the stream from `from` to `to` ends.
    /// The stream the receiver has now for the piece's stripe, if another, sends it (it
    /// was on its way on an old stream when that one's source began its catch-up).
    pub(super) fn push_cut(&mut self, t: f64, from: Host, to: Host, pull: u32, piece: u32) {
        let push = self.push.as_mut().expect("push trees");
        push.coming[pull as usize].remove(&piece);
        for (_, tag) in push.lines.close(from, to) {
            if let Tag::Piece { pull, piece, .. } = tag {
                push.coming[pull as usize].remove(&piece);
            }
        }
        let stripe = push.trees.stripe(piece);
        let Some(source) = push.trees.feeds[to as usize][stripe as usize] else {
            return;
        };
        let blob = self.pulls[pull as usize].blob;
        let host = self.source_host(source, to, blob);
        if host != from && self.source_has(source, to, blob, piece) {
            let src = match source {
                Source::Seed => Src::Seed,
                Source::Node(_) => Src::Peer,
            };
            self.push_to(t, host, to, pull, piece, src);
        }
    }

    /// Streams moved by a join or a leave: the old one ends, and the new source sends
    /// what it has of the stripe that the node lacks, in order, then each new piece.
    pub(super) fn restream(&mut self, t: f64, moved: Vec<Moved>) {
        // Old streams end first: a stream from a node that feeds another stripe now
        // must not take the new stripe's pieces down with it.
        for m in &moved {
            for blob in 0..self.blobs.len() as u32 {
                let Some(from) = m.from else {
                    break;
                };
                let host = self.source_host(from, m.node, blob);
                let push = self.push.as_mut().expect("push trees");
                let k = push.trees.k;
                let of_stripe = |(_, tag): &(u64, Tag)| matches!(tag, Tag::Piece { piece, .. } if piece % k == m.stripe);
                for (_, tag) in push.lines.close_if(host, m.node, of_stripe) {
                    if let Tag::Piece { pull, piece, .. } = tag {
                        push.coming[pull as usize].remove(&piece);
                    }
                }
            }
        }
        for m in &moved {
            let Some(to) = m.to else {
                continue;
            };
            for blob in 0..self.blobs.len() as u32 {
                let pull = self.pull_of(m.node, blob);
                let host = self.source_host(to, m.node, blob);
                let count = self.blobs[blob as usize].layout.count();
                let k = self.push.as_ref().expect("push trees").trees.k;
                let held: Vec<u32> = (m.stripe..count)
                    .step_by(k as usize)
                    .filter(|&i| self.source_has(to, m.node, blob, i))
                    .collect();
                let src = match to {
                    Source::Seed => Src::Seed,
                    Source::Node(_) => Src::Peer,
                };
                for piece in held {
                    self.push_to(t, host, m.node, pull, piece, src);
                }
            }
        }
    }

    /// The host a stream of `blob` comes from: a parent, or the blob's seed.
    fn source_host(&self, source: Source, node: Host, blob: u32) -> Host {
        match source {
            Source::Node(parent) => parent,
            Source::Seed => self.seed_host(self.pulls[self.pull_of(node, blob) as usize].sn),
        }
    }

    fn source_has(&self, source: Source, node: Host, blob: u32, piece: u32) -> bool {
        match source {
            Source::Node(parent) => {
                let p = &self.pulls[self.pull_of(parent, blob) as usize];
                p.planner
                    .as_ref()
                    .is_some_and(|l| l.have.contains(PieceIndex(piece)))
            }
            Source::Seed => {
                let sn = self.pulls[self.pull_of(node, blob) as usize].sn;
                self.sns[sn].seeded.get(&blob).is_some_and(|&n| piece < n)
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

/// Where a node's stream of a stripe comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Seed,
    Node(Host),
}

/// The supernode's trees, by host. Nodes are hosts `0..nodes`.
#[derive(Debug)]
pub struct Trees {
    k: u32,
    trees: StripeTrees,
    ids: Vec<NodeId>,
    hosts: HashMap<NodeId, Host>,
    /// Per node and stripe: the source its stream comes from now (`None`: no stream).
    feeds: Vec<Vec<Option<Source>>>,
}

impl Trees {
    /// Trees of `k` stripes for nodes that have yet to join; `ids[h]` is host `h`'s node.
    pub fn new(k: u32, ids: Vec<NodeId>) -> Self {
        let hosts = ids
            .iter()
            .enumerate()
            .map(|(h, &id)| (id, h as Host))
            .collect();
        let feeds = vec![vec![None; k as usize]; ids.len()];
        Trees {
            k,
            trees: StripeTrees::new(k),
            ids,
            hosts,
            feeds,
        }
    }

    pub fn join(&mut self, node: Host) -> Vec<Moved> {
        self.trees.join(self.ids[node as usize]);
        self.moved()
    }

    pub fn leave(&mut self, node: Host) -> Vec<Moved> {
        self.trees.leave(self.ids[node as usize]);
        self.feeds[node as usize].fill(None);
        self.moved()
    }

    /// The streams the last join or leave moved.
    fn moved(&mut self) -> Vec<Moved> {
        let mut moved = Vec::new();
        for (id, stripe) in self.trees.take_changes() {
            let Some(&node) = self.hosts.get(&id) else {
                continue;
            };
            let to = self.trees.feed(id, stripe).map(|feed| match feed {
                Feed::Seed => Source::Seed,
                Feed::Node(parent) => Source::Node(self.hosts[&parent]),
            });
            let from = std::mem::replace(&mut self.feeds[node as usize][stripe as usize], to);
            if from != to {
                moved.push(Moved {
                    node,
                    stripe,
                    from,
                    to,
                });
            }
        }
        moved
    }

    pub fn stripe(&self, piece: u32) -> u32 {
        piece % self.k
    }

    /// The node the seed sends `piece` to.
    pub fn root(&self, piece: u32) -> Option<Host> {
        let root = self.trees.root(self.stripe(piece))?;
        Some(self.hosts[&root])
    }

    /// Whom `node` sends `piece` on to once it has it (none unless it forwards the
    /// piece's stripe).
    pub fn children(&self, node: Host, piece: u32) -> Vec<Host> {
        let id = self.ids[node as usize];
        if self.trees.stripe_of(id) != Some(self.stripe(piece)) {
            return Vec::new();
        }
        let children = self.trees.children(id);
        children.iter().map(|c| self.hosts[c]).collect()
    }
}

/// A node's stream of a stripe now comes from elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub node: Host,
    pub stripe: u32,
    pub from: Option<Source>,
    pub to: Option<Source>,
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

    /// Every piece reaches every node exactly once, and the moves say where each node's
    /// streams come from.
    #[test]
    fn every_node_gets_every_stripe_once_and_moves_say_from_where() {
        for (nodes, k) in [(2, 2), (7, 4), (50, 4), (1000, 8), (333, 16)] {
            let mut trees = Trees::new(k, (0..nodes).map(|h| NodeId(u64::from(h) + 7)).collect());
            let mut feeds = vec![vec![None; k as usize]; nodes as usize];
            let mut apply = |moved: Vec<Moved>| {
                for m in moved {
                    assert_eq!(feeds[m.node as usize][m.stripe as usize], m.from);
                    feeds[m.node as usize][m.stripe as usize] = m.to;
                }
            };
            for h in 0..nodes {
                apply(trees.join(h));
            }
            apply(trees.leave(nodes / 2));
            for piece in 0..k {
                let mut got = vec![0u32; nodes as usize];
                let Some(root) = trees.root(piece) else {
                    assert!(nodes - 1 < k, "only a swarm smaller than k lacks a stripe");
                    continue;
                };
                let mut level = vec![root];
                assert_eq!(feeds[level[0] as usize][piece as usize], Some(Source::Seed));
                while !level.is_empty() {
                    for &n in &level {
                        got[n as usize] += 1;
                    }
                    let next: Vec<Host> = level
                        .iter()
                        .flat_map(|&n| trees.children(n, piece))
                        .collect();
                    for (&c, parent) in next.iter().zip(
                        level
                            .iter()
                            .flat_map(|&n| std::iter::repeat_n(n, trees.children(n, piece).len())),
                    ) {
                        assert_eq!(
                            feeds[c as usize][piece as usize],
                            Some(Source::Node(parent))
                        );
                    }
                    level = next;
                }
                let gone = nodes / 2;
                assert_eq!(got[gone as usize], 0);
                assert!(
                    got.iter()
                        .enumerate()
                        .all(|(n, &g)| g == 1 || n as u32 == gone),
                    "{nodes} nodes, {k} stripes"
                );
            }
        }
    }

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
