//! The downloader's sans-IO core: which piece to ask which parent for.
//!
//! Events in (parents offered by the supernode, hashes learned, pieces done or failed) and
//! the current time; decisions out ([`Planner::next_requests`]). The driver moves bytes.
//!
//! Strategy:
//! - pieces inside the streaming window (the next `window` pieces after what the client has
//!   been sent) come first and in order, so that containerd gets bytes steadily;
//! - beyond the window, the rarest piece among the parents first, so that the swarm quickly
//!   has many different pieces to trade; ties are broken by a per-node offset so that nodes
//!   starting together do not all ask for the same piece;
//! - at most `per_parent` requests in flight to one parent; a parent that fails is rested
//!   for a while, one that sends bad data is never asked again;
//! - a piece whose hash is not known yet is not asked for (it could not be checked);
//! - a piece no parent has yet waits for the seed to publish it; when nothing has arrived
//!   for `stall_after`, the streaming window goes to the registry ([`Request::Registry`])
//!   so that the client keeps getting bytes; when no peer has delivered for twice as long,
//!   or the swarm gave up on the blob ([`Planner::registry_only`]), every missing piece.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::time::{Duration, Instant};

use std::hash::BuildHasher as _;
use std::net::SocketAddr;

use shoal_proto::message::{NodeId, Parent, PieceSet};
use shoal_proto::{PieceIndex, PieceLayout};

#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Requests in flight to one parent.
    pub per_parent: u32,
    /// Requests in flight in all: enough to fill the link, few enough that each piece
    /// arrives soon (a piece is only passed on once it is whole, and a request that
    /// shares the link with too many others times out).
    pub max_in_flight: u32,
    /// Pieces ahead of the streaming cursor fetched in order.
    pub window: u32,
    /// A request older than this is given up and its parent rested.
    pub piece_timeout: Duration,
    /// How long a failed parent is not asked.
    pub rest: Duration,
    /// How long a parent that answered "busy" (at its upload limit) is not asked: short,
    /// since its slots free as pieces finish (`shoal sim`: 5 s here made 100 nodes take
    /// 11 s instead of 6.6 s for a 256 MiB image at 1 Gbit/s; with the supernode told of
    /// full uploads, 1,000 nodes x 256 MiB took p50 1.52 x S/B at 50 ms, 1.60 x at 200).
    pub rest_busy: Duration,
    /// No progress for this long: the streaming window comes from the registry; no piece
    /// from a peer for twice as long: everything does.
    pub stall_after: Duration,
    /// A fed stripe ([`Planner::feed`]) whose stream has sent nothing for this long is
    /// fetched piece by piece like the others, until its stream sends again.
    pub stripe_stall: Duration,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            per_parent: 4,
            max_in_flight: 8,
            window: 8,
            piece_timeout: Duration::from_secs(10),
            rest: Duration::from_secs(5),
            rest_busy: Duration::from_millis(50),
            stall_after: Duration::from_secs(10),
            stripe_stall: Duration::from_secs(3),
        }
    }
}

/// Where a piece should come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A parent, by the address the supernode named it by.
    Peer {
        parent: SocketAddr,
        piece: PieceIndex,
    },
    Registry {
        piece: PieceIndex,
    },
}

/// Why a piece request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The parent did not have it, or the connection failed: try elsewhere.
    Unavailable,
    /// The parent is at its upload limit: try elsewhere, and it again soon.
    Busy,
    /// The bytes failed the piece hash: never ask this parent again.
    BadData,
}

#[derive(Debug)]
struct ParentState {
    addr: SocketAddr,
    pieces: PieceSet,
    in_flight: u32,
    rested_until: Option<Instant>,
    /// The offer that last named it.
    offered: u64,
}

/// A parent no offer has named in this many offers is forgotten (once nothing is in flight
/// to it): its piece set is stale, and a node that knew every parent it was ever offered
/// would scan thousands per plan.
pub const FORGET_AFTER_OFFERS: u64 = 4;

/// Parents known at once, each a bit of a piece's holder mask: offers name 8 and are
/// forgotten after [`FORGET_AFTER_OFFERS`], so a node knows about 40 at most; parents
/// offered beyond this are left out until others are forgotten.
pub const MAX_PARENTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A parent, and its slot in `parents` when asked (still its own while the request is
    /// in flight: a parent is forgotten only with nothing in flight).
    Peer(SocketAddr, usize),
    Registry,
}

