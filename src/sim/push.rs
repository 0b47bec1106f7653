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
//! Not modelled: nodes that join late or leave (the trees repair themselves, but the
//! pieces a stream missed would come from the mesh), and a forwarder that sends bad data
//! (its subtree would fall back to asking).

use std::collections::{HashMap, VecDeque};

use shoal_proto::message::NodeId;
use shoal_supernode::stripes::StripeTrees;

use super::net::Host;

/// The trees of a swarm that stays as it started, by host. Nodes are hosts `0..nodes`.
#[derive(Debug)]
pub struct Trees {
    k: u32,
    /// Per node: its children in the tree of the stripe it forwards.
    children: Vec<Vec<Host>>,
    /// Per stripe: the node the seed feeds.
    roots: Vec<Host>,
}

impl Trees {
    /// The supernode's trees of `k` stripes once `nodes` nodes joined in order; `id` names
    /// a host's node.
    pub fn new(nodes: u32, k: u32, id: impl Fn(Host) -> NodeId) -> Self {
        let mut trees = StripeTrees::new(k);
        let host: HashMap<NodeId, Host> = (0..nodes).map(|h| (id(h), h)).collect();
        for h in 0..nodes {
            trees.join(id(h));
        }
        let children = (0..nodes)
            .map(|h| trees.children(id(h)).iter().map(|c| host[c]).collect())
            .collect();
        let roots = (0..k)
            .map(|s| trees.root(s).map_or(0, |r| host[&r]))
            .collect();
        // Each node forwards stripe `h % k` (joins fill the stripes in turn).
        debug_assert!((0..nodes).all(|h| trees.stripe_of(id(h)) == Some(h % k)));
        Trees { k, children, roots }
    }

    /// The node the seed sends `piece` to.
    pub fn root(&self, piece: u32) -> Host {
        self.roots[(piece % self.k) as usize]
    }

    /// Whom `node` sends `piece` on to once it has it (none unless it forwards the
    /// piece's stripe).
    pub fn children(&self, node: Host, piece: u32) -> &[Host] {
        if piece % self.k == node % self.k {
            &self.children[node as usize]
        } else {
            &[]
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
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece reaches every node exactly once, no node forwards more than its share,
    /// and the trees are shallow.
    #[test]
    fn every_node_gets_every_stripe_once_from_a_shallow_tree() {
        for (nodes, k) in [(2, 2), (7, 4), (50, 4), (1000, 8), (1001, 4), (333, 16)] {
            let trees = Trees::new(nodes, k, |h| NodeId(u64::from(h) + 7));
            for piece in 0..k {
                let mut got = vec![0u32; nodes as usize];
                let mut level = vec![trees.root(piece)];
                let mut depth = 0;
                while !level.is_empty() {
                    depth += 1;
                    for &n in &level {
                        got[n as usize] += 1;
                    }
                    level = level
                        .iter()
                        .flat_map(|&n| trees.children(n, piece).iter().copied())
                        .collect();
                }
                assert!(got.iter().all(|&g| g == 1), "{nodes} nodes, {k} stripes");
                let bound = (f64::from(nodes).ln() / f64::from(k).ln()).ceil() as u32 + 2;
                assert!(depth <= bound, "{nodes}/{k}: depth {depth} > {bound}");
            }
            let most = (0..nodes).map(|n| trees.children[n as usize].len()).max();
            // Stripes with one forwarder fewer than others spread what is over.
            let room = k as usize + (k as usize).div_ceil((nodes / k) as usize);
            assert!(most <= Some(room), "{nodes}/{k}: {most:?} children");
        }
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
