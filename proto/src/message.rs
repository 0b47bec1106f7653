//! The messages between daemons and supernodes, and between daemons.
//!
//! Control (daemon ↔ supernode) and piece transfer (daemon ↔ daemon) run over QUIC with the
//! ALPN [`ALPN`]; a protocol change gets a new ALPN, so old and new nodes refuse each other
//! at the handshake instead of misreading each other. Every message is a length-prefixed
//! frame ([`crate::frame`]); a piece's bytes follow their [`PeerReply::Piece`] header raw.
//!
//! Decoded messages are checked with `validate` before use: sizes of lists and strings, and
//! piece sets against their blob's layout.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::digest::BlobDigest;
use crate::group::{GroupHash, MAX_GROUP_PIECES};
use crate::piece::{PieceHash, PieceIndex, PieceLayout};

/// The protocol version, as negotiated by ALPN. 3: blobs under 128 MiB have smaller pieces
/// ([`PieceLayout::for_blob`]), and a node serves a complete blob by that layout. 4: a task
/// carries only the hashes the node does not know yet ([`FromSupernode::Task`]). 5: a piece
/// set may travel as the gaps between its pieces ([`PieceSet`]), and a task's parents name
/// only pieces the asker lacks. 6: an answer leaves out the blob's digest and layout (the
/// node knows them from its `Want`: the layout follows from the length, [`Task`]), parents
/// are named by address alone ([`Parent`]), and so is a peer reported for bad data; a
/// node's announcements travel as frames on one stream ([`StreamKind::Announce`]). 7: a
/// task carries a hash per group of pieces instead of per piece, and a parent sends a
/// group's piece hashes with a piece when asked ([`crate::group`]). 8: a task may name who
/// feeds the node each stripe of the blob ([`Task::feeds`]), and a node asks its feed for
/// a stripe's pieces on one stream ([`StreamKind::Stripe`], [`StripeRequest`]).
pub const ALPN: &[u8] = b"shoal/8";

/// QUIC send priority of control streams, above piece streams (0) on the same connection.
pub const CONTROL_PRIORITY: i32 = 1;

/// The first byte of every bidirectional stream says what it carries: a control request
/// (to a supernode), a piece request (to any node, the seed included), or a node's
/// announcements to a supernode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    Control = 1,
    Piece = 2,
    /// `Have` frames, one after another, for as long as the node is connected: a node
    /// announces new pieces every few milliseconds, and a stream each was the supernode's
    /// cost (`cargo bench --bench announce`).
    Announce = 3,
    /// A [`StripeRequest`], then the holder sends the stripe's pieces the asker lacks, each
    /// as a [`PeerReply::Piece`] and its bytes, in order and as it gets them, until it has
    /// sent the whole stripe or the asker stops reading.
    Stripe = 4,
}

impl StreamKind {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Control),
            2 => Some(Self::Piece),
            3 => Some(Self::Announce),
            4 => Some(Self::Stripe),
            _ => None,
        }
    }
}

const MAX_NAME: usize = 255;
const MAX_ZONE: usize = 64;
const MAX_CREDENTIAL: usize = 16 * 1024;
const MAX_PARENTS: usize = 64;
/// Largest frame on a piece stream: a reply with a whole group's piece hashes.
pub const MAX_PEER_FRAME: u32 = 16 * 1024;
/// Most stripes a blob is cut into ([`Task::feeds`]).
pub const MAX_STRIPES: u32 = 64;

/// A node's identity in the swarm (also in its certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// Where the seed gets a blob: the registry, repository, and the asking client's
/// credentials (an `Authorization` value), never logged or stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub registry: String,
    pub repository: String,
    pub authorization: Option<String>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Which pieces of a blob a node holds: one bit per piece. On the wire, the bits or the
/// gaps between the pieces held, whichever is shorter ([`WireSet`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "WireSet", try_from = "WireSet")]
pub struct PieceSet {
    count: u32,
    bits: Vec<u8>,
}

/// A [`PieceSet`] as sent: one bit per piece (128 bytes for a 1 GiB blob), or, for a set
/// of few pieces, each piece's distance from the one before (a byte or two each).
#[derive(Serialize, Deserialize)]
enum WireSet {
    Bits { count: u32, bits: Vec<u8> },
    Gaps { count: u32, gaps: Vec<u32> },
}

