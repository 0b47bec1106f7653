//! The seed: the first time a blob is asked for, the supernode pulls it from the registry
//! once, with the asking client's credentials (used for this fetch only, never logged or
//! stored), hashes each piece as it streams in and publishes each hash group
//! ([`shoal_proto::group`]) as soon as its last piece is in, so that nodes fetch from the
//! seed and from each other before the seed has the whole blob.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::message::Origin;
use shoal_proto::message::PieceSet;
use shoal_proto::{BlobDigest, GroupHash, PieceHash, PieceIndex, PieceLayout};
use shoal_registry_proxy::{ForwardHeaders, Registry, Upstream};
use shoal_transport::pieces::{Found, GroupHashes};
use shoal_transport::stripe::News;

/// What the seed has of a blob so far.
#[derive(Debug, Clone, Default)]
pub struct SeedProgress {
    /// Hashes of the first `groups.len()` hash groups: those whose pieces it all holds.
    pub groups: Vec<GroupHash>,
    pub state: SeedState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeedState {
    #[default]
    Fetching,
    /// The whole blob is here and matched its sha256.
    Complete,
    Failed(String),
}

#[derive(Debug)]
pub struct SeedBlob {
    pub layout: PieceLayout,
    file: Arc<File>,
    inner: Mutex<Inner>,
    changed: tokio::sync::Notify,
    /// The seed's news of new pieces, of every blob (stripe streams wait on it).
    news: Arc<News>,
}

#[derive(Debug, Default)]
struct Inner {
    progress: SeedProgress,
    /// The hashes of the pieces the seed holds, in order.
    hashes: Vec<PieceHash>,
}

impl SeedBlob {
    fn new(layout: PieceLayout, file: File, news: Arc<News>) -> Self {
        Self {
            layout,
            file: Arc::new(file),
            inner: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            news,
        }
    }

