//! The swarm over loopback QUIC with the real `docker-registry`: one supernode (in process)
//! and several shoald (in process), pulling at the same moment.

mod common;

use shoal::registry::fetch_all_verified;

use std::sync::Arc;
use std::time::Duration;

use common::{HANG, Registry};
use shoal::image::Blob;
use shoal_daemon::config::{Config, ServeArgs};
use shoal_proto::BlobDigest;
use shoal_registry_proxy::UpstreamConfig;
use shoal_supernode::{Supernode, SupernodeConfig};

const REPO: &str = "swarm/blob";

fn random_blob(len: usize, seed: u8) -> Blob {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed);
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Blob::new("application/octet-stream", bytes)
}

/// A supernode with its data in `dir/supernode`, listening on `listen`, seeding from the
/// registry at `registry` over plain HTTP.
fn supernode_config(dir: &std::path::Path, registry: &str, listen: &str) -> SupernodeConfig {
    SupernodeConfig {
        listen: listen.parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("supernode"),
        upstream: UpstreamConfig {
            insecure: [registry.parse().unwrap()].into_iter().collect(),
            ..Default::default()
        },
        stripes: 0,
    }
}

async fn supernode(dir: &std::path::Path, registry: &Registry) -> Supernode {
    Supernode::start(supernode_config(dir, &registry.addr, "127.0.0.1:0"))
        .await
        .unwrap()
}

/// A supernode's `/status`.
async fn status(client: &reqwest::Client, sn: &Supernode) -> serde_json::Value {
    let url = format!("http://{}/status", sn.api_addr);
    let text = client.get(url).send().await.unwrap().text().await.unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Pushes `blob` to the registry and starts a supernode for it; returns the supernode,
/// the daemons' list of supernodes and the join token.
async fn blob_swarm(
    client: &reqwest::Client,
    dir: &std::path::Path,
    registry: &Registry,
    blob: &Blob,
) -> (Supernode, Vec<String>, String) {
    shoal::registry::push_blob(client, &registry.url(), REPO, blob, None)
        .await
        .unwrap();
    let sn = supernode(dir, registry).await;
    let supernodes = vec![sn.quic_addr.to_string()];
    let token = sn.join_token.to_string();
    (sn, supernodes, token)
}

/// Starts a shoald in the swarm; returns its URL and a stopper.
async fn daemon(
    dir: &std::path::Path,
    i: usize,
    registry: &str,
    supernodes: &[String],
    token: &str,
) -> (String, shoal_daemon::RunningDaemon) {
    let args = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.join(format!("d{i}"))),
        cache_size: Some("1GiB".into()),
        insecure_registries: vec![registry.to_owned()],
        supernodes: supernodes.to_vec(),
        peer_listen: Some("127.0.0.1:0".into()),
        join_token: Some(token.into()),
        ..Default::default()
    };
    let daemon = shoal_daemon::Daemon::bind(&Config::resolve(args, None).unwrap())
        .await
        .unwrap()
        .spawn()
        .unwrap();
    (daemon.url.clone(), daemon)
}

/// What 8 daemons pulling one blob at once left behind.
struct EightPulls {
    len: u64,
    /// Blob bytes the registry sent for the pulls.
    registry_sent: u64,
    /// Each daemon's `/metrics`, and the supernode's.
    daemons: Vec<String>,
    supernode: String,
}

