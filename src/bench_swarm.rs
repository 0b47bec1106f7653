//! `shoal bench swarm`: the swarm's transfer speed against raw QUIC in the same run, and the
//! latency a small blob pays for going through the swarm.
//!
//! - one hop: a node fetches every piece of a blob from another node (the piece protocol,
//!   8 requests in flight on one connection), vs raw quinn moving the same bytes on one
//!   stream between the same two endpoints (same TLS, same socket buffers);
//! - small blobs: 1 MiB blobs GET directly from `docker-registry` vs through a shoald that
//!   is in a swarm (supernode in process: the seed fetches, the node takes the piece);
//! - memory: peak RSS (`VmHWM`, reset once the node holds the blob) of a shoald process
//!   that holds the big blob while `--peers` other shoald processes pull it at once.

use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use shoal_proto::message::NodeId;
use shoal_proto::{BlobDigest, PieceLayout};
use shoal_transport::pieces::{Found, GroupHashes, PieceLookup, fetch_piece, serve_pieces};
use shoal_transport::{ClusterCa, Endpoint};

use crate::image::{Image, LayerSpec};
use crate::report::flag_in;
use crate::testbed::Registry;

#[derive(Debug, Clone, clap::Args)]
pub struct SwarmBenchArgs {
    /// Bytes moved in the one-hop figures, in MiB
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    /// Runs of each one-hop figure (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Distinct 1 MiB blobs for the latency figures
    #[arg(long, default_value_t = 20)]
    pub small_blobs: usize,
    /// Peers pulling the big blob at once from a node that holds it (memory figure; 0 skips)
    #[arg(long, default_value_t = 8)]
    pub peers: usize,
}

impl SwarmBenchArgs {
    fn check(&self) -> anyhow::Result<()> {
        flag_in("--mib", self.mib, 1..=8192)?;
        flag_in("--runs", self.runs, 1..=100)?;
        flag_in("--small-blobs", self.small_blobs, 1..=10_000)?;
        // Each peer is a shoald process; 0 skips the figure.
        flag_in("--peers", self.peers, 0..=64)
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Raw quinn: `len` bytes on one unidirectional stream, written from one reused buffer.
async fn raw_quinn(sender: &Endpoint, receiver: &Endpoint, len: u64) -> anyhow::Result<Duration> {
    let addr = receiver.local_addr()?;
    let receiver = receiver.clone();
    let sink = tokio::spawn(async move {
        let (conn, _) = receiver.accept().await.context("no connection")?;
        let mut recv = conn.accept_uni().await?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            got += chunk.bytes.len() as u64;
        }
        anyhow::Ok(got)
    });
    let started = Instant::now();
    let (conn, _) = sender.connect(addr).await?;
    let mut send = conn.open_uni().await?;
    let buf = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let mut sent = 0u64;
    while sent < len {
        send.write_chunk(buf.clone()).await?;
        sent += buf.len() as u64;
    }
    send.finish()?;
    let got = sink.await??;
    let took = started.elapsed();
    anyhow::ensure!(got == sent, "raw quinn moved {got} of {sent} bytes");
    conn.close(0u32.into(), b"done");
    Ok(took)
}

/// The piece protocol: every 1 MiB piece of a `len`-byte blob, 8 requests in flight.
async fn one_hop(holder: &Endpoint, asker: &Endpoint, len: u64) -> anyhow::Result<Duration> {
    let layout = PieceLayout::new(len, shoal_proto::piece::PIECE_SIZE)?;
    let file = tempfile::tempfile()?;
    let chunk = vec![9u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        file.write_all_at(&chunk, pos)?;
        pos += chunk.len() as u64;
    }
    let file = Arc::new(file);
    let digest = BlobDigest::of(b"bench");
    let lookup: PieceLookup = Arc::new(move |d, i, _| {
        (*d == digest).then(|| {
            Some(Found {
                file: file.clone(),
                range: layout.range(i).ok()?,
                hashes: GroupHashes::None,
            })
        })?
    });
    let server = holder.clone();
    let serving = tokio::spawn(async move {
        if let Some((conn, _)) = server.accept().await {
            serve_pieces(
                conn,
                lookup,
                Arc::new(()),
                shoal_transport::pieces::UploadLimits::new(64, 0, 0),
            )
            .await;
        }
    });
    let started = Instant::now();
    let (conn, _) = asker.connect(holder.local_addr()?).await?;
    let mut moved = 0u64;
    let mut pieces = futures_util::stream::iter(layout.pieces())
        .map(|i| fetch_piece(&conn, digest, i, layout.len_of(i).unwrap_or(0), false))
        .buffer_unordered(8);
    while let Some(piece) = pieces.next().await {
        moved += piece?.len as u64;
    }
    drop(pieces);
    let took = started.elapsed();
    conn.close(0u32.into(), b"done");
    serving.abort();
    anyhow::ensure!(moved == len, "moved {moved} of {len} bytes");
    Ok(took)
}

pub async fn swarm(args: &SwarmBenchArgs) -> anyhow::Result<()> {
    args.check()?;
    let ca = ClusterCa::generate()?;
    let local = "127.0.0.1:0".parse()?;
    let len = (args.mib as u64) << 20;
    let (mut raw, mut hop) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let a = Endpoint::bind(local, &ca.issue(NodeId(1))?)?;
        let b = Endpoint::bind(local, &ca.issue(NodeId(2))?)?;
        raw.push(raw_quinn(&a, &b, len).await?);
        let a = Endpoint::bind(local, &ca.issue(NodeId(3))?)?;
        let b = Endpoint::bind(local, &ca.issue(NodeId(4))?)?;
        hop.push(one_hop(&a, &b, len).await?);
    }
    let (raw, hop) = (median(raw), median(hop));

