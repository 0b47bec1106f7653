//! The scheduling core.
//!
//! State: peers (address, zone, last heard from, health, recent upload assignments) and
//! tasks (one per blob: its layout and which peer holds which pieces). Decisions: for a
//! node that wants pieces of a blob, which parents to try.
//!
//! Rules, in order:
//! - never hand out the asker itself, a peer that left, one not heard from within the peer
//!   timeout, or one reported for bad data;
//! - only peers that hold pieces the asker lacks;
//! - look at a bounded sample of holders per decision ([`SchedulerConfig::sample`],
//!   rotating through all of them across decisions) plus every seed, so that a decision
//!   costs the same with 100 or 100,000 peers in a task; an answer's worth of useful
//!   holders in the asker's zone ends the look early (the rotation spreads the load);
//! - among those looked at, a peer whose last report (at most [`UPLOADS_FRESH`] old) says
//!   its upload slots are all taken comes after every other: it would only answer "busy";
//! - spread upload load: a peer already handed out `max_uploads_per_parent` times within the
//!   load window is skipped while others remain;
//! - prefer the asker's zone, then the least loaded, then the one with most useful pieces;
//! - a seed (see [`Scheduler::add_seed`]) offers only pieces no other peer has announced,
//!   each to one asker at a time ([`SEED_OFFER_HOLD`]), and none it has begun sending
//!   within the load window ("super-seeding"): its upload goes to new pieces, each sent
//!   about once, and the nodes trade the rest. Without this every node asks the
//!   seed for the newest pieces and the seed's upload sets the pace of the whole swarm
//!   (`shoal sim` showed it: 100 nodes, no byte from peers). The seed itself sends a piece
//!   only while that holds ([`Scheduler::seed_may_send`]), whatever list an asker has.

use std::collections::VecDeque;

// Fast hashing with a random seed per map: node ids and digests come from the network.
use foldhash::{HashMap, HashMapExt, HashSet};

use indexmap::{IndexMap, IndexSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_proto::message::NodeId;
use shoal_proto::message::{Parent, PieceSet, Uploads};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};

use crate::stripes::{Feed, StripeTrees};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Parents handed out per answer.
    pub parents_per_answer: usize,
    /// Handouts of one parent within `load_window` before others are preferred.
    pub max_uploads_per_parent: usize,
    pub load_window: Duration,
    /// A peer not heard from for this long is gone.
    pub peer_timeout: Duration,
    /// Holders considered per decision.
    pub sample: usize,
    /// Pieces a seed gives one asker before others get theirs: the asker's share of
    /// pieces only it holds (see [`Scheduler::parents`]).
    pub seed_offer: usize,
    /// Stripes of each task's [`StripeTrees`], which every node that wants the blob joins
    /// (0: none): `shoal-supernode --stripes`, `shoal sim --stripes`.
    pub stripes: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            parents_per_answer: 8,
            max_uploads_per_parent: 8,
            load_window: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(30),
            sample: 32,
            seed_offer: 2,
            stripes: 0,
        }
    }
}

/// Holders looked at per decision, as a multiple of [`SchedulerConfig::sample`].
pub const SCAN_PER_SAMPLE: usize = 4;

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    /// Index into [`Scheduler::zones`] (decisions compare zones for every candidate).
    zone: usize,
    last_seen: Instant,
    handouts: VecDeque<Instant>,
    /// Its upload slots were all taken at this time, as it last reported.
    full_at: Option<Instant>,
}

/// How long a node's report of full upload slots counts. Nodes report with each batch of
/// new pieces (every few ms while they download); a node that has everything reports no
/// more, and is tried again once this passes.
pub const UPLOADS_FRESH: Duration = Duration::from_millis(500);

/// How long a seed's offer of a piece to one asker keeps it from other askers. Short: an
/// asker busy elsewhere must not leave the seed idle; once the seed sends the piece
/// ([`Scheduler::seed_sending`]) the piece is held for the load window instead.
pub const SEED_OFFER_HOLD: Duration = Duration::from_millis(300);
/// How long after a seed began sending a piece it refuses to send it again
/// ([`Scheduler::seed_may_send`]): by then the receiver has it, or has given up on it.
pub const SEED_RESEND: Duration = Duration::from_millis(300);

#[derive(Debug)]
struct Task {
    layout: PieceLayout,
    holders: IndexMap<NodeId, PieceSet, foldhash::fast::RandomState>,
    /// Holders other than seeds with at least one piece: the ones worth scanning.
    stocked: IndexSet<NodeId, foldhash::fast::RandomState>,
    /// Where the next decision's sample of `stocked` starts.
    cursor: usize,
    /// Per piece: holders other than seeds.
    available: Vec<u32>,
    /// Per piece: when a seed last offered it, and when it last began sending it.
    seed_offered: Vec<Option<Instant>>,
    seed_sent: Vec<Option<Instant>>,
    /// Per asker: pieces a seed offered it recently, and when.
    seed_gifts: HashMap<NodeId, Vec<(PieceIndex, Instant)>>,
    /// Who forwards which stripe to whom, with `stripes` set.
    trees: Option<StripeTrees>,
}

