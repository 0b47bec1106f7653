//! The supernode: it knows which node holds which pieces of which blob, answers "where do I
//! get my next pieces?", and seeds each blob from the registry once.
//!
//! # Layout
//! - [`scheduler`]: the sans-IO scheduling core. Events and the current time in, decisions
//!   out; no sockets, no clock of its own, so tests and `shoal sim` drive the same code.
//! - [`stripes`]: stripe trees, who forwards which stripe of a blob to whom (sans-IO; the
//!   scheduler keeps one per blob with `--stripes`, and names each node's feeds).
//! - [`seed`]: fetches a blob from the registry once, publishing piece hashes as they come.
//! - [`server`]: the drivers: QUIC control and seed pieces, the HTTP API, joining nodes.
#![forbid(unsafe_code)]

pub mod scheduler;
pub mod seed;
pub mod server;
pub mod stripes;

pub use scheduler::{Scheduler, SchedulerConfig};
pub use server::{Supernode, SupernodeConfig};