impl From<PieceSet> for WireSet {
    fn from(set: PieceSet) -> Self {
        match set.gap_bytes() {
            Some(_) => WireSet::Gaps {
                count: set.count,
                gaps: set.gaps().collect(),
            },
            None => WireSet::Bits {
                count: set.count,
                bits: set.bits,
            },
        }
    }
}

impl TryFrom<WireSet> for PieceSet {
    type Error = String;

    fn try_from(wire: WireSet) -> Result<Self, String> {
        match wire {
            WireSet::Bits { count, bits } => Ok(PieceSet { count, bits }),
            WireSet::Gaps { count, gaps } => {
                if count > crate::piece::MAX_PIECES {
                    return Err(format!(
                        "a set of {count} pieces (at most {})",
                        crate::piece::MAX_PIECES
                    ));
                }
                if gaps.len() > count as usize {
                    return Err(format!("{} pieces in a set of {count}", gaps.len()));
                }
                let mut set = PieceSet::empty(count);
                let mut at: u64 = 0;
                for (n, gap) in gaps.into_iter().enumerate() {
                    if n > 0 && gap == 0 {
                        return Err("a piece named twice in a set".into());
                    }
                    at += u64::from(gap);
                    if at >= u64::from(count) {
                        return Err(format!("piece {at} in a set of {count}"));
                    }
                    set.insert(PieceIndex(at as u32));
                }
                Ok(set)
            }
        }
    }
}

impl PieceSet {
    /// Each piece's distance from the one before (the first one's from 0).
    fn gaps(&self) -> impl Iterator<Item = u32> + '_ {
        let mut last = 0;
        self.iter().map(move |piece| {
            let gap = piece.0 - last;
            last = piece.0;
            gap
        })
    }

    /// The gaps' bytes on the wire when they are shorter than the bits (or there are no
    /// bits), else `None`: the set is sent as bits.
    fn gap_bytes(&self) -> Option<usize> {
        let mut bytes = 0;
        for gap in self.gaps() {
            bytes += varint_len(gap as usize);
            if bytes >= self.bits.len() && !self.bits.is_empty() {
                return None;
            }
        }
        Some(bytes)
    }

    /// The bytes this set takes in a message, without building its wire form.
    pub fn wire_len(&self) -> usize {
        let body = match self.gap_bytes() {
            Some(bytes) => varint_len(self.len() as usize) + bytes,
            None => varint_len(self.bits.len()) + self.bits.len(),
        };
        // The variant's index, then the count.
        1 + varint_len(self.count as usize) + body
    }

    /// An empty set for a blob of `count` pieces.
    pub fn empty(count: u32) -> Self {
        Self {
            count,
            bits: vec![0; (count as usize).div_ceil(8)],
        }
    }

    pub fn full(count: u32) -> Self {
        let mut s = Self::empty(count);
        (0..count).for_each(|i| s.insert(PieceIndex(i)));
        s
    }

    /// Whether the set fits a blob of `count` pieces (length, and no bits past the end).
    pub fn fits(&self, count: u32) -> bool {
        let len_ok = self.bits.len() == (count as usize).div_ceil(8);
        let tail_ok = match (count % 8, self.bits.last()) {
            (0, _) | (_, None) => true,
            (used, Some(last)) => last >> used == 0,
        };
        self.count == count && len_ok && tail_ok
    }

    pub fn contains(&self, i: PieceIndex) -> bool {
        i.0 < self.count
            && self
                .bits
                .get(i.0 as usize / 8)
                .is_some_and(|b| b & (1 << (i.0 % 8)) != 0)
    }

    /// Adds a piece; indices past the set's end are ignored (callers check layouts first).
    pub fn insert(&mut self, i: PieceIndex) {
        if i.0 >= self.count {
            return;
        }
        if let Some(b) = self.bits.get_mut(i.0 as usize / 8) {
            *b |= 1 << (i.0 % 8);
        }
    }

    /// Whether every piece is in.
    pub fn is_full(&self) -> bool {
        self.len() == self.count
    }

    pub fn len(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|b| *b == 0)
    }

    /// How many of this set's pieces `other` lacks (sets of different blobs: all of them).
    pub fn count_not_in(&self, other: &PieceSet) -> u32 {
        if other.count != self.count || other.bits.len() != self.bits.len() {
            return self.len();
        }
        // Eight bytes at a time: the scheduler runs this for every holder it considers.
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let (a, b) = (self.bits.chunks_exact(8), other.bits.chunks_exact(8));
        let tail: u32 = a
            .remainder()
            .iter()
            .zip(b.remainder())
            .map(|(a, b)| (a & !b).count_ones())
            .sum();
        a.zip(b)
            .map(|(a, b)| (word(a) & !word(b)).count_ones())
            .sum::<u32>()
            + tail
    }

    /// This set's pieces that `other` lacks (all of them when `other` is of another size).
    pub fn without(&self, other: &PieceSet) -> PieceSet {
        let mut out = self.clone();
        if other.count == self.count {
            for (a, b) in out.bits.iter_mut().zip(&other.bits) {
                *a &= !b;
            }
        }
        out
    }

    /// Removes a piece (indices past the end are ignored).
    pub fn remove(&mut self, i: PieceIndex) {
        if i.0 >= self.count {
            return;
        }
        if let Some(b) = self.bits.get_mut(i.0 as usize / 8) {
            *b &= !(1 << (i.0 % 8));
        }
    }

    /// This set's pieces that are in neither `a` nor `b`, lowest first; a set of another
    /// size counts as empty. Skips eight pieces at a time, for sets that are mostly full or
    /// mostly empty.
    pub fn iter_without<'a>(
        &'a self,
        a: &'a PieceSet,
        b: &'a PieceSet,
    ) -> impl Iterator<Item = PieceIndex> + 'a {
        let byte = |s: &PieceSet, i: usize| {
            if s.count == self.count {
                s.bits.get(i).copied().unwrap_or(0)
            } else {
                0
            }
        };
        let bytes = self.bits.iter().enumerate();
        bytes.flat_map(move |(i, own)| ones(i, own & !byte(a, i) & !byte(b, i)))
    }

    /// How `self` became `new`, leaving out pieces in `except`: each piece added (`true`)
    /// or removed (`false`). A set of another size than `new` counts as empty.
    pub fn changes<'a>(
        &'a self,
        new: &'a PieceSet,
        except: &'a PieceSet,
    ) -> impl Iterator<Item = (PieceIndex, bool)> + 'a {
        let byte = |s: &PieceSet, i: usize| {
            if s.count == new.count {
                s.bits.get(i).copied().unwrap_or(0)
            } else {
                0
            }
        };
        (0..new.bits.len()).flat_map(move |i| {
            let (old, now) = (byte(self, i), new.bits[i]);
            let mut m = (old ^ now) & !byte(except, i);
            std::iter::from_fn(move || {
                (m != 0).then(|| {
                    let bit = m.trailing_zeros();
                    m &= m - 1;
                    (PieceIndex(i as u32 * 8 + bit), now & (1 << bit) != 0)
                })
            })
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = PieceIndex> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, b)| ones(i, *b))
    }
}

