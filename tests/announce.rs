//! A node's announcements reach the supernode as frames on one stream, with the real
//! `docker-registry` behind the supernode's seed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Registry;
use shoal::image::Blob;
use shoal_proto::frame::{FrameDecoder, MAX_FRAME, encode};
use shoal_proto::message::{FromSupernode, NodeId, Origin, StreamKind, Task, ToSupernode, Uploads};
use shoal_proto::{PieceIndex, PieceLayout};
use shoal_registry_proxy::UpstreamConfig;
use shoal_supernode::{Supernode, SupernodeConfig};
use shoal_transport::Endpoint;

const REPO: &str = "announce/blob";

/// A node as the supernode sees it: a connection that said hello.
struct Node {
    conn: quinn::Connection,
    peer_addr: SocketAddr,
    _endpoint: Endpoint,
}

impl Node {
    async fn join(sn: &Supernode, id: u64) -> Node {
        let identity = sn.ca.issue(NodeId(id)).unwrap();
        let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
        let peer_addr = endpoint.local_addr().unwrap();
        let (conn, _) = endpoint.connect(sn.quic_addr).await.unwrap();
        let node = Node {
            conn,
            peer_addr,
            _endpoint: endpoint,
        };
        let hello = ToSupernode::Hello {
            node: NodeId(id),
            zone: String::new(),
            peer_addr,
        };
        assert!(node.ask(&hello).await.is_none());
        node
    }

    /// A control message on a stream of its own, and its answer.
    async fn ask(&self, msg: &ToSupernode) -> Option<FromSupernode> {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(&[StreamKind::Control as u8]).await.unwrap();
        send.write_all(&encode(msg)).await.unwrap();
        send.finish().unwrap();
        let bytes = recv.read_to_end(MAX_FRAME as usize).await.unwrap();
        let mut decoder = FrameDecoder::default();
        decoder.push(&bytes);
        decoder.decode().unwrap()
    }
}

#[test]
fn announcements_on_one_stream_make_their_node_a_parent() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let blob = Blob::new("application/octet-stream", vec![7u8; 4 << 20]);
        let client = reqwest::Client::new();
        shoal::registry::push_blob(&client, &registry.url(), REPO, &blob, None)
            .await
            .unwrap();
        let sn = Supernode::start(SupernodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("supernode"),
            upstream: UpstreamConfig {
                insecure: [registry.addr.parse().unwrap()].into_iter().collect(),
                ..Default::default()
            },
            stripes: 0,
        })
        .await
        .unwrap();
        let len = blob.bytes.len() as u64;
        let count = PieceLayout::for_blob(len).unwrap().count();
        let want = ToSupernode::Want {
            digest: blob.digest,
            len,
            origin: Origin {
                registry: registry.addr.clone(),
                repository: REPO.into(),
                authorization: None,
            },
            known_groups: 0,
            hold: true,
            fed: false,
            feeds_tag: 0,
        };
        let a = Node::join(&sn, 1).await;
        assert!(matches!(a.ask(&want).await, Some(FromSupernode::Task(_))));
        // Node 1 announces every piece, in three frames on one stream it keeps open.
        let (mut announce, _) = a.conn.open_bi().await.unwrap();
        announce
            .write_all(&[StreamKind::Announce as u8])
            .await
            .unwrap();
        let pieces: Vec<PieceIndex> = (0..count).map(PieceIndex).collect();
        for part in pieces.chunks(count.div_ceil(3) as usize) {
            let have = ToSupernode::Have {
                digest: blob.digest,
                pieces: part.to_vec(),
                uploads: Uploads {
                    sending: 0,
                    slots: 4,
                },
            };
            announce.write_all(&encode(&have)).await.unwrap();
        }
        // Node 2 is offered node 1 with all of them (announcements are not answered:
        // ask until they are in, at most 5 s).
        let b = Node::join(&sn, 2).await;
        let mut offered = None;
        for _ in 0..50 {
            let Some(FromSupernode::Task(Task { parents, .. })) = b.ask(&want).await else {
                panic!("no task for node 2");
            };
            offered = parents.into_iter().find(|p| p.addr == a.peer_addr);
            if offered.as_ref().is_some_and(|p| p.pieces.len() == count) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let offered = offered.expect("node 1 was never offered to node 2");
        assert_eq!(offered.pieces.len(), count, "{offered:?}");
        // The stream stays open for more.
        let more = ToSupernode::Have {
            digest: blob.digest,
            pieces: vec![PieceIndex(0)],
            uploads: Uploads::default(),
        };
        announce.write_all(&encode(&more)).await.unwrap();
    });
}
