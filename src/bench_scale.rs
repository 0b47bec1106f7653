//! `shoal bench scale-out`: a real swarm on this machine, every part its own process, and
//! all nodes pulling one image at the same moment, against the same pull done without
//! shoal (`direct`) in the same run.
//!
//! The origin is `--registry URL`, else `docker-registry` when installed, else an
//! embedded origin (so that the command works with nothing but the repo). A counting
//! TCP tap in front of it measures registry egress live. Nodes are `shoal` processes
//! running a shoald and supernodes are `shoal` processes running a supernode (hidden
//! subcommands built from the same libraries as `shoald` and `shoal-supernode`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::image::{Image, LayerSpec};
use crate::report::{CrossCheck, Outcome, Run, parse_bytes};
use crate::tap::Tap;
use crate::testbed::{Proc, free_port};

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleOutArgs {
    /// Nodes (shoald processes) pulling the image at the same moment
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Image size, all layers together: 64MiB, 256MiB, 1GiB…
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub image_size: u64,
    /// Layers the image is cut into (equal sizes, random bytes)
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Supernodes; blobs are spread over them by rendezvous hashing
    #[arg(long, default_value_t = 1)]
    pub supernodes: usize,
    /// Stripes per blob (shoal-supernode's --stripes): each node gets every stripe on one
    /// stream from its feed in the stripe's tree, as the feed gets it (0: off, nodes only
    /// ask each other for pieces; the sim of a --cross-check models the same)
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub stripes: u32,
    /// Push the image to this registry (http://HOST:PORT) instead of starting one
    #[arg(long)]
    pub registry: Option<String>,
    /// Baselines run in the same session: `direct` (every node pulls from the registry),
    /// `bittorrent` (--netns only: aria2c clients with opentracker, one seed host)
    #[arg(long, value_delimiter = ',', default_value = "direct")]
    pub baseline: Vec<String>,
    /// Each node, supernode and the registry in its own network namespace with upload and
    /// download capped at --bandwidth (root; needs docker-registry; namespaces are removed
    /// at the end, also on failure or Ctrl-C)
    #[arg(long)]
    pub netns: bool,
    /// Per-host cap in --netns mode: 100mbit, 1gbit, 12MB/s…
    #[arg(long, default_value = "100mbit", value_parser = crate::report::parse_rate)]
    pub bandwidth: u64,
    /// Write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an HTML report with SVG plots into this directory
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// (--netns) Also run `shoal sim` of the same swarm, given the round trips measured
    /// here, and report how far apart the two are (they should agree within 15% on p50
    /// and registry egress)
    #[arg(long)]
    pub cross_check: bool,
    /// Pieces each node uploads at once (shoald's --max-upload-peers; also given to the
    /// sim of a --cross-check)
    #[arg(
        long,
        env = shoal_daemon::config::MAX_UPLOAD_PEERS_ENV,
        default_value_t = shoal_daemon::config::DEFAULT_MAX_UPLOAD_PEERS,
        value_name = "N"
    )]
    pub max_upload_peers: usize,
    /// (--netns) Tell each node its link (shoald's --upload-link at --bandwidth): nodes then
    /// send up to 2 pieces beyond --max-upload-peers while their link has room (also given
    /// to the sim of a --cross-check)
    #[arg(long)]
    pub upload_link_known: bool,
    /// Keep every process's data directory and log (node-N.log, supernode-N.log) in this
    /// directory, for reading after the run (default: a temporary one, removed at the end;
    /// `SHOAL_LOG=shoal_daemon=debug` makes the logs say more)
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// Bounds on flags: every node and supernode is a process here (and in --netns mode a
/// network namespace).
const MAX_NODES: usize = 1000;
const MAX_SUPERNODES: usize = 64;
const MAX_LAYERS: usize = 1000;
/// As the sim takes it (a u16 there).
const MAX_UPLOAD_PEERS: usize = 1024;
/// 1 mbit/s, in bytes.
const MIN_NETNS_RATE: u64 = 125_000;

pub(crate) const REPO: &str = "bench/scale-out";
pub(crate) const TAG: &str = "v1";

