//! The real parts the end-to-end tests run: see `shoal::testbed`.

pub use shoal::testbed::*;