impl Task {
    fn new(layout: PieceLayout, stripes: u32) -> Self {
        let count = layout.count() as usize;
        Task {
            layout,
            holders: IndexMap::default(),
            stocked: IndexSet::default(),
            cursor: 0,
            available: vec![0; count],
            seed_offered: vec![None; count],
            seed_sent: vec![None; count],
            seed_gifts: HashMap::new(),
            trees: (stripes > 0).then(|| StripeTrees::new(stripes)),
        }
    }

    fn remove_holder(&mut self, node: &NodeId, is_seed: bool) {
        self.seed_gifts.remove(node);
        if let Some(trees) = self.trees.as_mut() {
            trees.leave(*node);
        }
        self.stocked.swap_remove(node);
        if let Some(set) = self.holders.swap_remove(node)
            && !is_seed
        {
            for p in set.iter() {
                self.available[p.0 as usize] = self.available[p.0 as usize].saturating_sub(1);
            }
        }
    }
}

/// Why an event was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("node {0:?} has not said hello")]
    UnknownPeer(NodeId),
    #[error("node {0:?} is banned for sending bad data")]
    Banned(NodeId),
    #[error("no task for this blob: the node must ask for it first")]
    UnknownTask,
    #[error("the blob's length differs from the task's")]
    LayoutMismatch,
    #[error("{0} is past the blob's last piece")]
    PieceOutOfRange(PieceIndex),
}

#[derive(Debug, Default)]
pub struct Scheduler {
    config: SchedulerConfig,
    peers: HashMap<NodeId, Peer>,
    banned: HashSet<NodeId>,
    seeds: HashSet<NodeId>,
    tasks: HashMap<BlobDigest, Task>,
    /// Zone names seen in hellos.
    zones: indexmap::IndexSet<String, foldhash::fast::RandomState>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// `node` is a seed: it gets every piece from the registry, so the scheduler spends its
    /// upload on pieces nobody else has.
    pub fn add_seed(&mut self, node: NodeId) {
        self.seeds.insert(node);
    }

    /// A node announced itself (or came back).
    pub fn hello(
        &mut self,
        now: Instant,
        node: NodeId,
        zone: String,
        addr: SocketAddr,
    ) -> Result<(), ScheduleError> {
        if self.banned.contains(&node) {
            return Err(ScheduleError::Banned(node));
        }
        let (zone, _) = self.zones.insert_full(zone);
        let peer = self.peers.entry(node).or_insert_with(|| Peer {
            addr,
            zone,
            last_seen: now,
            handouts: VecDeque::new(),
            full_at: None,
        });
        (peer.addr, peer.zone, peer.last_seen) = (addr, zone, now);
        Ok(())
    }

    fn touch(&mut self, now: Instant, node: NodeId) -> Result<(), ScheduleError> {
        if self.banned.contains(&node) {
            return Err(ScheduleError::Banned(node));
        }
        let peer = self
            .peers
            .get_mut(&node)
            .ok_or(ScheduleError::UnknownPeer(node))?;
        peer.last_seen = now;
        Ok(())
    }

    /// A node is still there (its connection is open), whether or not it said anything.
    pub fn keep_alive(&mut self, now: Instant, node: NodeId) {
        if let Some(peer) = self.peers.get_mut(&node) {
            peer.last_seen = now;
        }
    }

    /// A node reported how busy its upload is.
    pub fn uploads(&mut self, now: Instant, node: NodeId, uploads: Uploads) {
        if let Some(peer) = self.peers.get_mut(&node) {
            peer.full_at = uploads.is_full().then_some(now);
        }
    }

    /// Whether a seed should send `piece` of `digest` to whoever asks: not once another
    /// node has announced it, nor within [`SEED_RESEND`] of beginning to send it. The
    /// offers keep to that already; this also holds for askers whose list of the seed's
    /// pieces is older than the latest announcements (`shoal sim`, 10,000 x 1 GiB: the
    /// seed sent 1.2 GiB of a 1 GiB blob; sending each piece once, 1.42x -> 1.33x S/B). A
    /// node refused this way asks someone else, and a stall still reaches the registry.
    pub fn seed_may_send(&self, now: Instant, digest: &BlobDigest, piece: PieceIndex) -> bool {
        let Some(task) = self.tasks.get(digest) else {
            return true;
        };
        let i = piece.0 as usize;
        let elsewhere = task.available.get(i).copied().unwrap_or(0);
        let sent = task.seed_sent.get(i).copied().flatten();
        elsewhere == 0 && sent.is_none_or(|at| now.duration_since(at) >= SEED_RESEND)
    }