impl ScaleOutArgs {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=MAX_NODES).contains(&self.nodes),
            "--nodes must be between 1 and {MAX_NODES}: each node is a process on this \
             machine (`shoal sim` runs 10,000 and more)"
        );
        ensure!(
            (1..=MAX_SUPERNODES).contains(&self.supernodes),
            "--supernodes must be between 1 and {MAX_SUPERNODES}"
        );
        let max = shoal_proto::message::MAX_STRIPES;
        ensure!(
            self.stripes == 0 || (2..=max).contains(&self.stripes),
            "--stripes must be 0 (off) or between 2 and {max}"
        );
        ensure!(
            (1..=MAX_UPLOAD_PEERS).contains(&self.max_upload_peers),
            "--max-upload-peers must be between 1 and {MAX_UPLOAD_PEERS}"
        );
        ensure!(
            self.netns || !self.cross_check,
            "--cross-check compares a --netns run with the sim: add --netns"
        );
        ensure!(
            self.netns || !self.upload_link_known,
            "--upload-link-known gives each node its --bandwidth cap: add --netns (on \
             loopback a node's link has no known rate)"
        );
        if self.netns {
            // tbf lets its bucket through at line rate: the cap must hold for most of the
            // image, or nodes beat S/B and the run measures nothing.
            let burst = crate::netns::BURST_BYTES;
            ensure!(
                self.bandwidth >= MIN_NETNS_RATE,
                "--bandwidth must be at least 1mbit with --netns: each link lets {} KiB \
                 through before its cap holds",
                burst >> 10
            );
            ensure!(
                self.image_size >= 16 * burst,
                "--image-size must be at least {} MiB with --netns: each link lets {} KiB \
                 through before its cap holds",
                (16 * burst) >> 20,
                burst >> 10
            );
        }
        ensure!(
            self.layers > 0 && self.image_size >= self.layers as u64,
            "--layers must be at least 1 and at most the image size in bytes"
        );
        ensure!(
            self.layers <= MAX_LAYERS,
            "--layers must be at most {MAX_LAYERS}"
        );
        for b in self.baseline.iter().filter(|b| !b.is_empty()) {
            match b.as_str() {
                "direct" => {}
                "bittorrent" => ensure!(
                    self.netns,
                    "the bittorrent baseline runs in --netns mode only (aria2c clients need \
                     an address each)"
                ),
                _ => bail!("unknown baseline {b:?}: use direct, bittorrent or both"),
            }
        }
        Ok(())
    }
}

/// The run's work directory: `--keep DIR`, or a temporary one (removed when the guard
/// drops).
pub(crate) fn work_dir(
    args: &ScaleOutArgs,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating --keep directory {}", dir.display()))?;
            ensure!(
                std::fs::read_dir(dir)?.next().is_none(),
                "--keep directory {} is not empty: give a new one",
                dir.display()
            );
            eprintln!("work directory (data and logs, kept): {}", dir.display());
            Ok((None, dir.clone()))
        }
        None => {
            let tmp = tempfile::tempdir().context("creating a work directory")?;
            let path = tmp.path().to_owned();
            Ok((Some(tmp), path))
        }
    }
}

/// The `shoal sim` command that models a `--netns` run: the same swarm and caps, and the
/// round trips its nodes measured (to compare the model with the real swarm).
pub fn sim_command(args: &ScaleOutArgs, run: &Run) -> Option<String> {
    let (peer, supernode) = (run.shoal.peer_rtt_s?, run.shoal.supernode_rtt_s?);
    Some(format!(
        "shoal sim --nodes {} --image-size {} --layers {} --bandwidth {}bit --supernodes {} \
         --rtt-ms {:.0} --supernode-rtt-ms {:.0} --max-upload-peers {}{}{}",
        args.nodes,
        args.image_size,
        args.layers,
        args.bandwidth * 8,
        args.supernodes,
        peer * 1000.0,
        supernode * 1000.0,
        args.max_upload_peers,
        if args.upload_link_known {
            " --upload-link-known"
        } else {
            ""
        },
        // With fewer nodes than stripes some stripe has no forwarder: the supernode names
        // no feeds, and the nodes only ask each other.
        match args.stripes {
            k if k as usize <= args.nodes => format!(" --stripes {k}"),
            _ => " --stripes 0".to_owned(),
        }
    ))
}