/// The pieces whose bits are set in byte `i` of a set.
fn ones(i: usize, mut byte: u8) -> impl Iterator<Item = PieceIndex> {
    std::iter::from_fn(move || {
        (byte != 0).then(|| {
            let bit = byte.trailing_zeros();
            byte &= byte - 1;
            PieceIndex(i as u32 * 8 + bit)
        })
    })
}

/// A node the supernode suggests as a source of pieces, named by the address it serves
/// pieces on: a node dials parents by address and knows them by it, so their ids do not
/// travel (at 10,000 nodes a random 64-bit id, 10 bytes in every parent, was a fifth of
/// the supernode's answer bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub addr: SocketAddr,
    pub pieces: PieceSet,
}

/// How busy a node's upload is: pieces it is sending now, of at most `slots` at once (over
/// that it answers "busy"). The supernode hands out full nodes last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploads {
    pub sending: u16,
    pub slots: u16,
}

impl Uploads {
    pub fn is_full(&self) -> bool {
        self.sending >= self.slots
    }
}

/// From a daemon to its supernode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSupernode {
    /// First message on a connection: who the node is and where peers reach it.
    Hello {
        node: NodeId,
        zone: String,
        peer_addr: SocketAddr,
    },
    /// The node wants a blob of `len` bytes (as the registry said) and knows the hashes of
    /// its first `known_groups` hash groups: send its task. With `hold` (the node has every
    /// piece of those groups: it waits for hashes), while the seed is still fetching, the
    /// supernode holds the answer (briefly) until it has more groups than that. Without,
    /// it answers at once: a node with pieces to fetch needs fresh parents, not hashes, and
    /// a group takes the seed a while (`shoal sim`, 1,000 x 1 GiB: 1.38x S/B holding
    /// every question, 1.29x with groups of one piece).
    ///
    /// With `fed`, every stripe of the blob comes to the node on a stream
    /// ([`Task::feeds`]): the answer names no parents. `feeds_tag` is the [`feeds_tag`] of
    /// the feeds the node has: the answer names them only when they changed.
    Want {
        digest: BlobDigest,
        len: u64,
        origin: Origin,
        known_groups: u32,
        hold: bool,
        fed: bool,
        feeds_tag: u32,
    },
    /// The node now holds these pieces (batched), and is this busy uploading.
    Have {
        digest: BlobDigest,
        pieces: Vec<PieceIndex>,
        uploads: Uploads,
    },
    /// The parent at `peer` (the address the supernode named it by) sent a piece that
    /// failed its hash.
    BadPiece {
        digest: BlobDigest,
        peer: SocketAddr,
        piece: PieceIndex,
    },
    /// The node dropped the blob (evicted, or gave up).
    Drop { digest: BlobDigest },
    /// The node holds this whole blob (announced when it connects, so that a restarted
    /// supernode learns the swarm again).
    Holding { digest: BlobDigest, len: u64 },
}

