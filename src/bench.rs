//! `shoal bench mirror`: shoald's speed, each figure beside a raw figure from the same run.
//!
//! Starts the real `docker-registry` and a `shoald` process in front of it on loopback, then:
//! - a 1 GiB blob: direct GET from the registry vs through shoald, first as a miss (shared
//!   fetch into the store) and then from the store;
//! - shoald's peak RSS (`VmHWM`) while 8 clients read the 1 GiB blob at once (a fresh
//!   process, so the peak is this phase's);
//! - small (1 MiB) blobs: the latency of a direct GET vs through shoald, miss and hit.
//!
//! Medians over several runs: the machine is shared and noisy.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use rand::{RngCore as _, SeedableRng as _};
use shoal_proto::BlobDigest;

use crate::image::Blob;
use crate::registry::push_blob;
use crate::report::flag_in;
use crate::testbed::{Registry, Shoald};

#[derive(Debug, Clone, clap::Args)]
pub struct MirrorBenchArgs {
    /// Size of the big blob, in MiB
    #[arg(long, default_value_t = 1024)]
    pub big_mib: usize,
    /// Runs of each big-blob transfer (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Number of distinct 1 MiB blobs for the latency figures
    #[arg(long, default_value_t = 40)]
    pub small_blobs: usize,
    /// Concurrent readers for the memory figure
    #[arg(long, default_value_t = 8)]
    pub readers: usize,
}

impl MirrorBenchArgs {
    fn check(&self) -> anyhow::Result<()> {
        // The big blob is built in memory.
        flag_in("--big-mib", self.big_mib, 1..=8192)?;
        flag_in("--runs", self.runs, 1..=100)?;
        flag_in("--small-blobs", self.small_blobs, 1..=10_000)?;
        flag_in("--readers", self.readers, 1..=1024)
    }
}

const REPO: &str = "bench/blobs";

fn random_blob(len: usize, seed: u64) -> Blob {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; len];
    rng.fill_bytes(&mut bytes);
    Blob {
        digest: BlobDigest::of(&bytes),
        media_type: "application/octet-stream",
        bytes: Bytes::from(bytes),
    }
}

/// GETs `url` (`http://HOST:PORT/path`), discarding the body; returns the time to the last
/// byte. A minimal HTTP/1.1 client reading into one reused buffer, so that the client's own
/// allocations do not set the pace of what is measured.
pub(crate) async fn timed_get(url: &str, expected: u64) -> anyhow::Result<Duration> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url
        .strip_prefix("http://")
        .context("bench URLs are http://")?;
    let (host, path) = rest.split_once('/').context("URL without a path")?;
    let started = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connect {host}"))?;
    sock.set_nodelay(true)?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    sock.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut filled = 0;
    let header_end = loop {
        let n = sock.read(&mut buf[filled..]).await?;
        ensure!(
            n > 0,
            "GET {url}: connection closed before the headers ended"
        );
        filled += n;
        if let Some(i) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(filled < buf.len(), "GET {url}: headers too long");
    };
    let head = String::from_utf8_lossy(&buf[..header_end]);
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {url}: {}",
        head.lines().next().unwrap_or("")
    );
    let mut got = (filled - header_end) as u64;
    while got < expected {
        let n = sock.read(&mut buf).await?;
        ensure!(
            n > 0,
            "GET {url}: body ended after {got} of {expected} bytes"
        );
        got += n as u64;
    }
    ensure!(
        got == expected,
        "GET {url}: {got} bytes, expected {expected}"
    );
    Ok(started.elapsed())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Peak resident set of a process, in bytes.
pub(crate) fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