/// The flags of a `shoal sim …` command line.
fn sim_args(command: &str) -> anyhow::Result<crate::sim::SimArgs> {
    #[derive(clap::Parser)]
    struct SimCli {
        #[command(flatten)]
        sim: crate::sim::SimArgs,
    }
    let cli = <SimCli as clap::Parser>::try_parse_from(command.split_whitespace().skip(1))
        .context("the sim's command line")?;
    Ok(cli.sim)
}

/// Runs the `shoal sim` that models `run` (see [`sim_command`]); none when the run
/// measured no round trips (no piece came from a peer).
fn cross_check(args: &ScaleOutArgs, run: &Run) -> anyhow::Result<Option<CrossCheck>> {
    let Some(command) = sim_command(args, run) else {
        eprintln!("cross-check: no round trip to a peer was measured; nothing to give the sim");
        return Ok(None);
    };
    let mut sim = sim_args(&command)?;
    sim.baseline.clear();
    eprintln!("cross-check: {command}");
    let modelled = tokio::task::block_in_place(|| crate::sim::run(&sim))?;
    Ok(Some(CrossCheck::of(command, &run.shoal, &modelled.shoal)))
}

/// Where the image is served from.
enum Origin {
    Embedded { _server: crate::origin::Origin },
    Docker(crate::testbed::Registry),
    External,
}

pub async fn scale_out(args: &ScaleOutArgs) -> anyhow::Result<Run> {
    args.check()?;
    let started = Instant::now();
    let (_tmp, dir) = work_dir(args)?;
    // Every node and seed stores the image, and so does the registry; it is built here in
    // memory first.
    let copies = (args.nodes + args.supernodes + 1) as u64;
    crate::room::Room::measure(
        &dir,
        args.image_size.saturating_mul(copies),
        args.image_size.saturating_mul(2),
    )?
    .check(
        &format!(
            "a swarm of {} node{} pulling a {} image",
            args.nodes,
            if args.nodes == 1 { "" } else { "s" },
            crate::report::human_bytes(args.image_size)
        ),
        &dir,
    )?;
    let per_layer = (args.image_size / args.layers as u64) as usize;
    let specs: Vec<LayerSpec> = (0..args.layers)
        .map(|_| LayerSpec::random_blob(per_layer))
        .collect();
    let image = Image::build(&specs, u64::from(std::process::id()));
    if args.netns {
        // On Ctrl-C the run is dropped, and with it the namespaces and processes.
        let run = tokio::select! {
            run = crate::bench_netns::scale_out(args, &image) => run,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; namespaces removed"),
        };
        let mut run = run?;
        if args.cross_check {
            // The run stands on its own: a sim that cannot run is said, not fatal.
            run.cross_check = cross_check(args, &run).unwrap_or_else(|e| {
                eprintln!("cross-check: the sim did not run: {e:#}");
                None
            });
        }
        return Ok(run);
    }
    let image_bytes = image.blob_bytes();
    let client = reqwest::Client::new();

    let (origin, upstream) = start_origin(args, &image, &dir).await?;
    let tap = Tap::start(upstream).await?;
    let ns = tap.addr.to_string();
    eprintln!(
        "origin: {} ({} bytes in {} blobs), seen through a counting tap at {ns}",
        match &origin {
            Origin::Embedded { .. } => "embedded registry".to_owned(),
            Origin::Docker(r) => format!("docker-registry at {}", r.addr),
            Origin::External => args.registry.clone().unwrap_or_default(),
        },
        image_bytes,
        image.layers.len() + 1
    );

    let swarm = Swarm::start(args, &dir, &ns, &client).await?;
    eprintln!(
        "swarm: {} supernode(s), {} nodes; pulling {REPO}:{TAG} on all nodes at once",
        args.supernodes, args.nodes
    );
    let mirrors: Vec<Option<String>> = swarm.nodes.iter().map(|n| Some(n.url())).collect();
    let mut shoal = pull_all(&client, &tap, &ns, &mirrors, image_bytes, "shoal").await;
    for node in &swarm.nodes {
        let metrics = node.metrics(&client).await.unwrap_or_default();
        shoal.peer_bytes += crate::demo::fetched_from(&metrics, "Peer");
        shoal.seed_bytes += crate::demo::fetched_from(&metrics, "Seed");
        shoal.fallback_bytes += crate::demo::fetched_from(&metrics, "Registry");
    }
    drop(swarm);

    let mut baselines = BTreeMap::new();
    if args.baseline.iter().any(|b| b == "direct") {
        let direct: Vec<Option<String>> = vec![None; args.nodes];
        let outcome = pull_all(&client, &tap, &ns, &direct, image_bytes, "direct").await;
        baselines.insert("direct".to_owned(), outcome.finish(image_bytes, 0.0));
    }
    drop(origin);
    Ok(Run {
        mode: "loopback",
        nodes: args.nodes,
        image_bytes,
        layers: args.layers,
        bandwidth_bytes_per_s: 0,
        lower_bound_s: 0.0,
        wall_s: started.elapsed().as_secs_f64(),
        shoal: shoal.finish(image_bytes, 0.0),
        baselines,
        cross_check: None,
    })
}

