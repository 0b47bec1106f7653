//! shoal's shared vocabulary, with no I/O.
//!
//! # Layout
//! - [`digest`]: [`BlobDigest`], the content address of a blob (`sha256:<64 hex>`), parsed
//!   strictly because every digest arrives from the network.
//! - [`piece`]: how a blob is cut into pieces ([`PieceLayout`], [`PieceIndex`]) and how a
//!   piece is checked ([`PieceHash`], BLAKE3); the piece size and why.
//! - [`group`]: hash groups ([`GroupHash`]): the supernode names a group of piece hashes
//!   by one hash, and parents pass the piece hashes on with the pieces.
//! - [`message`]: the messages between daemons and supernodes and between daemons, with
//!   their limits; the protocol version ([`message::ALPN`]).
//! - [`frame`]: length-prefixed framing with a hard size limit, and a sans-IO decoder.
#![forbid(unsafe_code)]

pub mod digest;
pub mod frame;
pub mod group;
pub mod message;
pub mod piece;

pub use digest::{BlobDigest, DigestError};
pub use group::GroupHash;
pub use piece::{LayoutError, PieceHash, PieceIndex, PieceLayout};
