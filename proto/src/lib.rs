//! shoal's shared vocabulary, with no I/O.
//!
//! # Layout
//! - [`digest`]: [`BlobDigest`], the content address of a blob (`sha256:<64 hex>`), parsed
//!   strictly because every digest arrives from the network.
//!
//! Piece layout, piece hashes and wire messages join this crate with the swarm.
#![forbid(unsafe_code)]

pub mod digest;

pub use digest::{BlobDigest, DigestError};