/// From a supernode to a daemon: the answer to a `Want`, on the stream that carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromSupernode {
    Task(Task),
    /// The supernode cannot schedule this blob (e.g. the registry refused the seed).
    Refused {
        reason: String,
    },
}

/// The hashes of a blob's hash groups `groups_from..groups_from + groups.len()` (the seed
/// publishes a group's hash once it has hashed the group's last piece; a node is sent those
/// beyond the `known_groups` of its `Want`, so that a swarm asking every few milliseconds
/// does not fill the supernode's link with hashes it has), and parents for pieces the node
/// lacks. The piece hashes of a group come from the parents ([`crate::group`]).
///
/// Neither the blob's digest nor its layout travel: the node named the digest and length
/// in its `Want` on the same stream, and the layout is [`PieceLayout::for_blob`] of that
/// length (at 10,000 nodes asking every few tens of milliseconds, those 41 bytes were a
/// tenth of what the supernode's link carried for answers). Check a task against the
/// layout with [`Task::validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub groups_from: u32,
    pub groups: Vec<GroupHash>,
    pub parents: Vec<Parent>,
    /// With stripes (the supernode's `--stripes`): per stripe `s` of `feeds.len()`, the
    /// node that sends this node the stripe's pieces (piece `i` is in stripe
    /// `i % feeds.len()`), unasked, as it gets them ([`StreamKind::Stripe`]). Empty
    /// without stripes. `None` when they are the ones the node's `Want` named by their
    /// [`feeds_tag`]: a node that asks every 200 ms is not sent the same addresses each
    /// time, and a lost answer loses no move (`shoal sim --stripes 4`, 10,000 x 1 GiB
    /// on 3 supernodes: 56 MiB of answers with them every time, and p50 1.11x S/B).
    pub feeds: Option<Vec<SocketAddr>>,
}

/// A short tag of a list of feeds: 0 for none. A node names the feeds it has by their tag.
pub fn feeds_tag(feeds: &[SocketAddr]) -> u32 {
    if feeds.is_empty() {
        return 0;
    }
    let bytes = postcard::to_allocvec(feeds).expect("addresses serialize");
    let hash = blake3::hash(&bytes);
    let tag = u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"));
    tag.max(1)
}

/// The first frame of a [`StreamKind::Stripe`] stream: send me the pieces of `digest` in
/// stripe `stripe` of `stripes` that are not in `have`, as you get them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRequest {
    pub digest: BlobDigest,
    pub stripe: u32,
    pub stripes: u32,
    pub have: PieceSet,
}

impl StripeRequest {
    /// Checks the request against the blob's layout.
    pub fn validate(&self, layout: PieceLayout) -> Result<(), InvalidMessage> {
        if !(2..=MAX_STRIPES).contains(&self.stripes) || self.stripe >= self.stripes {
            return Err(InvalidMessage::BadStripe {
                stripe: self.stripe,
                stripes: self.stripes,
            });
        }
        if !self.have.fits(layout.count()) {
            return Err(InvalidMessage::PieceSetMismatch {
                count: layout.count(),
            });
        }
        Ok(())
    }

    /// Whether `piece` is in the asked stripe.
    pub fn holds(&self, piece: PieceIndex) -> bool {
        piece.0 % self.stripes == self.stripe
    }
}

