//! `shoald`: the shoal node daemon.

/// Tokio moves tasks between worker threads, so buffers are often freed by a thread other
/// than the one that allocated them; mimalloc handles that without a shared lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_daemon::config::{Config, ServeArgs};
use shoal_daemon::containerd::{self, ConfigureArgs, Outcome};

/// shoald: containerd's registry mirror on every node.
///
/// Serves the OCI distribution API (GET/HEAD of /v2/ manifests and blobs) to containerd,
/// keeps every blob it serves in a verified store under --data-dir, and fetches misses
/// from the registry named by containerd's `ns=` parameter. Point containerd at it with
/// `shoald configure-containerd`.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML file with any of the flags below (kebab-case keys, e.g. cache-size = "20GiB");
    /// flags and environment variables win over it
    #[arg(long, env = "SHOAL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write containerd hosts.toml files that make this shoald the mirror of registries
    ConfigureContainerd(ConfigureArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match cli.command {
        Some(Command::ConfigureContainerd(args)) => configure(&args),
        None => serve(cli.serve, cli.config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoald: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::resolve(args, config_file.as_deref())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let daemon = shoal_daemon::Daemon::bind(&config).await?;
        daemon.run(shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn configure(args: &ConfigureArgs) -> anyhow::Result<()> {
    let (outcomes, advice) = containerd::configure(args)?;
    for outcome in outcomes {
        match outcome {
            Outcome::Created(path) => println!("wrote {}", path.display()),
            Outcome::Unchanged(path) => println!("unchanged {}", path.display()),
            Outcome::Replaced { path, backup } => {
                println!(
                    "wrote {} (previous file kept as {})",
                    path.display(),
                    backup.display()
                )
            }
        }
    }
    if let Some(advice) = advice {
        println!("\n{advice}");
    }
    Ok(())
}
