//! How a blob is cut into pieces, and how a piece is checked.
//!
//! A blob of `len` bytes is cut into pieces of `piece_size` bytes (the last one shorter).
//! Each piece has a BLAKE3 hash; a node checks every piece it receives against the hash the
//! supernode gave it, never against anything the sending peer says.
//!
//! # Piece size: 1 MiB, smaller for blobs under 128 MiB
//! - Hashing is not the limit at any size considered: BLAKE3 runs at about 4.2 GB/s on one
//!   core here (TESTBED.md), about 0.25 ms per 1 MiB piece, against the 0.65 GB/s a QUIC
//!   connection moves (1.6 ms per 1 MiB piece).
//! - Smaller pieces spread a blob over more parents sooner (a node can upload a piece as soon
//!   as it has it), which is what makes a swarm fast; a 1 MiB piece takes 84 ms to cross a
//!   100 mbit link, so a node becomes a source within a tenth of a second of starting.
//! - Larger pieces cost fewer requests and announcements: 1 MiB pieces make 1,024 pieces and
//!   32 KiB of hashes for a 1 GiB blob, which fits one control frame, and a request per
//!   1.6 ms per connection at full QUIC speed is cheap.
//! - A blob under 128 MiB is cut into about [`SMALL_BLOB_PIECES`] pieces (none under
//!   64 KiB): a piece is passed on only once it is whole and a node uploads to several
//!   peers at once, so each hop of the swarm costs a few piece-times, and in a blob of a few
//!   pieces the hops are most of the pull. `shoal sim`, 40 nodes x 16 MiB in 2 layers at
//!   25 mbit: p50 2.73x S/B with 1 MiB pieces, 1.28x with 64 KiB; 100 nodes x 64 MiB in 2
//!   layers at 50 mbit: 1.63x -> 1.29x.
//!
//! Layouts with other piece sizes (powers of two from 64 KiB to 64 MiB) are accepted, so the
//! size can change without a protocol change.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The piece size shoal uses for blobs of 128 MiB and more.
pub const PIECE_SIZE: u32 = 1 << 20;
/// A blob under 128 MiB is cut into 65 to this many pieces (fewer when pieces would be
/// under 64 KiB).
pub const SMALL_BLOB_PIECES: u64 = 128;
const MIN_PIECE_SIZE: u32 = 64 << 10;
const MAX_PIECE_SIZE: u32 = 64 << 20;
/// More pieces than this (16 TiB at 1 MiB) is refused: it bounds every per-piece table.
pub const MAX_PIECES: u32 = 1 << 24;

/// The position of a piece in its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PieceIndex(pub u32);

impl fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "piece {}", self.0)
    }
}

/// Why a layout or a piece position is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("piece size {0} is not a power of two between 64 KiB and 64 MiB")]
    BadPieceSize(u32),
    #[error("blob of {len} bytes would have more than {MAX_PIECES} pieces")]
    TooManyPieces { len: u64 },
    #[error("{index} is past the last piece ({count} pieces)")]
    IndexOutOfRange { index: PieceIndex, count: u32 },
}

/// How a blob of a given length is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceLayout {
    blob_len: u64,
    piece_size: u32,
}

impl PieceLayout {
    /// A checked layout; both numbers may come from the network.
    pub fn new(blob_len: u64, piece_size: u32) -> Result<Self, LayoutError> {
        if !piece_size.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&piece_size)
        {
            return Err(LayoutError::BadPieceSize(piece_size));
        }
        if blob_len.div_ceil(u64::from(piece_size)) > u64::from(MAX_PIECES) {
            return Err(LayoutError::TooManyPieces { len: blob_len });
        }
        Ok(Self {
            blob_len,
            piece_size,
        })
    }

    /// The layout shoal uses for a blob of `blob_len` bytes: the smallest power of two that
    /// cuts it into at most [`SMALL_BLOB_PIECES`] pieces, within 64 KiB and [`PIECE_SIZE`].
    pub fn for_blob(blob_len: u64) -> Result<Self, LayoutError> {
        let size = blob_len
            .div_ceil(SMALL_BLOB_PIECES)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX)
            .clamp(u64::from(MIN_PIECE_SIZE), u64::from(PIECE_SIZE));
        // Clamped to at most PIECE_SIZE, a u32.
        Self::new(blob_len, size as u32)
    }

    pub fn blob_len(&self) -> u64 {
        self.blob_len
    }

    pub fn piece_size(&self) -> u32 {
        self.piece_size
    }

    /// Number of pieces (0 for an empty blob).
    pub fn count(&self) -> u32 {
        // Bounded by MAX_PIECES in `new`.
        self.blob_len.div_ceil(u64::from(self.piece_size)) as u32
    }

    /// The byte range of a piece.
    pub fn range(&self, index: PieceIndex) -> Result<Range<u64>, LayoutError> {
        if index.0 >= self.count() {
            return Err(LayoutError::IndexOutOfRange {
                index,
                count: self.count(),
            });
        }
        let start = u64::from(index.0) * u64::from(self.piece_size);
        Ok(start..(start + u64::from(self.piece_size)).min(self.blob_len))
    }

    /// The length of a piece.
    pub fn len_of(&self, index: PieceIndex) -> Result<u32, LayoutError> {
        // A piece is at most `piece_size` (a u32) long.
        self.range(index).map(|r| (r.end - r.start) as u32)
    }

    /// The piece holding byte `offset`, if the blob has that byte.
    pub fn piece_at(&self, offset: u64) -> Option<PieceIndex> {
        (offset < self.blob_len).then(|| PieceIndex((offset / u64::from(self.piece_size)) as u32))
    }

    /// Every piece, in order.
    pub fn pieces(&self) -> impl Iterator<Item = PieceIndex> {
        (0..self.count()).map(PieceIndex)
    }
}