/// From a daemon to a peer, on a fresh stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// A piece; with `hashes`, also the piece hashes of its group (the asker does not know
    /// them yet).
    Piece {
        digest: BlobDigest,
        index: PieceIndex,
        hashes: bool,
    },
}

/// A peer's answer; after `Piece`, exactly `len` raw bytes follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerReply {
    /// `hashes`: the piece hashes of the piece's group, in order, when asked for (else
    /// empty); the asker checks them against the group hash its supernode sent.
    Piece {
        index: PieceIndex,
        len: u32,
        hashes: Vec<PieceHash>,
    },
    /// The peer does not have that piece (any more).
    Missing,
    /// The peer is at its upload limit: ask someone else.
    Busy,
}

/// Why a decoded message is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("{field} is {len} bytes long, over the limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("piece set does not fit a blob of {count} pieces")]
    PieceSetMismatch { count: u32 },
    #[error("{hashes} group hashes from group {from} on, past the blob's {count} groups")]
    TooManyHashes {
        hashes: usize,
        from: u32,
        count: u32,
    },
    #[error("{0} is past the blob's last piece")]
    PieceOutOfRange(PieceIndex),
    #[error("stripe {stripe} of {stripes} (stripes are 2 to {MAX_STRIPES})")]
    BadStripe { stripe: u32, stripes: u32 },
}

fn limit(field: &'static str, len: usize, max: usize) -> Result<(), InvalidMessage> {
    if len > max {
        Err(InvalidMessage::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

impl ToSupernode {
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Hello { zone, .. } => limit("zone", zone.len(), MAX_ZONE),
            Self::Want { origin, .. } => {
                limit("registry", origin.registry.len(), MAX_NAME)?;
                limit("repository", origin.repository.len(), MAX_NAME)?;
                limit(
                    "authorization",
                    origin.authorization.as_ref().map_or(0, String::len),
                    MAX_CREDENTIAL,
                )
            }
            Self::Have { pieces, .. } => {
                limit("have list", pieces.len(), crate::piece::MAX_PIECES as usize)
            }
            Self::BadPiece { .. } | Self::Drop { .. } | Self::Holding { .. } => Ok(()),
        }
    }
}

impl PeerReply {
    /// Checks the lists against the protocol's limits; the asker checks a piece's hashes
    /// against its group.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Piece { hashes, .. } => {
                limit("piece hashes", hashes.len(), MAX_GROUP_PIECES as usize)
            }
            Self::Missing | Self::Busy => Ok(()),
        }
    }
}

impl FromSupernode {
    /// Checks what can be checked without the blob's layout (a task's lists against the
    /// protocol's limits); a task is checked against the layout with [`Task::validate`].
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Task(task) => {
                limit(
                    "group hashes",
                    task.groups.len(),
                    crate::piece::MAX_PIECES as usize,
                )?;
                limit("parents", task.parents.len(), MAX_PARENTS)?;
                limit(
                    "feeds",
                    task.feeds.as_ref().map_or(0, Vec::len),
                    MAX_STRIPES as usize,
                )
            }
            Self::Refused { reason } => limit("reason", reason.len(), 4096),
        }
    }
}

impl Task {
    /// Checks the task against the layout of the blob it answers for: group hashes past the
    /// last group, and piece sets of another size, are refused.
    pub fn validate(&self, layout: PieceLayout) -> Result<(), InvalidMessage> {
        let count = layout.count();
        let (hashes, from, groups) = (self.groups.len(), self.groups_from, layout.groups());
        if hashes as u64 + u64::from(from) > u64::from(groups) {
            return Err(InvalidMessage::TooManyHashes {
                hashes,
                from,
                count: groups,
            });
        }
        limit("parents", self.parents.len(), MAX_PARENTS)?;
        let feeds = self.feeds.as_ref().map_or(0, Vec::len);
        limit("feeds", feeds, MAX_STRIPES as usize)?;
        if feeds == 1 {
            return Err(InvalidMessage::BadStripe {
                stripe: 0,
                stripes: 1,
            });
        }
        match self.parents.iter().find(|p| !p.pieces.fits(count)) {
            Some(_) => Err(InvalidMessage::PieceSetMismatch { count }),
            None => Ok(()),
        }
    }
}

