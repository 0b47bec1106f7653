//! The `bittorrent` baseline of `shoal bench scale-out --netns`: the image's blobs spread by
//! BitTorrent, the design class Kraken follows. One seed host (the registry's namespace)
//! runs `opentracker` and an `aria2c` seeding the blobs; every node runs `aria2c` in its own
//! namespace under the same caps, and keeps seeding after it completes, as a Kraken agent
//! does. A node's completion time is when aria2c has every piece (its
//! `--on-bt-download-complete` hook), measured from the moment all clients were started.
//!
//! Tuned for a fair fight on a LAN: no DHT or local discovery (the tracker knows everyone),
//! peer exchange on, re-announce every 2 s so that nodes find each other as fast as the
//! tracker allows, and the piece size shoal would use for the image's largest layer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};

use crate::image::Image;
use crate::netns::Lab;
use crate::report::Outcome;
use crate::testbed::Proc;

const TRACKER_PORT: u16 = 6969;
const SEED_PORT: u16 = 6881;
/// The hook aria2c runs when a node has every piece: it appends the wall-clock time to
/// the file named by `SHOAL_BT_DONE` (aria2c passes its environment on).
const HOOK: &str = "#!/bin/sh\ndate +%s.%N >> \"$SHOAL_BT_DONE\"\n";

