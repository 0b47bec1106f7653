//! The seed: the first time a blob is asked for, the supernode pulls it from the registry
//! once, with the asking client's credentials (used for this fetch only, never logged or
//! stored), hashes each piece as it streams in and publishes its hash at once, so that
//! nodes fetch from the seed and from each other before the seed has the whole blob.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::message::Origin;
use shoal_proto::{BlobDigest, PieceHash, PieceIndex, PieceLayout};
use shoal_registry_proxy::{ForwardHeaders, Registry, Upstream};

/// What the seed has of a blob so far.
#[derive(Debug, Clone, Default)]
pub struct SeedProgress {
    /// Hashes of the first `hashes.len()` pieces, which the seed holds.
    pub hashes: Vec<PieceHash>,
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
    progress: Mutex<SeedProgress>,
    changed: tokio::sync::Notify,
}

impl SeedBlob {
    pub fn progress(&self) -> SeedProgress {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The file and range of a piece the seed holds.
    pub fn piece(&self, index: PieceIndex) -> Option<(Arc<File>, Range<u64>)> {
        let have = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hashes
            .len() as u32;
        (index.0 < have)
            .then(|| Some((self.file.clone(), self.layout.range(index).ok()?)))
            .flatten()
    }

    fn update(&self, f: impl FnOnce(&mut SeedProgress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
    }

    /// The progress once the seed has more than `known` hashes, has finished, or `within`
    /// has passed, whichever comes first.
    pub async fn wait_beyond(&self, known: usize, within: std::time::Duration) -> SeedProgress {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let progress = self.progress();
            if progress.hashes.len() > known || progress.state != SeedState::Fetching {
                return progress;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
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
        let blob = Arc::new(SeedBlob {
            layout,
            file: Arc::new(file),
            progress: Mutex::new(SeedProgress::default()),
            changed: tokio::sync::Notify::new(),
        });
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
                    task_blob.update(|p| p.state = SeedState::Complete);
                }
                Err(message) => {
                    tracing::warn!(%digest, error = %message, "seed fetch failed");
                    task_blob.update(|p| {
                        p.hashes.clear();
                        p.state = SeedState::Failed(message);
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
                blob.update(|p| p.hashes.push(hash));
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