/// 1 supernode (with `stripes`) and 8 daemons, all GET one 64 MiB blob at once; every
/// pull must get the right bytes.
fn eight_daemons_pull(stripes: u32, seed: u8) -> EightPulls {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(64 << 20, seed);
    rt().block_on(async {
        let client = reqwest::Client::new();
        shoal::registry::push_blob(&client, &registry.url(), REPO, &blob, None)
            .await
            .unwrap();
        let before = registry.blob_bytes_sent();
        let config = SupernodeConfig {
            stripes,
            ..supernode_config(dir.path(), &registry.addr, "127.0.0.1:0")
        };
        let sn = Supernode::start(config).await.unwrap();
        let supernodes = vec![sn.quic_addr.to_string()];
        let token = sn.join_token.to_string();
        let mut daemons = Vec::new();
        for i in 0..8 {
            daemons.push(daemon(dir.path(), i, &registry.addr, &supernodes, &token).await);
        }
        let digest = blob.digest;
        let urls: Vec<String> = daemons
            .iter()
            .map(|(url, _)| format!("{url}/v2/{REPO}/blobs/{digest}?ns={}", registry.addr))
            .collect();
        let pulls = fetch_all_verified(&client, &urls, &digest);
        for r in tokio::time::timeout(HANG, pulls).await.expect("pulls hung") {
            r.unwrap();
        }
        let registry_sent = registry.blob_bytes_sent() - before;
        let mut metrics = Vec::new();
        for (url, _) in &daemons {
            metrics.push(shoal::demo::metrics_text(&client, url).await.unwrap());
        }
        let api = format!("http://{}", sn.api_addr);
        EightPulls {
            len: blob.bytes.len() as u64,
            registry_sent,
            daemons: metrics,
            supernode: shoal::demo::metrics_text(&client, &api).await.unwrap(),
        }
    })
}

/// (a) 1 supernode + 8 daemons, all GET one 64 MiB blob at once: all get the right bytes,
/// the registry sends at most 1.05 x the blob, and the daemons got bytes from peers.
#[test]
fn eight_daemons_pull_one_blob_and_the_registry_sends_it_about_once() {
    let run = eight_daemons_pull(0, 1);
    let (sent, len) = (run.registry_sent, run.len);
    let from_peers: u64 = run
        .daemons
        .iter()
        .map(|m| shoal::demo::fetched_from(m, "Peer"))
        .sum();
    let from_seed: u64 = run
        .daemons
        .iter()
        .map(|m| shoal::demo::fetched_from(m, "Seed"))
        .sum();
    let answers = shoal::demo::supernode_answer_bytes(&run.supernode);
    println!(
        "registry sent {sent} bytes for a {len}-byte blob; daemons got {from_peers} from peers, {from_seed} from the seed; the supernode answered with {answers} bytes"
    );
    // Every daemon asked at least once and got the blob's group hashes: 32 bytes a group
    // (here of one piece).
    let groups = shoal_proto::PieceLayout::for_blob(len).unwrap().groups() as u64;
    assert!(
        answers >= 8 * 32 * groups,
        "{answers} bytes of answers\n{}",
        run.supernode
    );
    assert!(
        sent as f64 <= 1.05 * len as f64,
        "registry sent {sent} bytes for a {len}-byte blob"
    );
    assert!(from_peers > 0, "no bytes came from peers");
}

/// With stripe trees (`--stripes 4`), 8 daemons pull one 64 MiB blob at once: each gets
/// most of it unasked on its stripe streams, the seed sends the blob about once, and the
/// registry too.
#[test]
fn eight_daemons_pull_one_blob_down_stripe_trees() {
    let run = eight_daemons_pull(4, 3);
    let (sent, len) = (run.registry_sent, run.len);
    let streamed: Vec<u64> = run
        .daemons
        .iter()
        .map(|m| shoal::demo::stripe_bytes(m))
        .collect();
    let seed = shoal::demo::supernode_seed_bytes(&run.supernode);
    println!(
        "registry sent {sent} bytes for a {len}-byte blob; the seed {seed}; bytes on stripe streams per node: {streamed:?}"
    );
    assert!(
        sent as f64 <= 1.05 * len as f64,
        "registry sent {sent} bytes for a {len}-byte blob"
    );
    let total: u64 = streamed.iter().sum();
    assert!(
        total as f64 >= 0.5 * (8 * len) as f64,
        "at least half of all bytes came on stripe streams: {streamed:?}"
    );
    assert!(
        (seed as f64) < 2.0 * len as f64,
        "the seed sent {seed} bytes for a {len}-byte blob"
    );
}

