//! The `shoal` tool's library: test images, an embedded origin registry, and a client that
//! pulls through a mirror as containerd does. The demo, the end-to-end tests and the
//! benches share it.
//!
//! # Layout
//! - [`image`]: builds OCI images in memory (plain and gzip layers, config, manifest).
//! - [`registry`]: pushes images to a registry; pulls through a mirror checking digests.
//! - [`origin`]: an in-memory registry serving one image, counting the bytes it sends.
//! - [`demo`]: `shoal demo`, the main job on one machine.
//! - [`testbed`]: real registry, containerd and shoald processes for tests and benches.
//! - [`bench`]: `shoal bench mirror`, shoald's speed against a direct registry GET.
//! - [`bench_swarm`]: `shoal bench swarm`, piece transfer against raw QUIC, swarm latency.
//! - [`bench_scale`]: `shoal bench scale-out`, a real swarm of processes pulling one image.
//! - [`bench_netns`]: its `--netns` mode: every host in a namespace with capped bandwidth.
//! - [`bench_bt`]: its `bittorrent` baseline: aria2c clients and opentracker.
//! - [`netns`]: the namespaces, veths, bridge and tbf caps of `--netns`.
//! - [`node`]: the `shoal` binary as a shoald or supernode process of a bench swarm.
//! - [`tap`]: a counting TCP forwarder that measures registry egress.
//! - [`sim`]: `shoal sim`, thousands of simulated nodes on the real scheduler and planner.
//! - [`report`]: the results of scale-out runs: table, JSON, HTML with SVG plots.
//! - [`room`]: whether the machine has the disk and memory a bench run needs.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_bt;
pub mod bench_netns;
pub mod bench_scale;
pub mod bench_swarm;
pub mod demo;
pub mod image;
pub mod netns;
pub mod node;
pub mod origin;
pub mod registry;
pub mod report;
pub mod room;
pub mod sim;
pub mod tap;
pub mod testbed;
