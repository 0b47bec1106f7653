//! Hash groups: how a node learns piece hashes without the supernode sending each one.
//!
//! A blob's pieces are taken in groups of [`PieceLayout::group_pieces`] (a power of two,
//! so that a blob has about [`HASH_GROUPS`] groups). The supernode sends each node one
//! [`GroupHash`] per group, the hash of the group's piece hashes in order; a parent sends
//! the group's piece hashes along with a piece when the asker does not know them yet, and
//! the asker checks them against the group hash before it checks the piece against its
//! own. So a node never trusts a hash a peer sent unless it matches what the supernode
//! said, and the supernode's link carries 32 bytes per group instead of per piece.
//!
//! Why: at 10,000 nodes pulling 1 GiB (1,024 pieces), piece hashes were 313 of the
//! 466 MiB the supernode's link carried for answers (`shoal sim`, docs/benchmarks.md).
//! The cost: a piece can be fetched only once its whole group is hashed by the seed, so
//! the swarm lags the seed by up to a group. Hence groups of 8 pieces at 1 GiB (128
//! groups): `shoal sim`, 1,000 x 1 GiB at 1 Gbit/s, p50 / S/B by pieces per group: 1.29x
//! (1, as before groups), 1.26x (2), 1.30x (4), 1.29x (8), 1.33x (16), 1.36x (32); the
//! hashes are then 4 KiB per node instead of 32 KiB.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::piece::{PieceHash, PieceIndex, PieceLayout};

/// A blob is cut into about this many hash groups (fewer when it has fewer pieces).
pub const HASH_GROUPS: u32 = 128;
/// Most pieces in one group: bounds the hash list a parent sends with a piece (8 KiB).
pub const MAX_GROUP_PIECES: u32 = 256;

const CONTEXT: &str = "shoal 2026-12 piece hash group";

/// The hash of one group's piece hashes, in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupHash(pub [u8; 32]);

impl GroupHash {
    pub fn of(hashes: &[PieceHash]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        for h in hashes {
            hasher.update(&h.0);
        }
        Self(*hasher.finalize().as_bytes())
    }

    /// Whether `hashes` are the piece hashes this group hash names.
    pub fn matches(&self, hashes: &[PieceHash]) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(Self::of(hashes).0)
    }
}

impl fmt::Debug for GroupHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupHash({})", hex::encode(&self.0[..8]))
    }
}

impl PieceLayout {
    /// Pieces per hash group: the smallest power of two that makes at most
    /// [`HASH_GROUPS`] groups, at most [`MAX_GROUP_PIECES`].
    pub fn group_pieces(&self) -> u32 {
        self.count()
            .div_ceil(HASH_GROUPS)
            .max(1)
            .next_power_of_two()
            .min(MAX_GROUP_PIECES)
    }

    /// Number of hash groups (0 for an empty blob).
    pub fn groups(&self) -> u32 {
        self.count().div_ceil(self.group_pieces())
    }

    /// The group a piece belongs to.
    pub fn group_of(&self, index: PieceIndex) -> u32 {
        index.0 / self.group_pieces()
    }

    /// The pieces of group `group` (empty past the last group).
    pub fn group_range(&self, group: u32) -> Range<u32> {
        let size = self.group_pieces();
        let start = group.saturating_mul(size).min(self.count());
        start..start.saturating_add(size).min(self.count())
    }

    /// Pieces covered by the first `groups` groups.
    pub fn pieces_in_groups(&self, groups: u32) -> u32 {
        groups.saturating_mul(self.group_pieces()).min(self.count())
    }

    /// Groups whose every piece is among the first `pieces`.
    pub fn whole_groups(&self, pieces: u32) -> u32 {
        if pieces >= self.count() {
            self.groups()
        } else {
            pieces / self.group_pieces()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_blob_has_about_128_groups() {
        let l = |len: u64| PieceLayout::for_blob(len).unwrap();
        assert_eq!(l(1 << 30).group_pieces(), 8);
        assert_eq!(l(1 << 30).groups(), 128);
        assert_eq!(
            l(100 << 20).group_pieces(),
            1,
            "under 128 MiB: 128 pieces or fewer"
        );
        assert_eq!(l(0).groups(), 0);
        assert_eq!(l(1).group_pieces(), 1);
        assert_eq!(l(1).groups(), 1);
        // 1 TiB: 1,048,576 pieces in groups of 256.
        assert_eq!(l(1 << 40).group_pieces(), MAX_GROUP_PIECES);
        let odd = PieceLayout::new(129 << 20, 1 << 20).unwrap();
        assert_eq!((odd.group_pieces(), odd.groups()), (2, 65));
        assert_eq!(odd.group_range(64), 128..129);
        assert_eq!(odd.group_range(65), 129..129);
        assert_eq!(odd.group_range(u32::MAX), 129..129);
        assert_eq!(odd.whole_groups(127), 63);
        assert_eq!(odd.whole_groups(129), 65);
        assert_eq!(odd.pieces_in_groups(65), 129);
        assert_eq!(odd.pieces_in_groups(u32::MAX), 129);
    }

    #[test]
    fn a_group_hash_names_its_hashes_in_order() {
        let (a, b) = (PieceHash::of(b"a"), PieceHash::of(b"b"));
        let g = GroupHash::of(&[a, b]);
        assert!(g.matches(&[a, b]));
        assert!(!g.matches(&[b, a]));
        assert!(!g.matches(&[a]));
        assert!(!g.matches(&[a, b, b]));
        assert_ne!(
            GroupHash::of(&[a]).0,
            a.0,
            "a group of one is not its piece's hash"
        );
    }

    proptest! {
        #[test]
        fn groups_tile_the_pieces(len in 0u64..(1 << 40), shift in 16u32..=26) {
            let l = PieceLayout::new(len, 1 << shift).unwrap();
            prop_assert!(l.groups() <= HASH_GROUPS.max(l.count().div_ceil(MAX_GROUP_PIECES)));
            let mut next = 0;
            for g in [0, 1, l.groups() / 2, l.groups().saturating_sub(1)] {
                if g >= l.groups() {
                    continue;
                }
                let r = l.group_range(g);
                prop_assert!(!r.is_empty());
                prop_assert_eq!(l.group_of(PieceIndex(r.start)), g);
                prop_assert_eq!(l.group_of(PieceIndex(r.end - 1)), g);
            }
            if l.groups() > 0 {
                next = l.group_range(l.groups() - 1).end;
            }
            prop_assert_eq!(next, l.count());
        }
    }
}