    /// The pieces of the groups whose hashes are published: the ones a node can check.
    pub fn hashed(&self) -> PieceSet {
        let groups = self.lock().progress.groups.len() as u32;
        let mut set = PieceSet::empty(self.layout.count());
        (0..self.layout.pieces_in_groups(groups)).for_each(|i| set.insert(PieceIndex(i)));
        set
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn progress(&self) -> SeedProgress {
        self.lock().progress.clone()
    }

    /// The file and range of a piece the seed holds, and with `hashes` the piece hashes
    /// of its group (none until the whole group is in).
    pub fn piece(&self, index: PieceIndex, hashes: bool) -> Option<Found> {
        let inner = self.lock();
        if index.0 as usize >= inner.hashes.len() {
            return None;
        }
        let group = self.layout.group_of(index);
        let hashes = match hashes && group < inner.progress.groups.len() as u32 {
            true => {
                let r = self.layout.group_range(group);
                GroupHashes::Known(inner.hashes[r.start as usize..r.end as usize].to_vec())
            }
            false => GroupHashes::None,
        };
        Some(Found {
            file: self.file.clone(),
            range: self.layout.range(index).ok()?,
            hashes,
        })
    }

    /// The next piece is in, with this hash: a group that it completes is published.
    fn publish(&self, hash: PieceHash) {
        let layout = self.layout;
        self.update(|inner| {
            inner.hashes.push(hash);
            let pieces = inner.hashes.len() as u32;
            let group = inner.progress.groups.len() as u32;
            let range = layout.group_range(group);
            if !range.is_empty() && pieces >= range.end {
                let hashes = &inner.hashes[range.start as usize..range.end as usize];
                inner.progress.groups.push(GroupHash::of(hashes));
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.lock());
        self.changed.notify_waiters();
        self.news.bump();
    }

    /// The progress once the seed has more than `known` group hashes, has finished, or
    /// `within` has passed, whichever comes first. Groups that had to be waited for are
    /// gathered for up to `linger` more (or until the seed finishes), so that the groups of
    /// a small blob come in one answer instead of one question each. Once every group is
    /// known it returns at once (the blob's sha256 check may still be running).
    pub async fn wait_beyond(
        &self,
        known: usize,
        within: std::time::Duration,
        linger: std::time::Duration,
    ) -> SeedProgress {
        let deadline = tokio::time::Instant::now() + within;
        let mut until = deadline;
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let progress = self.progress();
            let all = progress.groups.len() >= self.layout.groups() as usize;
            if progress.state != SeedState::Fetching || all {
                return progress;
            }
            if progress.groups.len() > known {
                if !waited {
                    return progress;
                }
                until = until.min(tokio::time::Instant::now() + linger);
            }
            waited = true;
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.progress();
            }
        }
    }
}

/// The seed's blobs, by digest.
#[derive(Debug)]
pub struct Seed {
    dir: PathBuf,
    upstream: Upstream,
    blobs: dashmap::DashMap<BlobDigest, Arc<SeedBlob>>,
    /// Bumped whenever a blob has new pieces.
    pub news: Arc<News>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("registry name: {0}")]
    BadOrigin(String),
    #[error("seed storage: {0}")]
    Io(#[from] std::io::Error),
}

impl Seed {
    pub fn new(dir: PathBuf, upstream: Upstream) -> std::io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            upstream,
            blobs: Default::default(),
            news: Arc::default(),
        })
    }

    pub fn get(&self, digest: &BlobDigest) -> Option<Arc<SeedBlob>> {
        self.blobs.get(digest).map(|b| b.clone())
    }

    /// The seed's copy of a blob, started now if there is none (or the last one failed).
    pub fn ensure(
        &self,
        digest: BlobDigest,
        layout: PieceLayout,
        origin: &Origin,
    ) -> Result<Arc<SeedBlob>, SeedError> {
        let registry: Registry = origin
            .registry
            .parse()
            .map_err(|e| SeedError::BadOrigin(format!("{e}")))?;
        let repository: shoal_registry_proxy::RepositoryName = origin
            .repository
            .parse()
            .map_err(|e| SeedError::BadOrigin(format!("{e}")))?;
        // Decided under the map's entry lock: nodes asking at once start one fetch.
        let entry = self.blobs.entry(digest);
        if let dashmap::mapref::entry::Entry::Occupied(e) = &entry
            && !matches!(e.get().progress().state, SeedState::Failed(_))
        {
            return Ok(e.get().clone());
        }
        let path = self.dir.join(digest.hex());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let blob = Arc::new(SeedBlob::new(layout, file, self.news.clone()));
        entry.insert(blob.clone());
        let headers = ForwardHeaders {
            authorization: origin
                .authorization
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok()),
            ..Default::default()
        };
        let (upstream, task_blob) = (self.upstream.clone(), blob.clone());
        let url_path = format!("/v2/{repository}/blobs/{digest}");
        tokio::spawn(async move {
            let result = fetch(
                &upstream, &registry, &url_path, &headers, &task_blob, digest,
            )
            .await;
            match result {
                Ok(()) => {
                    tracing::info!(%digest, bytes = layout.blob_len(), "seed has the blob");
                    task_blob.update(|p| p.progress.state = SeedState::Complete);
                }
                Err(message) => {
                    tracing::warn!(%digest, error = %message, "seed fetch failed");
                    task_blob.update(|p| {
                        p.hashes.clear();
                        p.progress = SeedProgress {
                            state: SeedState::Failed(message),
                            ..SeedProgress::default()
                        };
                    });
                }
            }
        });
        Ok(blob)
    }
}