async fn start_origin(
    args: &ScaleOutArgs,
    image: &Image,
    dir: &Path,
) -> anyhow::Result<(Origin, std::net::SocketAddr)> {
    if let Some(url) = &args.registry {
        let host = url
            .strip_prefix("http://")
            .context("--registry must be http://HOST:PORT")?
            .trim_end_matches('/');
        crate::registry::push(url.trim_end_matches('/'), REPO, TAG, image, None)
            .await
            .with_context(|| format!("pushing the test image to {url}"))?;
        let addr = tokio::net::lookup_host(host)
            .await?
            .next()
            .with_context(|| format!("{host} does not resolve"))?;
        return Ok((Origin::External, addr));
    }
    if which::which("docker-registry").is_ok() {
        // The registry dies with this process too, also on SIGKILL, like the nodes (see
        // `node::dies_with_bench`), when util-linux's `setpriv` can ask the kernel for it.
        let dies_with_bench: &[&str] = if which::which("setpriv").is_ok() {
            &["setpriv", "--pdeathsig", "KILL", "--"]
        } else {
            &[]
        };
        let addr = format!("127.0.0.1:{}", crate::testbed::free_port());
        let registry = tokio::task::block_in_place(|| {
            crate::testbed::Registry::try_start_at(dir, &[], &addr, dies_with_bench)
        })?;
        crate::registry::push(&registry.url(), REPO, TAG, image, None).await?;
        let addr = registry.addr.parse()?;
        return Ok((Origin::Docker(registry), addr));
    }
    let origin = crate::origin::Origin::start(image, REPO, TAG).await?;
    let addr = origin.addr;
    Ok((Origin::Embedded { _server: origin }, addr))
}

/// Supernodes and nodes, each a child process; killed when dropped.
struct Swarm {
    _supernodes: Vec<Proc>,
    nodes: Vec<Node>,
}

struct Node {
    addr: String,
    _proc: Proc,
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn metrics(&self, client: &reqwest::Client) -> anyhow::Result<String> {
        Ok(client
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?
            .text()
            .await?)
    }
}

/// How long a started process has to answer its health check.
pub(crate) const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

/// What the swarm's processes log: `SHOAL_LOG` as given to the bench, else warnings.
pub(crate) fn child_log_filter() -> String {
    std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".to_owned())
}

fn spawn_self(args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args).env("SHOAL_LOG", child_log_filter());
    crate::node::dies_with_bench(&mut cmd);
    Proc::spawn_logged(cmd, log)
}

/// Waits until `url` answers 2xx; after `within`, fails with the tail of `log`.
pub(crate) async fn wait_healthy(
    client: &reqwest::Client,
    url: &str,
    log: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    bail!("{url} did not answer within {within:?}; its log says:\n{tail}")
}

