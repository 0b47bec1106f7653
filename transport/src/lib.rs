//! shoal's transport between daemons and supernodes: QUIC with TLS 1.3 and mutual
//! authentication against one cluster CA. It knows nothing of registries or scheduling.
//!
//! # Layout
//! - [`ca`]: the cluster CA, node certificates, join tokens.
//! - [`endpoint`]: QUIC endpoints that present a node certificate and require one from the
//!   other side; sized UDP buffers; the peer's node id from its certificate.
//! - [`link`]: room on a node's upload link, measured.
//! - [`pieces`]: piece requests and answers over QUIC streams.
//! - [`rate`]: byte-rate limits for uploads and downloads.
//! - [`stripe`]: a stripe of a blob sent on one stream as its holder gets it.
#![forbid(unsafe_code)]

pub mod ca;
pub mod endpoint;
pub mod link;
pub mod pieces;
pub mod rate;
pub mod stripe;

pub use ca::{ClusterCa, JoinToken, NodeIdentity};
pub use endpoint::{Accepting, Endpoint, TransportError};