async fn fetch(
    upstream: &Upstream,
    registry: &Registry,
    path: &str,
    headers: &ForwardHeaders,
    blob: &SeedBlob,
    digest: BlobDigest,
) -> Result<(), String> {
    let mut resp = upstream
        .send(Method::GET, registry, path, headers)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("registry answered {}", resp.status()));
    }
    let layout = blob.layout;
    let mut sha = Sha256::new();
    let mut piece = Vec::with_capacity(layout.piece_size() as usize);
    let mut next = PieceIndex(0);
    let mut received = 0u64;
    while let Some(chunk) = upstream
        .next_chunk(&mut resp)
        .await
        .map_err(|e| e.to_string())?
    {
        received += chunk.len() as u64;
        if received > layout.blob_len() {
            return Err("registry sent more bytes than the blob has".into());
        }
        sha.update(&chunk);
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let want = layout.len_of(next).map_err(|e| e.to_string())? as usize;
            let take = (want - piece.len()).min(rest.len());
            piece.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if piece.len() == want {
                let offset = layout.range(next).map_err(|e| e.to_string())?.start;
                let hash = PieceHash::of(&piece);
                let file = blob.file.clone();
                let bytes =
                    std::mem::replace(&mut piece, Vec::with_capacity(layout.piece_size() as usize));
                tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                blob.publish(hash);
                next = PieceIndex(next.0 + 1);
            }
        }
    }
    if received != layout.blob_len() {
        return Err(format!(
            "registry sent {received} of {} bytes",
            layout.blob_len()
        ));
    }
    if BlobDigest::from_bytes(sha.finalize().into()) != digest {
        return Err("registry bytes do not match the digest".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A blob of `pieces` pieces in groups of one.
    fn blob(pieces: u32) -> Arc<SeedBlob> {
        let layout = PieceLayout::new(u64::from(pieces) << 16, 64 << 10).unwrap();
        assert_eq!(layout.group_pieces(), 1);
        Arc::new(SeedBlob::new(
            layout,
            tempfile::tempfile().unwrap(),
            Arc::default(),
        ))
    }

    fn publish(blob: &SeedBlob) {
        blob.publish(PieceHash::of(b"piece"));
    }

    const HOLD: Duration = Duration::from_millis(200);
    const GATHER: Duration = Duration::from_millis(10);

    #[test]
    fn a_group_is_published_when_its_last_piece_is_in() {
        // 512 pieces in groups of 4.
        let seed = Arc::new(SeedBlob::new(
            PieceLayout::new(512 << 16, 64 << 10).unwrap(),
            tempfile::tempfile().unwrap(),
            Arc::default(),
        ));
        assert_eq!(seed.layout.group_pieces(), 4);
        let hashes: Vec<PieceHash> = (0..512u32)
            .map(|i| PieceHash::of(&i.to_le_bytes()))
            .collect();
        for h in &hashes[..7] {
            seed.publish(*h);
        }
        let progress = seed.progress();
        assert_eq!((seed.lock().hashes.len(), progress.groups.len()), (7, 1));
        assert!(progress.groups[0].matches(&hashes[..4]));
        let found = seed.piece(PieceIndex(2), true).unwrap();
        assert_eq!(found.range, (2 << 16)..(3 << 16));
        assert!(matches!(found.hashes, GroupHashes::Known(h) if h == hashes[..4]));
        let found = seed.piece(PieceIndex(6), true).unwrap();
        assert!(
            matches!(found.hashes, GroupHashes::None),
            "the group of piece 6 is not whole yet"
        );
        let found = seed.piece(PieceIndex(2), false).unwrap();
        assert!(matches!(found.hashes, GroupHashes::None), "not asked");
        assert!(seed.piece(PieceIndex(7), false).is_none(), "not held");
        let hashed: Vec<u32> = seed.hashed().iter().map(|i| i.0).collect();
        assert_eq!(hashed, [0, 1, 2, 3], "the pieces of whole groups");
        for h in &hashes[7..] {
            seed.publish(*h);
        }
        let progress = seed.progress();
        assert_eq!(
            (seed.lock().hashes.len(), progress.groups.len()),
            (512, 128)
        );
        assert!(progress.groups[127].matches(&hashes[508..]));
    }

    #[tokio::test(start_paused = true)]
    async fn hashes_waited_for_are_gathered_a_little_longer() {
        let seed = blob(4);
        let waiting = tokio::spawn({
            let seed = seed.clone();
            async move {
                let started = tokio::time::Instant::now();
                let progress = seed.wait_beyond(0, HOLD, GATHER).await;
                (progress.groups.len(), started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        publish(&seed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        publish(&seed);
        let (hashes, took) = waiting.await.unwrap();
        assert_eq!(hashes, 2, "both hashes in one answer");
        assert_eq!(
            took,
            Duration::from_millis(60),
            "10 ms after the first new hash"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn known_hashes_and_the_last_hash_are_answered_at_once() {
        let seed = blob(2);
        publish(&seed);
        let started = tokio::time::Instant::now();
        assert_eq!(seed.wait_beyond(0, HOLD, GATHER).await.groups.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO, "the node lags: no wait");

        let waiting = tokio::spawn({
            let seed = seed.clone();
            async move { seed.wait_beyond(1, HOLD, GATHER).await.groups.len() }
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
        publish(&seed);
        let started = tokio::time::Instant::now();
        assert_eq!(waiting.await.unwrap(), 2);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "every hash known: no gathering"
        );

        let nothing = blob(2);
        let started = tokio::time::Instant::now();
        assert!(nothing.wait_beyond(0, HOLD, GATHER).await.groups.is_empty());
        assert_eq!(
            started.elapsed(),
            HOLD,
            "nothing new: held for the whole hold"
        );
    }
}
