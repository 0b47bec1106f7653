//! `shoal bench scale-out --netns`: the same swarm as on loopback, but every host (the
//! registry, each supernode, each node) in its own network namespace with its upload and
//! download capped (`--bandwidth`), and each node's pull made from inside its namespace
//! (containerd sits next to shoald), so that only swarm and registry traffic crosses the
//! caps. The lower bound is `S/B`: no distribution delivers an image of S bytes to a node
//! whose link carries B bytes/s faster.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::bench_scale::{REPO, ScaleOutArgs, TAG, wait_healthy};
use crate::image::Image;
use crate::netns::Lab;
use crate::report::{Outcome, Run};
use crate::testbed::{Proc, Registry};

const REGISTRY_PORT: u16 = 5000;
const SUPERNODE_PORT: u16 = 7100;
const SUPERNODE_API_PORT: u16 = 7101;
const PEER_PORT: u16 = 7000;
const MIRROR_PORT: u16 = 5050;

fn spawn_in(lab: &Lab, host: usize, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let mut cmd = lab.command(host, &std::env::current_exe()?);
    cmd.args(args)
        .env("SHOAL_LOG", crate::bench_scale::child_log_filter());
    crate::node::dies_with_bench(&mut cmd);
    Proc::spawn_logged(cmd, log)
}

/// Processes in namespaces start slower than on loopback.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