/// A node that holds a whole blob (its pull over, the blob in its store) passes on the
/// piece hashes of a group with a piece: a later node takes pieces from it and checks them
/// against the supernode's group hashes. The node that pulled the blob kept its piece
/// hashes and sends them as they are; restarted, it has lost them and hashes each group
/// again from the blob. 256 MiB: 256 pieces in groups of two (smaller blobs have groups of
/// one piece).
#[test]
fn a_node_holding_a_whole_blob_passes_on_its_pieces_with_their_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(256 << 20, 7);
    let small = random_blob(1 << 20, 8);
    let layout = shoal_proto::PieceLayout::for_blob(blob.bytes.len() as u64).unwrap();
    assert_eq!(layout.group_pieces(), 2);
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let (sn, supernodes, token) = blob_swarm(&client, dir.path(), &registry, &blob).await;
        shoal::registry::push_blob(&client, &registry.url(), REPO, &small, None)
            .await
            .unwrap();
        let pull = |base: String, digest: shoal_proto::BlobDigest| {
            let client = client.clone();
            let registry = registry.addr.clone();
            async move {
                let url = format!("{base}/v2/{REPO}/blobs/{digest}?ns={registry}");
                let pull = shoal::registry::fetch_verified(&client, &url, &digest);
                tokio::time::timeout(HANG, pull)
                    .await
                    .expect("pull hung")
                    .unwrap();
            }
        };
        let start = |i| daemon(dir.path(), i, &registry.addr, &supernodes, &token);
        // Node 1 pulls after node 0, and finds it holding the whole blob.
        let (base0, stop0) = start(0).await;
        pull(base0.clone(), blob.digest).await;
        let (base1, stop1) = start(1).await;
        pull(base1.clone(), blob.digest).await;
        let from_peers = |m: &str| shoal::demo::fetched_from(m, "Peer");
        let rehashed = |m: &str| shoal::demo::groups_rehashed(m);
        let m1 = shoal::demo::metrics_text(&client, &base1).await.unwrap();
        let m0 = shoal::demo::metrics_text(&client, &base0).await.unwrap();
        println!(
            "node 1 got {} bytes from node 0, {} from the seed; node 0 hashed {} groups again",
            from_peers(&m1),
            shoal::demo::fetched_from(&m1, "Seed"),
            rehashed(&m0),
        );
        assert!(from_peers(&m1) > 0, "no piece came from node 0\n{m1}");
        let got = from_peers(&m1) + shoal::demo::fetched_from(&m1, "Seed");
        assert_eq!(got, blob.bytes.len() as u64, "{m1}");
        assert_eq!(rehashed(&m0), 0, "node 0 kept the hashes of its pull\n{m0}");

        // Node 0 restarted, node 1 gone: node 2 can only get the blob from node 0 (and the
        // seed), which hashes groups again. Node 0 pulls a small blob first: it then
        // connects to the supernode and says what it holds.
        stop1.stop().await;
        stop0.stop().await;
        let (base0, _stop0) = start(0).await;
        pull(base0.clone(), small.digest).await;
        let (base2, _stop2) = start(2).await;
        pull(base2.clone(), blob.digest).await;
        let m2 = shoal::demo::metrics_text(&client, &base2).await.unwrap();
        let m0 = shoal::demo::metrics_text(&client, &base0).await.unwrap();
        println!(
            "node 2 got {} bytes from node 0 restarted, which hashed {} groups again",
            from_peers(&m2),
            rehashed(&m0),
        );
        assert!(from_peers(&m2) > 0, "no piece came from node 0\n{m2}");
        assert!(rehashed(&m0) > 0, "{m0}");
        let status = self::status(&client, &sn).await;
        assert_eq!(status["banned"], 0, "{status}");
    });
}

/// Without a reachable supernode, shoald still serves: straight from the registry.
#[test]
fn an_unreachable_supernode_falls_back_to_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(3 << 20, 2);
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        shoal::registry::push_blob(&client, &registry.url(), REPO, &blob, None)
            .await
            .unwrap();
        // A token of some CA, and a supernode address where nothing listens.
        let ca = shoal_transport::ClusterCa::generate().unwrap();
        let token = shoal_transport::JoinToken::new(&ca).to_string();
        let dead = format!("127.0.0.1:{}", common::free_port());
        let (url, _stop) = daemon(dir.path(), 0, &registry.addr, &[dead], &token).await;
        let url = format!("{url}/v2/{REPO}/blobs/{}?ns={}", blob.digest, registry.addr);
        let got = tokio::time::timeout(
            Duration::from_secs(60),
            shoal::registry::fetch_verified(&client, &url, &blob.digest),
        )
        .await
        .expect("hung");
        got.unwrap();
    });
}

