//! The OCI distribution surface of shoal: what containerd asks, and how we ask registries.
//!
//! # Layout
//! - [`route`]: parses `/v2/<name>/{manifests,blobs}/<reference>` and the `ns=` parameter
//!   into typed, validated values ([`Route`], [`RepositoryName`], [`Registry`]).
//! - [`range`]: the single `Range` header shoal answers (`bytes=N-`, `bytes=N-M`, suffixes).
//! - [`upstream`]: the HTTP client to registries: per-registry TLS roots, plain HTTP for
//!   insecure registries, redirects without leaking `Authorization`, deadlines on connect,
//!   headers and stalled bodies, one retry on 429/5xx.
//! - [`oci_error`]: OCI error bodies for answers shoal writes itself.
#![forbid(unsafe_code)]

pub mod oci_error;
pub mod range;
pub mod route;
pub mod upstream;

pub use oci_error::{OciError, OciErrorCode};
pub use range::{ByteRange, RangeError};
pub use route::{Reference, Registry, RepositoryName, Route, RouteError};
pub use upstream::{ForwardHeaders, Upstream, UpstreamConfig, UpstreamError};