pub async fn mirror(args: &MirrorBenchArgs) -> anyhow::Result<()> {
    args.check()?;
    let dir = tempfile::tempdir()?;
    let registry = tokio::task::block_in_place(|| Registry::try_start(dir.path(), &[]))?;
    let client = reqwest::Client::new();
    let big = random_blob(args.big_mib << 20, 1);
    let small: Vec<Blob> = (0..args.small_blobs)
        .map(|i| random_blob(1 << 20, 100 + i as u64))
        .collect();
    for blob in std::iter::once(&big).chain(&small) {
        push_blob(&client, &registry.url(), REPO, blob, None).await?;
    }
    let big_len = big.bytes.len() as u64;
    let data_dir = dir.path().join("shoald");
    let start_shoald = |data_dir: &Path| {
        tokio::task::block_in_place(|| {
            Shoald::start(
                data_dir,
                &[
                    "--insecure-registry",
                    &registry.addr,
                    "--cache-size",
                    "8GiB",
                ],
            )
        })
    };
    let shoald = start_shoald(&data_dir);
    let direct = |b: &Blob| format!("{}/v2/{REPO}/blobs/{}", registry.url(), b.digest);
    let mirrored = |b: &Blob| {
        format!(
            "{}/v2/{REPO}/blobs/{}?ns={}",
            shoald.url(),
            b.digest,
            registry.addr
        )
    };

    println!(
        "shoal bench mirror: {} MiB blob x {} runs, {} x 1 MiB blobs, {} readers",
        args.big_mib, args.runs, args.small_blobs, args.readers
    );
    let mut direct_big = Vec::new();
    for _ in 0..args.runs {
        direct_big.push(timed_get(&direct(&big), big_len).await?);
    }
    let miss_big = timed_get(&mirrored(&big), big_len).await?;
    let mut hit_big = Vec::new();
    for _ in 0..args.runs {
        hit_big.push(timed_get(&mirrored(&big), big_len).await?);
    }
    let (direct_big, hit_big) = (median(direct_big), median(hit_big));

    let (mut d_small, mut miss_small, mut hit_small) = (Vec::new(), Vec::new(), Vec::new());
    for blob in &small {
        d_small.push(timed_get(&direct(blob), 1 << 20).await?);
        miss_small.push(timed_get(&mirrored(blob), 1 << 20).await?);
        hit_small.push(timed_get(&mirrored(blob), 1 << 20).await?);
    }
    let (d_small, miss_small, hit_small) = (median(d_small), median(miss_small), median(hit_small));
    drop(shoald);

    // A fresh process for the memory figure, so that its peak is this phase's.
    let shoald = start_shoald(&data_dir);
    let url = format!(
        "{}/v2/{REPO}/blobs/{}?ns={}",
        shoald.url(),
        big.digest,
        registry.addr
    );
    let started = Instant::now();
    let readers = (0..args.readers).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { timed_get(&url, big_len).await })
    });
    for r in futures_util::future::join_all(readers).await {
        r??;
    }
    let together = started.elapsed();
    let rss = peak_rss(shoald.pid())?;

    println!();
    println!("| what | raw (direct docker-registry) | through shoald | ratio / added | target |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {} MiB blob, cache hit | {:.2} GB/s | {:.2} GB/s | {:.2}x | >= 2 GB/s, >= 1.0x |",
        args.big_mib,
        gbps(big_len, direct_big),
        gbps(big_len, hit_big),
        direct_big.as_secs_f64() / hit_big.as_secs_f64()
    );
    println!(
        "| {} MiB blob, miss (fetch + store + serve) | {:.2} GB/s | {:.2} GB/s | {:.2}x | |",
        args.big_mib,
        gbps(big_len, direct_big),
        gbps(big_len, miss_big),
        direct_big.as_secs_f64() / miss_big.as_secs_f64()
    );
    println!(
        "| 1 MiB blob, miss, median latency | {:.2} ms | {:.2} ms | +{:.2} ms | <= +10 ms |",
        ms(d_small),
        ms(miss_small),
        ms(miss_small.saturating_sub(d_small))
    );
    println!(
        "| 1 MiB blob, hit, median latency | {:.2} ms | {:.2} ms | {:+.2} ms | <= +10 ms |",
        ms(d_small),
        ms(hit_small),
        ms(hit_small) - ms(d_small)
    );
    println!(
        "| peak RSS, {} readers of the {} MiB blob | | {:.1} MiB ({:.2} GB/s together) | | <= 64 MiB |",
        args.readers,
        args.big_mib,
        rss as f64 / (1 << 20) as f64,
        gbps(big_len * args.readers as u64, together)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: MirrorBenchArgs,
    }

    #[test]
    fn flags_that_would_measure_nothing_are_refused() {
        for (flag, value) in [
            ("--runs", "0"),
            ("--small-blobs", "0"),
            ("--big-mib", "0"),
            ("--readers", "0"),
            ("--readers", "100000"),
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