/// A node built to lie: it tells the supernode it holds every piece of `digest` and
/// answers every piece request with bytes of the right length but the wrong content, and
/// with the true piece hashes of the group when asked (so that its lie is found by the
/// piece's own hash, not by its group's).
async fn corrupting_peer(
    sn: &Supernode,
    registry: &Registry,
    digest: BlobDigest,
    blob: &[u8],
) -> (shoal_transport::Endpoint, quinn::Connection) {
    let len = blob.len() as u64;
    use shoal_proto::frame;
    use shoal_proto::message::{NodeId, Origin, StreamKind, ToSupernode, Uploads};
    let me = NodeId(0xbad);
    let endpoint =
        shoal_transport::Endpoint::bind("127.0.0.1:0".parse().unwrap(), &sn.ca.issue(me).unwrap())
            .unwrap();
    let garbage = tempfile::tempfile().unwrap();
    garbage.set_len(len).unwrap();
    let garbage = Arc::new(garbage);
    let layout = shoal_proto::PieceLayout::for_blob(len).unwrap();
    let hashes: Vec<shoal_proto::PieceHash> = layout
        .pieces()
        .map(|i| {
            let r = layout.range(i).unwrap();
            shoal_proto::PieceHash::of(&blob[r.start as usize..r.end as usize])
        })
        .collect();
    let lookup: shoal_transport::pieces::PieceLookup = Arc::new(move |_, i, asked| {
        let group = layout.group_range(layout.group_of(i));
        let group = hashes
            .get(group.start as usize..group.end as usize)?
            .to_vec();
        Some(shoal_transport::pieces::Found {
            file: garbage.clone(),
            range: layout.range(i).ok()?,
            hashes: match asked {
                true => shoal_transport::pieces::GroupHashes::Known(group),
                false => shoal_transport::pieces::GroupHashes::None,
            },
        })
    });
    let accept = endpoint.clone();
    let uploads = shoal_transport::pieces::UploadLimits::new(64, 0, 0);
    tokio::spawn(async move {
        while let Some((conn, _)) = accept.accept().await {
            tokio::spawn(shoal_transport::pieces::serve_pieces(
                conn,
                lookup.clone(),
                Arc::new(()),
                uploads.clone(),
            ));
        }
    });
    let (conn, _) = endpoint.connect(sn.quic_addr).await.unwrap();
    let peer_addr = endpoint.local_addr().unwrap();
    let origin = Origin {
        registry: registry.addr.clone(),
        repository: REPO.into(),
        authorization: None,
    };
    for msg in [
        ToSupernode::Hello {
            node: me,
            zone: String::new(),
            peer_addr,
        },
        ToSupernode::Want {
            digest,
            len,
            origin,
            known_groups: 0,
            hold: true,
            fed: false,
            feeds_tag: 0,
        },
        ToSupernode::Have {
            digest,
            pieces: layout.pieces().collect(),
            uploads: Uploads::default(),
        },
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[StreamKind::Control as u8]).await.unwrap();
        send.write_all(&frame::encode(&msg)).await.unwrap();
        send.finish().unwrap();
        let _ = recv.read_to_end(1 << 22).await;
    }
    // The supernode forgets a node whose control connection closes: keep it open.
    (endpoint, conn)
}

/// (c) A peer that sends corrupted pieces: every pull still completes with the right
/// digest, and the supernode bans the peer.
#[test]
fn a_corrupting_peer_is_banned_and_pulls_still_complete() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(16 << 20, 3);
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let (sn, supernodes, token) = blob_swarm(&client, dir.path(), &registry, &blob).await;
        let digest = blob.digest;
        let url = |base: &str| format!("{base}/v2/{REPO}/blobs/{digest}?ns={}", registry.addr);
        let _liar = corrupting_peer(&sn, &registry, digest, &blob.bytes).await;
        let mut daemons = Vec::new();
        let mut stops = Vec::new();
        for i in 0..4 {
            let (url, stop) = daemon(dir.path(), i, &registry.addr, &supernodes, &token).await;
            daemons.push(url);
            stops.push(stop);
        }
        let urls: Vec<String> = daemons.iter().map(|base| url(base)).collect();
        for r in tokio::time::timeout(HANG, fetch_all_verified(&client, &urls, &digest))
            .await
            .expect("pulls hung")
        {
            r.unwrap();
        }
        // Reports travel on their own; give the last one a moment.
        let mut status = serde_json::Value::Null;
        for _ in 0..50 {
            status = self::status(&client, &sn).await;
            if status["banned"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status["banned"], 1, "{status}");
    });
}

