//! Stripe trees (sans-IO): who sends which stripe of a blob to whom.
//!
//! A blob's pieces are cut into `k` stripes (piece `i` in stripe `i % k`). Each node
//! forwards one stripe: the forwarders of a stripe form a complete k-ary tree in the order
//! of their positions, position 0 fed by the seed and position `j` by position
//! `(j - 1) / k`. Every other node hangs under a forwarder of that stripe as a leaf. A
//! forwarder then sends its stripe to at most `k` children at 1/k of the stripe's rate
//! each, its whole upload, and every node receives each stripe from one parent at 1/k of
//! its download: both links full, trees `log_k(nodes / k)` deep (`shoal-supernode
//! --stripes`, `shoal sim --stripes`, docs/benchmarks.md).
//!
//! Joins and leaves keep the trees whole:
//! - a node joins as a forwarder of the stripe with the fewest, at the next position; if
//!   that overfills its parent, one of the parent's leaves moves under it; then it hangs
//!   as a leaf in every other stripe under the deepest forwarder with room;
//! - a forwarder that leaves is replaced at its position by its stripe's last forwarder,
//!   whose leaves move elsewhere; stripes that differ by two forwarders or more are
//!   evened out by moving a forwarder between them;
//! - with no room left in a stripe (its forwarders number fewer than the others'), a leaf
//!   goes under the forwarder with the fewest children.

use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeSet;

use shoal_proto::message::NodeId;

/// Where a node gets a stripe from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Seed,
    Node(NodeId),
}

#[derive(Debug)]
pub struct StripeTrees {
    k: usize,
    members: HashMap<NodeId, Member>,
    stripes: Vec<Stripe>,
    /// Nodes whose feed of a stripe changed since [`StripeTrees::take_changes`].
    changes: Vec<(NodeId, u32)>,
}

#[derive(Debug, Default)]
struct Stripe {
    /// Forwarders by position.
    forwarders: Vec<NodeId>,
    /// Per position: the leaves under the forwarder there.
    leaves: Vec<Vec<NodeId>>,
    /// Positions with fewer than `k` children.
    open: BTreeSet<usize>,
    /// Positions with more than `k` children (leaves placed while the stripe was full).
    over: BTreeSet<usize>,
}

#[derive(Debug)]
struct Member {
    stripe: usize,
    position: usize,
    /// Per stripe other than its own: the position it hangs under (`None` while the stripe
    /// has no forwarder).
    under: Vec<Option<usize>>,
}

