//! The swarm as operators run it: `shoal-supernode` and `shoald` processes, the real
//! `docker-registry`, and real containerd instances pulling with `ctr`.

mod common;

use shoal::registry::fetch_all_verified;

use std::time::{Duration, Instant};

use common::{Containerd, HANG, Registry, Shoald, SupernodeProc, configure_containerd};
use shoal::image::{Blob, Image, LayerSpec};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn start_daemon(
    dir: &std::path::Path,
    name: &str,
    registry: &Registry,
    sn: &SupernodeProc,
) -> Shoald {
    let mut args = vec!["--insecure-registry".to_owned(), registry.addr.clone()];
    args.extend(sn.shoald_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Shoald::start(&dir.join(name), &args)
}

/// (b) `ctr images pull` through two daemons of one swarm: both pulls unpack, every blob
/// crossed from the registry once (the seed's fetch), and the second node's bytes came
/// from the swarm.
#[test]
fn ctr_pulls_through_two_daemons_that_share_layers() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let image = Image::build(
        &[
            LayerSpec::Random { size: 24 << 20 },
            LayerSpec::Gzip { files: 20 },
            LayerSpec::Random { size: 1 },
        ],
        11,
    );
    rt().block_on(shoal::registry::push(
        &registry.url(),
        "swarm/app",
        "1",
        &image,
        None,
    ))
    .unwrap();
    let sn = SupernodeProc::start(&dir.path().join("sn"), &registry.addr);
    let reference = format!("{}/swarm/app:1", registry.addr);
    let mut nodes = Vec::new();
    for n in ["a", "b"] {
        let shoald = start_daemon(dir.path(), n, &registry, &sn);
        let node_dir = dir.path().join(format!("node-{n}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let hosts = configure_containerd(&node_dir, &registry.addr, &shoald);
        let containerd = Containerd::start(&node_dir.join("containerd"));
        nodes.push((shoald, hosts, containerd));
    }
    for (_, hosts, containerd) in &nodes {
        containerd.pull(hosts, &reference, None);
    }
    for blob in image.blobs() {
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "blob {} crossed the registry other than once",
            blob.digest
        );
    }
    let second = nodes[1].0.metrics();
    let from_swarm =
        shoal::demo::fetched_from(&second, "Peer") + shoal::demo::fetched_from(&second, "Seed");
    assert!(
        from_swarm >= image.layers[0].bytes.len() as u64,
        "second node got {from_swarm} bytes from the swarm:\n{second}"
    );
    assert_eq!(
        shoal::demo::fetched_from(&second, "Registry"),
        0,
        "{second}"
    );
}

fn random_blob(len: usize, seed: u64) -> Blob {
    Image::build(&[LayerSpec::Random { size: len }], seed).layers[0].clone()
}

/// (c) A peer killed (SIGKILL) mid-transfer: the other nodes' pulls complete with the
/// right digest.
#[test]
fn a_peer_killed_mid_transfer_does_not_fail_the_others() {
    a_peer_killed_mid_transfer(&["--stripes", "0"]);
}

/// (b) with stripe trees: the killed node fed others a stripe; their streams end, the
/// stripe comes from parents, and the trees mend.
#[test]
fn a_feed_killed_mid_transfer_does_not_fail_the_others() {
    a_peer_killed_mid_transfer(&["--stripes", "2"]);
}

/// Three daemons pull a blob from a supernode started with `flags`; one is killed 150 ms in.
fn a_peer_killed_mid_transfer(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(96 << 20, 12);
    let rt = rt();
    rt.block_on(shoal::registry::push(
        &registry.url(),
        "swarm/app",
        "1",
        &Image::build(&[LayerSpec::Empty], 0),
        None,
    ))
    .unwrap();
    rt.block_on(shoal::registry::push_blob(
        &reqwest::Client::new(),
        &registry.url(),
        "swarm/app",
        &blob,
        None,
    ))
    .unwrap();
    let sn = SupernodeProc::start_with(&dir.path().join("sn"), &registry.addr, flags);
    let mut daemons: Vec<Shoald> = ["a", "b", "c"]
        .iter()
        .map(|n| start_daemon(dir.path(), n, &registry, &sn))
        .collect();
    let urls: Vec<String> = daemons
        .iter()
        .map(|d| {
            format!(
                "{}/v2/swarm/app/blobs/{}?ns={}",
                d.url(),
                blob.digest,
                registry.addr
            )
        })
        .collect();
    let victim = daemons.remove(0);
    rt.block_on(async {
        let client = reqwest::Client::new();
        let digest = blob.digest;
        let pulls = tokio::spawn(async move { fetch_all_verified(&client, &urls, &digest).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        victim.kill9();
        let started = Instant::now();
        let results = tokio::time::timeout(HANG, pulls)
            .await
            .expect("pulls hung")
            .unwrap();
        for r in &results[1..] {
            r.as_ref().unwrap();
        }
        println!("survivors finished {:?} after the kill", started.elapsed());
    });
}

/// (c) The supernode killed mid-pull: the pulls complete (from peers and the registry).
#[test]
fn the_supernode_killed_mid_pull_does_not_fail_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(64 << 20, 13);
    let rt = rt();
    rt.block_on(shoal::registry::push_blob(
        &reqwest::Client::new(),
        &registry.url(),
        "swarm/app",
        &blob,
        None,
    ))
    .unwrap();
    let sn = SupernodeProc::start(&dir.path().join("sn"), &registry.addr);
    let daemons: Vec<Shoald> = ["a", "b"]
        .iter()
        .map(|n| start_daemon(dir.path(), n, &registry, &sn))
        .collect();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let urls = daemons
            .iter()
            .map(|d| {
                format!(
                    "{}/v2/swarm/app/blobs/{}?ns={}",
                    d.url(),
                    blob.digest,
                    registry.addr
                )
            })
            .collect::<Vec<_>>();
        let digest = blob.digest;
        let pulls = tokio::spawn(async move { fetch_all_verified(&client, &urls, &digest).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(sn);
        for r in tokio::time::timeout(HANG, pulls)
            .await
            .expect("pulls hung")
            .unwrap()
        {
            r.unwrap();
        }
    });
}