impl Swarm {
    async fn start(
        args: &ScaleOutArgs,
        dir: &Path,
        ns: &str,
        client: &reqwest::Client,
    ) -> anyhow::Result<Swarm> {
        let mut supernodes = Vec::new();
        let mut quic = Vec::new();
        let mut token = String::new();
        for k in 0..args.supernodes {
            let (listen, api) = (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            );
            let data = dir.join(format!("supernode-{k}"));
            let log = dir.join(format!("supernode-{k}.log"));
            if k > 0 {
                // One cluster: every supernode uses the first one's CA and join token.
                let first = dir.join("supernode-0");
                std::fs::create_dir_all(data.join("ca"))?;
                for file in ["ca/ca.pem", "ca/ca.key", "join-token"] {
                    std::fs::copy(first.join(file), data.join(file))
                        .with_context(|| format!("sharing the cluster CA ({file})"))?;
                }
            }
            let argv: Vec<String> = [
                "__supernode",
                "--listen",
                &listen,
                "--api-listen",
                &api,
                "--insecure-registry",
                ns,
                "--data-dir",
                data.to_str().context("work directory is not UTF-8")?,
                "--stripes",
                &args.stripes.to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            supernodes.push(spawn_self(&argv, &log)?);
            wait_healthy(
                client,
                &format!("http://{api}/healthz"),
                &log,
                HEALTHY_WITHIN,
            )
            .await?;
            if k == 0 {
                token = std::fs::read_to_string(data.join("join-token"))?
                    .trim()
                    .to_owned();
            }
            quic.push(listen);
        }
        let mut nodes = Vec::new();
        for i in 0..args.nodes {
            let addr = format!("127.0.0.1:{}", free_port());
            let peer = format!("127.0.0.1:{}", free_port());
            let data = dir.join(format!("node-{i}"));
            let log = dir.join(format!("node-{i}.log"));
            let mut argv: Vec<String> = [
                "__shoald",
                "--listen",
                &addr,
                "--peer-listen",
                &peer,
                "--insecure-registry",
                ns,
                "--join-token",
                &token,
                "--data-dir",
                data.to_str().context("work directory is not UTF-8")?,
                "--max-upload-peers",
                &args.max_upload_peers.to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            for q in &quic {
                argv.extend(["--supernode".to_owned(), q.clone()]);
            }
            let proc = spawn_self(&argv, &log)?;
            wait_healthy(
                client,
                &format!("http://{addr}/healthz"),
                &log,
                HEALTHY_WITHIN,
            )
            .await?;
            nodes.push(Node { addr, _proc: proc });
        }
        Ok(Swarm {
            _supernodes: supernodes,
            nodes,
        })
    }
}

/// Every node pulls the image at the same moment, through its mirror (`Some(url)`) or
/// straight from the registry (`None`); a progress line is printed every second.
async fn pull_all(
    client: &reqwest::Client,
    tap: &Tap,
    ns: &str,
    mirrors: &[Option<String>],
    image_bytes: u64,
    what: &str,
) -> Outcome {
    let egress_at_start = tap.upstream_bytes();
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let pulls: Vec<_> = mirrors
        .iter()
        .map(|mirror| {
            let (client, received, done) = (client.clone(), received.clone(), done.clone());
            let registry = format!("http://{ns}");
            let mirror = mirror.clone();
            let ns = ns.to_owned();
            tokio::spawn(async move {
                let result = match &mirror {
                    Some(m) => {
                        crate::registry::pull_streaming(&client, m, Some(&ns), REPO, TAG, &received)
                            .await
                    }
                    None => {
                        crate::registry::pull_streaming(
                            &client, &registry, None, REPO, TAG, &received,
                        )
                        .await
                    }
                };
                done.fetch_add(1, Ordering::Relaxed);
                result.map(|_| started.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut series = vec![(0.0, 0)];
    let mut all = futures_util::future::join_all(pulls);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now();
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = tick.tick() => {
                let t = started.elapsed().as_secs_f64();
                let egress = tap.upstream_bytes() - egress_at_start;
                series.push((t, egress));
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    eprintln!(
                        "[{what} {t:5.1} s] {}/{} nodes done, received {} ({:.0} MB/s), registry sent {} ({:.2}x the image)",
                        done.load(Ordering::Relaxed),
                        mirrors.len(),
                        crate::report::human_bytes(received.load(Ordering::Relaxed)),
                        received.load(Ordering::Relaxed) as f64 / t / 1e6,
                        crate::report::human_bytes(egress),
                        egress as f64 / image_bytes as f64
                    );
                }
            }
        }
    };
    let egress = tap.upstream_bytes() - egress_at_start;
    series.push((started.elapsed().as_secs_f64(), egress));
    let mut outcome = Outcome {
        registry_egress_bytes: egress,
        registry_egress_over_time: series,
        ..Default::default()
    };
    for r in results {
        match r.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(t) => outcome.node_completion_s.push(t),
            Err(e) => {
                eprintln!("[{what}] a pull failed: {e:#}");
                outcome.failures += 1;
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: ScaleOutArgs,
    }

    fn refused(flags: &str) -> String {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(flags.split_whitespace()))
            .expect("valid flags");
        cli.bench.check().unwrap_err().to_string()
    }

    #[test]
    fn flags_that_would_measure_nothing_or_swamp_the_machine_are_refused() {
        assert!(refused("--nodes 0").contains("--nodes"));
        assert!(refused("--nodes 100000").contains("shoal sim"));
        assert!(refused("--supernodes 1000").contains("--supernodes"));
        assert!(refused("--netns --bandwidth 100kbit").contains("--bandwidth"));
        assert!(refused("--netns --image-size 1MiB").contains("--image-size"));
        assert!(refused("--max-upload-peers 0").contains("--max-upload-peers"));
        assert!(refused("--layers 5000").contains("--layers"));
        assert!(refused("--max-upload-peers 100000").contains("--max-upload-peers"));
        assert!(refused("--baseline bittorrent").contains("--netns"));
        assert!(refused("--cross-check").contains("--netns"));
        assert!(refused("--upload-link-known").contains("--netns"));
        let fine = Cli::try_parse_from(["bench", "--netns", "--nodes", "40"]).unwrap();
        fine.bench.check().unwrap();
    }

    #[test]
    fn a_netns_run_names_the_sim_that_models_it() {
        let flags = "--netns --nodes 20 --image-size 64MiB --layers 2 --bandwidth 50mbit";
        let cli =
            Cli::try_parse_from(std::iter::once("bench").chain(flags.split_whitespace())).unwrap();
        let mut run = Run {
            mode: "netns",
            nodes: 20,
            image_bytes: 64 << 20,
            layers: 2,
            bandwidth_bytes_per_s: 6_250_000,
            lower_bound_s: 10.7,
            wall_s: 0.0,
            shoal: Default::default(),
            baselines: Default::default(),
            cross_check: None,
        };
        assert_eq!(
            sim_command(&cli.bench, &run),
            None,
            "no round trips measured"
        );
        run.shoal.peer_rtt_s = Some(0.0534);
        run.shoal.supernode_rtt_s = Some(0.0649);
        let command = sim_command(&cli.bench, &run).unwrap();
        assert_eq!(
            command,
            "shoal sim --nodes 20 --image-size 67108864 --layers 2 --bandwidth 50000000bit \
             --supernodes 1 --rtt-ms 53 --supernode-rtt-ms 65 --max-upload-peers 5 --stripes 4"
        );
        // The command is one the sim takes.
        let sim = sim_args(&command).unwrap();
        assert_eq!(
            (sim.nodes, sim.image_size, sim.bandwidth),
            (20, 64 << 20, 6_250_000)
        );
        assert_eq!((sim.rtt_ms, sim.supernode_rtt_ms), (53.0, 65.0));
        assert_eq!((sim.max_upload_peers, sim.stripes_run()), (5, 4));
        // Without stripes, or with fewer nodes than stripes (the supernode then names no
        // feeds), the sim models nodes that only ask each other.
        for extra in [["--stripes", "0"], ["--stripes", "32"]] {
            let cli = Cli::try_parse_from(
                std::iter::once("bench")
                    .chain(flags.split_whitespace())
                    .chain(extra.iter().copied()),
            )
            .unwrap();
            let command = sim_command(&cli.bench, &run).unwrap();
            assert!(command.ends_with(" --stripes 0"), "{command}");
            assert_eq!(sim_args(&command).unwrap().stripes_run(), 0, "{command}");
        }
        // The nodes' upload slots, when set, go to the sim too.
        let cli = Cli::try_parse_from(
            std::iter::once("bench")
                .chain(flags.split_whitespace())
                .chain(["--max-upload-peers", "3"]),
        )
        .unwrap();
        let command = sim_command(&cli.bench, &run).unwrap();
        assert!(command.contains("--max-upload-peers 3 "), "{command}");
        assert_eq!(sim_args(&command).unwrap().max_upload_peers, 3);
        assert!(!sim_args(&command).unwrap().upload_link_known);
        // Nodes told their link: so is the sim.
        let cli = Cli::try_parse_from(
            std::iter::once("bench")
                .chain(flags.split_whitespace())
                .chain(["--upload-link-known"]),
        )
        .unwrap();
        let command = sim_command(&cli.bench, &run).unwrap();
        assert!(sim_args(&command).unwrap().upload_link_known, "{command}");
    }
}