/// The framed length of a `FromSupernode::Task` answer with `new_hashes` group hashes,
/// these parents and these feeds (if any are sent), without building it (`shoal sim`
/// counts its supernodes' answer bytes so).
pub fn task_frame_len(
    groups_from: u32,
    new_hashes: usize,
    parents: &[Parent],
    feeds: Option<&[SocketAddr]>,
) -> usize {
    let empty = FromSupernode::Task(Task {
        groups_from,
        ..Task::default()
    });
    // An empty list is one length byte; a longer one, its length's varint and its items.
    let body = size(&empty) - 2
        + varint_len(new_hashes)
        + new_hashes * std::mem::size_of::<GroupHash>()
        + varint_len(parents.len())
        + parents
            .iter()
            .map(|p| size(&p.addr) + p.pieces.wire_len())
            .sum::<usize>()
        + feeds.map_or(0, |f| {
            varint_len(f.len()) + f.iter().map(size).sum::<usize>()
        });
    crate::frame::HEADER_LEN + body
}

/// Bytes of postcard's varint of `n`.
fn varint_len(n: usize) -> usize {
    ((usize::BITS - n.leading_zeros()).max(1) as usize).div_ceil(7)
}

/// The postcard size of a value.
fn size<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).expect("shoal messages always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_s_length_is_known_without_building_it() {
        let layout = PieceLayout::for_blob(1 << 30).unwrap();
        let parent = |n: u64, pieces: &[u32]| Parent {
            addr: format!("10.0.{}.{}:65002", n % 256, (n >> 40) % 256)
                .parse()
                .unwrap(),
            pieces: set(layout.count(), pieces),
        };
        let feeds: Vec<SocketAddr> = (0..4).map(|n| parent(n, &[]).addr).collect();
        for (from, new, parents, feeds) in [
            (0, 0, vec![], None),
            (1, 0, vec![], Some(&[][..])),
            (3, 1, vec![parent(1, &[0])], Some(&feeds[..2])),
            (
                100,
                200,
                (0..8).map(|n| parent(n << 40, &[1, 500, 1023])).collect(),
                Some(&feeds[..]),
            ),
        ] {
            let task = FromSupernode::Task(Task {
                groups_from: from,
                groups: vec![GroupHash([7; 32]); new],
                parents: parents.clone(),
                feeds: feeds.map(<[SocketAddr]>::to_vec),
            });
            assert_eq!(
                task_frame_len(from, new, &parents, feeds),
                crate::frame::encode(&task).len(),
                "{new} hashes, {} parents",
                parents.len()
            );
        }
    }

    #[test]
    fn a_piece_set_s_length_is_known_without_building_it() {
        // Sets of every density, so that both forms and the point between them are met.
        let mut seed = 1u64;
        for count in [0, 1, 7, 8, 9, 100, 1024, 5000] {
            for density in [0, 1, 3, 10, 30, 60, 100] {
                let mut set = PieceSet::empty(count);
                for i in 0..count {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if (seed >> 33) % 100 < density {
                        set.insert(PieceIndex(i));
                    }
                }
                let sent = postcard::to_allocvec(&set).unwrap();
                assert_eq!(
                    set.wire_len(),
                    sent.len(),
                    "{count} pieces, {density}% held"
                );
                let back: PieceSet = postcard::from_bytes(&sent).unwrap();
                assert_eq!(back, set);
            }
        }
    }

    #[test]
    fn piece_sets_check_their_size() {
        let mut s = PieceSet::empty(10);
        s.insert(PieceIndex(9));
        s.insert(PieceIndex(10)); // ignored: past the end
        assert!(s.contains(PieceIndex(9)) && !s.contains(PieceIndex(10)));
        assert_eq!(s.len(), 1);
        assert!(s.fits(10));
        assert!(!s.fits(17));
        assert!(
            !PieceSet {
                count: 10,
                bits: vec![0, 0b0000_0100]
            }
            .fits(10),
            "a bit past the last piece"
        );
        assert_eq!(PieceSet::full(10).iter().count(), 10);
    }

    #[test]
    fn a_piece_set_travels_in_its_shorter_form() {
        let encoded = |s: &PieceSet| postcard::to_allocvec(s).unwrap();
        let back = |b: &[u8]| postcard::from_bytes::<PieceSet>(b);
        for pieces in [
            vec![],
            vec![0],
            vec![5, 6, 1023],
            (0..1024).step_by(3).collect::<Vec<_>>(),
            (0..1024).collect(),
        ] {
            let s = set(1024, &pieces);
            let bytes = encoded(&s);
            assert_eq!(back(&bytes).unwrap(), s, "{pieces:?}");
            // Never longer than the bits and their header.
            assert!(
                bytes.len() <= 128 + 6,
                "{} bytes for {pieces:?}",
                bytes.len()
            );
        }
        assert!(
            encoded(&set(1024, &[5, 6, 1023])).len() < 12,
            "few pieces: gaps"
        );
        let empty = encoded(&PieceSet::empty(0));
        assert_eq!(back(&empty).unwrap(), PieceSet::empty(0));
    }

    #[test]
    fn a_bad_set_of_gaps_is_refused() {
        let gaps = |count: u32, gaps: Vec<u32>| {
            let bytes = postcard::to_allocvec(&WireSet::Gaps { count, gaps }).unwrap();
            postcard::from_bytes::<PieceSet>(&bytes)
        };
        assert!(gaps(10, vec![3, 4]).is_ok());
        assert!(gaps(10, vec![3, 7]).is_err(), "piece 10 of 10");
        assert!(gaps(10, vec![3, 0]).is_err(), "piece 3 twice");
        assert!(
            gaps(2, vec![0, 1, 1]).is_err(),
            "more pieces than the set has"
        );
        assert!(
            gaps(u32::MAX, vec![]).is_err(),
            "no allocation of a huge set"
        );
        assert!(gaps(10, vec![u32::MAX, u32::MAX]).is_err(), "no overflow");
    }

    #[test]
    fn without_leaves_out_the_other_set_s_pieces() {
        let a = set(20, &[1, 2, 3, 19]);
        assert_eq!(a.without(&set(20, &[2, 19])), set(20, &[1, 3]));
        assert_eq!(
            a.without(&set(8, &[1])),
            a,
            "another blob's set takes nothing"
        );
    }

    fn set(count: u32, pieces: &[u32]) -> PieceSet {
        let mut s = PieceSet::empty(count);
        pieces.iter().for_each(|i| s.insert(PieceIndex(*i)));
        s
    }

    proptest::proptest! {
        #[test]
        fn iter_without_and_changes_agree_with_contains(
            count in 1u32..200,
            picks in proptest::collection::vec((0u32..200, 0u8..4), 0..300),
        ) {
            let pick = |k: u8| set(count, &picks.iter().filter(|(_, w)| *w == k).map(|(i, _)| *i).collect::<Vec<_>>());
            let (own, a, b) = (pick(0), pick(1), pick(2));
            let slow: Vec<PieceIndex> = own.iter().filter(|i| !a.contains(*i) && !b.contains(*i)).collect();
            proptest::prop_assert_eq!(own.iter_without(&a, &b).collect::<Vec<_>>(), slow);
            let not_in_a = own.iter().filter(|i| !a.contains(*i)).count() as u32;
            proptest::prop_assert_eq!(own.count_not_in(&a), not_in_a);
            let mut applied = own.clone();
            let none = PieceSet::empty(0);
            for (i, added) in own.changes(&a, &none) {
                proptest::prop_assert_eq!(added, a.contains(i));
                if added { applied.insert(i) } else { applied.remove(i) }
            }
            proptest::prop_assert_eq!(&applied, &a);
            let slow: Vec<(PieceIndex, bool)> = (0..count)
                .map(PieceIndex)
                .filter(|i| own.contains(*i) != a.contains(*i) && !b.contains(*i))
                .map(|i| (i, a.contains(i)))
                .collect();
            proptest::prop_assert_eq!(own.changes(&a, &b).collect::<Vec<_>>(), slow);
        }
    }

    #[test]
    fn sets_of_another_size_count_as_empty() {
        let (own, other) = (set(10, &[1, 2]), set(12, &[1]));
        assert_eq!(own.iter_without(&other, &other).count(), 2);
        assert_eq!(PieceSet::empty(0).changes(&own, &other).count(), 2);
        assert_eq!(own.changes(&set(10, &[2, 3]), &set(10, &[3])).count(), 1);
    }

    #[test]
    fn credentials_are_not_printed() {
        let o = Origin {
            registry: "r".into(),
            repository: "a".into(),
            authorization: Some("Bearer s3cret".into()),
        };
        assert!(!format!("{o:?}").contains("s3cret"));
    }

    #[test]
    fn tasks_are_checked_against_their_layout() {
        let layout = PieceLayout::new(3 << 20, crate::piece::PIECE_SIZE).unwrap();
        let parent = |pieces| Parent {
            addr: "127.0.0.1:1".parse().unwrap(),
            pieces,
        };
        let ok = Task {
            groups_from: 0,
            groups: vec![GroupHash([b'a'; 32])],
            parents: vec![parent(PieceSet::empty(3))],
            feeds: None,
        };
        assert!(ok.validate(layout).is_ok());
        assert!(FromSupernode::Task(ok).validate().is_ok());
        let tail = Task {
            groups_from: 1,
            groups: vec![GroupHash([b'b'; 32]); 2],
            ..Task::default()
        };
        assert!(tail.validate(layout).is_ok());
        for (from, n) in [(0, 4), (2, 2), (u32::MAX, 1)] {
            let bad = Task {
                groups_from: from,
                groups: vec![GroupHash([b'a'; 32]); n],
                ..Task::default()
            };
            assert!(
                matches!(
                    bad.validate(layout),
                    Err(InvalidMessage::TooManyHashes { .. })
                ),
                "{from} + {n}"
            );
        }
        let bad = Task {
            groups_from: 0,
            groups: vec![],
            parents: vec![parent(PieceSet::empty(100))],
            feeds: None,
        };
        assert!(matches!(
            bad.validate(layout),
            Err(InvalidMessage::PieceSetMismatch { .. })
        ));
        let crowded = FromSupernode::Task(Task {
            parents: vec![parent(PieceSet::empty(3)); MAX_PARENTS + 1],
            ..Task::default()
        });
        assert!(matches!(
            crowded.validate(),
            Err(InvalidMessage::TooLong {
                field: "parents",
                ..
            })
        ));
    }

    #[test]
    fn feeds_and_stripe_requests_are_checked() {
        let layout = PieceLayout::new(3 << 20, crate::piece::PIECE_SIZE).unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let feeds = |n| Task {
            feeds: Some(vec![addr; n]),
            ..Task::default()
        };
        for n in [0, 2, MAX_STRIPES as usize] {
            assert!(feeds(n).validate(layout).is_ok(), "{n} feeds");
            assert!(FromSupernode::Task(feeds(n)).validate().is_ok());
        }
        assert!(feeds(1).validate(layout).is_err(), "one stripe is none");
        let over = MAX_STRIPES as usize + 1;
        assert!(feeds(over).validate(layout).is_err());
        assert!(FromSupernode::Task(feeds(over)).validate().is_err());
        let request = |stripe, stripes, have| StripeRequest {
            digest: BlobDigest::of(b"blob"),
            stripe,
            stripes,
            have,
        };
        assert!(request(3, 4, PieceSet::empty(3)).validate(layout).is_ok());
        for (stripe, stripes) in [(0, 0), (0, 1), (4, 4), (0, MAX_STRIPES + 1)] {
            assert!(
                matches!(
                    request(stripe, stripes, PieceSet::empty(3)).validate(layout),
                    Err(InvalidMessage::BadStripe { .. })
                ),
                "{stripe} of {stripes}"
            );
        }
        assert!(matches!(
            request(0, 2, PieceSet::empty(4)).validate(layout),
            Err(InvalidMessage::PieceSetMismatch { .. })
        ));
        let other: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(feeds_tag(&[]), 0);
        assert_ne!(feeds_tag(&[addr, other]), 0);
        assert_ne!(feeds_tag(&[addr, other]), feeds_tag(&[other, addr]));
        assert_eq!(feeds_tag(&[addr, other]), feeds_tag(&[addr, other]));
        let odd = request(1, 2, PieceSet::empty(3));
        assert!(odd.holds(PieceIndex(1)) && odd.holds(PieceIndex(5)));
        assert!(!odd.holds(PieceIndex(0)));
    }

    #[test]
    fn a_piece_carries_at_most_a_group_of_hashes() {
        let reply = |n| PeerReply::Piece {
            index: PieceIndex(0),
            len: 1,
            hashes: vec![PieceHash::of(b"a"); n],
        };
        assert!(reply(MAX_GROUP_PIECES as usize).validate().is_ok());
        assert!(reply(MAX_GROUP_PIECES as usize + 1).validate().is_err());
        // The largest reply fits a peer frame.
        let len = crate::frame::encode(&reply(MAX_GROUP_PIECES as usize)).len();
        assert!(len <= MAX_PEER_FRAME as usize, "{len}");
    }
}
