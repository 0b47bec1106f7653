//! The `shoal` binary as one part of a benchmark swarm (hidden subcommands): a shoald or a
//! supernode in its own process, built from the same libraries as `shoald` and
//! `shoal-supernode`, so that `shoal bench scale-out` needs nothing but this binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use shoal_daemon::config::{Config, ServeArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct SupernodeArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub api_listen: SocketAddr,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Registries reached over plain HTTP (HOST:PORT)
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Stripes per blob for stripe trees (0: off)
    #[arg(long, default_value_t = 4)]
    pub stripes: u32,
}

/// Names the process of the bench that started a node of its swarm: the node dies with
/// it, also when it is killed with SIGKILL and cannot stop its nodes itself.
const BENCH_PID: &str = "SHOAL_BENCH_PID";

/// Makes `cmd`, a node of this process's bench swarm, die with this process.
///
/// The kernel signals the node when the *thread* that started it ends: start nodes from a
/// thread that lives as long as the bench (the one running the bench's future, or a
/// runtime worker), never from `spawn_blocking`, whose threads end when idle.
pub fn dies_with_bench(cmd: &mut std::process::Command) {
    cmd.env(BENCH_PID, std::process::id().to_string());
}

/// In a node started by a bench: the kernel kills it when the bench's process ends, and
/// it stops at once if that has already happened. Elsewhere, nothing.
pub fn die_with_bench() -> anyhow::Result<()> {
    let Ok(bench) = std::env::var(BENCH_PID) else {
        return Ok(());
    };
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    set_parent_process_death_signal(Some(Signal::KILL))?;
    let parent = getppid().map(|p| p.as_raw_nonzero().to_string());
    anyhow::ensure!(
        parent.as_deref() == Some(bench.as_str()),
        "the bench that started this node (pid {bench}) is gone; stopping"
    );
    Ok(())
}

async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn shoald(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::resolve(args, None)?;
    shoal_daemon::Daemon::bind(&config)
        .await?
        .run(stopped())
        .await;
    Ok(())
}

pub async fn supernode(args: SupernodeArgs) -> anyhow::Result<()> {
    let insecure = args
        .insecure_registries
        .iter()
        .map(|r| r.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--insecure-registry: {e}"))?;
    let supernode = shoal_supernode::Supernode::start(shoal_supernode::SupernodeConfig {
        listen: args.listen,
        api_listen: args.api_listen,
        data_dir: args.data_dir,
        upstream: shoal_registry_proxy::UpstreamConfig {
            insecure,
            ..Default::default()
        },
        stripes: args.stripes,
    })
    .await?;
    stopped().await;
    drop(supernode);
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Where to pull from: a mirror (with --ns) or the registry itself
    #[arg(long)]
    pub base: String,
    /// The registry, as containerd names it to a mirror (`ns=`)
    #[arg(long)]
    pub ns: Option<String>,
    #[arg(long)]
    pub repo: String,
    #[arg(long)]
    pub tag: String,
}

/// One node's pull in a bench swarm: waits for a line on stdin ("go"), pulls the image as
/// containerd does, and prints `ok SECONDS BYTES` or `err MESSAGE`.
pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let client = reqwest::Client::new();
    let progress = std::sync::atomic::AtomicU64::new(0);
    let started = std::time::Instant::now();
    let pulled = crate::registry::pull_streaming(
        &client,
        &args.base,
        args.ns.as_deref(),
        &args.repo,
        &args.tag,
        &progress,
    )
    .await;
    match pulled {
        Ok(bytes) => println!("ok {} {bytes}", started.elapsed().as_secs_f64()),
        Err(e) => println!("err {e:#}"),
    }
    Ok(())
}
