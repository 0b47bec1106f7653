//! How many announcements of new pieces (`Have`) one shoal-supernode takes per second on
//! loopback, from 64 nodes at once: each on a QUIC stream of its own (as shoald sent them
//! before), and as frames on one stream per node (as it sends them now). `shoal sim` counts what a swarm sends (`supernode_announcements`): 10,000 nodes
//! pulling 1 GiB at 1 Gbit/s send about 380,000 streams a second to one supernode. The raw
//! limit beside it: the same streams to a server that reads them and does nothing else.
//!
//! And how many questions (`Want`, answered with the scheduler's parents) it answers per
//! second, one at a time per node as a pull asks them, each on a stream of its own: a
//! 10,000-node swarm pulling 1 GiB at 1 Gbit/s asks about 70,000 a second (`shoal sim`).
//! Asking them one after another on one stream per pull was tried (2026-12-02): 48,000 a
//! second against 52,000, no gain, so shoald keeps a stream each. Needs `docker-registry`
//! (the seed fetches the asked-for blob from it once).
//!
//! `cargo bench --bench announce` (add `-- --quick` for a short run).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_proto::frame::{FrameDecoder, MAX_FRAME, encode};
use shoal_proto::message::{FromSupernode, NodeId, Origin, StreamKind, ToSupernode, Uploads};
use shoal_proto::{BlobDigest, PieceIndex, PieceLayout};
use shoal_supernode::{Supernode, SupernodeConfig};
use shoal_transport::{ClusterCa, Endpoint};

/// Nodes announcing at once.
const NODES: usize = 64;
/// Streams each node keeps open at once (a daemon announces every 20 ms and asks its
/// questions meanwhile: a few at a time).
const IN_FLIGHT: usize = 4;

const BLOB_LEN: u64 = 1 << 30;

/// One message on a stream of its own, and its (empty) answer read to the end.
async fn exchange(conn: &quinn::Connection, msg: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(msg).await.expect("write");
    send.finish().expect("finish");
    recv.read_to_end(MAX_FRAME as usize).await.expect("answer");
}

fn control(msg: &ToSupernode) -> Vec<u8> {
    let mut bytes = vec![StreamKind::Control as u8];
    bytes.extend_from_slice(&encode(msg));
    bytes
}

/// `NODES` connections to `addr`, each with an identity from `ca`; each says hello and
/// holds the blob first when `hello` (so that its announcements reach a task).
async fn nodes(ca: &ClusterCa, addr: SocketAddr, hello: bool) -> Nodes {
    let digest = BlobDigest::of(b"announced blob");
    let mut nodes = Nodes::default();
    for i in 0..NODES {
        let node = NodeId(1_000 + i as u64);
        let identity = ca.issue(node).expect("identity");
        let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
        let (conn, _) = endpoint.connect(addr).await.expect("connect");
        if hello {
            let hello = ToSupernode::Hello {
                node,
                zone: String::new(),
                peer_addr: endpoint.local_addr().unwrap(),
            };
            exchange(&conn, &control(&hello)).await;
            let holding = ToSupernode::Holding {
                digest,
                len: BLOB_LEN,
            };
            exchange(&conn, &control(&holding)).await;
        }
        nodes.conns.push(conn);
        nodes.endpoints.push(endpoint);
    }
    nodes
}

/// Connections to one server, and the endpoints they live on.
#[derive(Default)]
struct Nodes {
    conns: Vec<quinn::Connection>,
    endpoints: Vec<Endpoint>,
}