/// A proxy in front of the registry that answers the first blob GET with 429, and passes
/// everything else through; returns its address and the number of 429s it sent.
async fn throttling_proxy(registry: &str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let throttled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count, upstream) = (throttled.clone(), registry.to_owned());
    tokio::spawn(async move {
        // Bounded: the test makes a handful of connections.
        for _ in 0..256 {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let (count, upstream) = (count.clone(), upstream.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                if text.starts_with("GET ")
                    && text.contains("/blobs/sha256:")
                    && count.fetch_add(1, Ordering::SeqCst) == 0
                {
                    let answer = "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = client.write_all(answer.as_bytes()).await;
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                if server.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, throttled)
}

/// (c) A registry that answers 429 before it answers 200: the seed retries, every pull
/// completes with the right digest.
#[test]
fn a_registry_that_answers_429_then_200_does_not_fail_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(8 << 20, 4);
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        shoal::registry::push_blob(&client, &registry.url(), REPO, &blob, None)
            .await
            .unwrap();
        let (proxy, throttled) = throttling_proxy(&registry.addr).await;
        let sn = Supernode::start(supernode_config(dir.path(), &proxy, "127.0.0.1:0"))
            .await
            .unwrap();
        let supernodes = vec![sn.quic_addr.to_string()];
        let token = sn.join_token.to_string();
        let mut daemons = Vec::new();
        for i in 0..3 {
            daemons.push(daemon(dir.path(), i, &proxy, &supernodes, &token).await);
        }
        let digest = blob.digest;
        let urls: Vec<String> = daemons
            .iter()
            .map(|(url, _)| format!("{url}/v2/{REPO}/blobs/{digest}?ns={proxy}"))
            .collect();
        for r in tokio::time::timeout(HANG, fetch_all_verified(&client, &urls, &digest))
            .await
            .expect("pulls hung")
        {
            r.unwrap();
        }
        assert!(
            throttled.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the registry never said 429"
        );
    });
}

/// A restarted supernode learns again which nodes hold which blobs: nodes announce their
/// whole blobs when they reconnect.
#[test]
fn a_restarted_supernode_learns_the_swarm_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let (a, b) = (random_blob(2 << 20, 5), random_blob(1 << 20, 6));
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        for blob in [&a, &b] {
            shoal::registry::push_blob(&client, &registry.url(), REPO, blob, None)
                .await
                .unwrap();
        }
        let sn = supernode(dir.path(), &registry).await;
        let addr = sn.quic_addr;
        let token = sn.join_token.to_string();
        let (url, _stop) = daemon(dir.path(), 0, &registry.addr, &[addr.to_string()], &token).await;
        let get = |blob: &Blob| {
            let url = format!("{url}/v2/{REPO}/blobs/{}?ns={}", blob.digest, registry.addr);
            let (client, digest) = (client.clone(), blob.digest);
            async move {
                shoal::registry::fetch_verified(&client, &url, &digest)
                    .await
                    .unwrap()
            }
        };
        get(&a).await;
        drop(sn);

        // The same address and data directory (so the same CA and join token). The old
        // endpoint lets go of the address once its connections have drained, which takes
        // longer on a loaded machine: wait up to 15 s.
        let mut restarted = None;
        for _ in 0..150 {
            let config = supernode_config(dir.path(), &registry.addr, &addr.to_string());
            match Supernode::start(config).await {
                Ok(sn) => {
                    restarted = Some(sn);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let sn = restarted.expect("the supernode could not bind its address again");
        get(&b).await; // the node reconnects, says hello, and announces blob a
        let mut status = serde_json::Value::Null;
        for _ in 0..150 {
            status = self::status(&client, &sn).await;
            if status["tasks"] == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            status["tasks"], 2,
            "the restarted supernode knows only what was asked since: {status}"
        );
    });
}

