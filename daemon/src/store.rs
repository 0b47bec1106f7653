//! The node's content-addressed blob store.
//!
//! On disk, under the data directory:
//! - `blobs/sha256/<hex>`: complete blobs whose sha256 was checked. A file only ever appears
//!   here by `rename` after its bytes were written and synced, so a crash (even `kill -9`)
//!   never leaves a half-written blob that looks complete.
//! - `partial/<hex>`: blobs being written. They are removed at start: without piece hashes
//!   there is nothing to resume them against, and refetching is always correct.
//!
//! In memory: an index of entries with their state, size, last use and pin count. Readers
//! and writers hold a [`Lease`]; eviction (to stay under the cache size) only ever removes
//! complete, unpinned blobs, least recently used first. A blob pulled over the swarm also
//! keeps its piece hashes there while the daemon runs ([`Store::keep_piece_hashes`]), so
//! that serving a group's hashes to a peer does not hash the group's bytes again.
//!
//! All methods that touch the disk block; async callers run them in `spawn_blocking` or
//! accept the short cost (open, rename, unlink).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::BlobDigest;

use crate::hashes::BlobHashes;

/// After the disk fills up, how long shoald streams straight from registries before it
/// tries to write to the store again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(30);

/// Why a blob cannot be written to the store; in every case the caller streams straight
/// from the registry instead.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the disk under the store is full; streaming from registries until space frees up")]
    DiskFull,
    #[error("blob of {len} bytes is larger than the cache size ({capacity} bytes)")]
    TooLarge { len: u64, capacity: u64 },
    #[error("no room: the store is full of blobs that are being read or written")]
    NoRoom,
    #[error("blob is already in the store or being written")]
    Exists,
    #[error("store I/O: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Partial,
    Complete,
}

#[derive(Debug)]
struct Entry {
    state: EntryState,
    len: u64,
    last_used: u64,
    pins: u32,
    /// The piece hashes of a complete blob, when known (not kept on disk).
    piece_hashes: Option<Arc<BlobHashes>>,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<BlobDigest, Entry>,
    used: u64,
    /// Logical clock for LRU order.
    tick: u64,
}

/// The blob store. Shared as `Arc<Store>`.
#[derive(Debug)]
pub struct Store {
    blobs_dir: PathBuf,
    partial_dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    disk_full_until: Mutex<Option<Instant>>,
}

/// Keeps a blob from being evicted while it is read or written.
#[derive(Debug)]
pub struct Lease {
    store: Arc<Store>,
    digest: BlobDigest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.store.lock();
        if let Some(entry) = index.entries.get_mut(&self.digest) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }
}

/// A complete blob, open for reading.
#[derive(Debug)]
pub struct StoredBlob {
    pub file: Arc<File>,
    pub len: u64,
    pub lease: Lease,
    /// Its piece hashes, if it was pulled over the swarm since the daemon started.
    pub piece_hashes: Option<Arc<BlobHashes>>,
}