    /// A seed began sending `piece` of `digest` to a node: other askers are not offered
    /// it from the seed for a load window (by then the receiver has announced it, or it
    /// is gone and the piece is offered again).
    pub fn seed_sending(&mut self, now: Instant, digest: &BlobDigest, piece: PieceIndex) {
        if let Some(sent) = self
            .tasks
            .get_mut(digest)
            .and_then(|t| t.seed_sent.get_mut(piece.0 as usize))
        {
            *sent = Some(now);
        }
    }

    /// A node wants a blob. Returns true when the task is new (the seed should start).
    pub fn want(
        &mut self,
        now: Instant,
        node: NodeId,
        digest: BlobDigest,
        layout: PieceLayout,
    ) -> Result<bool, ScheduleError> {
        self.touch(now, node)?;
        let mut created = false;
        let stripes = self.config.stripes;
        let task = self.tasks.entry(digest).or_insert_with(|| {
            created = true;
            Task::new(layout, stripes)
        });
        if task.layout != layout {
            return Err(ScheduleError::LayoutMismatch);
        }
        if let Some(trees) = task.trees.as_mut()
            && !self.seeds.contains(&node)
        {
            trees.join(node);
        }
        task.holders
            .entry(node)
            .or_insert_with(|| PieceSet::empty(layout.count()));
        Ok(created)
    }

    /// A node holds new pieces.
    pub fn have(
        &mut self,
        now: Instant,
        node: NodeId,
        digest: &BlobDigest,
        pieces: &[PieceIndex],
    ) -> Result<(), ScheduleError> {
        self.touch(now, node)?;
        let task = self
            .tasks
            .get_mut(digest)
            .ok_or(ScheduleError::UnknownTask)?;
        let count = task.layout.count();
        if let Some(bad) = pieces.iter().find(|p| p.0 >= count) {
            return Err(ScheduleError::PieceOutOfRange(*bad));
        }
        let set = task
            .holders
            .entry(node)
            .or_insert_with(|| PieceSet::empty(count));
        let is_seed = self.seeds.contains(&node);
        for p in pieces {
            if !set.contains(*p) {
                set.insert(*p);
                if !is_seed {
                    task.available[p.0 as usize] += 1;
                }
            }
        }
        if !is_seed && !pieces.is_empty() {
            task.stocked.insert(node);
        }
        Ok(())
    }

    /// `reporter` got a bad piece from `culprit`: the culprit is never handed out again.
    pub fn bad_piece(
        &mut self,
        now: Instant,
        reporter: NodeId,
        culprit: SocketAddr,
    ) -> Result<(), ScheduleError> {
        self.touch(now, reporter)?;
        // Parents are named by address in answers, and so are they when reported; a rare
        // event, so a scan over the peers beats an index kept for it.
        let Some(node) = self
            .peers
            .iter()
            .find(|(_, p)| p.addr == culprit)
            .map(|(id, _)| *id)
        else {
            tracing::warn!(%culprit, ?reporter, "a peer no longer known was reported for bad data");
            return Ok(());
        };
        tracing::warn!(
            ?node,
            %culprit,
            ?reporter,
            "peer sent a piece that failed its hash; banned"
        );
        self.banned.insert(node);
        self.forget_peer(node);
        Ok(())
    }

    /// The stripe trees of `digest`'s task (with [`SchedulerConfig::stripes`] set).
    pub fn stripe_trees(&self, digest: &BlobDigest) -> Option<&StripeTrees> {
        self.tasks.get(digest)?.trees.as_ref()
    }

