//! `shoal-supernode`: the swarm's scheduler and seed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;
use shoal_registry_proxy::upstream::parse_registry_ca;
use shoal_registry_proxy::{Registry, UpstreamConfig};
use shoal_supernode::{Supernode, SupernodeConfig};

/// shoal-supernode: schedules which node fetches which pieces from whom, and seeds each
/// blob from its registry once.
///
/// On first start it creates a cluster CA under DATA_DIR/ca and writes a join token to
/// DATA_DIR/join-token; give that token to every shoald (--join-token-file).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// QUIC address for daemons (control and seed pieces); the same TCP port is not used
    #[arg(
        long,
        env = "SHOAL_SUPERNODE_LISTEN",
        default_value = "127.0.0.1:65100"
    )]
    listen: SocketAddr,
    /// HTTP address of /healthz, /metrics, /status and /join
    #[arg(
        long,
        env = "SHOAL_SUPERNODE_API_LISTEN",
        default_value = "127.0.0.1:65101"
    )]
    api_listen: SocketAddr,
    /// Directory of the CA, the join token and seeded blobs
    #[arg(
        long,
        env = "SHOAL_SUPERNODE_DATA_DIR",
        default_value = "/var/lib/shoal-supernode"
    )]
    data_dir: PathBuf,
    /// Talk plain HTTP to this registry (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Trust the PEM CA in FILE for this registry (repeatable)
    #[arg(long = "registry-ca", value_name = "HOST=FILE")]
    registry_cas: Vec<String>,
    /// Cut each blob into K stripes, each sent down a tree of nodes as pieces arrive;
    /// nodes still ask each other for what a stripe's stream does not bring in time (0:
    /// off, nodes only ask each other for pieces)
    #[arg(long, env = "SHOAL_SUPERNODE_STRIPES", value_name = "K", default_value_t = 4,
          value_parser = parse_stripes)]
    stripes: u32,
}

/// 0, or 2 to 64 stripes.
fn parse_stripes(s: &str) -> Result<u32, String> {
    let k: u32 = s.parse().map_err(|e| format!("{e}"))?;
    let max = shoal_proto::message::MAX_STRIPES;
    if k == 0 || (2..=max).contains(&k) {
        Ok(k)
    } else {
        Err(format!("{k} stripes: give 0 (off) or 2 to {max}"))
    }
}

fn config(cli: Cli) -> anyhow::Result<SupernodeConfig> {
    let mut errors = Vec::new();
    let insecure: HashSet<Registry> = cli
        .insecure_registries
        .iter()
        .filter_map(|s| {
            s.parse()
                .map_err(|e| errors.push(format!("--insecure-registry: {e}")))
                .ok()
        })
        .collect();
    let ca_pem: HashMap<Registry, Vec<u8>> = cli
        .registry_cas
        .iter()
        .filter_map(|s| parse_registry_ca(s).map_err(|e| errors.push(e)).ok())
        .collect();
    if !errors.is_empty() {
        bail!("invalid configuration:\n  - {}", errors.join("\n  - "));
    }
    let upstream = UpstreamConfig {
        insecure,
        ca_pem,
        ..Default::default()
    };
    Ok(SupernodeConfig {
        listen: cli.listen,
        api_listen: cli.api_listen,
        data_dir: cli.data_dir,
        upstream,
        stripes: cli.stripes,
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = (|| {
        let config = config(cli)?;
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        runtime.block_on(async {
            let supernode = Supernode::start(config).await?;
            println!("join token: {}", supernode.join_token);
            tokio::signal::ctrl_c().await?;
            drop(supernode);
            Ok::<_, anyhow::Error>(())
        })
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-supernode: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