    let dir = tempfile::tempdir()?;
    let registry = tokio::task::block_in_place(|| Registry::try_start(dir.path(), &[]))?;
    let client = reqwest::Client::new();
    let blobs: Vec<_> = (0..args.small_blobs)
        .map(|i| {
            Image::build(&[LayerSpec::Random { size: 1 << 20 }], 500 + i as u64).layers[0].clone()
        })
        .collect();
    for blob in &blobs {
        crate::registry::push_blob(&client, &registry.url(), "bench/swarm", blob, None).await?;
    }
    let sn = shoal_supernode::Supernode::start(shoal_supernode::SupernodeConfig {
        listen: local,
        api_listen: local,
        data_dir: dir.path().join("sn"),
        upstream: shoal_registry_proxy::UpstreamConfig {
            insecure: [registry.addr.parse()?].into_iter().collect(),
            ..Default::default()
        },
        stripes: 0,
    })
    .await?;
    let serve = shoal_daemon::config::ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.path().join("d")),
        insecure_registries: vec![registry.addr.clone()],
        supernodes: vec![sn.quic_addr.to_string()],
        peer_listen: Some("127.0.0.1:0".into()),
        join_token: Some(sn.join_token.to_string()),
        ..Default::default()
    };
    let daemon = shoal_daemon::Daemon::bind(&shoal_daemon::Config::resolve(serve, None)?)
        .await?
        .spawn()?;
    let mirror = daemon.url.clone();
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for blob in &blobs {
        let url = format!("{}/v2/bench/swarm/blobs/{}", registry.url(), blob.digest);
        let started = Instant::now();
        crate::registry::fetch_verified(&client, &url, &blob.digest).await?;
        direct.push(started.elapsed());
        let url = format!(
            "{mirror}/v2/bench/swarm/blobs/{}?ns={}",
            blob.digest, registry.addr
        );
        let started = Instant::now();
        crate::registry::fetch_verified(&client, &url, &blob.digest).await?;
        via.push(started.elapsed());
    }
    daemon.stop().await;
    let (direct, via) = (median(direct), median(via));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    let memory = if args.peers > 0 {
        Some(serving_memory(args, &registry, dir.path()).await?)
    } else {
        None
    };

    println!("| what | raw | shoal | ratio / added | target |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| one hop, {} MiB in 1 MiB pieces (8 in flight) vs one raw quinn stream | {:.2} GB/s | {:.2} GB/s | {:.2}x | >= 0.75x |",
        args.mib,
        gbps(len, raw),
        gbps(len, hop),
        raw.as_secs_f64() / hop.as_secs_f64()
    );
    println!(
        "| 1 MiB blob through the swarm (seed fetch + piece), median | {:.2} ms | {:.2} ms | +{:.2} ms | <= +10 ms |",
        ms(direct),
        ms(via),
        ms(via.saturating_sub(direct))
    );
    if let Some(m) = memory {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| peak RSS of the node holding the {} MiB blob while {} peers pull it ({:.0} MiB of theirs from peers) | | {:.1} MiB (pullers: max {:.1} MiB) | | <= 64 MiB |",
            args.mib,
            args.peers,
            mib(m.from_peers),
            mib(m.holder),
            mib(m.puller_max)
        );
    }
    Ok(())
}

