//! `shoal`: demo and benchmarks of the shoal image distribution system.

/// `shoal sim`'s planners decide on several threads and free what another thread
/// allocated; with glibc's allocator that made two threads no faster than one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// shoal: peer-to-peer container image distribution. This tool shows and measures it.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start an embedded registry and a shoald in front of it, pull a generated image through
    /// shoald twice as containerd does, and show where the bytes came from
    Demo(shoal::demo::DemoArgs),
    /// Measure shoal against raw figures taken in the same run
    #[command(subcommand)]
    Bench(Bench),
    /// Simulate thousands of nodes pulling one image: a flow-level network model driving
    /// the real supernode scheduler and daemon planner on a virtual clock
    Sim(shoal::sim::SimArgs),
    /// A shoald in this process (one node of a bench swarm)
    #[command(name = "__shoald", hide = true)]
    NodeShoald(shoal_daemon::config::ServeArgs),
    /// One node's pull in a bench swarm
    #[command(name = "__pull", hide = true)]
    NodePull(shoal::node::PullArgs),
    /// A supernode in this process (part of a bench swarm)
    #[command(name = "__supernode", hide = true)]
    NodeSupernode(shoal::node::SupernodeArgs),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// shoald as a mirror vs direct GETs from docker-registry: throughput, latency, memory
    /// (needs docker-registry and a built shoald next to this binary)
    Mirror(shoal::bench::MirrorBenchArgs),
    /// Piece transfer between two nodes vs raw QUIC; small-blob latency through the swarm
    /// (needs docker-registry)
    Swarm(shoal::bench_swarm::SwarmBenchArgs),
    /// A real swarm on this machine (every node, supernode and the registry its own
    /// process) pulls one image at the same moment, against every node pulling directly
    ScaleOut(shoal::bench_scale::ScaleOutArgs),
}

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("starting the async runtime");
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match cli.command {
        Command::Demo(args) => shoal::demo::run(&args).await,
        Command::Bench(Bench::Mirror(args)) => shoal::bench::mirror(&args).await,
        Command::Bench(Bench::Swarm(args)) => shoal::bench_swarm::swarm(&args).await,
        Command::Bench(Bench::ScaleOut(args)) => {
            let run = shoal::bench_scale::scale_out(&args).await?;
            shoal::report::finish(&run, args.json.as_deref(), args.report.as_deref())?;
            if let Some(command) = shoal::bench_scale::sim_command(&args, &run)
                && run.cross_check.is_none()
            {
                println!("the same swarm in the model, with the round trips measured here:");
                println!("  {command}");
            }
            Ok(())
        }
        Command::NodeShoald(args) => {
            shoal::node::die_with_bench()?;
            shoal::node::shoald(args).await
        }
        Command::NodeSupernode(args) => {
            shoal::node::die_with_bench()?;
            shoal::node::supernode(args).await
        }
        Command::NodePull(args) => {
            shoal::node::die_with_bench()?;
            shoal::node::pull(args).await
        }
        Command::Sim(args) => {
            let run = tokio::task::block_in_place(|| shoal::sim::run(&args))?;
            shoal::report::finish(&run, args.json.as_deref(), args.report.as_deref())
        }
    }
}
