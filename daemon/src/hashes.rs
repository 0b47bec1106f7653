//! The hashes a node knows of a blob it pulls over the swarm, with no I/O.
//!
//! The supernode sends a hash per group of pieces ([`shoal_proto::group`]); a group's piece
//! hashes come from a parent, with the first piece of the group the node fetches, and are
//! kept once they match the group hash. A piece is checked against its own hash, so no byte
//! a peer sent is trusted unless it traces back to the supernode.

use std::sync::Arc;

use shoal_proto::message::PieceSet;
use shoal_proto::{GroupHash, PieceHash, PieceIndex, PieceLayout};

/// Why a piece from a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("the hash group of {0} is not known yet")]
    GroupUnknown(PieceIndex),
    #[error("the peer sent no hashes for the group of {0}")]
    NoHashes(PieceIndex),
    #[error("the {got} hashes the peer sent for the group of {piece} do not match its group hash")]
    GroupMismatch { piece: PieceIndex, got: usize },
    #[error("{0} does not match its hash")]
    PieceMismatch(PieceIndex),
}

/// Group hashes from the supernode, and the piece hashes of the groups a peer sent and
/// that matched.
#[derive(Debug, Clone)]
pub struct BlobHashes {
    layout: PieceLayout,
    groups: Vec<GroupHash>,
    /// By group: its piece hashes, once known.
    pieces: Vec<Option<Arc<[PieceHash]>>>,
}

impl BlobHashes {
    pub fn new(layout: PieceLayout) -> Self {
        Self {
            layout,
            groups: Vec::new(),
            pieces: Vec::new(),
        }
    }

    pub fn layout(&self) -> PieceLayout {
        self.layout
    }

    /// Group hashes the supernode sent so far (the first ones, in order).
    pub fn groups_known(&self) -> u32 {
        self.groups.len() as u32
    }

    /// Pieces whose group hash is known: those a node may fetch from peers.
    pub fn pieces_known(&self) -> u32 {
        self.layout.pieces_in_groups(self.groups_known())
    }

    /// Adds the group hashes of a supernode's answer that carries them from group `from`
    /// on; returns whether any were new. An answer that starts past the known ones (a gap)
    /// or runs past the blob's groups adds nothing.
    pub fn add_groups(&mut self, from: u32, more: Vec<GroupHash>) -> bool {
        let (from, have) = (from as usize, self.groups.len());
        let end = from.saturating_add(more.len());
        if from > have || end > self.layout.groups() as usize || end <= have {
            return false;
        }
        self.groups.extend(more.into_iter().skip(have - from));
        self.pieces.resize(self.groups.len(), None);
        true
    }

    /// Whether a request for `piece` should ask for its group's piece hashes.
    pub fn lacks_group_of(&self, piece: PieceIndex) -> bool {
        self.group_of(piece).is_none()
    }

    /// The piece hashes of the group of `piece`, if known.
    pub fn group_of(&self, piece: PieceIndex) -> Option<Arc<[PieceHash]>> {
        let group = self.layout.group_of(piece) as usize;
        self.pieces.get(group)?.clone()
    }

    /// The hash of `piece`, if its group's piece hashes are known.
    pub fn piece_hash(&self, piece: PieceIndex) -> Option<PieceHash> {
        let start = self.layout.group_range(self.layout.group_of(piece)).start;
        self.group_of(piece)?
            .get((piece.0 - start) as usize)
            .copied()
    }

    /// The hash `piece` must have: the one known, or else from `offered` (its group's piece
    /// hashes as a peer sent them), which are kept once they match the group hash.
    pub fn expected(
        &mut self,
        piece: PieceIndex,
        offered: Vec<PieceHash>,
    ) -> Result<PieceHash, HashError> {
        if let Some(hash) = self.piece_hash(piece) {
            return Ok(hash);
        }
        let group = self.layout.group_of(piece);
        let Some(group_hash) = self.groups.get(group as usize) else {
            return Err(HashError::GroupUnknown(piece));
        };
        if offered.is_empty() {
            return Err(HashError::NoHashes(piece));
        }
        if !group_hash.matches(&offered) {
            return Err(HashError::GroupMismatch {
                piece,
                got: offered.len(),
            });
        }
        self.pieces[group as usize] = Some(offered.into());
        Ok(self
            .piece_hash(piece)
            .expect("a group that matched has every piece hash"))
    }

    /// Checks a piece a peer sent (its bytes in chunks), with the group's piece hashes it
    /// sent when asked (else empty).
    pub fn check<B: AsRef<[u8]>>(
        &mut self,
        piece: PieceIndex,
        chunks: &[B],
        offered: Vec<PieceHash>,
    ) -> Result<(), HashError> {
        if self.expected(piece, offered)?.matches_chunks(chunks) {
            Ok(())
        } else {
            Err(HashError::PieceMismatch(piece))
        }
    }
}

