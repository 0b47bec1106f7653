//! `shoal demo`: shoal's main job on one machine with nothing but the repo. An embedded
//! origin registry serves a generated image, a shoald sits in front of it as containerd's
//! mirror would, and the image is pulled through shoald twice, the way containerd pulls.
//! The first pull crosses to the registry once; the second comes from shoald's store.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use shoal_daemon::config::{Config, ServeArgs};

use crate::image::{Image, LayerSpec};
use crate::origin::Origin;
use crate::registry::pull_through;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Size of the image's big layer, in MiB
    #[arg(long, default_value_t = 64)]
    pub layer_mib: usize,
}

const REPO: &str = "demo/app";
const TAG: &str = "v1";

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let specs = [
        LayerSpec::Empty,
        LayerSpec::Random { size: 1 },
        LayerSpec::Gzip { files: 200 },
        LayerSpec::Random {
            size: args.layer_mib << 20,
        },
    ];
    let image = Image::build(&specs, std::process::id().into());
    let origin = Origin::start(&image, REPO, TAG).await?;
    let ns = origin.addr.to_string();
    println!(
        "origin registry  http://{ns} serves {REPO}:{TAG} ({} blobs, {} bytes)",
        image.layers.len() + 1,
        image.blob_bytes()
    );

    let data_dir = tempfile::tempdir().context("cannot create a data directory")?;
    let serve = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.path().to_owned()),
        cache_size: Some("2GiB".into()),
        insecure_registries: vec![ns.clone()],
        default_registry: Some(ns.clone()),
        ..Default::default()
    };
    let config = Config::resolve(serve, None)?;
    let daemon = shoal_daemon::Daemon::bind(&config).await?.spawn()?;
    let mirror = daemon.url.clone();
    println!(
        "shoald           {mirror} (store in {})",
        data_dir.path().display()
    );

    let client = reqwest::Client::new();
    let mut origin_bytes = Vec::new();
    for pull in 1..=2 {
        let before = origin.blob_bytes_sent();
        let started = Instant::now();
        let pulled = pull_through(&client, &mirror, &ns, REPO, TAG).await?;
        let from_origin = origin.blob_bytes_sent() - before;
        origin_bytes.push(from_origin);
        println!(
            "pull {pull}: {} blobs, {} bytes in {:.0} ms, digests verified; registry sent {from_origin} bytes",
            pulled.blobs,
            pulled.bytes,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    let metrics = client
        .get(format!("{mirror}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    println!(
        "shoald served    from registry: {} bytes, from its store: {} bytes",
        served_from(&metrics, "Registry"),
        served_from(&metrics, "Store")
    );
    daemon.stop().await;
    ensure!(
        origin_bytes[0] == image.blob_bytes(),
        "first pull: registry sent {} bytes, expected each blob once",
        origin_bytes[0]
    );
    ensure!(
        origin_bytes[1] == 0,
        "second pull reached the registry ({} bytes)",
        origin_bytes[1]
    );
    println!(
        "ok: each blob crossed from the registry once; the second pull came from shoald's store"
    );
    Ok(())
}

/// The metrics text of the daemon or supernode API at `base` (`http://host:port`).
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let resp = client.get(format!("{base}/metrics")).send().await?;
    Ok(resp.error_for_status()?.text().await?)
}

/// The `shoald_blob_bytes_served_total{source=…}` value in a metrics text.
pub fn served_from(metrics: &str, source: &str) -> u64 {
    sample(
        metrics,
        &format!("shoald_blob_bytes_served_total{{source=\"{source}\"}}"),
    )
}

/// The `shoald_bytes_fetched_total{source=…}` value in a metrics text.
pub fn fetched_from(metrics: &str, source: &str) -> u64 {
    sample(
        metrics,
        &format!("shoald_bytes_fetched_total{{source=\"{source}\"}}"),
    )
}

/// Blob bytes a node got on stripe streams.
pub fn stripe_bytes(metrics: &str) -> u64 {
    sample(metrics, "shoald_stripe_bytes_total")
}

/// Hash groups a node hashed again from a stored blob for a peer.
pub fn groups_rehashed(metrics: &str) -> u64 {
    sample(metrics, "shoald_groups_rehashed_total")
}

/// Piece requests a node gave a place beyond its upload slots.
pub fn uploads_beyond(metrics: &str) -> u64 {
    sample(metrics, "shoald_uploads_given_total{place=\"Beyond\"}")
}

/// Bytes of pieces a supernode's seed sent to nodes (its `/metrics`).
pub fn supernode_seed_bytes(metrics: &str) -> u64 {
    sample(metrics, "shoal_supernode_seed_bytes_total")
}

/// Bytes of answers a supernode sent to nodes' questions (its `/metrics`).
pub fn supernode_answer_bytes(metrics: &str) -> u64 {
    sample(metrics, "shoal_supernode_answer_bytes_total")
}

/// The sum and count of a histogram in a metrics text, e.g.
/// `histogram(text, "shoald_peer_answer_seconds")`.
pub fn histogram(metrics: &str, name: &str) -> (f64, u64) {
    (
        sample(metrics, &format!("{name}_sum")),
        sample(metrics, &format!("{name}_count")),
    )
}

/// The value of `series` in a metrics text (zero when it is absent).
fn sample<T: std::str::FromStr + Default>(metrics: &str, series: &str) -> T {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::{fetched_from, histogram};

    #[test]
    fn reads_counters_and_histogram_sums() {
        let text = "shoald_bytes_fetched_total{source=\"Peer\"} 42\n\
                    shoald_peer_answer_seconds_sum 0.25\n\
                    shoald_peer_answer_seconds_count 5\n";
        assert_eq!(fetched_from(text, "Peer"), 42);
        assert_eq!(fetched_from(text, "Seed"), 0);
        assert_eq!(histogram(text, "shoald_peer_answer_seconds"), (0.25, 5));
        assert_eq!(histogram(text, "shoald_supernode_rtt_seconds"), (0.0, 0));
        assert_eq!(histogram("", "shoald_peer_answer_seconds"), (0.0, 0));
    }
}