#[derive(Debug)]
pub struct Planner {
    config: PlannerConfig,
    layout: PieceLayout,
    have: PieceSet,
    /// Hashes are known for pieces below this index.
    hashes_known: u32,
    /// Requests in flight: a few (`max_in_flight`), so a list read in place is quicker than
    /// a map or a piece set (a cold allocation each).
    in_flight: Vec<(PieceIndex, Source, Instant)>,
    /// The parents of the last few offers, each in a slot that stays its own while it is
    /// known (its bit in `holding`); `parent_at` finds one by id.
    parents: Vec<Option<ParentState>>,
    parent_at: HashMap<SocketAddr, usize>,
    /// Offers so far.
    offers: u64,
    /// Parents that sent bad data or are gone: never asked again.
    banned: HashSet<SocketAddr>,
    /// Which parents (slots) that are not banned hold each piece this node lacks, and the
    /// pieces at least one holds: kept as offers come, so that a plan reads one word per
    /// piece, not every parent's piece set (`shoal sim` runs thousands of planners).
    /// Masks of pieces this node has are stale.
    holding: Vec<u64>,
    held: PieceSet,
    /// Pieces below this have been handed to the client.
    cursor: u32,
    last_progress: Instant,
    /// When a peer (or seed) last delivered a piece.
    last_peer_progress: Instant,
    /// Spreads tie-breaks between nodes.
    offset: u32,
    /// The swarm cannot help (supernode gone or refused): everything from the registry.
    registry_only: bool,
    /// No more hashes will come (the supernode is gone): pieces without one come from the
    /// registry at once; peers still serve the pieces that can be checked.
    hashes_final: bool,
    /// The pieces beyond the window, rarest first: (holders, tie-break, piece). Kept from
    /// plan to plan while the counts stay the same (a node plans once per piece and hears
    /// of new counts once per offer); pieces had or requested since are skipped.
    ranked: Vec<(u16, u32, PieceIndex)>,
    /// `ranked` is sorted below this index; beyond it only once it is needed.
    sorted_upto: usize,
    /// Entries of `ranked` below this are pieces this node has.
    ranked_from: usize,
    /// `ranked` no longer matches the counts (or ranks every piece, see `next_requests`).
    ranked_stale: bool,
    /// Stripes the blob is cut into when pieces come on stripe streams (0: none), and per
    /// stripe, when its stream last sent a piece (or opened); `None`: not fed.
    stripes: u32,
    feeds: Vec<Option<Instant>>,
    /// The fed stripes left out of `ranked`, a bit each.
    ranked_fed: u64,
}