/// What a flight on the swarm path serves peers while it runs: the pieces it checked, and
/// the hashes that go with them.
#[derive(Debug)]
pub struct Checked {
    pub have: PieceSet,
    pub hashes: BlobHashes,
}

impl Checked {
    pub fn new(layout: PieceLayout) -> Self {
        Self {
            have: PieceSet::empty(layout.count()),
            hashes: BlobHashes::new(layout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of 64 KiB: 10 in groups of one, or 512 in groups of 4.
    fn layout(pieces: u64) -> PieceLayout {
        PieceLayout::new(pieces << 16, 64 << 10).unwrap()
    }

    fn piece_hashes(n: u32) -> Vec<PieceHash> {
        (0..n).map(|i| PieceHash::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn group_hashes_are_added_where_the_known_ones_end() {
        let l = layout(5);
        let g = |i: u8| GroupHash([i; 32]);
        let mut h = BlobHashes::new(l);
        assert!(h.add_groups(0, vec![g(0), g(1)]));
        assert_eq!(h.groups, vec![g(0), g(1)]);
        // An answer overlapping what is known adds only the rest.
        assert!(h.add_groups(1, vec![g(1), g(2)]));
        assert_eq!(h.groups, vec![g(0), g(1), g(2)]);
        // Nothing new, a gap, or past the blob: nothing added.
        assert!(!h.add_groups(3, vec![]));
        assert!(!h.add_groups(1, vec![g(1)]));
        assert!(!h.add_groups(4, vec![g(4)]));
        assert!(!h.add_groups(3, vec![g(3), g(4), g(5)]));
        assert!(!h.add_groups(u32::MAX, vec![g(4)]));
        assert_eq!(h.groups_known(), 3);
        assert!(h.add_groups(3, vec![g(3), g(4)]));
        assert_eq!(h.pieces_known(), 5);
    }

    #[test]
    fn a_group_s_hashes_are_taken_only_when_they_match_its_group_hash() {
        let l = layout(512);
        assert_eq!(l.group_pieces(), 4);
        let pieces = piece_hashes(512);
        let groups: Vec<GroupHash> = pieces.chunks(4).map(GroupHash::of).collect();
        let mut h = BlobHashes::new(l);
        h.add_groups(0, groups[..2].to_vec());
        assert_eq!(h.pieces_known(), 8);
        let p = PieceIndex;
        assert!(h.lacks_group_of(p(5)));
        assert_eq!(
            h.expected(p(8), pieces[8..12].to_vec()),
            Err(HashError::GroupUnknown(p(8)))
        );
        assert_eq!(h.expected(p(5), vec![]), Err(HashError::NoHashes(p(5))));
        let mut forged = pieces[4..8].to_vec();
        forged[1] = PieceHash::of(b"forged");
        assert_eq!(
            h.expected(p(5), forged),
            Err(HashError::GroupMismatch {
                piece: p(5),
                got: 4
            })
        );
        assert_eq!(
            h.expected(p(5), pieces[4..7].to_vec()),
            Err(HashError::GroupMismatch {
                piece: p(5),
                got: 3
            }),
            "a group's hashes are all of them"
        );
        assert!(h.lacks_group_of(p(5)), "nothing kept from a bad list");
        assert_eq!(h.expected(p(5), pieces[4..8].to_vec()), Ok(pieces[5]));
        assert!(!h.lacks_group_of(p(4)) && !h.lacks_group_of(p(7)));
        assert!(h.lacks_group_of(p(3)));
        // Once known, what a peer sends is not needed.
        assert_eq!(h.expected(p(6), vec![]), Ok(pieces[6]));
        assert_eq!(h.piece_hash(p(7)), Some(pieces[7]));
        assert_eq!(h.group_of(p(4)).as_deref(), Some(&pieces[4..8]));
    }

    #[test]
    fn a_piece_is_checked_against_its_own_hash() {
        let l = layout(10);
        let bytes: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
        let pieces: Vec<PieceHash> = bytes.iter().map(|b| PieceHash::of(b)).collect();
        let mut h = BlobHashes::new(l);
        h.add_groups(0, pieces.iter().map(|p| GroupHash::of(&[*p])).collect());
        let p = PieceIndex;
        assert_eq!(h.check(p(3), &[&bytes[3]], vec![pieces[3]]), Ok(()));
        assert_eq!(
            h.check(p(4), &[&bytes[5]], vec![pieces[4]]),
            Err(HashError::PieceMismatch(p(4)))
        );
        // The group's hash matched, so it is kept even though the bytes did not.
        assert_eq!(h.check(p(4), &[&bytes[4]], vec![]), Ok(()));
    }
}