/// The BLAKE3 hash of one piece.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PieceHash(pub [u8; 32]);

impl PieceHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Whether `bytes` are the piece this hash names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.matches_chunks(&[bytes])
    }

    /// Whether the piece made of these chunks, in order, is the one this hash names.
    ///
    /// BLAKE3 hashes several 1 KiB chunks at once (SIMD) only when an update holds them:
    /// fed packet-sized pieces (about 1.2 KB) it ran at 0.9 GB/s instead of 6 (criterion,
    /// `benches/core.rs`). Small chunks are therefore gathered into 64 KiB first.
    pub fn matches_chunks<B: AsRef<[u8]>>(&self, chunks: &[B]) -> bool {
        const GATHER: usize = 64 << 10;
        let mut hasher = blake3::Hasher::new();
        let mut gathered: Vec<u8> = Vec::new();
        for c in chunks.iter().map(AsRef::as_ref) {
            if c.len() >= GATHER {
                hasher.update(&gathered);
                gathered.clear();
                hasher.update(c);
                continue;
            }
            if gathered.len() + c.len() > GATHER {
                hasher.update(&gathered);
                gathered.clear();
            }
            if gathered.capacity() == 0 {
                gathered.reserve_exact(GATHER);
            }
            gathered.extend_from_slice(c);
        }
        hasher.update(&gathered);
        // blake3::Hash compares in constant time; not needed here, but free.
        blake3::Hash::from_bytes(self.0) == hasher.finalize()
    }
}

impl fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceHash({})", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cuts_blobs_into_pieces() {
        let l = PieceLayout::new(2 * (1 << 20) + 5, PIECE_SIZE).unwrap();
        assert_eq!(l.count(), 3);
        assert_eq!(l.range(PieceIndex(2)).unwrap(), (2 << 20)..(2 << 20) + 5);
        assert_eq!(l.len_of(PieceIndex(0)).unwrap(), 1 << 20);
        assert!(matches!(
            l.range(PieceIndex(3)),
            Err(LayoutError::IndexOutOfRange { .. })
        ));
        assert_eq!(l.piece_at((1 << 20) - 1), Some(PieceIndex(0)));
        assert_eq!(l.piece_at(2 * (1 << 20) + 5), None);
        assert_eq!(PieceLayout::for_blob(0).unwrap().count(), 0);
        assert_eq!(PieceLayout::for_blob(1).unwrap().count(), 1);
    }

    #[test]
    fn small_blobs_get_smaller_pieces() {
        let size = |len: u64| PieceLayout::for_blob(len).unwrap().piece_size();
        assert_eq!(size(1), 64 << 10);
        assert_eq!(size(1 << 20), 64 << 10);
        assert_eq!(size(8 << 20), 64 << 10);
        assert_eq!(size((8 << 20) + 1), 128 << 10);
        assert_eq!(size(64 << 20), 512 << 10);
        assert_eq!(size(128 << 20), PIECE_SIZE);
        assert_eq!(size(1 << 40), PIECE_SIZE);
        assert!(PieceLayout::for_blob(u64::MAX).is_err());
        for len in [(8 << 20) + 1, 100 << 20, (128 << 20) - 1] {
            let count = u64::from(PieceLayout::for_blob(len).unwrap().count());
            assert!(
                (SMALL_BLOB_PIECES / 2 + 1..=SMALL_BLOB_PIECES).contains(&count),
                "{len}: {count}"
            );
        }
    }

    #[test]
    fn refuses_hostile_layouts() {
        for size in [0, 1, 3, 1000, 32 << 10, 128 << 20, u32::MAX] {
            assert!(PieceLayout::new(10, size).is_err(), "{size}");
        }
        assert!(matches!(
            PieceLayout::new(u64::MAX, PIECE_SIZE),
            Err(LayoutError::TooManyPieces { .. })
        ));
        assert!(
            PieceLayout::new(u64::from(MAX_PIECES) * u64::from(PIECE_SIZE), PIECE_SIZE).is_ok()
        );
        assert!(
            PieceLayout::new(
                u64::from(MAX_PIECES) * u64::from(PIECE_SIZE) + 1,
                PIECE_SIZE
            )
            .is_err()
        );
        let l = PieceLayout::for_blob(10).unwrap();
        assert!(l.range(PieceIndex(u32::MAX)).is_err());
    }

    #[test]
    fn hashes_check_bytes() {
        let h = PieceHash::of(b"piece");
        assert!(h.matches(b"piece"));
        assert!(!h.matches(b"piecf"));
    }

    proptest! {
        #[test]
        fn pieces_tile_the_blob(len in 0u64..(1 << 40), shift in 16u32..=26) {
            let l = PieceLayout::new(len, 1 << shift).unwrap();
            let mut next = 0;
            for i in [0, l.count() / 2, l.count().saturating_sub(1)] {
                if let Ok(r) = l.range(PieceIndex(i)) {
                    prop_assert!(r.start < r.end && r.end <= len);
                    prop_assert_eq!(l.piece_at(r.start), Some(PieceIndex(i)));
                    prop_assert_eq!(l.piece_at(r.end - 1), Some(PieceIndex(i)));
                }
            }
            if l.count() > 0 {
                next = l.range(PieceIndex(l.count() - 1)).unwrap().end;
            }
            prop_assert_eq!(next, len);
        }
    }
}