/// The path of `tool`, or an error that says how to install it.
fn need(tool: &str) -> anyhow::Result<PathBuf> {
    crate::testbed::find_tool(tool).context("the bittorrent baseline needs it")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spawns `program args…` in host `k`'s namespace with its output going to `log`.
fn spawn_in(
    lab: &Lab,
    host: usize,
    program: &Path,
    args: &[&str],
    env: Option<(&str, &Path)>,
    log: &Path,
) -> anyhow::Result<Proc> {
    let mut cmd = lab.command(host, program);
    cmd.args(args);
    if let Some((key, value)) = env {
        cmd.env(key, value);
    }
    Proc::spawn_logged(cmd, log)
}

/// Runs the baseline on `nodes` (host indices of `lab`) with host 0 as the seed host;
/// `work` is a scratch directory; `deadline` bounds the whole download.
pub async fn run_baseline(
    lab: &Lab,
    nodes: &[usize],
    image: &Image,
    work: &Path,
    deadline: Duration,
    lower_bound: f64,
) -> anyhow::Result<Outcome> {
    let aria2c = need("aria2c")?;
    let opentracker = need("opentracker")?;
    let mktorrent = need("mktorrent")?;
    let seed_addr = lab.addr(0);

    // The seed's copy of the blobs, the torrent, and the tracker's whitelist (Debian's
    // opentracker only tracks listed info hashes).
    let bt = work.join("bt");
    let content = bt.join("seed").join("image");
    std::fs::create_dir_all(&content)?;
    for blob in image.blobs() {
        std::fs::write(content.join(blob.digest.hex()), &blob.bytes)?;
    }
    let largest = image
        .layers
        .iter()
        .map(|l| l.bytes.len())
        .max()
        .unwrap_or(0);
    let piece_log2 = shoal_proto::PieceLayout::for_blob(largest as u64)?
        .piece_size()
        .trailing_zeros()
        .to_string();
    let torrent = bt.join("image.torrent");
    run(Command::new(&mktorrent)
        .args(["-a", &format!("http://{seed_addr}:{TRACKER_PORT}/announce")])
        .args(["-l", &piece_log2, "-o"])
        .arg(&torrent)
        .arg(&content))?;
    let shown = run(Command::new(&aria2c).arg("-S").arg(&torrent))?;
    let info_hash = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("Info Hash: "))
        .context("aria2c -S did not show the info hash")?
        .trim()
        .to_owned();
    std::fs::write(bt.join("whitelist"), format!("{info_hash}\n"))?;
    let hook = bt.join("done.sh");
    std::fs::write(&hook, HOOK)?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let s = |p: &Path| p.to_str().map(str::to_owned).context("path is not UTF-8");
    let (bt_dir, torrent_path, hook_path) = (s(&bt)?, s(&torrent)?, s(&hook)?);
    let common = [
        "--enable-dht=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--seed-ratio=0.0",
        "--bt-tracker-interval=2",
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
    ];
    let mut procs = Vec::new();
    let tracker_addr = seed_addr.to_string();
    let port = TRACKER_PORT.to_string();
    procs.push(spawn_in(
        lab,
        0,
        &opentracker,
        &[
            "-i",
            &tracker_addr,
            "-p",
            &port,
            "-P",
            &port,
            "-d",
            &bt_dir,
            "-u",
            "nobody",
            "-w",
            "whitelist",
        ],
        None,
        &bt.join("tracker.log"),
    )?);
    let seed_dir = format!("--dir={}", s(&bt.join("seed"))?);
    let seed_port = format!("--listen-port={SEED_PORT}");
    let mut seed_args: Vec<&str> = vec![
        &seed_dir,
        &seed_port,
        "--check-integrity=false",
        "--bt-seed-unverified=true",
    ];
    seed_args.extend(common);
    seed_args.push(&torrent_path);
    procs.push(spawn_in(
        lab,
        0,
        &aria2c,
        &seed_args,
        None,
        &bt.join("seed.log"),
    )?);
    wait_seeded(seed_addr, &info_hash).await?;

    let egress_start = lab.tx_bytes(0);
    let started = Instant::now();
    let started_wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let mut done_files = Vec::new();
    let hook_arg = format!("--on-bt-download-complete={hook_path}");
    for (i, &host) in nodes.iter().enumerate() {
        let dir = bt.join(format!("node-{i}"));
        let done = bt.join(format!("node-{i}.done"));
        let dir_arg = format!("--dir={}", s(&dir)?);
        let mut node_args: Vec<&str> = vec![&dir_arg, &hook_arg];
        node_args.extend(common);
        node_args.push(&torrent_path);
        procs.push(spawn_in(
            lab,
            host,
            &aria2c,
            &node_args,
            Some(("SHOAL_BT_DONE", &done)),
            &bt.join(format!("node-{i}.log")),
        )?);
        done_files.push(done);
    }

    let mut times: Vec<Option<f64>> = vec![None; nodes.len()];
    let mut series = vec![(0.0, 0)];
    let mut last_print = Instant::now();
    while times.iter().any(Option::is_none) && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (t, file) in times.iter_mut().zip(&done_files) {
            if t.is_none()
                && let Ok(text) = std::fs::read_to_string(file)
                && let Some(Ok(at)) = text.lines().next().map(str::parse::<f64>)
            {
                *t = Some((at - started_wall).max(0.0));
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let egress = lab.tx_bytes(0).saturating_sub(egress_start);
        series.push((elapsed, egress));
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "[bittorrent {elapsed:6.1} s = {:.2} S/B] {}/{} done; seed host sent {}",
                elapsed / lower_bound,
                times.iter().flatten().count(),
                nodes.len(),
                crate::report::human_bytes(egress),
            );
        }
    }
    let egress = lab.tx_bytes(0).saturating_sub(egress_start);
    drop(procs);

    let mut outcome = Outcome {
        registry_egress_bytes: egress,
        registry_egress_over_time: series,
        ..Default::default()
    };
    for t in times {
        match t {
            Some(t) => outcome.node_completion_s.push(t),
            None => outcome.failures += 1,
        }
    }
    if outcome.failures > 0 {
        eprintln!(
            "[bittorrent] {} node(s) did not finish within {} s (logs in {})",
            outcome.failures,
            deadline.as_secs(),
            bt.display()
        );
    }
    let received = image.blob_bytes() * outcome.node_completion_s.len() as u64;
    outcome.peer_bytes = received.saturating_sub(egress);
    Ok(outcome)
}

/// Waits until the tracker lists the seed as complete, so that the clients find it on
/// their first announce.
async fn wait_seeded(tracker: std::net::Ipv4Addr, info_hash: &str) -> anyhow::Result<()> {
    let raw = hex::decode(info_hash).context("info hash is not hex")?;
    let escaped: String = raw.iter().map(|b| format!("%{b:02X}")).collect();
    let url = format!("http://{tracker}:{TRACKER_PORT}/scrape?info_hash={escaped}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(&url).send().await
            && let Ok(body) = r.bytes().await
            && seeders(&body) > 0
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the tracker at {tracker}:{TRACKER_PORT} did not list the seed within 30 s")
}

/// The `complete` count of a bencoded scrape answer (one torrent).
fn seeders(body: &[u8]) -> u64 {
    let key = b"8:completei";
    body.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            body[at + key.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, b| {
                    n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
                })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_answers_are_read() {
        let body =
            b"d5:filesd20:aaaaaaaaaaaaaaaaaaaad8:completei3e10:downloadedi0e10:incompletei2eeee";
        assert_eq!(seeders(body), 3);
        assert_eq!(seeders(b"d5:filesdee"), 0);
        assert_eq!(seeders(b"8:completei"), 0);
    }
}
