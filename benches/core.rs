//! Criterion benches of shoal's hot paths, each beside the raw limit it cannot beat:
//! - piece hashing (BLAKE3 `PieceHash::of`) and verification of a piece that arrived in
//!   QUIC-sized chunks (`matches_chunks`), vs `blake3::hash` of the same bytes;
//! - the store: writing a 64 MiB blob at piece offsets and committing it (fsync, rename),
//!   vs `std::fs::write` + `sync_all` of the same bytes; reading it back vs a plain read;
//! - framing: encode and decode of a `Task` with the 32 group hashes of a 1 GiB blob and
//!   4 parents, vs postcard alone;
//! - the scheduler: parent decisions per second for a task with 10,000 peers.
//!
//! `cargo bench --bench core` (add `-- --quick` for a short run).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shoal_proto::frame::{FrameDecoder, MAX_FRAME, encode};
use shoal_proto::message::{FromSupernode, NodeId, Parent, PieceSet, Task};
use shoal_proto::{BlobDigest, GroupHash, PieceHash, PieceIndex, PieceLayout};
use shoal_supernode::{Scheduler, SchedulerConfig};

const PIECE: usize = 1 << 20;

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

fn hashing(c: &mut Criterion) {
    let piece = bytes(PIECE);
    let chunks: Vec<&[u8]> = piece.chunks(1200).collect();
    let hash = PieceHash::of(&piece);
    let mut g = c.benchmark_group("piece hash (1 MiB)");
    g.throughput(Throughput::Bytes(PIECE as u64));
    g.bench_function("raw blake3::hash", |b| b.iter(|| blake3::hash(&piece)));
    g.bench_function("PieceHash::of", |b| b.iter(|| PieceHash::of(&piece)));
    g.bench_function("verify, 1200-byte chunks", |b| {
        b.iter(|| assert!(hash.matches_chunks(&chunks)))
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let len = 64 * PIECE;
    let blob = bytes(len);
    let digest = BlobDigest::of(&blob);
    let layout = PieceLayout::for_blob(len as u64).unwrap();
    let mut g = c.benchmark_group("store (64 MiB)");
    g.throughput(Throughput::Bytes(len as u64));
    g.sample_size(10);
    g.bench_function("raw write + fsync", |b| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        b.iter(|| {
            std::fs::write(&path, &blob).unwrap();
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        })
    });
    g.bench_function("store: pieces at offsets + commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let store = shoal_daemon::store::Store::open(dir.path(), 1 << 40).unwrap();
                let started = Instant::now();
                let partial = store.begin(&digest, len as u64).unwrap();
                for i in layout.pieces() {
                    let r = layout.range(i).unwrap();
                    partial
                        .write_at(r.start, &blob[r.start as usize..r.end as usize])
                        .unwrap();
                }
                partial.commit().unwrap();
                total += started.elapsed();
            }
            total
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let store = shoal_daemon::store::Store::open(dir.path(), 1 << 40).unwrap();
    let partial = store.begin(&digest, len as u64).unwrap();
    partial.write_at(0, &blob).unwrap();
    partial.commit().unwrap();
    let raw_path = dir.path().join("raw");
    std::fs::write(&raw_path, &blob).unwrap();
    let mut buf = vec![0u8; len];
    g.bench_function("raw read (cached)", |b| {
        b.iter(|| {
            use std::io::Read as _;
            std::fs::File::open(&raw_path)
                .unwrap()
                .read_exact(&mut buf)
                .unwrap()
        })
    });
    g.bench_function("store: open_complete + read (cached)", |b| {
        b.iter(|| {
            use std::os::unix::fs::FileExt as _;
            let stored = store.open_complete(&digest).unwrap();
            stored.file.read_exact_at(&mut buf, 0).unwrap()
        })
    });
    g.finish();
}

fn task() -> FromSupernode {
    let layout = PieceLayout::for_blob(1 << 30).unwrap();
    let groups = (0..layout.groups())
        .map(|g| GroupHash::of(&[PieceHash::of(&g.to_le_bytes())]))
        .collect();
    let parents = (0..4)
        .map(|n| Parent {
            addr: ([10, 0, 0, n as u8], 7000).into(),
            pieces: PieceSet::full(layout.count()),
        })
        .collect();
    FromSupernode::Task(Task {
        groups_from: 0,
        groups,
        parents,
        feeds: None,
    })
}

fn framing(c: &mut Criterion) {
    let msg = task();
    let framed = encode(&msg);
    let mut g = c.benchmark_group("framing (Task: 32 group hashes, 4 parents)");
    g.throughput(Throughput::Bytes(framed.len() as u64));
    g.bench_function("raw postcard::to_allocvec", |b| {
        b.iter(|| postcard::to_allocvec(&msg).unwrap())
    });
    g.bench_function("frame::encode", |b| b.iter(|| encode(&msg)));
    g.bench_function("raw postcard::from_bytes", |b| {
        b.iter(|| postcard::from_bytes::<FromSupernode>(&framed[4..]).unwrap())
    });
    g.bench_function("FrameDecoder::decode", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new(MAX_FRAME);
            d.push(&framed);
            d.decode::<FromSupernode>().unwrap().unwrap()
        })
    });
    g.finish();
}

fn scheduler(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler decisions");
    for peers in [1_000u64, 10_000] {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let digest = BlobDigest::of(b"blob");
        let layout = PieceLayout::for_blob(1 << 30).unwrap();
        let seed = NodeId(0);
        s.add_seed(seed);
        for n in 0..=peers {
            let addr = ([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 7000).into();
            s.hello(now, NodeId(n), String::new(), addr).unwrap();
            s.want(now, NodeId(n), digest, layout).unwrap();
            // Peers hold a spread of pieces, as in the middle of a pull.
            let held: Vec<PieceIndex> = (0..layout.count())
                .filter(|i| (i + n as u32).is_multiple_of(3))
                .map(PieceIndex)
                .collect();
            s.have(now, NodeId(n), &digest, &held).unwrap();
        }
        g.throughput(Throughput::Elements(1));
        let mut asker = 1;
        g.bench_with_input(BenchmarkId::new("parents", peers), &peers, |b, peers| {
            b.iter(|| {
                asker = asker % peers + 1;
                s.parents(now, NodeId(asker), &digest).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, store, framing, scheduler);
criterion_main!(benches);