pub async fn scale_out(args: &ScaleOutArgs, image: &Image) -> anyhow::Result<Run> {
    let started = Instant::now();
    let bw = args.bandwidth;
    let hosts = 1 + args.supernodes + args.nodes;
    eprintln!(
        "netns: creating {hosts} namespaces capped at {} each way",
        crate::report::human_bytes(bw) + "/s"
    );
    let lab = tokio::task::block_in_place(|| Lab::create(hosts, bw))?;
    let (_tmp, dir) = crate::bench_scale::work_dir(args)?;
    let client = reqwest::Client::new();
    let image_bytes = image.blob_bytes();

    // Host 0: the registry.
    let registry_addr = format!("{}:{REGISTRY_PORT}", lab.addr(0));
    let wrap: Vec<String> = lab.wrap(0);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    crate::testbed::find_tool("docker-registry").context("--netns runs the real registry")?;
    let registry = tokio::task::block_in_place(|| {
        Registry::try_start_at(&dir.join("registry"), &[], &registry_addr, &wrap)
    })?;
    crate::registry::push(&registry.url(), REPO, TAG, image, None).await?;

    // Hosts 1..=S: supernodes, sharing the first one's CA and join token.
    let mut procs = Vec::new();
    let mut supernodes = Vec::new();
    let mut token = String::new();
    for s in 0..args.supernodes {
        let host = 1 + s;
        let addr = lab.addr(host);
        let data = dir.join(format!("supernode-{s}"));
        if s > 0 {
            let first = dir.join("supernode-0");
            std::fs::create_dir_all(data.join("ca"))?;
            for file in ["ca/ca.pem", "ca/ca.key", "join-token"] {
                std::fs::copy(first.join(file), data.join(file))?;
            }
        }
        let log = dir.join(format!("supernode-{s}.log"));
        let argv = strs(&[
            "__supernode",
            "--listen",
            &format!("{addr}:{SUPERNODE_PORT}"),
            "--api-listen",
            &format!("{addr}:{SUPERNODE_API_PORT}"),
            "--insecure-registry",
            &registry_addr,
            "--data-dir",
            data.to_str().context("work directory is not UTF-8")?,
            "--stripes",
            &args.stripes.to_string(),
        ]);
        procs.push(spawn_in(&lab, host, &argv, &log)?);
        wait_healthy(
            &client,
            &format!("http://{addr}:{SUPERNODE_API_PORT}/healthz"),
            &log,
            HEALTHY_WITHIN,
        )
        .await?;
        if s == 0 {
            token = std::fs::read_to_string(data.join("join-token"))?
                .trim()
                .to_owned();
        }
        supernodes.push(format!("{addr}:{SUPERNODE_PORT}"));
    }

    // The rest: nodes.
    let first_node = 1 + args.supernodes;
    for i in 0..args.nodes {
        let host = first_node + i;
        let addr = lab.addr(host);
        let data = dir.join(format!("node-{i}"));
        let log = dir.join(format!("node-{i}.log"));
        let mut argv = strs(&[
            "__shoald",
            "--listen",
            &format!("0.0.0.0:{MIRROR_PORT}"),
            "--peer-listen",
            &format!("{addr}:{PEER_PORT}"),
            "--insecure-registry",
            &registry_addr,
            "--join-token",
            &token,
            "--data-dir",
            data.to_str().context("work directory is not UTF-8")?,
            "--max-upload-peers",
            &args.max_upload_peers.to_string(),
        ]);
        for s in &supernodes {
            argv.extend(["--supernode".to_owned(), s.clone()]);
        }
        if args.upload_link_known {
            argv.extend(["--upload-link".to_owned(), args.bandwidth.to_string()]);
        }
        procs.push(spawn_in(&lab, host, &argv, &log)?);
        wait_healthy(
            &client,
            &format!("http://{addr}:{MIRROR_PORT}/healthz"),
            &log,
            HEALTHY_WITHIN,
        )
        .await?;
    }
    eprintln!(
        "netns: registry, {} supernode(s), {} nodes up; pulling at once",
        args.supernodes, args.nodes
    );

    let mirror = format!("http://127.0.0.1:{MIRROR_PORT}");
    let lower_bound = image_bytes as f64 / bw as f64;
    let nodes: Vec<usize> = (first_node..first_node + args.nodes).collect();
    let egress_before = registry.blob_bytes_sent();
    let supernode_hosts = 1..=args.supernodes;
    let links_before: Vec<(u64, u64)> =
        supernode_hosts.clone().map(|k| lab.link_bytes(k)).collect();
    let mut shoal = pull_all(
        &lab,
        &nodes,
        (&mirror, &registry_addr),
        "shoal",
        lower_bound,
    )
    .await?;
    shoal.registry_egress_bytes = registry.blob_bytes_sent() - egress_before;
    let (mut sent, mut received) = (0, 0);
    for (k, (tx, rx)) in supernode_hosts.zip(links_before) {
        let (tx_now, rx_now) = lab.link_bytes(k);
        sent += tx_now.saturating_sub(tx);
        received += rx_now.saturating_sub(rx);
    }
    shoal.supernode_sent_bytes = Some(sent);
    shoal.supernode_received_bytes = Some(received);
    let (mut answers, mut peer_rtts, mut supernode_rtts) = ((0.0, 0), (0.0, 0), (0.0, 0));
    let mut beyond = 0;
    for &host in &nodes {
        let url = format!("http://{}:{MIRROR_PORT}/metrics", lab.addr(host));
        let metrics = metrics_of(&client, &url).await?;
        shoal.peer_bytes += crate::demo::fetched_from(&metrics, "Peer");
        shoal.seed_bytes += crate::demo::fetched_from(&metrics, "Seed");
        shoal.fallback_bytes += crate::demo::fetched_from(&metrics, "Registry");
        beyond += crate::demo::uploads_beyond(&metrics);
        add(&mut answers, &metrics, "shoald_peer_answer_seconds");
        add(&mut peer_rtts, &metrics, "shoald_peer_rtt_seconds");
        add(
            &mut supernode_rtts,
            &metrics,
            "shoald_supernode_rtt_seconds",
        );
    }
    shoal.peer_answer_s = mean(answers);
    shoal.peer_rtt_s = mean(peer_rtts);
    shoal.supernode_rtt_s = mean(supernode_rtts);
    shoal.uploads_beyond_slots = args.upload_link_known.then_some(beyond);
    let mut answer_bytes = 0;
    for s in 0..args.supernodes {
        let url = format!("http://{}:{SUPERNODE_API_PORT}/metrics", lab.addr(1 + s));
        answer_bytes += crate::demo::supernode_answer_bytes(&metrics_of(&client, &url).await?);
    }
    shoal.supernode_answer_bytes = Some(answer_bytes);
    shoal.supernode_link_bytes_per_s = Some(bw);
    drop(procs);

    let mut baselines = BTreeMap::new();
    if args.baseline.iter().any(|b| b == "direct") {
        let direct_base = format!("http://{registry_addr}");
        let before = registry.blob_bytes_sent();
        let mut direct = pull_all(&lab, &nodes, (&direct_base, ""), "direct", lower_bound).await?;
        direct.registry_egress_bytes = registry.blob_bytes_sent() - before;
        baselines.insert("direct".to_owned(), direct.finish(image_bytes, lower_bound));
    }
    if args.baseline.iter().any(|b| b == "bittorrent") {
        // Generous: four times what the registry's own link needs to serve everyone.
        let deadline = Duration::from_secs_f64(60.0 + 4.0 * args.nodes as f64 * lower_bound);
        let bt =
            crate::bench_bt::run_baseline(&lab, &nodes, image, &dir, deadline, lower_bound).await?;
        baselines.insert("bittorrent".to_owned(), bt.finish(image_bytes, lower_bound));
    }
    drop(registry);
    drop(lab);
    Ok(Run {
        mode: "netns",
        nodes: args.nodes,
        image_bytes,
        layers: args.layers,
        bandwidth_bytes_per_s: bw,
        lower_bound_s: lower_bound,
        wall_s: started.elapsed().as_secs_f64(),
        shoal: shoal.finish(image_bytes, lower_bound),
        baselines,
        cross_check: None,
    })
}