/// A proxy in front of the registry that sends at most `rate` bytes a second to each
/// client, so that a seed takes a while over a blob; returns its address.
async fn slow_proxy(registry: &str, rate: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let upstream = registry.to_owned();
    tokio::spawn(async move {
        // Bounded: the test makes a few dozen connections.
        for _ in 0..256 {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    let _ = server_tx.shutdown().await;
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match server_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                }
                let _ = client_tx.shutdown().await;
            });
        }
    });
    addr
}

/// The supernode of a blob dies mid-pull: the next supernode in the blob's order takes it
/// over (seeds it once more and hears of every piece the nodes have), every pull completes,
/// and the registry sends the blob about twice (once per seed), not once per node.
#[test]
fn when_the_blobs_supernode_dies_mid_pull_the_next_one_takes_over() {
    supernode_dies_mid_pull(0);
}

/// The same with stripe trees: the next supernode names new feeds from its own trees, and
/// the streams move to them.
#[test]
fn when_the_blobs_supernode_dies_mid_pull_the_next_one_takes_over_the_stripe_trees() {
    supernode_dies_mid_pull(2);
}

fn supernode_dies_mid_pull(stripes: u32) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let blob = random_blob(32 << 20, 7);
    let rt = rt();
    rt.block_on(async {
        let client = reqwest::Client::new();
        shoal::registry::push_blob(&client, &registry.url(), REPO, &blob, None)
            .await
            .unwrap();
        // Seeding the blob takes the first supernode 4 s.
        let proxy = slow_proxy(&registry.addr, 8 << 20).await;
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let config = |dir| SupernodeConfig {
            stripes,
            ..supernode_config(dir, &proxy, "127.0.0.1:0")
        };
        let first = Supernode::start(config(&a)).await.unwrap();
        // One cluster: the second supernode uses the first one's CA and join token.
        std::fs::create_dir_all(b.join("supernode/ca")).unwrap();
        for file in ["ca/ca.pem", "ca/ca.key", "join-token"] {
            std::fs::copy(
                a.join("supernode").join(file),
                b.join("supernode").join(file),
            )
            .unwrap();
        }
        let second = Supernode::start(config(&b)).await.unwrap();
        let addrs = [first.quic_addr, second.quic_addr];
        let ranked = shoal_daemon::swarm::rendezvous(&blob.digest, &addrs);
        let (doomed, survivor) = if ranked[0] == first.quic_addr {
            (first, second)
        } else {
            (second, first)
        };
        let supernodes: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let token = doomed.join_token.to_string();
        let mut daemons = Vec::new();
        for i in 0..4 {
            daemons.push(daemon(dir.path(), i, &proxy, &supernodes, &token).await);
        }
        let digest = blob.digest;
        let urls: Vec<String> = daemons
            .iter()
            .map(|(url, _)| format!("{url}/v2/{REPO}/blobs/{digest}?ns={proxy}"))
            .collect();
        let before = registry.blob_bytes_sent();
        let pulls = tokio::spawn({
            let client = client.clone();
            async move { fetch_all_verified(&client, &urls, &digest).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !pulls.is_finished(),
            "the pulls ended before the supernode died"
        );
        drop(doomed);
        for r in tokio::time::timeout(HANG, pulls)
            .await
            .expect("pulls hung")
            .unwrap()
        {
            r.unwrap();
        }
        let sent = registry.blob_bytes_sent() - before;
        let len = blob.bytes.len() as u64;
        println!("registry sent {sent} bytes for a {len}-byte blob");
        let status = status(&client, &survivor).await;
        assert_eq!(
            status["tasks"], 1,
            "the next supernode never took the blob: {status}"
        );
        // Once per seed, the first one's partly: far less than once per node.
        assert!(
            sent as f64 <= 2.2 * len as f64,
            "registry sent {sent} bytes for a {len}-byte blob"
        );
        let mut streamed = 0;
        for (url, _) in &daemons {
            let m = shoal::demo::metrics_text(&client, url).await.unwrap();
            streamed += shoal::demo::stripe_bytes(&m);
        }
        println!("{streamed} bytes came on stripe streams");
        assert_eq!(
            streamed > 0,
            stripes > 0,
            "{streamed} bytes on stripe streams"
        );
    });
}