/// A blob being written. Dropped without [`PartialBlob::commit`], it is removed.
#[derive(Debug)]
pub struct PartialBlob {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    lease: Option<Lease>,
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir`, finds complete blobs and
    /// removes partial ones.
    pub fn open(data_dir: &Path, capacity: u64) -> io::Result<Arc<Store>> {
        let blobs_dir = data_dir.join("blobs").join("sha256");
        let partial_dir = data_dir.join("partial");
        fs::create_dir_all(&blobs_dir)?;
        if partial_dir.exists() {
            fs::remove_dir_all(&partial_dir)?;
        }
        fs::create_dir_all(&partial_dir)?;

        let mut found = Vec::new();
        for dirent in fs::read_dir(&blobs_dir)? {
            let dirent = dirent?;
            let name = dirent.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<BlobDigest>().ok());
            let meta = dirent.metadata()?;
            match parsed {
                Some(digest) if meta.is_file() => {
                    found.push((meta.modified()?, digest, meta.len()))
                }
                _ => {
                    tracing::warn!(path = %dirent.path().display(), "ignoring a file that is not a blob")
                }
            }
        }
        // Oldest first, so that the LRU clock starts in modification order.
        found.sort();
        let mut index = Index::default();
        for (_, digest, len) in found {
            index.tick += 1;
            index.used += len;
            index.entries.insert(
                digest,
                Entry {
                    state: EntryState::Complete,
                    len,
                    last_used: index.tick,
                    pins: 0,
                    piece_hashes: None,
                },
            );
        }
        tracing::info!(blobs = index.entries.len(), bytes = index.used, dir = %data_dir.display(), "store opened");
        let store = Arc::new(Store {
            blobs_dir,
            partial_dir,
            capacity,
            index: Mutex::new(index),
            disk_full_until: Mutex::new(None),
        });
        store.lock_and_evict(0);
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock leaves the index consistent (every update is a
        // single insert/remove plus counters), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, digest: &BlobDigest) -> PathBuf {
        self.blobs_dir.join(digest.hex())
    }

    /// Bytes held by complete and partial blobs.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Every complete blob and its length.
    pub fn complete_blobs(&self) -> Vec<(BlobDigest, u64)> {
        let index = self.lock();
        index
            .entries
            .iter()
            .filter(|(_, e)| e.state == EntryState::Complete)
            .map(|(d, e)| (*d, e.len))
            .collect()
    }

    /// Whether the whole blob is in the store.
    pub fn contains(&self, digest: &BlobDigest) -> bool {
        self.lock()
            .entries
            .get(digest)
            .is_some_and(|e| e.state == EntryState::Complete)
    }

    /// Opens a complete blob for reading, marking it recently used.
    pub fn open_complete(self: &Arc<Self>, digest: &BlobDigest) -> Option<StoredBlob> {
        let (len, piece_hashes) = {
            let mut index = self.lock();
            index.tick += 1;
            let tick = index.tick;
            let entry = index
                .entries
                .get_mut(digest)
                .filter(|e| e.state == EntryState::Complete)?;
            entry.last_used = tick;
            entry.pins += 1;
            (entry.len, entry.piece_hashes.clone())
        };
        let lease = Lease {
            store: self.clone(),
            digest: *digest,
        };
        match File::open(self.blob_path(digest)) {
            Ok(file) => Some(StoredBlob {
                file: Arc::new(file),
                len,
                lease,
                piece_hashes,
            }),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "blob vanished from the store; forgetting it");
                drop(lease);
                self.forget(digest);
                None
            }
        }
    }

    /// Keeps the piece hashes of a complete blob (checked as its pieces came) for as long as
    /// the blob stays in the store and the daemon runs. A blob that is not complete is left
    /// alone.
    pub fn keep_piece_hashes(&self, digest: &BlobDigest, hashes: Arc<BlobHashes>) {
        let mut index = self.lock();
        if let Some(entry) = index
            .entries
            .get_mut(digest)
            .filter(|e| e.state == EntryState::Complete)
        {
            entry.piece_hashes = Some(hashes);
        }
    }

    /// Pins a blob (complete or partial) that the caller will read through a handle it
    /// already has.
    pub fn pin(self: &Arc<Self>, digest: &BlobDigest) -> Option<Lease> {
        let mut index = self.lock();
        let entry = index.entries.get_mut(digest)?;
        entry.pins += 1;
        Some(Lease {
            store: self.clone(),
            digest: *digest,
        })
    }

    /// Starts writing a blob of `len` bytes, evicting least recently used blobs for room.
    pub fn begin(
        self: &Arc<Self>,
        digest: &BlobDigest,
        len: u64,
    ) -> Result<PartialBlob, StoreError> {
        if self
            .disk_full_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
        {
            return Err(StoreError::DiskFull);
        }
        if len > self.capacity {
            return Err(StoreError::TooLarge {
                len,
                capacity: self.capacity,
            });
        }
        {
            let mut index = self.evict_for(len)?;
            if index.entries.contains_key(digest) {
                return Err(StoreError::Exists);
            }
            index.tick += 1;
            let last_used = index.tick;
            index.used += len;
            index.entries.insert(
                *digest,
                Entry {
                    state: EntryState::Partial,
                    len,
                    last_used,
                    pins: 1,
                    piece_hashes: None,
                },
            );
        }
        let lease = Lease {
            store: self.clone(),
            digest: *digest,
        };
        let path = self.partial_dir.join(digest.hex());
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path);
        match opened {
            Ok(file) => Ok(PartialBlob {
                file: Arc::new(file),
                path,
                len,
                lease: Some(lease),
            }),
            Err(e) => {
                drop(lease);
                self.forget(digest);
                Err(self.io_error(e))
            }
        }
    }

    /// Classifies a write failure; a full disk switches the store off for a while.
    pub fn io_error(&self, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded {
            tracing::error!(
                dir = %self.blobs_dir.display(),
                "disk full: the store stops taking blobs for {DISK_FULL_BACKOFF:?}; requests stream \
                 straight from registries. Free space or lower --cache-size."
            );
            *self
                .disk_full_until
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + DISK_FULL_BACKOFF);
            StoreError::DiskFull
        } else {
            StoreError::Io(e)
        }
    }

    /// Evicts unpinned complete blobs, least recently used first, until `len` more bytes fit.
    fn evict_for(&self, len: u64) -> Result<std::sync::MutexGuard<'_, Index>, StoreError> {
        let mut index = self.lock();
        while index.used + len > self.capacity {
            let victim = index
                .entries
                .iter()
                .filter(|(_, e)| e.state == EntryState::Complete && e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(d, _)| *d);
            let Some(victim) = victim else {
                return Err(StoreError::NoRoom);
            };
            let entry = index
                .entries
                .remove(&victim)
                .expect("victim is in the index");
            index.used -= entry.len;
            if let Err(e) = fs::remove_file(self.blob_path(&victim)) {
                tracing::warn!(digest = %victim, error = %e, "could not remove an evicted blob");
            }
            tracing::info!(digest = %victim, bytes = entry.len, "evicted blob");
        }
        Ok(index)
    }

    fn lock_and_evict(&self, len: u64) {
        if let Err(e) = self.evict_for(len) {
            tracing::warn!(error = %e, "store is over its cache size");
        }
    }

    fn forget(&self, digest: &BlobDigest) {
        let mut index = self.lock();
        if let Some(entry) = index.entries.remove(digest) {
            index.used -= entry.len;
        }
    }
}

impl PartialBlob {
    /// The open file, for readers that follow the writer (positional reads only).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset`. Blocks.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Makes the blob complete: syncs its bytes, then renames it into place. The caller has
    /// checked the digest. Blocks.
    pub fn commit(mut self) -> io::Result<()> {
        let lease = self
            .lease
            .take()
            .expect("lease is present until commit or drop");
        let store = lease.store.clone();
        let result = (|| {
            self.file.sync_all()?;
            fs::rename(&self.path, store.blob_path(&lease.digest))?;
            File::open(&store.blobs_dir)?.sync_all()
        })();
        match &result {
            Ok(()) => {
                if let Some(entry) = store.lock().entries.get_mut(&lease.digest) {
                    entry.state = EntryState::Complete;
                }
            }
            Err(_) => {
                let _ = fs::remove_file(&self.path);
                let _ = fs::remove_file(store.blob_path(&lease.digest));
                let digest = lease.digest;
                drop(lease);
                store.forget(&digest);
            }
        }
        result
    }
}