/// Starts one puller per node host, tells them all to go at once, and collects their
/// times; `from` is (base URL, `ns`), `ns` empty for a direct pull.
/// A node's `/metrics`. A pooled connection the daemon has just closed fails the first
/// request; a fresh one is tried before giving up.
async fn metrics_of(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let mut tries = 0;
    loop {
        tries += 1;
        match client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
        {
            Ok(response) => return Ok(response.text().await?),
            Err(e) if tries < 3 => tracing::debug!(%url, error = %e, "metrics: trying again"),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {url}"))),
        }
    }
}

async fn pull_all(
    lab: &Lab,
    hosts: &[usize],
    (base, ns): (&str, &str),
    what: &str,
    lower_bound: f64,
) -> anyhow::Result<Outcome> {
    let mut children = Vec::new();
    for &host in hosts {
        let wrap = lab.wrap(host);
        let mut cmd = tokio::process::Command::new(&wrap[0]);
        cmd.args(&wrap[1..])
            .arg(std::env::current_exe()?)
            .args(["__pull", "--base", base, "--repo", REPO, "--tag", TAG]);
        if !ns.is_empty() {
            cmd.args(["--ns", ns]);
        }
        crate::node::dies_with_bench(cmd.as_std_mut());
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a puller")?;
        children.push(child);
    }
    // Let every puller start before the signal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let egress_start = lab.tx_bytes(0);
    let started = Instant::now();
    for child in &mut children {
        let stdin = child.stdin.as_mut().context("puller without stdin")?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let results = children.into_iter().map(|mut child| async move {
        let stdout = child.stdout.take().context("puller without stdout")?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
        let _ = child.wait().await;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ok") => words
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .context("puller said ok without a time"),
            _ => bail!("pull failed: {}", line.trim()),
        }
    });
    let mut all = Box::pin(futures_util::future::join_all(results));
    let mut series = vec![(0.0, 0)];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_print = Instant::now();
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = tick.tick() => {
                let t = started.elapsed().as_secs_f64();
                let egress = lab.tx_bytes(0).saturating_sub(egress_start);
                series.push((t, egress));
                if last_print.elapsed() >= Duration::from_secs(2) {
                    last_print = Instant::now();
                    eprintln!(
                        "[{what} {t:6.1} s = {:.2} S/B] registry link sent {}",
                        t / lower_bound,
                        crate::report::human_bytes(egress),
                    );
                }
            }
        }
    };
    series.push((
        started.elapsed().as_secs_f64(),
        lab.tx_bytes(0).saturating_sub(egress_start),
    ));
    let mut outcome = Outcome {
        registry_egress_over_time: series,
        ..Default::default()
    };
    for r in results {
        match r {
            Ok(t) => outcome.node_completion_s.push(t),
            Err(e) => {
                eprintln!("[{what}] {e:#}");
                outcome.failures += 1;
            }
        }
    }
    ensure!(
        !outcome.node_completion_s.is_empty() || hosts.is_empty(),
        "[{what}] no node completed its pull"
    );
    Ok(outcome)
}

/// Adds a node's sum and count of histogram `name` to `total`.
fn add(total: &mut (f64, u64), metrics: &str, name: &str) {
    let (sum, count) = crate::demo::histogram(metrics, name);
    *total = (total.0 + sum, total.1 + count);
}

fn mean((sum, count): (f64, u64)) -> Option<f64> {
    (count > 0).then(|| sum / count as f64)
}