impl StripeTrees {
    /// Trees for `k` stripes (at least 2: one stripe would make a chain).
    pub fn new(k: u32) -> Self {
        let k = k.max(2) as usize;
        StripeTrees {
            k,
            members: HashMap::new(),
            stripes: (0..k).map(|_| Stripe::default()).collect(),
            changes: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Stripes a blob is cut into.
    pub fn stripes(&self) -> u32 {
        self.k as u32
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The stripe `node` forwards.
    pub fn stripe_of(&self, node: NodeId) -> Option<u32> {
        self.members.get(&node).map(|m| m.stripe as u32)
    }

    /// Where `node` gets `stripe` from (`None`: not a member, no such stripe, or no node
    /// forwards it yet).
    pub fn feed(&self, node: NodeId, stripe: u32) -> Option<Feed> {
        let m = self.members.get(&node)?;
        let s = stripe as usize;
        let st = self.stripes.get(s)?;
        if s == m.stripe {
            return Some(match m.position {
                0 => Feed::Seed,
                j => Feed::Node(st.forwarders[(j - 1) / self.k]),
            });
        }
        Some(Feed::Node(st.forwarders[m.under[s]?]))
    }

    /// The nodes `node` sends its stripe to.
    pub fn children(&self, node: NodeId) -> Vec<NodeId> {
        let Some(m) = self.members.get(&node) else {
            return Vec::new();
        };
        let st = &self.stripes[m.stripe];
        let first = m.position * self.k + 1;
        let end = (first + self.k).min(st.forwarders.len());
        let mut children = st.forwarders.get(first..end).unwrap_or(&[]).to_vec();
        children.extend_from_slice(&st.leaves[m.position]);
        children
    }

    /// Who must be told of a new feed since the last call: each (node, stripe) whose
    /// [`StripeTrees::feed`] changed (or may have; a node that left may be named).
    pub fn take_changes(&mut self) -> Vec<(NodeId, u32)> {
        let mut changes = std::mem::take(&mut self.changes);
        changes.sort_unstable();
        changes.dedup();
        changes
    }

    /// The node that the seed feeds with `stripe`.
    pub fn root(&self, stripe: u32) -> Option<NodeId> {
        self.stripes
            .get(stripe as usize)?
            .forwarders
            .first()
            .copied()
    }

    /// A node joins (again: nothing changes).
    pub fn join(&mut self, node: NodeId) {
        if self.members.contains_key(&node) {
            return;
        }
        let s = (0..self.k)
            .min_by_key(|&s| self.stripes[s].forwarders.len())
            .expect("k >= 1");
        self.members.insert(
            node,
            Member {
                stripe: s,
                position: 0,
                under: vec![None; self.k],
            },
        );
        self.add_forwarder(s, node);
        for t in (0..self.k).filter(|&t| t != s) {
            self.place(t, node);
        }
    }

    /// A node leaves: its children are fed from elsewhere.
    pub fn leave(&mut self, node: NodeId) {
        let Some(m) = self.members.get(&node) else {
            return;
        };
        let (s, under) = (m.stripe, m.under.clone());
        for (t, at) in under.into_iter().enumerate() {
            if let Some(at) = at {
                self.stripes[t].leaves[at].retain(|&n| n != node);
                self.refresh(t, at);
                self.relieve(t, at);
            }
        }
        self.remove_forwarder(s, node);
        self.members.remove(&node);
        self.even_out();
    }

    /// Children of the forwarder at `at` in stripe `s`.
    fn child_count(&self, s: usize, at: usize) -> usize {
        let st = &self.stripes[s];
        let first = at * self.k + 1;
        let forwarders = st.forwarders.len().saturating_sub(first).min(self.k);
        forwarders + st.leaves[at].len()
    }

    fn refresh(&mut self, s: usize, at: usize) {
        let count = (at < self.stripes[s].forwarders.len()).then(|| self.child_count(s, at));
        let st = &mut self.stripes[s];
        match count {
            Some(c) if c < self.k => st.open.insert(at),
            _ => st.open.remove(&at),
        };
        match count {
            Some(c) if c > self.k => st.over.insert(at),
            _ => st.over.remove(&at),
        };
    }

    /// A leaf under the forwarder at `from` in stripe `s` moves under the one at `to`.
    fn move_leaf(&mut self, s: usize, from: usize, to: usize) {
        if let Some(leaf) = self.stripes[s].leaves[from].pop() {
            self.stripes[s].leaves[to].push(leaf);
            self.members.get_mut(&leaf).expect("member").under[s] = Some(to);
            self.changes.push((leaf, s as u32));
        }
        self.refresh(s, from);
        self.refresh(s, to);
    }

    /// `node` becomes the last forwarder of stripe `s`.
    fn add_forwarder(&mut self, s: usize, node: NodeId) {
        let at = self.stripes[s].forwarders.len();
        self.stripes[s].forwarders.push(node);
        self.stripes[s].leaves.push(Vec::new());
        self.members.get_mut(&node).expect("member").position = at;
        self.members.get_mut(&node).expect("member").under[s] = None;
        self.changes.push((node, s as u32));
        if at == 0 {
            // The stripe had no forwarder: every other member hangs under this one now.
            let mut waiting: Vec<NodeId> = self
                .members
                .iter()
                .filter(|(n, m)| **n != node && m.stripe != s && m.under[s].is_none())
                .map(|(n, _)| *n)
                .collect();
            // In a fixed order: the same joins and leaves make the same trees.
            waiting.sort_unstable();
            for n in waiting {
                self.place(s, n);
            }
        } else {
            self.refresh(s, (at - 1) / self.k);
            self.refresh(s, at);
            self.relieve(s, at);
        }
        self.refresh(s, at);
    }

    /// While the forwarder at `at` has room, it takes leaves from those with too many,
    /// the most first.
    fn relieve(&mut self, s: usize, at: usize) {
        while self.stripes[s].open.contains(&at) {
            let most = self.stripes[s]
                .over
                .iter()
                .copied()
                .max_by_key(|&from| self.child_count(s, from));
            let Some(from) = most else {
                break;
            };
            self.move_leaf(s, from, at);
        }
    }

    /// `node`, a forwarder of stripe `s`, stops forwarding it: the last forwarder takes
    /// its place, and the last one's leaves go elsewhere.
    fn remove_forwarder(&mut self, s: usize, node: NodeId) {
        let at = self.members[&node].position;
        let st = &mut self.stripes[s];
        let last = st.forwarders.len() - 1;
        let moved = st.forwarders.pop().expect("a forwarder");
        let orphans = st.leaves.pop().expect("its leaves");
        st.open.remove(&last);
        st.over.remove(&last);
        if at != last {
            st.forwarders[at] = moved;
            self.members.get_mut(&moved).expect("member").position = at;
            // The moved forwarder has a new parent, and the children of its new place a
            // new one too.
            let first = at * self.k + 1;
            let end = (first + self.k).min(st.forwarders.len());
            let fed = st.forwarders.get(first..end).unwrap_or(&[]).iter();
            let fed = fed.chain(&st.leaves[at]).chain(std::iter::once(&moved));
            self.changes.extend(fed.map(|&n| (n, s as u32)));
        }
        for leaf in &orphans {
            self.members.get_mut(leaf).expect("member").under[s] = None;
            self.changes.push((*leaf, s as u32));
        }
        if last > 0 {
            self.refresh(s, (last - 1) / self.k);
        }
        if at < last {
            self.refresh(s, at);
        }
        if last > 0 {
            self.relieve(s, (last - 1) / self.k);
        }
        if self.stripes[s].forwarders.is_empty() {
            // Nobody forwards this stripe: its leaves wait for the next forwarder.
            self.stripes[s].open.clear();
            self.stripes[s].over.clear();
            return;
        }
        for leaf in orphans {
            self.place(s, leaf);
        }
    }

    /// `node` hangs under a forwarder of stripe `s`: the deepest with room, else the one
    /// with the fewest children.
    fn place(&mut self, s: usize, node: NodeId) {
        let count = self.stripes[s].forwarders.len();
        if count == 0 {
            return;
        }
        let at = match self.stripes[s].open.last() {
            Some(&at) => at,
            None => (0..count)
                .rev()
                .min_by_key(|&at| self.child_count(s, at))
                .expect("a forwarder"),
        };
        self.stripes[s].leaves[at].push(node);
        self.members.get_mut(&node).expect("member").under[s] = Some(at);
        self.changes.push((node, s as u32));
        self.refresh(s, at);
    }

    /// While one stripe has two forwarders more than another, its last forwarder moves.
    fn even_out(&mut self) {
        loop {
            let (most, least) = {
                let len = |s: &usize| self.stripes[*s].forwarders.len();
                let most = (0..self.k).max_by_key(len).expect("k >= 1");
                let least = (0..self.k).min_by_key(len).expect("k >= 1");
                (most, least)
            };
            if self.stripes[most].forwarders.len() < self.stripes[least].forwarders.len() + 2 {
                return;
            }
            let node = *self.stripes[most].forwarders.last().expect("a forwarder");
            // It leaves `most` and joins `least` as a forwarder; it hangs in `most` as a
            // leaf now, and no longer in `least`.
            self.remove_forwarder(most, node);
            if let Some(at) = self.members[&node].under[least] {
                self.stripes[least].leaves[at].retain(|&n| n != node);
                self.refresh(least, at);
                self.relieve(least, at);
            }
            self.members.get_mut(&node).expect("member").stripe = least;
            self.add_forwarder(least, node);
            self.place(most, node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every member gets every stripe that has a forwarder from exactly one parent; the
    /// parents' lists of children say the same; every chain of feeds ends at the seed,
    /// shallow; no forwarder has more than its share of children.
    fn check(trees: &StripeTrees) {
        let k = trees.k;
        let n = trees.len();
        let counts: Vec<usize> = trees.stripes.iter().map(|s| s.forwarders.len()).collect();
        let (most, least) = (counts.iter().max(), counts.iter().min());
        assert!(
            most.zip(least).is_none_or(|(a, b)| a - b <= 1),
            "{counts:?}"
        );
        for (&node, m) in &trees.members {
            assert_eq!(trees.stripes[m.stripe].forwarders[m.position], node);
            for s in 0..k as u32 {
                if counts[s as usize] == 0 {
                    assert_eq!(trees.feed(node, s), None);
                    continue;
                }
                let mut at = node;
                let mut depth = 0;
                loop {
                    match trees.feed(at, s).expect("fed") {
                        Feed::Seed => break,
                        Feed::Node(parent) => {
                            assert!(trees.children(parent).contains(&at));
                            assert_eq!(trees.stripe_of(parent), Some(s));
                            at = parent;
                        }
                    }
                    depth += 1;
                    assert!(depth <= n, "a cycle in stripe {s}");
                }
                let bound = (n.max(2) as f64).ln() / (k.max(2) as f64).ln() + 2.0;
                assert!(depth as f64 <= bound, "{n} nodes, k {k}: depth {depth}");
            }
        }
        for (&node, m) in &trees.members {
            let children = trees.children(node);
            for c in &children {
                assert_eq!(trees.feed(*c, m.stripe as u32), Some(Feed::Node(node)));
            }
            // A stripe with fewer forwarders than another may have to take one more.
            let room = if counts[m.stripe] >= k { k + 1 } else { n };
            assert!(children.len() <= room, "{} children, k {k}", children.len());
        }
    }

    #[test]
    fn nodes_in_join_order_make_complete_trees() {
        let mut trees = StripeTrees::new(4);
        for i in 0..1000 {
            trees.join(NodeId(i));
        }
        check(&trees);
        assert_eq!(trees.root(0), Some(NodeId(0)));
        assert_eq!(trees.stripe_of(NodeId(5)), Some(1));
        // 250 forwarders a stripe: the 1,000 nodes fill their places exactly.
        let full = (0..1000).filter(|&i| trees.children(NodeId(i)).len() == 4);
        assert!(full.count() >= 990);
        assert_eq!(trees.feed(NodeId(0), 0), Some(Feed::Seed));
        assert_eq!(trees.feed(NodeId(4), 0), Some(Feed::Node(NodeId(0))));
    }

    #[test]
    fn a_stripe_without_forwarders_is_fed_once_one_joins() {
        let mut trees = StripeTrees::new(3);
        assert_eq!(trees.feed(NodeId(1), 0), None);
        trees.join(NodeId(1));
        assert_eq!(trees.feed(NodeId(1), 1), None);
        trees.join(NodeId(2));
        trees.join(NodeId(3));
        check(&trees);
        assert!(trees.feed(NodeId(1), 1).is_some());
        trees.leave(NodeId(2));
        check(&trees);
        trees.leave(NodeId(9));
        trees.join(NodeId(3));
        assert_eq!(trees.len(), 2);
    }

    proptest! {
        #[test]
        fn joins_and_leaves_keep_the_trees_whole(
            k in 2u32..6,
            ops in proptest::collection::vec((any::<bool>(), 0u64..60), 1..300),
        ) {
            let mut trees = StripeTrees::new(k);
            let feeds = |trees: &StripeTrees| -> Vec<(NodeId, u32, Option<Feed>)> {
                let mut all: Vec<_> = trees
                    .members
                    .keys()
                    .flat_map(|&n| (0..k).map(move |s| (n, s)))
                    .map(|(n, s)| (n, s, trees.feed(n, s)))
                    .collect();
                all.sort_unstable_by_key(|&(n, s, _)| (n, s));
                all
            };
            for (join, id) in ops {
                let before = feeds(&trees);
                if join {
                    trees.join(NodeId(id));
                } else {
                    trees.leave(NodeId(id));
                }
                check(&trees);
                let changes = trees.take_changes();
                for (n, s, feed) in feeds(&trees) {
                    let was = before.iter().find(|b| (b.0, b.1) == (n, s)).map(|b| b.2);
                    if was.flatten() != feed {
                        prop_assert!(changes.contains(&(n, s)), "{n:?} stripe {s}: {was:?} -> {feed:?}");
                    }
                }
            }
        }
    }
}