struct Memory {
    holder: u64,
    puller_max: u64,
    from_peers: u64,
}

/// A shoald process takes the big blob through the swarm; then, with its peak RSS reset,
/// `args.peers` fresh shoald processes pull the blob at the same moment.
async fn serving_memory(
    args: &SwarmBenchArgs,
    registry: &Registry,
    dir: &std::path::Path,
) -> anyhow::Result<Memory> {
    use crate::testbed::{Shoald, SupernodeProc};
    let blob = Image::build(
        &[LayerSpec::Random {
            size: args.mib << 20,
        }],
        900,
    )
    .layers[0]
        .clone();
    let len = blob.bytes.len() as u64;
    let client = reqwest::Client::new();
    crate::registry::push_blob(&client, &registry.url(), "bench/serve", &blob, None).await?;
    let start = |name: &str, sn: &SupernodeProc| {
        let mut args = sn.shoald_args();
        args.extend(["--insecure-registry".to_owned(), registry.addr.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| Shoald::start(&dir.join(name), &args))
    };
    let url = |d: &Shoald| {
        format!(
            "{}/v2/bench/serve/blobs/{}?ns={}",
            d.url(),
            blob.digest,
            registry.addr
        )
    };
    let sn =
        tokio::task::block_in_place(|| SupernodeProc::start(&dir.join("sn-proc"), &registry.addr));
    let holder = start("holder", &sn);
    crate::bench::timed_get(&url(&holder), len).await?;
    std::fs::write(format!("/proc/{}/clear_refs", holder.pid()), "5")
        .context("resetting the holder's peak RSS (/proc/PID/clear_refs)")?;
    let pullers: Vec<Shoald> = (0..args.peers)
        .map(|i| start(&format!("puller-{i}"), &sn))
        .collect();
    let urls: Vec<String> = pullers.iter().map(url).collect();
    let gets = urls.iter().map(|u| crate::bench::timed_get(u, len));
    for got in futures_util::future::join_all(gets).await {
        got?;
    }
    let holder_rss = crate::bench::peak_rss(holder.pid())?;
    let mut puller_max = 0;
    let mut from_peers = 0;
    for p in &pullers {
        puller_max = puller_max.max(crate::bench::peak_rss(p.pid())?);
        let metrics = tokio::task::block_in_place(|| p.metrics());
        from_peers += crate::demo::fetched_from(&metrics, "Peer");
    }
    Ok(Memory {
        holder: holder_rss,
        puller_max,
        from_peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: SwarmBenchArgs,
    }

    #[test]
    fn flags_that_would_measure_nothing_are_refused() {
        for (flag, value) in [
            ("--runs", "0"),
            ("--small-blobs", "0"),
            ("--mib", "0"),
            ("--peers", "100000"),
        ] {
            let cli = Cli::try_parse_from(["bench", flag, value]).unwrap();
            let error = cli.bench.check().unwrap_err().to_string();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
        Cli::try_parse_from(["bench"])
            .unwrap()
            .bench
            .check()
            .unwrap();
    }
}