    /// Who sends `node` each stripe of `digest`, by address (a seed's for a stripe's
    /// root): the [`Task::feeds`](shoal_proto::message::Task) of its answers. Empty
    /// without stripes, for a node not in the trees, and while some stripe has no
    /// forwarder (fewer nodes than stripes): the nodes then only ask each other.
    pub fn feeds(&self, node: NodeId, digest: &BlobDigest) -> Vec<SocketAddr> {
        let Some(trees) = self.stripe_trees(digest) else {
            return Vec::new();
        };
        let seed = self
            .seeds
            .iter()
            .find_map(|s| self.peers.get(s))
            .map(|p| p.addr);
        let addr = |feed| match feed {
            Feed::Seed => seed,
            Feed::Node(id) => self.peers.get(&id).map(|p| p.addr),
        };
        (0..trees.stripes())
            .map(|s| trees.feed(node, s).and_then(addr))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    /// Who in `digest`'s stripe trees has a new feed since the last call (see
    /// [`StripeTrees::take_changes`]).
    pub fn take_stripe_changes(&mut self, digest: &BlobDigest) -> Vec<(NodeId, u32)> {
        let trees = self.tasks.get_mut(digest).and_then(|t| t.trees.as_mut());
        trees.map(StripeTrees::take_changes).unwrap_or_default()
    }

    /// A node dropped a blob.
    pub fn drop_blob(&mut self, node: NodeId, digest: &BlobDigest) {
        let is_seed = self.seeds.contains(&node);
        if let Some(task) = self.tasks.get_mut(digest) {
            task.remove_holder(&node, is_seed);
        }
    }

    /// A node left (its connection closed).
    pub fn leave(&mut self, node: NodeId) {
        self.forget_peer(node);
    }

    fn forget_peer(&mut self, node: NodeId) {
        self.peers.remove(&node);
        let is_seed = self.seeds.contains(&node);
        for task in self.tasks.values_mut() {
            task.remove_holder(&node, is_seed);
        }
    }

    /// Forgets peers not heard from within the timeout, and tasks nobody holds any more.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.config.peer_timeout;
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_seen) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for node in gone {
            tracing::info!(?node, "peer timed out");
            self.forget_peer(node);
        }
        self.tasks.retain(|_, t| !t.holders.is_empty());
    }

    /// Parents for `asker`'s missing pieces of `digest`.
    pub fn parents(
        &mut self,
        now: Instant,
        asker: NodeId,
        digest: &BlobDigest,
    ) -> Result<Vec<Parent>, ScheduleError> {
        self.touch(now, asker)?;
        let task = self
            .tasks
            .get_mut(digest)
            .ok_or(ScheduleError::UnknownTask)?;
        let count = task.layout.count();
        // What the seed gave this asker recently that nobody else has yet: while the asker
        // has `seed_offer` such pieces, it has enough to trade and the seed serves others
        // (without this the seed's pieces pile up on whoever asks first, and that one
        // node's upload paces the swarm).
        let seed_quota = {
            let window = self.config.load_window;
            let available = &task.available;
            let pending = task.seed_gifts.get_mut(&asker).map_or(0, |gifts| {
                gifts.retain(|(p, t)| {
                    now.duration_since(*t) <= window && available[p.0 as usize] <= 1
                });
                gifts.len()
            });
            // Alone in the task, the asker has nobody to trade with: no share.
            let seeds_here = self
                .seeds
                .iter()
                .filter(|s| task.holders.contains_key(*s))
                .count();
            if task.holders.len() - seeds_here <= 1 {
                usize::MAX
            } else {
                self.config.seed_offer.saturating_sub(pending)
            }
        };
        let empty = PieceSet::empty(count);
        let mine = task.holders.get(&asker).unwrap_or(&empty);
        let asker_zone = self.peers.get(&asker).map_or(usize::MAX, |p| p.zone);
        let (timeout, window, cap) = (
            self.config.peer_timeout,
            self.config.load_window,
            self.config.max_uploads_per_parent,
        );
        let seed_may_offer = |p: PieceIndex, task: &Task| {
            let i = p.0 as usize;
            task.available[i] == 0
                && task.seed_offered[i].is_none_or(|t| now.duration_since(t) > SEED_OFFER_HOLD)
                && task.seed_sent[i].is_none_or(|t| now.duration_since(t) > window)
        };

        // The seeds, then holders with pieces from a rotating start until `sample` useful
        // ones are found (so a decision costs about the same with 100 or 100,000 peers).
        let n = task.stocked.len();
        let start = task.cursor % n.max(1);
        let seeds: Vec<NodeId> = self
            .seeds
            .iter()
            .filter(|s| task.holders.contains_key(*s))
            .copied()
            .collect();
        let order = seeds
            .iter()
            .copied()
            .chain((start..start + n).map(|i| task.stocked[i % n]));
        let mut candidates: Vec<(bool, bool, bool, usize, u32, NodeId)> = Vec::new();
        let mut scanned: usize = 0;
        // Seeds always, then at most `SCAN_PER_SAMPLE * sample` holders: late in a pull
        // many hold nothing the asker lacks, and scanning all of them would make every
        // decision cost the whole swarm.
        let scan_limit = seeds.len() + SCAN_PER_SAMPLE * self.config.sample;
        // An answer's worth of useful holders in the asker's zone ends the scan: the rest
        // of the sample could only reorder them by reported slots, load and usefulness,
        // each at the cost of a cold piece set, and the rotating start spreads the load by
        // itself (`shoal sim`, 10,000 nodes x 1 GiB: 118 -> 72 s, p50 no worse anywhere).
        let mut in_zone = 0;
        for node in order.take(scan_limit) {
            if candidates.len() >= self.config.sample || in_zone >= self.config.parents_per_answer {
                break;
            }
            scanned += 1;
            let Some(pieces) = task.holders.get(&node).filter(|_| node != asker) else {
                continue;
            };
            let is_seed = self.seeds.contains(&node);
            let useful = if is_seed && seed_quota == 0 {
                0
            } else if is_seed {
                pieces
                    .iter()
                    .filter(|p| !mine.contains(*p) && seed_may_offer(*p, task))
                    .count() as u32
            } else {
                pieces.count_not_in(mine)
            };
            if useful == 0 {
                continue;
            }
            // The peer's state only now: most holders late in a pull are not useful.
            let Some(peer) = self
                .peers
                .get_mut(&node)
                .filter(|p| now.duration_since(p.last_seen) <= timeout)
            else {
                continue;
            };
            while peer
                .handouts
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                peer.handouts.pop_front();
            }
            let load = peer.handouts.len();
            let full = peer
                .full_at
                .is_some_and(|t| now.duration_since(t) <= UPLOADS_FRESH);
            in_zone += usize::from(peer.zone == asker_zone);
            // Sort key: free upload slots first, under the cap first, same zone first,
            // least loaded, most useful.
            candidates.push((
                full && !is_seed,
                load >= cap,
                peer.zone != asker_zone,
                load,
                u32::MAX - useful,
                node,
            ));
        }
        task.cursor = (start + scanned.saturating_sub(seeds.len())) % n.max(1);
        candidates.sort();
        let chosen: Vec<NodeId> = candidates
            .iter()
            .take(self.config.parents_per_answer)
            .map(|c| c.5)
            .collect();
        let mut parents = Vec::with_capacity(chosen.len());
        for node in chosen {
            let peer = self.peers.get_mut(&node).expect("candidate is a peer");
            peer.handouts.push_back(now);
            let held = &task.holders[&node];
            let pieces = if self.seeds.contains(&node) {
                // Only pieces nobody else has, the least offered first, a few at a time;
                // each offer is counted.
                let mine = task.holders.get(&asker).unwrap_or(&empty);
                let eligible: Vec<PieceIndex> = held
                    .iter()
                    .filter(|p| !mine.contains(*p) && seed_may_offer(*p, task))
                    .take(seed_quota)
                    .collect();
                let mut offered = PieceSet::empty(count);
                let gifts = task.seed_gifts.entry(asker).or_default();
                for p in eligible {
                    offered.insert(p);
                    task.seed_offered[p.0 as usize] = Some(now);
                    gifts.push((p, now));
                }
                offered
            } else {
                // Only what the asker lacks: the rest it would ignore, and the answer is
                // shorter (a set of few pieces travels as their gaps).
                held.without(task.holders.get(&asker).unwrap_or(&empty))
            };
            parents.push(Parent {
                addr: peer.addr,
                pieces,
            });
        }
        Ok(parents)
    }

    /// Number of peers banned for bad data.
    pub fn banned(&self) -> usize {
        self.banned.len()
    }

    /// Number of known peers and tasks, for status and metrics.
    pub fn counts(&self) -> (usize, usize) {
        (self.peers.len(), self.tasks.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtual clock: a fixed origin plus whatever the test advances.
    struct Clock(Instant, Duration);

    impl Clock {
        fn new() -> Self {
            Clock(Instant::now(), Duration::ZERO)
        }
        fn now(&self) -> Instant {
            self.0 + self.1
        }
        fn advance(&mut self, d: Duration) {
            self.1 += d;
        }
    }

    /// Node `i`'s address: parents are named by it, [`id`] reads the node back.
    fn addr(i: u64) -> SocketAddr {
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000))
    }

    fn id(p: &Parent) -> NodeId {
        let SocketAddr::V4(a) = p.addr else {
            panic!("{} is not a test address", p.addr)
        };
        let [_, hi, mid, lo] = a.ip().octets();
        NodeId(u64::from(hi) << 16 | u64::from(mid) << 8 | u64::from(lo))
    }

    fn setup(
        nodes: u64,
        zone: impl Fn(u64) -> &'static str,
    ) -> (Scheduler, Clock, BlobDigest, PieceLayout) {
        let clock = Clock::new();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let digest = BlobDigest::of(b"blob");
        let layout = PieceLayout::new(8 << 20, shoal_proto::piece::PIECE_SIZE).unwrap();
        for i in 0..nodes {
            s.hello(clock.now(), NodeId(i), zone(i).into(), addr(i))
                .unwrap();
            s.want(clock.now(), NodeId(i), digest, layout).unwrap();
        }
        (s, clock, digest, layout)
    }

    fn all(layout: &PieceLayout) -> Vec<PieceIndex> {
        layout.pieces().collect()
    }

    #[test]
    fn hands_out_holders_of_missing_pieces_never_the_asker() {
        let (mut s, clock, d, layout) = setup(4, |_| "a");
        s.have(clock.now(), NodeId(0), &d, &all(&layout)).unwrap();
        s.have(clock.now(), NodeId(1), &d, &[PieceIndex(0)])
            .unwrap();
        s.have(clock.now(), NodeId(2), &d, &[PieceIndex(0)])
            .unwrap();
        // Node 2 has piece 0: node 1 (only piece 0) is useless to it.
        let parents = s.parents(clock.now(), NodeId(2), &d).unwrap();
        let ids: Vec<_> = parents.iter().map(id).collect();
        assert_eq!(ids, vec![NodeId(0)]);
        // Its pieces, less the one the asker has.
        let named: Vec<u32> = parents[0].pieces.iter().map(|i| i.0).collect();
        assert_eq!(named, (1..layout.count()).collect::<Vec<_>>());
        let ids: Vec<_> = s
            .parents(clock.now(), NodeId(0), &d)
            .unwrap()
            .iter()
            .map(id)
            .collect();
        assert!(
            ids.is_empty(),
            "the seed has everything: nobody is useful to it"
        );
    }

    #[test]
    fn a_seed_gives_each_rare_piece_once_and_each_asker_a_small_share() {
        let (mut s, mut clock, d, layout) = setup(8, |_| "a");
        let seed = NodeId(0);
        s.add_seed(seed);
        s.have(clock.now(), seed, &d, &all(&layout)).unwrap();
        // Node 1 announced pieces 0-3: the seed does not offer those any more.
        let first_half: Vec<_> = (0..4).map(PieceIndex).collect();
        s.have(clock.now(), NodeId(1), &d, &first_half).unwrap();
        let seed_offer = |s: &mut Scheduler, asker: u64, now| {
            s.parents(now, NodeId(asker), &d)
                .unwrap()
                .into_iter()
                .find(|p| id(p) == seed)
                .map(|p| p.pieces.iter().map(|i| i.0).collect::<Vec<_>>())
        };
        // Two pieces per asker, each rare piece to one asker at a time.
        assert_eq!(seed_offer(&mut s, 2, clock.now()), Some(vec![4, 5]));
        assert_eq!(seed_offer(&mut s, 3, clock.now()), Some(vec![6, 7]));
        assert_eq!(seed_offer(&mut s, 4, clock.now()), None);
        // Asker 2 has its share until another node holds those pieces too.
        clock.advance(SEED_OFFER_HOLD + Duration::from_millis(1));
        assert_eq!(seed_offer(&mut s, 2, clock.now()), None);
        // Offers nobody took lapse quickly; a piece the seed sends is held for a window.
        s.seed_sending(clock.now(), &d, PieceIndex(6));
        assert_eq!(seed_offer(&mut s, 4, clock.now()), Some(vec![4, 5]));
        assert_eq!(seed_offer(&mut s, 5, clock.now()), Some(vec![7]));
        clock.advance(SEED_OFFER_HOLD + Duration::from_millis(1));
        assert_eq!(seed_offer(&mut s, 6, clock.now()), Some(vec![4, 5]));
        clock.advance(SchedulerConfig::default().load_window);
        assert_eq!(seed_offer(&mut s, 7, clock.now()), Some(vec![4, 5]));
        // A holder that leaves makes its pieces rare again.
        s.leave(NodeId(1));
        assert_eq!(seed_offer(&mut s, 2, clock.now()), Some(vec![0, 1]));
    }

    #[test]
    fn a_seed_sends_a_piece_again_only_when_nobody_else_has_it() {
        let (mut s, mut clock, d, layout) = setup(4, |_| "a");
        let seed = NodeId(0);
        s.add_seed(seed);
        s.have(clock.now(), seed, &d, &all(&layout)).unwrap();
        let p = PieceIndex;
        assert!(s.seed_may_send(clock.now(), &d, p(0)));
        s.seed_sending(clock.now(), &d, p(0));
        assert!(
            !s.seed_may_send(clock.now(), &d, p(0)),
            "just began sending it"
        );
        assert!(s.seed_may_send(clock.now(), &d, p(1)));
        clock.advance(SEED_RESEND);
        assert!(
            s.seed_may_send(clock.now(), &d, p(0)),
            "the receiver did not announce it"
        );
        s.have(clock.now(), NodeId(1), &d, &[p(0)]).unwrap();
        assert!(!s.seed_may_send(clock.now(), &d, p(0)), "node 1 has it");
        s.leave(NodeId(1));
        assert!(s.seed_may_send(clock.now(), &d, p(0)), "rare again");
        let other = BlobDigest::of(b"other");
        assert!(
            s.seed_may_send(clock.now(), &other, p(0)),
            "no task: not the scheduler's call"
        );
    }

    #[test]
    fn a_node_alone_with_the_seed_gets_every_piece_offered() {
        let (mut s, clock, d, layout) = setup(2, |_| "a");
        let seed = NodeId(0);
        s.add_seed(seed);
        s.have(clock.now(), seed, &d, &all(&layout)).unwrap();
        let offered = s
            .parents(clock.now(), NodeId(1), &d)
            .unwrap()
            .into_iter()
            .find(|p| id(p) == seed)
            .map(|p| p.pieces.iter().count());
        assert_eq!(
            offered,
            Some(layout.count() as usize),
            "nobody to trade with"
        );
    }

    #[test]
    fn prefers_the_askers_zone() {
        let (mut s, clock, d, layout) = setup(10, |i| if i % 2 == 0 { "east" } else { "west" });
        for i in 0..9 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        let parents = s.parents(clock.now(), NodeId(9), &d).unwrap();
        assert_eq!(parents.len(), 8);
        assert!(
            parents[..4].iter().all(|p| id(p).0 % 2 == 1),
            "the four in the asker's zone come first: {parents:?}"
        );
    }

    #[test]
    fn spreads_upload_load_and_forgets_it_after_the_window() {
        let (mut s, mut clock, d, layout) = setup(60, |_| "a");
        s.have(clock.now(), NodeId(0), &d, &all(&layout)).unwrap();
        s.have(clock.now(), NodeId(1), &d, &all(&layout)).unwrap();
        let mut handed = HashMap::new();
        for asker in 2..40 {
            for p in s.parents(clock.now(), NodeId(asker), &d).unwrap() {
                *handed.entry(id(&p)).or_insert(0i32) += 1;
            }
        }
        // Two holders, 38 askers: both carry the load evenly.
        assert!(
            (handed[&NodeId(0)] - handed[&NodeId(1)]).abs() <= 1,
            "{handed:?}"
        );
        // With a third holder, fresh, it comes first: the others are over their cap.
        s.have(clock.now(), NodeId(2), &d, &all(&layout)).unwrap();
        assert_eq!(
            id(&s.parents(clock.now(), NodeId(45), &d).unwrap()[0]),
            NodeId(2)
        );
        clock.advance(Duration::from_secs(3));
        let parents = s.parents(clock.now(), NodeId(46), &d).unwrap();
        assert_eq!(
            parents.len(),
            3,
            "after the window every holder is free again"
        );
    }

    #[test]
    fn peers_with_full_uploads_come_last_until_their_report_is_old() {
        // Fewer holders than an answer holds: every one is looked at and ranked.
        let (mut s, mut clock, d, layout) = setup(8, |_| "a");
        for i in 0..6 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        let full = Uploads {
            sending: 4,
            slots: 4,
        };
        for i in 0..4 {
            s.uploads(clock.now(), NodeId(i), full);
        }
        s.uploads(
            clock.now(),
            NodeId(4),
            Uploads {
                sending: 3,
                slots: 4,
            },
        );
        let first: Vec<NodeId> = s.parents(clock.now(), NodeId(6), &d).unwrap()[..2]
            .iter()
            .map(id)
            .collect();
        assert!(
            first.contains(&NodeId(4)) && first.contains(&NodeId(5)),
            "the two with free slots first: {first:?}"
        );
        // A slot freed and reported: no longer last.
        s.uploads(
            clock.now(),
            NodeId(0),
            Uploads {
                sending: 1,
                slots: 4,
            },
        );
        let parents = s.parents(clock.now(), NodeId(7), &d).unwrap();
        assert!(
            parents[..3].iter().any(|p| id(p) == NodeId(0)),
            "{parents:?}"
        );
        // Reports that old say nothing: every holder is a candidate on its other merits.
        clock.advance(UPLOADS_FRESH + Duration::from_millis(1));
        let parents = s.parents(clock.now(), NodeId(6), &d).unwrap();
        let at = |n: u64| parents.iter().position(|p| id(p) == NodeId(n));
        assert!(
            at(1) < at(5),
            "handed out as often, a holder once full is no longer last: {parents:?}"
        );
    }

    #[test]
    fn an_answers_worth_of_holders_in_the_askers_zone_ends_the_scan() {
        let (mut s, clock, d, layout) = setup(40, |i| if i < 30 { "a" } else { "b" });
        for i in 0..30 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        // Successive answers move on through the holders: each holder is handed out
        // about as often as the others without a ranking by load.
        let mut handed = HashMap::new();
        for asker in 30..40 {
            let parents = s.parents(clock.now(), NodeId(asker), &d).unwrap();
            assert_eq!(parents.len(), 8);
            for p in parents {
                *handed.entry(id(&p)).or_insert(0) += 1;
            }
        }
        assert_eq!(handed.len(), 30, "every holder in turn: {handed:?}");
        assert!(handed.values().all(|n| (2..=3).contains(n)), "{handed:?}");
    }

    #[test]
    fn holders_past_an_answers_worth_in_the_askers_zone_are_not_read() {
        let (mut s, clock, d, layout) = setup(17, |_| "a");
        for i in 0..16 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        let full = Uploads {
            sending: 4,
            slots: 4,
        };
        for i in 0..8 {
            s.uploads(clock.now(), NodeId(i), full);
        }
        // The first 8 in turn end the scan, full or not: ranking more would cost a piece
        // set read each, and a full parent answers "busy" and is rested a moment.
        let mut parents: Vec<u64> = s
            .parents(clock.now(), NodeId(16), &d)
            .unwrap()
            .iter()
            .map(|p| id(p).0)
            .collect();
        parents.sort_unstable();
        assert_eq!(parents, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn never_hands_out_peers_that_left_timed_out_or_sent_bad_data() {
        let (mut s, mut clock, d, layout) = setup(5, |_| "a");
        for i in 0..4 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        s.leave(NodeId(0));
        s.bad_piece(clock.now(), NodeId(4), addr(1)).unwrap();
        let ids: HashSet<_> = s
            .parents(clock.now(), NodeId(4), &d)
            .unwrap()
            .iter()
            .map(id)
            .collect();
        assert_eq!(ids, HashSet::from_iter([NodeId(2), NodeId(3)]));
        assert_eq!(
            s.hello(clock.now(), NodeId(1), "a".into(), addr(1)),
            Err(ScheduleError::Banned(NodeId(1)))
        );

        clock.advance(Duration::from_secs(20));
        s.have(clock.now(), NodeId(2), &d, &[]).unwrap(); // node 2 keeps talking, node 3 does not
        clock.advance(Duration::from_secs(15));
        let ids: Vec<_> = s
            .parents(clock.now(), NodeId(4), &d)
            .unwrap()
            .iter()
            .map(id)
            .collect();
        assert_eq!(ids, vec![NodeId(2)], "node 3 timed out");
        s.expire(clock.now());
        assert_eq!(s.counts().0, 2);
    }

    #[test]
    fn refuses_bad_events() {
        let (mut s, clock, d, layout) = setup(2, |_| "a");
        assert_eq!(
            s.have(clock.now(), NodeId(9), &d, &[]),
            Err(ScheduleError::UnknownPeer(NodeId(9)))
        );
        assert_eq!(
            s.have(clock.now(), NodeId(0), &d, &[PieceIndex(8)]),
            Err(ScheduleError::PieceOutOfRange(PieceIndex(8)))
        );
        assert_eq!(
            s.have(clock.now(), NodeId(0), &BlobDigest::of(b"other"), &[]),
            Err(ScheduleError::UnknownTask)
        );
        let other = PieceLayout::for_blob(1).unwrap();
        assert_eq!(
            s.want(clock.now(), NodeId(1), d, other),
            Err(ScheduleError::LayoutMismatch)
        );
        let _ = layout;
    }

    #[test]
    fn a_thousand_askers_get_answers_quickly() {
        // Not a benchmark: a guard against quadratic blow-ups in the hot path.
        let (mut s, clock, d, layout) = setup(2000, |i| if i % 3 == 0 { "a" } else { "b" });
        for i in 0..1000 {
            s.have(clock.now(), NodeId(i), &d, &all(&layout)).unwrap();
        }
        let started = std::time::Instant::now();
        for asker in 1000..2000 {
            assert!(
                !s.parents(clock.now(), NodeId(asker), &d)
                    .unwrap()
                    .is_empty()
            );
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn nodes_that_want_a_blob_join_its_stripe_trees_and_leave_them_when_gone() {
        let clock = Clock::new();
        let config = SchedulerConfig {
            stripes: 2,
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(config);
        let (digest, seed) = (BlobDigest::of(b"blob"), NodeId(99));
        let layout = PieceLayout::new(8 << 20, shoal_proto::piece::PIECE_SIZE).unwrap();
        s.add_seed(seed);
        s.hello(clock.now(), seed, "a".into(), addr(99)).unwrap();
        s.want(clock.now(), seed, digest, layout).unwrap();
        assert!(
            s.stripe_trees(&digest).unwrap().is_empty(),
            "a seed feeds the roots"
        );
        for i in 0..3 {
            s.hello(clock.now(), NodeId(i), "a".into(), addr(i))
                .unwrap();
            s.want(clock.now(), NodeId(i), digest, layout).unwrap();
        }
        let trees = s.stripe_trees(&digest).unwrap();
        assert_eq!(trees.len(), 3);
        assert_eq!(trees.feed(NodeId(0), 0), Some(Feed::Seed));
        assert_eq!(trees.feed(NodeId(2), 0), Some(Feed::Node(NodeId(0))));
        let changes = s.take_stripe_changes(&digest);
        assert!(changes.contains(&(NodeId(2), 0)), "{changes:?}");
        // Answers name the feeds by address, the seed's for a root.
        assert_eq!(s.feeds(NodeId(2), &digest)[0], addr(0));
        assert_eq!(s.feeds(NodeId(0), &digest)[0], addr(99));
        assert_eq!(s.feeds(NodeId(0), &digest).len(), 2);
        assert!(
            s.feeds(seed, &digest).is_empty(),
            "the seed is fed by nobody"
        );
        s.leave(NodeId(0));
        let trees = s.stripe_trees(&digest).unwrap();
        assert_eq!(trees.len(), 2);
        assert_eq!(trees.feed(NodeId(2), 0), Some(Feed::Seed));
        assert!(s.take_stripe_changes(&digest).contains(&(NodeId(2), 0)));
        assert_eq!(s.feeds(NodeId(2), &digest)[0], addr(99));
        // Without stripes, no trees.
        let (s, _, d, _) = setup(3, |_| "a");
        assert!(s.stripe_trees(&d).is_none());
        assert!(s.feeds(NodeId(1), &d).is_empty());
    }
}