impl Drop for PartialBlob {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove a partial blob");
            }
            let (store, digest) = (lease.store.clone(), lease.digest);
            drop(lease);
            store.forget(&digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(store: &Arc<Store>, bytes: &[u8]) -> BlobDigest {
        let digest = BlobDigest::of(bytes);
        let partial = store.begin(&digest, bytes.len() as u64).unwrap();
        partial.write_at(0, bytes).unwrap();
        partial.commit().unwrap();
        digest
    }

    #[test]
    fn complete_blobs_survive_a_restart_and_partials_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let a = write(&store, b"hello");
        let b = BlobDigest::of(b"half");
        let partial = store.begin(&b, 4).unwrap();
        partial.write_at(0, b"ha").unwrap();
        assert!(
            !store.contains(&b),
            "a partial blob must not count as complete"
        );
        std::mem::forget(partial); // as if the process died mid-write
        drop(store);

        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(store.contains(&a));
        assert!(!store.contains(&b));
        assert_eq!(store.used(), 5);
        assert!(!dir.path().join("partial").join(b.hex()).exists());
        let blob = store.open_complete(&a).unwrap();
        let mut buf = [0u8; 5];
        blob.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn evicts_least_recently_used_but_never_a_pinned_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        let a = write(&store, b"aaaa");
        let b = write(&store, b"bbbb");
        let reader = store.open_complete(&a).unwrap(); // a is now more recent than b, and pinned
        let c = write(&store, b"cccc");
        assert!(store.contains(&a) && store.contains(&c) && !store.contains(&b));
        // Everything left is pinned or too big: no room, nothing evicted.
        let pinned_c = store.open_complete(&c).unwrap();
        assert!(matches!(
            store.begin(&BlobDigest::of(b"dd"), 4),
            Err(StoreError::NoRoom)
        ));
        assert!(store.contains(&a) && store.contains(&c));
        drop((reader, pinned_c));
        let _d = write(&store, b"dddd");
        assert!(
            !store.contains(&a),
            "a was least recently used once unpinned"
        );
        assert!(matches!(
            store.begin(&BlobDigest::of(b"x"), 11),
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn piece_hashes_are_kept_with_a_complete_blob_until_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        let hashes = || {
            let layout = shoal_proto::PieceLayout::for_blob(4).unwrap();
            Arc::new(BlobHashes::new(layout))
        };
        // Not for a blob still being written, nor for one the store does not have.
        let b = BlobDigest::of(b"bbbb");
        let partial = store.begin(&b, 4).unwrap();
        store.keep_piece_hashes(&b, hashes());
        store.keep_piece_hashes(&BlobDigest::of(b"none"), hashes());
        partial.write_at(0, b"bbbb").unwrap();
        partial.commit().unwrap();
        assert!(store.open_complete(&b).unwrap().piece_hashes.is_none());

        let a = write(&store, b"aaaa");
        assert!(store.open_complete(&a).unwrap().piece_hashes.is_none());
        let kept = hashes();
        store.keep_piece_hashes(&a, kept.clone());
        let read = store.open_complete(&a).unwrap();
        assert!(Arc::ptr_eq(read.piece_hashes.as_ref().unwrap(), &kept));
        drop(read);
        // Evicted (b is more recent now), the hashes go with it; stored again, it has none.
        store.open_complete(&b).unwrap();
        write(&store, b"cccc");
        assert!(!store.contains(&a));
        write(&store, b"aaaa");
        assert!(store.open_complete(&a).unwrap().piece_hashes.is_none());
        // Nor after a restart: they are not on disk.
        store.keep_piece_hashes(&a, hashes());
        drop(store);
        let store = Store::open(dir.path(), 10).unwrap();
        assert!(store.open_complete(&a).unwrap().piece_hashes.is_none());
    }

    #[test]
    fn a_dropped_partial_is_removed_and_frees_its_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let d = BlobDigest::of(b"x");
        let partial = store.begin(&d, 50).unwrap();
        assert!(matches!(store.begin(&d, 50), Err(StoreError::Exists)));
        assert_eq!(store.used(), 50);
        drop(partial);
        assert_eq!(store.used(), 0);
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[test]
    fn ignores_stray_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        assert_eq!(store.used(), 0);
    }
}