impl Planner {
    pub fn new(config: PlannerConfig, layout: PieceLayout, me: NodeId, now: Instant) -> Self {
        let count = layout.count();
        Self {
            config,
            layout,
            have: PieceSet::empty(count),
            hashes_known: 0,
            in_flight: Vec::new(),
            parents: Vec::new(),
            parent_at: HashMap::new(),
            offers: 0,
            banned: HashSet::new(),
            holding: vec![0; count as usize],
            held: PieceSet::empty(count),
            cursor: 0,
            last_progress: now,
            last_peer_progress: now,
            offset: (me.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 % count.max(1),
            registry_only: false,
            hashes_final: false,
            ranked: Vec::new(),
            sorted_upto: 0,
            ranked_from: 0,
            ranked_stale: true,
            stripes: 0,
            feeds: Vec::new(),
            ranked_fed: 0,
        }
    }

    /// Pieces come on stripe streams: the blob is cut into `stripes` stripes (piece `i` is
    /// in stripe `i % stripes`; 0: no stripes), and a stream now feeds each stripe in
    /// `fed`. A fed stripe's pieces are not asked of parents while its stream keeps
    /// sending (see [`PlannerConfig::stripe_stall`]).
    pub fn feed(&mut self, now: Instant, stripes: u32, fed: &[u32]) {
        if stripes != self.stripes {
            self.stripes = stripes.min(u64::BITS);
            self.feeds = vec![None; self.stripes as usize];
        }
        for &stripe in fed {
            if let Some(feed) = self.feeds.get_mut(stripe as usize) {
                *feed = Some(now);
            }
        }
    }

    /// The stream of `stripe` ended: its pieces are asked of parents again.
    pub fn unfeed(&mut self, stripe: u32) {
        if let Some(feed) = self.feeds.get_mut(stripe as usize) {
            *feed = None;
        }
    }

    /// A piece came unasked on its stripe's stream and passed its hash.
    pub fn pushed(&mut self, now: Instant, piece: PieceIndex) {
        if let Some(Some(feed)) = self.stripe_of(piece).and_then(|s| self.feeds.get_mut(s)) {
            *feed = now;
        }
        self.done(now, piece);
    }

    fn stripe_of(&self, piece: PieceIndex) -> Option<usize> {
        (self.stripes > 0).then(|| (piece.0 % self.stripes) as usize)
    }

    /// The stripes whose streams sent something lately, a bit each.
    fn fed(&self, now: Instant) -> u64 {
        let live = |at: &Option<Instant>| {
            at.is_some_and(|at| now.saturating_duration_since(at) < self.config.stripe_stall)
        };
        let stripes = self.feeds.iter().enumerate();
        stripes
            .filter(|(_, at)| live(at))
            .fold(0, |m, (s, _)| m | 1 << s)
    }

    /// Whether every stripe comes on a stream that sent something lately.
    pub fn all_fed(&self, now: Instant) -> bool {
        self.stripes > 0 && self.fed(now).count_ones() == self.stripes
    }

    /// Whether `piece` is in one of the `fed` stripes.
    fn is_fed(&self, fed: u64, piece: PieceIndex) -> bool {
        self.stripe_of(piece).is_some_and(|s| fed & (1 << s) != 0)
    }

    /// The supernode offered parents (replaces what it said of them before). Parents that
    /// no offer named for [`FORGET_AFTER_OFFERS`] offers are forgotten.
    pub fn offer(&mut self, parents: Vec<Parent>) {
        let count = self.layout.count();
        self.offers += 1;
        self.ranked_stale = true;
        for p in parents {
            if !p.pieces.fits(count) || self.banned.contains(&p.addr) {
                continue;
            }
            let at = match self.parent_at.get(&p.addr) {
                Some(&at) => at,
                None => {
                    let Some(at) = self.free_slot() else { continue };
                    self.parents[at] = Some(ParentState {
                        addr: p.addr,
                        pieces: PieceSet::empty(count),
                        in_flight: 0,
                        rested_until: None,
                        offered: 0,
                    });
                    self.parent_at.insert(p.addr, at);
                    at
                }
            };
            let Some(state) = self.parents[at].as_mut() else {
                continue;
            };
            state.offered = self.offers;
            // Pieces this node has are left out: who holds them no longer matters.
            for (piece, added) in state.pieces.changes(&p.pieces, &self.have) {
                note_holder(&mut self.holding, &mut self.held, piece, at, added);
            }
            state.pieces = p.pieces;
        }
        for at in 0..self.parents.len() {
            let forgotten = self.parents[at].as_ref().is_some_and(|p| {
                p.in_flight == 0 && p.offered + FORGET_AFTER_OFFERS <= self.offers
            });
            if forgotten {
                self.drop_parent(at);
            }
        }
    }

    /// A slot for a new parent, if fewer than [`MAX_PARENTS`] are known.
    fn free_slot(&mut self) -> Option<usize> {
        if let Some(at) = self.parents.iter().position(Option::is_none) {
            return Some(at);
        }
        (self.parents.len() < MAX_PARENTS).then(|| {
            self.parents.push(None);
            self.parents.len() - 1
        })
    }

    /// A parent, looked for first in the slot it had.
    fn parent_in(&mut self, addr: SocketAddr, at: usize) -> Option<&mut ParentState> {
        let at = match self.parents.get(at) {
            Some(Some(p)) if p.addr == addr => at,
            _ => *self.parent_at.get(&addr)?,
        };
        self.parents[at].as_mut()
    }

    /// From now on, every missing piece comes from the registry.
    pub fn registry_only(&mut self) {
        self.registry_only = true;
    }

    /// A parent is gone for good (e.g. the seed of a supernode that died): never ask it
    /// again, and free its pieces in flight for others.
    pub fn remove_parent(&mut self, node: SocketAddr) {
        self.ban(node);
        let gone: Vec<PieceIndex> = self
            .in_flight
            .iter()
            .filter(|(_, source, _)| matches!(source, Source::Peer(n, _) if *n == node))
            .map(|(piece, _, _)| *piece)
            .collect();
        for piece in gone {
            self.untrack(piece);
        }
    }

    /// The supernode is gone: no more piece hashes will arrive.
    pub fn hashes_final(&mut self) {
        self.hashes_final = true;
    }

    /// Hashes of the first `n` pieces are known.
    pub fn hashes_known(&mut self, n: u32) {
        let n = n.min(self.layout.count());
        if n > self.hashes_known {
            self.hashes_known = n;
            self.ranked_stale = true;
        }
    }

    /// The client has been sent every piece below `piece`.
    pub fn streamed_to(&mut self, piece: u32) {
        self.cursor = self.cursor.max(piece);
    }

    pub fn have(&self) -> &PieceSet {
        &self.have
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// A piece arrived and passed its hash.
    pub fn done(&mut self, now: Instant, piece: PieceIndex) {
        match self.untrack(piece) {
            Some((Source::Peer(parent, at), _)) => {
                self.last_peer_progress = now;
                if let Some(p) = self.parent_in(parent, at) {
                    p.in_flight = p.in_flight.saturating_sub(1);
                }
            }
            Some((Source::Registry, _)) => {}
            // A peer's answer that came after its request was given up: still progress.
            None => self.last_peer_progress = now,
        }
        self.have.insert(piece);
        self.last_progress = now;
    }

    /// A request failed.
    pub fn failed(&mut self, now: Instant, piece: PieceIndex, failure: Failure) {
        let Some((source, _)) = self.untrack(piece) else {
            return;
        };
        let Source::Peer(parent, at) = source else {
            return;
        };
        let (hashes_final, rest, rest_busy) =
            (self.hashes_final, self.config.rest, self.config.rest_busy);
        let Some(p) = self.parent_in(parent, at) else {
            return;
        };
        p.in_flight = p.in_flight.saturating_sub(1);
        match failure {
            // Without a supernode nothing will say the parent is back: its pieces no longer
            // count as held, so that those only it had come from the registry now, not
            // after a stall (`shoal sim`, 20 nodes, a supernode dying while nodes leave:
            // p99 14 s instead of 2.6 s).
            Failure::Unavailable if hashes_final => self.ban(parent),
            Failure::Unavailable => p.rested_until = Some(now + rest),
            Failure::Busy => p.rested_until = Some(now + rest_busy),
            Failure::BadData => self.ban(parent),
        }
    }

    /// What to request now. Also times out old requests.
    pub fn next_requests(&mut self, now: Instant) -> Vec<Request> {
        let timed_out: Vec<PieceIndex> = self
            .in_flight
            .iter()
            .filter(|(_, s, at)| {
                *s != Source::Registry && now.duration_since(*at) > self.config.piece_timeout
            })
            .map(|(p, _, _)| *p)
            .collect();
        for piece in timed_out {
            self.failed(now, piece, Failure::Unavailable);
        }
        let mut out = Vec::new();
        if self.in_flight.len() >= self.config.max_in_flight as usize {
            return out;
        }

        // A stall hands the streaming window to the registry, so that the client keeps
        // getting bytes while the swarm is slow; only when no peer has delivered anything
        // for twice as long does the registry take everything (in a large swarm on slow
        // links a node may wait long for its share, and sending all of those nodes to the
        // registry at once would recreate the herd shoal exists to prevent).
        let swarm_dead = self.registry_only
            || now.duration_since(self.last_peer_progress) > 2 * self.config.stall_after;
        let stalled = now.duration_since(self.last_progress) > self.config.stall_after;
        // Whether pieces that no parent can serve may still be asked of the registry.
        let unserved_too = swarm_dead || self.hashes_final;
        // Pieces of fed stripes wait for their streams, unless the swarm failed.
        let fed = if unserved_too { 0 } else { self.fed(now) };
        if fed != self.ranked_fed {
            self.ranked_fed = fed;
            self.ranked_stale = true;
        }
        // The parents that may be asked now, a bit each.
        let mut free: u64 = 0;
        for (at, p) in self.parents.iter().enumerate() {
            if let Some(p) = p
                && self.usable(now, p)
                && p.in_flight < self.config.per_parent
            {
                free |= 1 << at;
            }
        }

        // The streaming window first, in order.
        let count = self.layout.count();
        let window_end = (self.cursor + self.config.window).min(count);
        for i in self.cursor..window_end {
            let piece = PieceIndex(i);
            let waits = !stalled && self.is_fed(fed, piece);
            if self.have.contains(piece) || self.is_requested(piece) || waits {
                continue;
            }
            if !self.consider(now, piece, swarm_dead || stalled, &mut free, &mut out) {
                return out;
            }
        }
        if free == 0 && !unserved_too {
            return out;
        }

        // Beyond it, the rarest first.
        let slots = self.config.max_in_flight as usize - self.in_flight.len();
        if unserved_too {
            // Every piece is a candidate now: ranked afresh, and afresh again next time.
            self.rank(&PieceSet::full(count), count, slots);
            self.ranked_stale = true;
        } else if self.ranked_stale {
            let held = std::mem::replace(&mut self.held, PieceSet::empty(0));
            self.rank(&held, self.hashes_known, slots);
            self.held = held;
            self.ranked_stale = false;
        }
        while self
            .ranked
            .get(self.ranked_from)
            .is_some_and(|r| self.have.contains(r.2))
        {
            self.ranked_from += 1;
        }
        let mut ranked = std::mem::take(&mut self.ranked);
        let mut at = self.ranked_from;
        while at < ranked.len() {
            if at == self.sorted_upto {
                ranked[at..].sort_unstable();
                self.sorted_upto = ranked.len();
            }
            let piece = ranked[at].2;
            at += 1;
            if self.have.contains(piece)
                || self.is_requested(piece)
                || (self.cursor..window_end).contains(&piece.0)
            {
                continue;
            }
            if !self.consider(now, piece, swarm_dead, &mut free, &mut out)
                || (free == 0 && !unserved_too)
            {
                break;
            }
        }
        self.ranked = ranked;
        out
    }

    /// Ranks the pieces of `universe` this node lacks, below `below`, rarest first; only
    /// the first few are sorted (enough for `slots` requests), the rest once needed.
    fn rank(&mut self, universe: &PieceSet, below: u32, slots: usize) {
        let count = self.layout.count();
        let mut ranked = std::mem::take(&mut self.ranked);
        ranked.clear();
        let fed = self.ranked_fed;
        ranked.extend(
            universe
                .iter_without(&self.have, &self.have)
                .filter(|p| p.0 < below && !self.is_fed(fed, *p))
                .map(|p| {
                    let tie = (p.0 + count - self.offset) % count;
                    (self.holding[p.0 as usize].count_ones() as u16, tie, p)
                }),
        );
        let head = (4 * slots).max(16).min(ranked.len());
        if head < ranked.len() {
            ranked.select_nth_unstable(head);
        }
        ranked[..head].sort_unstable();
        self.sorted_upto = head;
        self.ranked_from = 0;
        self.ranked = ranked;
    }

    /// Decides where `piece` comes from, if anywhere yet; false once no more requests fit.
    fn consider(
        &mut self,
        now: Instant,
        piece: PieceIndex,
        to_registry: bool,
        free: &mut u64,
        out: &mut Vec<Request>,
    ) -> bool {
        let parent = if to_registry {
            None
        } else {
            self.pick_parent(piece, *free)
        };
        match parent {
            Some((at, node)) => {
                let per_parent = self.config.per_parent;
                if let Some(p) = self.parents[at].as_mut() {
                    p.in_flight += 1;
                    if p.in_flight >= per_parent {
                        *free &= !(1 << at);
                    }
                }
                self.track(piece, Source::Peer(node, at), now);
                out.push(Request::Peer {
                    parent: node,
                    piece,
                });
            }
            // Without a supernode nothing new will be learned: a piece that cannot be
            // checked, or that no remaining parent holds, comes from the registry now.
            None if to_registry
                || (self.hashes_final
                    && (piece.0 >= self.hashes_known || self.holding[piece.0 as usize] == 0)) =>
            {
                self.track(piece, Source::Registry, now);
                out.push(Request::Registry { piece });
            }
            None => {}
        }
        self.in_flight.len() < self.config.max_in_flight as usize
    }

    fn track(&mut self, piece: PieceIndex, source: Source, now: Instant) {
        self.in_flight.push((piece, source, now));
    }

    fn is_requested(&self, piece: PieceIndex) -> bool {
        self.in_flight.iter().any(|(p, _, _)| *p == piece)
    }

    fn untrack(&mut self, piece: PieceIndex) -> Option<(Source, Instant)> {
        let at = self.in_flight.iter().position(|(p, _, _)| *p == piece)?;
        let (_, source, since) = self.in_flight.swap_remove(at);
        Some((source, since))
    }

    /// Never asks this parent again; its pieces no longer count as held. Its requests in
    /// flight still end (done or failed) as usual.
    fn ban(&mut self, node: SocketAddr) {
        self.banned.insert(node);
        self.ranked_stale = true;
        if let Some(&at) = self.parent_at.get(&node)
            && let Some(p) = self.parents[at].as_mut()
        {
            let pieces = std::mem::replace(&mut p.pieces, PieceSet::empty(0));
            for piece in pieces.iter_without(&self.have, &self.have) {
                note_holder(&mut self.holding, &mut self.held, piece, at, false);
            }
        }
    }

    /// Forgets a parent: its pieces no longer count as held.
    fn drop_parent(&mut self, at: usize) {
        let Some(p) = self.parents[at].take() else {
            return;
        };
        self.ranked_stale = true;
        self.parent_at.remove(&p.addr);
        for piece in p.pieces.iter_without(&self.have, &self.have) {
            note_holder(&mut self.holding, &mut self.held, piece, at, false);
        }
    }

    fn spread(&self, parent: SocketAddr) -> u64 {
        foldhash::fast::FixedState::with_seed(u64::from(self.offset)).hash_one(parent)
    }

    fn usable(&self, now: Instant, p: &ParentState) -> bool {
        !self.banned.contains(&p.addr) && p.rested_until.is_none_or(|t| now >= t)
    }

    /// Among the parents that may be asked (`free`), the least busy that holds `piece`:
    /// its slot and id.
    fn pick_parent(&self, piece: PieceIndex, free: u64) -> Option<(usize, SocketAddr)> {
        // A piece whose hash is unknown cannot be checked: it waits for the hash (or goes
        // to the registry, which the whole-blob sha256 covers).
        if piece.0 >= self.hashes_known {
            return None;
        }
        let mut candidates = self.holding.get(piece.0 as usize)? & free;
        let mut best: Option<((u32, u64), usize, SocketAddr)> = None;
        while candidates != 0 {
            let at = candidates.trailing_zeros() as usize;
            candidates &= candidates - 1;
            let Some(p) = self.parents[at].as_ref() else {
                continue;
            };
            // Least busy first; ties broken differently on every node, or all nodes would
            // crowd the same parent (the one with the lowest id).
            let key = (p.in_flight, self.spread(p.addr));
            if best.is_none_or(|(k, ..)| key < k) {
                best = Some((key, at, p.addr));
            }
        }
        best.map(|(_, at, node)| (at, node))
    }
}

/// Parent `slot` now holds `piece` (`added`) or no longer does.
fn note_holder(
    holding: &mut [u64],
    held: &mut PieceSet,
    piece: PieceIndex,
    slot: usize,
    added: bool,
) {
    let Some(mask) = holding.get_mut(piece.0 as usize) else {
        return;
    };
    if added {
        *mask |= 1 << slot;
        held.insert(piece);
    } else {
        *mask &= !(1 << slot);
        if *mask == 0 {
            held.remove(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(pieces: u64) -> PieceLayout {
        PieceLayout::new(pieces << 20, shoal_proto::piece::PIECE_SIZE).unwrap()
    }

    fn parent(id: u64, count: u32, pieces: impl IntoIterator<Item = u32>) -> Parent {
        let mut set = PieceSet::empty(count);
        pieces.into_iter().for_each(|i| set.insert(PieceIndex(i)));
        Parent {
            addr: peer(id),
            pieces: set,
        }
    }

    fn peer(id: u64) -> SocketAddr {
        SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 7000))
    }

    /// A planner without the overall cap on requests (tested on its own).
    fn planner(pieces: u64) -> (Planner, Instant) {
        let now = Instant::now();
        let config = PlannerConfig {
            max_in_flight: u32::MAX,
            ..PlannerConfig::default()
        };
        let mut p = Planner::new(config, layout(pieces), NodeId(99), now);
        p.hashes_known(pieces as u32);
        (p, now)
    }

    #[test]
    fn streams_the_window_in_order_and_spreads_load() {
        let (mut p, now) = planner(32);
        p.offer(vec![parent(1, 32, 0..32), parent(2, 32, 0..32)]);
        let reqs = p.next_requests(now);
        assert_eq!(reqs.len(), 8, "two parents, four each");
        let pieces: Vec<u32> = reqs
            .iter()
            .map(|r| match r {
                Request::Peer { piece, .. } => piece.0,
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            pieces,
            (0..8).collect::<Vec<_>>(),
            "the window comes first and in order"
        );
        let to_1 = reqs
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Request::Peer { parent, .. } if *parent == peer(1)
                )
            })
            .count();
        assert_eq!(to_1, 4);
        assert!(
            p.next_requests(now).is_empty(),
            "every parent is at its limit"
        );
        p.done(now, PieceIndex(0));
        assert_eq!(p.next_requests(now).len(), 1);
    }

    fn asked(reqs: &[Request]) -> Vec<u32> {
        let mut pieces: Vec<u32> = reqs
            .iter()
            .map(|r| match r {
                Request::Peer { piece, .. } | Request::Registry { piece } => piece.0,
            })
            .collect();
        pieces.sort_unstable();
        pieces
    }

    #[test]
    fn fed_stripes_wait_for_their_streams_while_they_send() {
        let (mut p, now) = planner(16);
        p.offer((1..=4).map(|id| parent(id, 16, 0..16)).collect());
        // Stripes 0 and 1 of 4 come on streams.
        p.feed(now, 4, &[0, 1]);
        let first = asked(&p.next_requests(now));
        assert!(
            first.iter().all(|i| i % 4 >= 2),
            "only the unfed stripes are asked for: {first:?}"
        );
        assert_eq!(first, [2, 3, 6, 7, 10, 11, 14, 15]);
        for i in &first {
            p.done(now, PieceIndex(*i));
        }
        // Stripe 0 keeps sending; stripe 1 falls silent.
        let stall = PlannerConfig::default().stripe_stall;
        let later = now + stall / 2;
        p.pushed(later, PieceIndex(0));
        assert!(p.next_requests(later).is_empty(), "both streams are live");
        assert!(!p.all_fed(later), "stripes 2 and 3 are not fed");
        let mut all = Planner::new(PlannerConfig::default(), layout(16), NodeId(1), now);
        all.feed(now, 4, &[0, 1, 2, 3]);
        assert!(all.all_fed(now) && !all.all_fed(now + stall));
        let silent = now + stall + Duration::from_millis(1);
        assert_eq!(
            asked(&p.next_requests(silent)),
            [1, 5, 9, 13],
            "a silent stream's stripe is asked of parents"
        );
        assert_eq!(p.in_flight(), 4);
        // A piece that came on the stream after it was asked for is had once.
        p.pushed(silent, PieceIndex(5));
        p.done(silent, PieceIndex(5));
        assert_eq!(p.in_flight(), 3);
        // Stripe 0's stream ends: its pieces are asked for at once.
        p.unfeed(0);
        assert_eq!(asked(&p.next_requests(silent)), [4, 8, 12]);
        assert!(!p.have().contains(PieceIndex(1)));
        assert!(p.have().contains(PieceIndex(0)) && p.have().contains(PieceIndex(5)));
    }

    #[test]
    fn beyond_the_window_the_rarest_piece_first() {
        let (mut p, now) = planner(20);
        let all_but_15 = || (0..20).filter(|i| *i != 15);
        p.offer(vec![
            parent(1, 20, 0..20),
            parent(2, 20, all_but_15()),
            parent(3, 20, all_but_15()),
        ]);
        let reqs = p.next_requests(now);
        assert_eq!(reqs.len(), 12);
        let beyond: Vec<u32> = reqs
            .iter()
            .filter_map(|r| match r {
                Request::Peer { piece, .. } if piece.0 >= 8 => Some(piece.0),
                _ => None,
            })
            .collect();
        assert_eq!(
            beyond.first(),
            Some(&15),
            "piece 15 has one holder: it goes first. {reqs:?}"
        );
    }

    #[test]
    fn bad_parents_are_dropped_failed_ones_rested() {
        let (mut p, now) = planner(4);
        p.offer(vec![parent(1, 4, 0..4), parent(2, 4, 0..4)]);
        let reqs = p.next_requests(now);
        let Request::Peer {
            parent: first,
            piece,
        } = reqs[0]
        else {
            panic!()
        };
        p.failed(now, piece, Failure::BadData);
        for r in &reqs[1..] {
            if let Request::Peer { piece, .. } = r {
                p.failed(now, *piece, Failure::Unavailable);
            }
        }
        let other = if first == peer(1) { peer(2) } else { peer(1) };
        // Right now: the banned one never, the other is resting.
        assert!(p.next_requests(now).is_empty());
        let later = now + Duration::from_secs(6);
        let reqs = p.next_requests(later);
        assert!(!reqs.is_empty());
        assert!(
            reqs.iter()
                .all(|r| matches!(r, Request::Peer { parent, .. } if *parent == other)),
            "{reqs:?}"
        );
    }

    #[test]
    fn a_busy_parent_rests_briefly_a_failed_one_longer() {
        let (mut p, now) = planner(4);
        p.offer(vec![parent(1, 4, 0..4)]);
        for r in p.next_requests(now) {
            if let Request::Peer { piece, .. } = r {
                p.failed(now, piece, Failure::Busy);
            }
        }
        assert!(p.next_requests(now).is_empty(), "resting");
        let soon = now + PlannerConfig::default().rest_busy + Duration::from_millis(1);
        let reqs = p.next_requests(soon);
        assert!(!reqs.is_empty(), "asked again soon after a busy answer");
        for r in reqs {
            if let Request::Peer { piece, .. } = r {
                p.failed(soon, piece, Failure::Unavailable);
            }
        }
        let later = soon + PlannerConfig::default().rest_busy + Duration::from_millis(1);
        assert!(
            p.next_requests(later).is_empty(),
            "a failure rests it longer"
        );
    }

    #[test]
    fn falls_back_to_the_registry_when_progress_stalls_or_the_swarm_gives_up() {
        let (mut p, now) = planner(4);
        p.offer(vec![parent(1, 4, [0, 1])]);
        let reqs = p.next_requests(now);
        assert_eq!(reqs.len(), 2, "pieces 2 and 3 wait for the seed: {reqs:?}");
        assert!(reqs.iter().all(|r| matches!(r, Request::Peer { .. })));
        p.registry_only();
        let reqs = p.next_requests(now);
        assert_eq!(
            reqs,
            vec![
                Request::Registry {
                    piece: PieceIndex(2)
                },
                Request::Registry {
                    piece: PieceIndex(3)
                }
            ]
        );

        let (mut p, now) = planner(2);
        p.offer(vec![parent(1, 2, [0, 1])]);
        assert_eq!(p.next_requests(now).len(), 2);
        // The parent never answers: requests time out, and after the stall the registry.
        let later = now + Duration::from_secs(11);
        let reqs = p.next_requests(later);
        assert_eq!(
            reqs,
            vec![
                Request::Registry {
                    piece: PieceIndex(0)
                },
                Request::Registry {
                    piece: PieceIndex(1)
                }
            ]
        );
        p.done(later, PieceIndex(0));
        p.done(later, PieceIndex(1));
        assert!(p.is_complete());
    }

    #[test]
    fn a_stall_sends_the_window_to_the_registry_and_a_dead_swarm_everything() {
        let (mut p, now) = planner(20);
        p.offer(vec![parent(1, 20, 0..20)]);
        assert_eq!(p.next_requests(now).len(), 4, "per_parent requests");
        // Nothing arrives: the requests time out, the parent rests, and the window (the
        // next 8 pieces the client needs) comes from the registry; the rest waits.
        let stalled = now + Duration::from_secs(11);
        let reqs = p.next_requests(stalled);
        let expected: Vec<Request> = (0..8)
            .map(|i| Request::Registry {
                piece: PieceIndex(i),
            })
            .collect();
        assert_eq!(reqs, expected);
        for i in 0..8 {
            p.done(stalled, PieceIndex(i));
        }
        p.streamed_to(8);
        // The parent is back from its rest and serves again.
        let rested = stalled + Duration::from_secs(6);
        let reqs = p.next_requests(rested);
        assert_eq!(reqs.len(), 4);
        assert!(reqs.iter().all(|r| matches!(r, Request::Peer { .. })));
        // Still no peer delivered anything after twice the stall: all from the registry.
        let dead = now + Duration::from_secs(21);
        let reqs = p.next_requests(dead);
        assert_eq!(reqs.len(), 8, "the 8 pieces not in flight: {reqs:?}");
        assert!(reqs.iter().all(|r| matches!(r, Request::Registry { .. })));
    }

    #[test]
    fn requests_in_flight_are_capped_overall() {
        let now = Instant::now();
        let mut p = Planner::new(PlannerConfig::default(), layout(40), NodeId(1), now);
        p.hashes_known(40);
        p.offer((1..=8).map(|id| parent(id, 40, 0..40)).collect());
        let cap = PlannerConfig::default().max_in_flight as usize;
        assert_eq!(p.next_requests(now).len(), cap);
        assert!(p.next_requests(now).is_empty());
        p.done(now, PieceIndex(0));
        assert_eq!(p.next_requests(now).len(), 1, "one done, one more");
    }

    #[test]
    fn pieces_without_a_known_hash_wait() {
        let now = Instant::now();
        let mut p = Planner::new(PlannerConfig::default(), layout(4), NodeId(1), now);
        p.offer(vec![parent(1, 4, 0..4)]);
        assert!(p.next_requests(now).is_empty());
        p.hashes_known(2);
        let reqs = p.next_requests(now);
        assert_eq!(reqs.len(), 2);
        // The supernode is gone: the pieces that cannot be checked come from the registry.
        p.hashes_final();
        let reqs = p.next_requests(now);
        assert_eq!(
            reqs,
            vec![
                Request::Registry {
                    piece: PieceIndex(2)
                },
                Request::Registry {
                    piece: PieceIndex(3)
                }
            ]
        );
    }

    #[test]
    fn without_a_supernode_a_parent_that_fails_hands_its_pieces_to_the_registry() {
        let now = Instant::now();
        let mut p = Planner::new(PlannerConfig::default(), layout(4), NodeId(1), now);
        p.hashes_known(4);
        p.offer(vec![parent(1, 4, [0, 1, 2, 3]), parent(2, 4, [0, 1])]);
        p.hashes_final();
        let reqs = p.next_requests(now);
        let to_1: Vec<PieceIndex> = reqs
            .iter()
            .filter_map(|r| match r {
                Request::Peer { parent, piece } if *parent == peer(1) => Some(*piece),
                _ => None,
            })
            .collect();
        assert!(to_1.contains(&PieceIndex(2)) && to_1.contains(&PieceIndex(3)));
        for piece in to_1 {
            p.failed(now, piece, Failure::Unavailable);
        }
        // Parent 1 left: pieces 2 and 3 (only it had them) come from the registry at
        // once, not after a stall; 0 and 1 still from parent 2.
        let reqs = p.next_requests(now);
        assert!(
            reqs.contains(&Request::Registry {
                piece: PieceIndex(2)
            }) && reqs.contains(&Request::Registry {
                piece: PieceIndex(3)
            }),
            "{reqs:?}"
        );
        assert!(
            !reqs
                .iter()
                .any(|r| matches!(r, Request::Peer { parent, .. } if *parent == peer(1))),
            "{reqs:?}"
        );
    }

    #[test]
    fn stale_parents_are_forgotten_banned_ones_stay_banned() {
        let (mut p, now) = planner(20);
        p.offer(vec![parent(1, 20, 0..20), parent(2, 20, 0..20)]);
        let reqs = p.next_requests(now);
        let Request::Peer { parent: bad, piece } = reqs[0] else {
            panic!()
        };
        p.failed(now, piece, Failure::BadData);
        for r in &reqs[1..] {
            if let Request::Peer { piece, .. } = r {
                p.done(now, *piece);
            }
        }
        // Parent 3 alone for a few offers: 1 and 2 are forgotten, and piece 12 (which
        // only they held) is no longer planned.
        for _ in 0..FORGET_AFTER_OFFERS {
            p.offer(vec![parent(3, 20, (0..20).filter(|i| *i != 12))]);
        }
        assert_eq!(p.parents.iter().flatten().count(), 1);
        assert_eq!(p.parent_at.len(), 1);
        let reqs = p.next_requests(now);
        assert_eq!(reqs.len(), 4, "per_parent requests to parent 3: {reqs:?}");
        assert!(
            reqs.iter()
                .all(|r| matches!(r, Request::Peer { parent, piece } if *parent == peer(3) && piece.0 != 12)),
            "{reqs:?}"
        );
        // The parent that sent bad data is never taken back, whatever the supernode says.
        p.offer(vec![parent(1, 20, 0..20), parent(2, 20, 0..20)]);
        let more = p.next_requests(now);
        assert!(!more.is_empty(), "the good one is back");
        assert!(
            more.iter()
                .all(|r| matches!(r, Request::Peer { parent, .. } if *parent != bad)),
            "{more:?}"
        );
    }

    #[test]
    fn offers_that_do_not_fit_the_layout_are_ignored() {
        let (mut p, now) = planner(4);
        p.offer(vec![parent(1, 100, 0..100)]);
        assert!(
            p.next_requests(now)
                .iter()
                .all(|r| matches!(r, Request::Registry { .. }))
        );
    }
}
