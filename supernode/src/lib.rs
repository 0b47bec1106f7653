//! The supernode: it knows which node holds which pieces of which blob, and answers "where
//! do I get my next pieces?".
//!
//! # Layout
//! - [`scheduler`]: the sans-IO scheduling core. Events and the current time in, decisions
//!   out; no sockets, no clock of its own, so tests and `shoal sim` drive the same code.
#![forbid(unsafe_code)]

pub mod scheduler;

pub use scheduler::{Scheduler, SchedulerConfig};