/// Runs `job(connection, announcements)` on every connection at once, `total`
/// announcements in all; the time until all are done.
async fn timed<F, Fut>(conns: &[quinn::Connection], total: u64, job: F) -> Duration
where
    F: Fn(quinn::Connection, u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per_conn = total.div_ceil(conns.len() as u64);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        tasks.spawn(job(conn.clone(), per_conn));
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

/// The `k`th announcement of a node: one piece.
fn have(k: u64) -> ToSupernode {
    let count = PieceLayout::for_blob(BLOB_LEN).unwrap().count();
    ToSupernode::Have {
        digest: BlobDigest::of(b"announced blob"),
        pieces: vec![PieceIndex((k * 7 % u64::from(count)) as u32)],
        uploads: Uploads {
            sending: 1,
            slots: 4,
        },
    }
}

/// `n` announcements, each on a stream of its own, `IN_FLIGHT` at a time.
async fn a_stream_each(conn: quinn::Connection, n: u64) {
    let lanes = (0..IN_FLIGHT as u64).map(|lane| {
        let conn = conn.clone();
        async move {
            for k in (lane..n).step_by(IN_FLIGHT) {
                exchange(&conn, &control(&have(k))).await;
            }
        }
    });
    futures_util::future::join_all(lanes).await;
}

/// `n` announcements as shoald sends them: frames on one stream. Done once the supernode
/// has received them all (QUIC's flow control keeps it from taking in much more than it
/// has processed).
async fn one_stream(conn: quinn::Connection, n: u64) {
    let (mut send, _) = conn.open_bi().await.expect("stream");
    send.write_all(&[StreamKind::Announce as u8]).await.unwrap();
    for k in 0..n {
        send.write_all(&encode(&have(k))).await.expect("write");
    }
    send.finish().expect("finish");
    send.stopped().await.expect("received");
}

/// A server that reads each stream to its end and closes it, answering nothing: the cost
/// of the streams alone.
async fn sink(ca: &ClusterCa) -> SocketAddr {
    let identity = ca.issue(NodeId(1)).unwrap();
    let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(accepting) = endpoint.incoming().await {
            tokio::spawn(async move {
                let Some((conn, _)) = accepting.established().await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = recv.read_to_end(MAX_FRAME as usize).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    addr
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn announcements(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (supernode, to_supernode, to_sink) = rt.block_on(async {
        let supernode = Supernode::start(SupernodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            upstream: Default::default(),
            stripes: 0,
        })
        .await
        .expect("supernode");
        let to_supernode = nodes(&supernode.ca, supernode.quic_addr, true).await;
        // Every node is known and holds the blob: its announcements are taken, not refused.
        let url = format!("http://{}/status", supernode.api_addr);
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status["peers"], NODES + 1, "{status}");
        assert_eq!(status["tasks"], 1, "{status}");
        let sink = sink(&supernode.ca).await;
        let to_sink = nodes(&supernode.ca, sink, false).await;
        (supernode, to_supernode, to_sink)
    });
    let mut g = c.benchmark_group(format!("announcements from {NODES} nodes"));
    g.throughput(Throughput::Elements(1));
    g.bench_function(
        "a stream each, read and dropped (raw limit of a stream each)",
        |b| b.iter_custom(|iters| rt.block_on(timed(&to_sink.conns, iters, a_stream_each))),
    );
    g.bench_function("shoal-supernode, a stream each", |b| {
        b.iter_custom(|iters| rt.block_on(timed(&to_supernode.conns, iters, a_stream_each)))
    });
    g.bench_function(
        "shoal-supernode, frames on one stream per node (shoald)",
        |b| b.iter_custom(|iters| rt.block_on(timed(&to_supernode.conns, iters, one_stream))),
    );
    g.finish();
    drop(supernode);
}

/// `n` questions, each on a stream of its own, one at a time.
async fn questions_a_stream_each(conn: quinn::Connection, n: u64, want: Arc<Vec<u8>>) {
    for _ in 0..n {
        exchange(&conn, &want).await;
    }
}

fn questions(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let registry = shoal::testbed::Registry::start(dir.path(), &[]);
    let blob = shoal::image::Blob::new("application/octet-stream", vec![5u8; 64 << 20]);
    let (supernode, nodes, want) = rt.block_on(async {
        let client = reqwest::Client::new();
        let repo = "bench/questions";
        shoal::registry::push_blob(&client, &registry.url(), repo, &blob, None)
            .await
            .unwrap();
        let supernode = Supernode::start(SupernodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("supernode"),
            upstream: shoal_registry_proxy::UpstreamConfig {
                insecure: [registry.addr.parse().unwrap()].into_iter().collect(),
                ..Default::default()
            },
            stripes: 0,
        })
        .await
        .expect("supernode");
        let nodes = nodes(&supernode.ca, supernode.quic_addr, true).await;
        let len = blob.bytes.len() as u64;
        let want = |known_groups| ToSupernode::Want {
            digest: blob.digest,
            len,
            origin: Origin {
                registry: registry.addr.clone(),
                repository: repo.into(),
                authorization: None,
            },
            known_groups,
            hold: false,
            fed: false,
            feeds_tag: 0,
        };
        // Every node holds the blob (parents for each answer); the seed has read it all,
        // and the questions say they know every group hash: answers of parents only.
        let groups = PieceLayout::for_blob(len).unwrap().groups();
        for conn in &nodes.conns {
            let holding = ToSupernode::Holding {
                digest: blob.digest,
                len,
            };
            exchange(conn, &control(&holding)).await;
        }
        let mut seeded = false;
        for _ in 0..200 {
            let (mut send, mut recv) = nodes.conns[0].open_bi().await.unwrap();
            send.write_all(&control(&want(0))).await.unwrap();
            send.finish().unwrap();
            let bytes = recv.read_to_end(MAX_FRAME as usize).await.unwrap();
            let mut decoder = FrameDecoder::default();
            decoder.push(&bytes);
            if let Ok(Some(FromSupernode::Task(task))) = decoder.decode::<FromSupernode>()
                && task.groups.len() as u32 == groups
            {
                seeded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seeded, "the seed did not read the blob within 10 s");
        (supernode, nodes, Arc::new(control(&want(groups))))
    });
    let mut g = c.benchmark_group(format!("questions from {NODES} nodes"));
    g.throughput(Throughput::Elements(1));
    let each = |conn, n| questions_a_stream_each(conn, n, want.clone());
    g.bench_function("shoal-supernode, a stream each", |b| {
        b.iter_custom(|iters| rt.block_on(timed(&nodes.conns, iters, each)))
    });
    g.finish();
    drop(supernode);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(10));
    targets = announcements, questions
}
criterion_main!(benches);
