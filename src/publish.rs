//! Leader side: one committed snapshot → its chunks in the store → its manifest.
//!
//! When the node wrote a chunk index beside the snapshot (the hook library does), the
//! publisher reads only the chunks the store lacks, checks each against the index and
//! uploads it; the rest of the file is never read. Otherwise the file is read once, in
//! order, on a blocking thread that cuts chunks and hashes the whole file; chunk hashing
//! and uploads run `concurrency` at a time. Either way, chunks the store already holds are
//! not uploaded again, and the manifest goes last: it is the commit point, so abandoning a
//! publish at any moment (error, cancel, SIGKILL) leaves only unreferenced chunks, which
//! the next attempt reuses and GC eventually removes. A lease under `leases/` keeps a GC
//! elsewhere from deleting, meanwhile, an old chunk this publish found present and skipped
//! (see [`crate::lease`]: the publish looks at the store only after its lease's wait for
//! GCs, and writes the manifest only while the lease is fresh).
//!
//! With streaming on ([`Publisher::streaming`]), the publish announces itself while it runs:
//! an in-progress object lists the chunks already in the store ([`crate::inprogress`]),
//! and the advisory `latest` object names the snapshot being published, so that followers
//! fetch its chunks before the manifest lands. Both are advisory and deleted (the former) or
//! superseded (the latter) when the publish ends; a failure to write them never fails it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::chunk::{self, Digest, RawChunk};
use crate::error::{Error, Result};
use crate::inprogress::{Announcer, Span};
use crate::lease::{self, Lease};
use crate::manifest::{ChunkRef, Encoding, Manifest, Publisher as PublisherInfo, MANIFEST_FORMAT};
use crate::progress::Progress;
use crate::repo::{ManifestId, Repo, StoredChunk};
use crate::snapdir::{SnapdirError, Snapshot};
use snaprelay_contract::chunking::{ChunkIndex, IndexFile};
use snaprelay_contract::dir::{Dir, NotRegular};

mod packed;

/// Times a publish takes its lease again when it lapses before the manifest is written.
const COMMIT_ATTEMPTS: usize = 3;

impl PublishReport {
    /// The report of a publish that found its snapshot's manifest in the store already.
    fn already_published(
        env: &crate::snapdir::Envelope,
        id: &ManifestId,
        sent: Sent,
        started: Instant,
    ) -> PublishReport {
        let (index, term) = env.log_id();
        tracing::debug!(index, term, manifest = %id, "already published");
        PublishReport {
            index,
            term,
            size: env.size,
            sha256: None,
            manifest: id.to_string(),
            chunk_index: false,
            already_published: true,
            chunks_total: 0,
            chunks_transferred: sent.chunks.into_inner(),
            bytes_transferred: sent.bytes.into_inner(),
            elapsed: started.elapsed(),
        }
    }

    /// The report of a publish that committed a manifest: `(size, sha256, chunks)` of it.
    fn committed(
        env: &crate::snapdir::Envelope,
        (size, sha256, chunks_total): (u64, &Digest, u64),
        id: &ManifestId,
        chunk_index: bool,
        sent: Sent,
        started: Instant,
    ) -> PublishReport {
        let (index, term) = env.log_id();
        PublishReport {
            index,
            term,
            size,
            sha256: Some(sha256.to_hex()),
            manifest: id.to_string(),
            chunk_index,
            already_published: false,
            chunks_total,
            chunks_transferred: sent.chunks.into_inner(),
            bytes_transferred: sent.bytes.into_inner(),
            elapsed: started.elapsed(),
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    pub index: u64,
    pub term: u64,
    pub size: u64,
    pub sha256: Option<String>,
    pub manifest: String,
    /// True when the node's chunk index was used: only the chunks the store lacked were read.
    pub chunk_index: bool,
    /// True when a manifest for this log id already existed; nothing was uploaded.
    pub already_published: bool,
    pub chunks_total: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::progress::as_millis")]
    pub elapsed: Duration,
}

pub struct Publisher<'a> {
    repo: &'a Repo,
    concurrency: usize,
    node_id: Option<u64>,
    progress: &'a dyn Progress,
    use_index: bool,
    lease_ttl: Duration,
    streaming: bool,
    announced: Option<Box<dyn Fn(u64, u64) + Send + Sync + 'a>>,
}

/// Counters shared by the uploads of one publish.
#[derive(Default)]
struct Sent {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

impl<'a> Publisher<'a> {
    pub fn new(
        repo: &'a Repo,
        concurrency: usize,
        node_id: Option<u64>,
        progress: &'a dyn Progress,
    ) -> Self {
        Publisher {
            repo,
            concurrency: concurrency.max(1),
            node_id,
            progress,
            use_index: true,
            lease_ttl: lease::DEFAULT_TTL,
            streaming: false,
            announced: None,
        }
    }

    /// Whether to announce the publish while it runs (default: no): the in-progress object
    /// and the `latest` object's `publishing` field (see the module's header).
    pub fn streaming(mut self, yes: bool) -> Self {
        self.streaming = yes;
        self
    }

    /// Called with the snapshot's (index, term) once a streaming publish has announced
    /// itself (the daemon hints the followers then).
    pub fn on_announced(mut self, f: impl Fn(u64, u64) + Send + Sync + 'a) -> Self {
        self.announced = Some(Box::new(f));
        self
    }

    /// The TTL of the publish's lease (default [`lease::DEFAULT_TTL`]); tests shorten it to
    /// run the protocol's time-based paths in few steps.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Whether to use the chunk index a node wrote beside the snapshot (default: yes). With
    /// `false`, the publisher cuts and hashes the file itself.
    pub fn use_chunk_index(mut self, yes: bool) -> Self {
        self.use_index = yes;
        self
    }

    /// Publishes `snapshot` unless a manifest for its log id exists already.
    ///
    /// Cancel safety: dropping the future stops reading and uploading; nothing becomes
    /// visible as a snapshot, because the manifest is written last.
    ///
    /// The snapshot's files are opened once, here, through the snapshot directory's
    /// descriptor, and every later read goes through those descriptors: a data file, chunk
    /// index or meta file that is a symbolic link, FIFO, device or directory is refused,
    /// and swapping one in during the publish changes nothing.
    pub async fn publish(&self, snapshot: &Snapshot) -> Result<PublishReport> {
        let started = Instant::now();
        let snapshot = &tokio::task::spawn_blocking({
            let snapshot = snapshot.clone();
            move || OpenSnapshot::open(snapshot)
        })
        .await
        .map_err(|e| Error::io("opening task", io::Error::other(e)))??;
        // The lease comes before any look at what the store holds (see `lease`); reading
        // the node's index meanwhile hides its round trips.
        let (lease, node_index) = tokio::join!(
            Lease::for_publish(self.repo, self.lease_ttl, self.node_id),
            async {
                match self.use_index {
                    true => self.usable_index(snapshot).await,
                    false => None,
                }
            }
        );
        let mut lease = lease?;
        let result = self
            .publish_leased(snapshot, node_index, &mut lease, started)
            .await;
        lease.release().await;
        result
    }

    async fn publish_leased(
        &self,
        snapshot: &OpenSnapshot,
        node_index: Option<NodeIndex>,
        lease: &mut Lease,
        started: Instant,
    ) -> Result<PublishReport> {
        if let Some(descriptor) = self.repo.packs() {
            return self
                .publish_packed(descriptor, snapshot, node_index, lease, started)
                .await;
        }
        let env = &snapshot.envelope;
        let (index, term) = env.log_id();
        let sent = Sent::default();
        // Independent work, run together: is it published already, which chunks does the
        // store hold (one listing covers earlier snapshots and chunks a killed push left
        // behind), and, with the node's index, sending the chunks that are new.
        let early = async {
            match &node_index {
                Some(NodeIndex {
                    list: NodeList::Whole { index, previous },
                    ..
                }) => self.send_new(snapshot, index, previous, &sent).await,
                _ => Ok(HashMap::new()),
            }
        };
        let (existing, present, early) = tokio::join!(
            self.repo.manifest_for(index, term),
            self.repo.list_chunks(),
            early
        );
        if let Some(id) = existing? {
            // Normally nothing was sent: the early sends find their chunks present.
            return Ok(PublishReport::already_published(env, &id, sent, started));
        }
        let mut present = present?;
        present.extend(early?);
        let announcer = self.announce(index, term, env.size).await;
        let result = self
            .upload_and_commit(
                snapshot,
                node_index,
                &present,
                &sent,
                lease,
                announcer.as_ref(),
            )
            .await;
        // After the manifest (or the failure): nothing is in progress any more.
        if let Some(announcer) = announcer {
            announcer.end().await;
        }
        let (manifest, id, used_index) = result?;
        self.progress.finish();
        let summary = (
            manifest.size,
            &manifest.sha256,
            manifest.chunks.len() as u64,
        );
        let report = PublishReport::committed(env, summary, &id, used_index, sent, started);
        tracing::debug!(
            index,
            term,
            bytes = report.size,
            chunks = report.chunks_total,
            chunks_uploaded = report.chunks_transferred,
            bytes_uploaded = report.bytes_transferred,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "published"
        );
        Ok(report)
    }

    /// With streaming on: writes the in-progress object, then tells `latest` (and the
    /// caller) that the publish started. `None` when streaming is off or the first write
    /// failed.
    async fn announce(&self, index: u64, term: u64, size: u64) -> Option<Announcer> {
        if !self.streaming {
            return None;
        }
        let announcer = Announcer::start(self.repo, index, term, size).await?;
        let store = self.repo.store();
        if let Err(e) =
            crate::latest::write_publishing(store, self.repo.cluster_id(), index, term).await
        {
            tracing::warn!(index, error = %e, "cannot announce the publish in the store's latest object; followers without hints fetch after the manifest");
        }
        if let Some(announced) = &self.announced {
            announced(index, term);
        }
        Some(announcer)
    }

    /// Uploads the chunks the store lacks and commits the manifest; returns it, its id and
    /// whether the node's chunk index was used.
    async fn upload_and_commit(
        &self,
        snapshot: &OpenSnapshot,
        node_index: Option<NodeIndex>,
        present: &HashMap<Digest, StoredChunk>,
        sent: &Sent,
        lease: &mut Lease,
        announcer: Option<&Announcer>,
    ) -> Result<(Manifest, ManifestId, bool)> {
        let env = &snapshot.envelope;
        let (index, term) = env.log_id();
        self.progress.begin(env.size);
        let used_index = node_index.is_some();
        let (chunks, sha256) = match node_index.map(|n| n.list) {
            Some(NodeList::File(file)) => {
                let index = file.read_all().map_err(|e| {
                    Error::io("reading the node's chunk index", std::io::Error::other(e))
                })?;
                let sha256 = index.sha256;
                let chunks = self
                    .upload_indexed(snapshot, index, present, sent, announcer)
                    .await?;
                (chunks, sha256)
            }
            Some(NodeList::Whole { index, .. }) => {
                let sha256 = index.sha256;
                let chunks = self
                    .upload_indexed(snapshot, index, present, sent, announcer)
                    .await?;
                (chunks, sha256)
            }
            None => self.upload_cut(snapshot, present, sent, announcer).await?,
        };
        let size = env.size;

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            cluster_id: self.repo.cluster_id().to_owned(),
            last_log_index: index,
            last_log_term: term,
            raft_meta: env.raft_meta.clone(),
            size,
            sha256,
            chunks,
            created_at: Utc::now(),
            publisher: PublisherInfo {
                node_id: self.node_id,
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        };
        let id = self
            .commit(snapshot, Commit::Chunks(&manifest), lease)
            .await?
            .ok_or_else(|| lease.lapsed())?;
        Ok((manifest, id, used_index))
    }

    /// The node's chunk index for `snapshot`, if it names one that this publish can trust
    /// and use; otherwise `None`, after saying why.
    async fn usable_index(&self, snapshot: &OpenSnapshot) -> Option<NodeIndex> {
        let path = snapshot.chunk_index_path()?;
        let data = snapshot.data_path.clone();
        let size = snapshot.envelope.size;
        let this = snapshot.snapshot.clone();
        let data_file = snapshot.data.clone();
        let index_file = match &snapshot.index {
            Some(Ok(file)) => file.try_clone().map_err(|e| e.to_string()),
            Some(Err(reason)) => Err(reason.clone()),
            None => Err("the envelope names no chunk index".into()),
        };
        let packs = self.repo.packs().is_some();
        let read = tokio::task::spawn_blocking(move || -> Result<NodeIndex, String> {
            let index_file = index_file?;
            let modified_index = index_file.metadata().and_then(|m| m.modified());
            // Held in memory whole while this publish stores chunks as objects (a few
            // hundred per GiB at its chunking); the pack publisher streams it instead.
            let file = IndexFile::from_file(index_file, &path, size).map_err(|e| e.to_string())?;
            let header = *file.header();
            let list = match packs {
                true => NodeList::File(file),
                false => {
                    let index = file.read_all().map_err(|e| e.to_string())?;
                    NodeList::Whole {
                        previous: previous_chunks(&this, index.chunking),
                        index,
                    }
                }
            };
            // The data file is immutable once committed; one written after its index is not
            // what the index describes. (Both as opened: fstat, never the paths again.)
            match (
                data_file.metadata().and_then(|m| m.modified()),
                modified_index,
            ) {
                (Ok(d), Ok(i)) if d > i => Err(format!(
                    "data file {} was modified after its chunk index {}",
                    data.display(),
                    path.display()
                )),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                _ => Ok(NodeIndex {
                    chunking: header.chunking,
                    sha256: header.sha256,
                    list,
                }),
            }
        })
        .await;
        let reason = match read {
            Ok(Ok(node)) if node.chunking == self.repo.params() => return Some(node),
            Ok(Ok(node)) => format!(
                "it was cut with {:?}, the repository cuts with {:?}",
                node.chunking,
                self.repo.params()
            ),
            Ok(Err(reason)) => reason,
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            index = snapshot.envelope.last_log_index,
            "not using the node's chunk index ({reason}); cutting the file instead"
        );
        None
    }

    /// Sends the chunks the node's previous snapshot did not have, which are almost surely
    /// new, without waiting for the store's listing: a HEAD each, and an upload where the
    /// store lacks it. Returns the store's sizes of the chunks it now holds. Sends nothing
    /// when there is no previous snapshot to tell or most chunks look new (the listing is
    /// cheaper than a HEAD per chunk then).
    async fn send_new(
        &self,
        snapshot: &OpenSnapshot,
        index: &ChunkIndex,
        previous: &HashSet<Digest>,
        sent: &Sent,
    ) -> Result<HashMap<Digest, StoredChunk>> {
        let mut seen = HashSet::new();
        let mut offset = 0u64;
        let mut new = Vec::new();
        for &(sha256, len) in &index.chunks {
            if !previous.contains(&sha256) && seen.insert(sha256) {
                new.push((sha256, offset, len));
            }
            offset += len;
        }
        if previous.is_empty() || new.len() * 4 > index.chunks.len() {
            return Ok(HashMap::new());
        }
        chunk::advise_sequential(&snapshot.data, false);
        futures::stream::iter(new)
            .map(|(sha256, offset, len)| {
                async move {
                    if self.repo.chunk_size(&sha256).await? != Some(len) {
                        let mut reader = ChunkReader::new(snapshot, snapshot.chunk_index_path());
                        let data =
                            tokio::task::spawn_blocking(move || reader.read(sha256, offset, len))
                                .await
                                .map_err(|e| Error::io("reading task", io::Error::other(e)))??;
                        self.send(&sha256, data, sent).await?;
                    }
                    // Stands in for the listing's entry; only the size is consulted.
                    let stored = StoredChunk {
                        size: len,
                        last_modified: Utc::now(),
                    };
                    Ok((sha256, stored))
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await
    }

    /// Uploads the chunks of `index` that the store lacks, reading only those from the file
    /// and checking each against the index; returns the manifest's chunk list.
    async fn upload_indexed(
        &self,
        snapshot: &OpenSnapshot,
        index: ChunkIndex,
        present: &HashMap<Digest, StoredChunk>,
        sent: &Sent,
        announcer: Option<&Announcer>,
    ) -> Result<Vec<ChunkRef>> {
        // Every chunk goes into the manifest; only the missing ones are read, in file order,
        // by one reader: sequential reads keep the kernel's readahead working on a cold
        // page cache, where scattered concurrent reads cost twice the system time.
        let mut refs = Vec::with_capacity(index.chunks.len());
        let mut wanted = Vec::new();
        let mut queued = HashSet::new();
        let mut offset = 0u64;
        for &(sha256, len) in &index.chunks {
            if present.get(&sha256).map(|c| c.size) != Some(len) && queued.insert(sha256) {
                wanted.push((sha256, offset, len));
            }
            refs.push(ChunkRef {
                sha256,
                len,
                stored_len: len,
                encoding: Encoding::Identity,
            });
            offset += len;
        }
        let to_send: u64 = wanted.iter().map(|&(_, _, len)| len).sum();
        self.progress.advance(index.size - to_send);
        if let Some(announcer) = announcer {
            let mut offset = 0;
            announcer.plan(refs.iter().map(|c| {
                offset += c.len;
                Span {
                    offset: offset - c.len,
                    len: c.len,
                    sha256: c.sha256,
                }
            }));
            let mut stored = HashSet::new();
            stored.extend(
                refs.iter()
                    .map(|c| c.sha256)
                    .filter(|sha| !queued.contains(sha)),
            );
            announcer.stored(stored);
        }

        chunk::advise_sequential(&snapshot.data, true);
        let mut reader = ChunkReader::new(snapshot, snapshot.chunk_index_path());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<(Digest, bytes::Bytes)>>(2);
        let reading = tokio::task::spawn_blocking(move || {
            for (sha256, offset, len) in wanted {
                let chunk = reader.read(sha256, offset, len).map(|data| (sha256, data));
                let failed = chunk.is_err();
                // A closed channel means the uploads stopped; their error is the one to report.
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        let uploads =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .map(|chunk| async move {
                    let (sha256, data) = chunk?;
                    let len = data.len() as u64;
                    self.send(&sha256, data, sent).await?;
                    if let Some(announcer) = announcer {
                        announcer.stored([sha256]);
                    }
                    self.progress.advance(len);
                    Ok::<_, Error>(())
                })
                .buffer_unordered(self.concurrency)
                .try_collect::<()>()
                .await;
        reading
            .await
            .map_err(|e| Error::io("reading task", io::Error::other(e)))?;
        uploads?;
        Ok(refs)
    }

    /// Reads the whole file in order, cutting and hashing it, and uploads the chunks the
    /// store lacks; returns the manifest's chunk list and the file's sha256.
    async fn upload_cut(
        &self,
        snapshot: &OpenSnapshot,
        present: &HashMap<Digest, StoredChunk>,
        sent: &Sent,
        announcer: Option<&Announcer>,
    ) -> Result<(Vec<ChunkRef>, Digest)> {
        let env = &snapshot.envelope;
        chunk::advise_sequential(&snapshot.data, true);
        let file = chunk::ReadAt::new(snapshot.data.clone(), 0);
        let params = self.repo.params();
        let hasher = chunk::WholeFileHasher::spawn()
            .map_err(|e| Error::io("starting the file hasher", e))?;
        // Two chunks queued ahead of the uploads keep the reader busy without holding more
        // than `concurrency + 2` chunks in memory.
        let (tx, rx) = tokio::sync::mpsc::channel::<RawChunk>(2);
        let reader = tokio::task::spawn_blocking(move || {
            let size = chunk::split(file, params, |c| {
                hasher.feed(c.data.clone());
                tx.blocking_send(c)
                    .map_err(|_| io::Error::other("upload stopped"))
            });
            (size, hasher.finish())
        });
        let chunks =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .map(|raw| self.store_chunk(raw, present, sent))
                .buffered(self.concurrency)
                // In file order: each chunk is in the store once its future is done.
                .map_ok({
                    let mut offset = 0;
                    move |c| {
                        if let Some(announcer) = announcer {
                            announcer.plan([Span {
                                offset,
                                len: c.len,
                                sha256: c.sha256,
                            }]);
                            announcer.stored([c.sha256]);
                        }
                        offset += c.len;
                        c
                    }
                })
                .try_collect::<Vec<ChunkRef>>()
                .await;
        // On an upload error the receiver is gone and the reader stops at its next send.
        let (read, sha256) = reader
            .await
            .map_err(|e| Error::io("chunking task", io::Error::other(e)))?;
        let chunks = chunks?;
        let size =
            read.map_err(|e| Error::io(format!("reading {}", snapshot.data_path.display()), e))?;
        if size != env.size {
            return Err(Error::Snapdir(SnapdirError::SizeMismatch {
                meta: snapshot.meta_path.clone(),
                data: snapshot.data_path.clone(),
                expected: env.size,
                actual: size,
            }));
        }
        Ok((chunks, sha256))
    }

    /// Writes the manifest — the commit point — while the lease vouches that no GC deleted
    /// an object this publish counted on: fresh from the take (after which the store was
    /// looked at) to the end of the write. When it is not, a GC may have taken the lease
    /// for stale: take a new one, wait for GCs, put back whatever vanished, then write (see
    /// `lease` for why that is enough). `None`: a pack the manifest names vanished, and the
    /// snapshot must be packed again.
    async fn commit(
        &self,
        snapshot: &OpenSnapshot,
        manifest: Commit<'_>,
        lease: &mut Lease,
    ) -> Result<Option<ManifestId>> {
        let index = manifest.index();
        for _ in 0..COMMIT_ATTEMPTS {
            if !lease.fresh() {
                tracing::warn!(
                    index,
                    "the publish lease lapsed; taking it again and checking every chunk before the manifest"
                );
                lease.retake().await?;
                match manifest {
                    Commit::Chunks(m) => self.restore_vanished(snapshot, &m.chunks).await?,
                    Commit::Packs(m) => {
                        if !self.packs_present(m).await? {
                            return Ok(None);
                        }
                    }
                }
                if !lease.fresh() {
                    continue;
                }
            }
            let guard = lease.guard();
            let put = async {
                match manifest {
                    Commit::Chunks(m) => self.repo.put_manifest(m).await,
                    Commit::Packs(m) => self.repo.put_packed_manifest(m).await,
                }
            };
            match tokio::time::timeout(lease.remaining(), put).await {
                Ok(Ok(id)) => {
                    guard.done();
                    if lease.fresh() {
                        // Whatever an earlier write cut off could break is put right.
                        lease.settled();
                        return Ok(Some(id));
                    }
                    tracing::warn!(
                        index,
                        "the publish lease lapsed while the manifest was written; checking its chunks"
                    );
                }
                // It may still land; the dropped guard leaves the lease to go stale.
                Ok(Err(e)) => return Err(e),
                Err(_) => tracing::warn!(
                    index,
                    "the manifest's write outlasted the publish lease; checking its chunks"
                ),
            }
        }
        Err(lease.lapsed())
    }

    /// Whether every pack `manifest` names is in the store at the size it says (listed
    /// after the lease's re-take).
    async fn packs_present(&self, manifest: &crate::manifest_v2::Manifest) -> Result<bool> {
        let present = self.repo.list_packs().await?;
        let missing = manifest
            .packs
            .iter()
            .filter(|p| present.get(&p.id).map(|s| s.size) != Some(p.size))
            .count();
        if missing > 0 {
            tracing::warn!(
                packs = missing,
                "packs vanished during the publish (a concurrent GC?); packing the snapshot again"
            );
        }
        Ok(missing == 0)
    }

    /// After a lapse of the publish's lease (and its re-take), a GC elsewhere may have
    /// deleted an old, unreferenced chunk this publish counted as present. Listing again
    /// under the new lease and re-sending what vanished keeps the rule that a manifest
    /// exists only when all its chunks do.
    async fn restore_vanished(&self, snapshot: &OpenSnapshot, chunks: &[ChunkRef]) -> Result<()> {
        let present = self.repo.list_chunks().await?;
        let mut offset = 0u64;
        let mut missing = Vec::new();
        for c in chunks {
            if present.get(&c.sha256).map(|p| p.size) != Some(c.len) {
                missing.push((offset, c.clone()));
            }
            offset += c.len;
        }
        if missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            chunks = missing.len(),
            "chunks vanished during the publish (a concurrent GC?); sending them again"
        );
        chunk::advise_sequential(&snapshot.data, false);
        let mut reader = ChunkReader::new(snapshot, None);
        for (offset, c) in missing {
            let (read, data) = tokio::task::spawn_blocking(move || {
                let data = reader.read(c.sha256, offset, c.len);
                (reader, data)
            })
            .await
            .map_err(|e| Error::io("re-reading task", io::Error::other(e)))?;
            reader = read;
            self.repo.put_chunk(&c.sha256, data?).await?;
        }
        Ok(())
    }

    /// Uploads one chunk and counts it.
    async fn send(&self, sha256: &Digest, data: bytes::Bytes, sent: &Sent) -> Result<()> {
        let len = data.len() as u64;
        self.repo.put_chunk(sha256, data).await?;
        sent.chunks.fetch_add(1, Ordering::Relaxed);
        sent.bytes.fetch_add(len, Ordering::Relaxed);
        tracing::debug!(chunk = %sha256, len, "uploaded chunk");
        Ok(())
    }

    async fn store_chunk(
        &self,
        raw: RawChunk,
        present: &HashMap<Digest, StoredChunk>,
        sent: &Sent,
    ) -> Result<ChunkRef> {
        let len = raw.data.len() as u64;
        let data = raw.data;
        let (sha, data) = tokio::task::spawn_blocking(move || (Digest::of(&data), data))
            .await
            .map_err(|e| Error::io("hashing task", io::Error::other(e)))?;
        if present.get(&sha).map(|c| c.size) != Some(len) {
            self.send(&sha, data, sent).await?;
        }
        self.progress.advance(len);
        Ok(ChunkRef {
            sha256: sha,
            len,
            stored_len: len,
            encoding: Encoding::Identity,
        })
    }
}

/// The manifest a publish commits, in its repository's format.
#[derive(Clone, Copy)]
enum Commit<'m> {
    Chunks(&'m Manifest),
    Packs(&'m crate::manifest_v2::Manifest),
}

impl Commit<'_> {
    fn index(&self) -> u64 {
        match self {
            Commit::Chunks(m) => m.last_log_index,
            Commit::Packs(m) => m.last_log_index,
        }
    }
}

/// The node's chunk index of a snapshot, and the chunks of the node's previous indexed
/// snapshot in the same directory (empty if there is none).
pub(super) struct NodeIndex {
    chunking: chunk::ChunkParams,
    sha256: Digest,
    list: NodeList,
}

/// How a publish reads the node's chunk list.
pub(super) enum NodeList {
    /// Read whole, with the chunks of the node's previous indexed snapshot: a publish of
    /// chunk objects (a few hundred chunks per GiB at its chunking).
    Whole {
        index: ChunkIndex,
        previous: HashSet<Digest>,
    },
    /// Left on disk and read a block at a time: a publish into packs, whose memory does not
    /// grow with the snapshot.
    File(IndexFile),
}

/// The chunks of the newest snapshot older than `snapshot` in its directory that has a
/// usable chunk index cut with `chunking`: what the previous publish most likely sent.
/// Best effort: any problem gives an empty set, which only turns the shortcut off.
fn previous_chunks(snapshot: &Snapshot, chunking: chunk::ChunkParams) -> HashSet<Digest> {
    let dir = snapshot.meta_path.parent().unwrap_or(Path::new("."));
    let Ok(scan) = crate::snapdir::scan(dir) else {
        return HashSet::new();
    };
    scan.snapshots
        .iter()
        .rev()
        .filter(|s| s.envelope.log_id() < snapshot.envelope.log_id())
        .filter_map(|s| Some((s.chunk_index_path()?, s.envelope.size)))
        .find_map(|(path, size)| IndexFile::open(&path, size).and_then(|f| f.read_all()).ok())
        .filter(|index| index.chunking == chunking)
        .map(|index| index.chunks.into_iter().map(|(sha, _)| sha).collect())
        .unwrap_or_default()
}

/// A snapshot with its files opened once through its directory's descriptor: the data file
/// (checked to be a regular file of the envelope's size) and, if the envelope names one, the
/// chunk index (or why it cannot be used).
struct OpenSnapshot {
    snapshot: Snapshot,
    data: Arc<File>,
    index: Option<std::result::Result<File, String>>,
}

impl std::ops::Deref for OpenSnapshot {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl OpenSnapshot {
    /// Blocking.
    fn open(snapshot: Snapshot) -> Result<OpenSnapshot> {
        let dir_path = snapshot.meta_path.parent().unwrap_or(Path::new("."));
        let dir_path = match dir_path.as_os_str().is_empty() {
            true => Path::new("."),
            false => dir_path,
        };
        let dir = Dir::open(dir_path)
            .map_err(|e| Error::io(format!("opening {}", dir_path.display()), e))?;
        let not_regular = |path: &Path, e: &io::Error| {
            NotRegular::of(e).map(|n| SnapdirError::NotRegular {
                path: path.to_owned(),
                kind: n.kind.to_owned(),
            })
        };
        let data = dir.open_file(&snapshot.envelope.data).map_err(|e| {
            match not_regular(&snapshot.data_path, &e) {
                Some(refused) => Error::Snapdir(refused),
                None => Error::io(format!("opening {}", snapshot.data_path.display()), e),
            }
        })?;
        let size = data
            .metadata()
            .map_err(|e| Error::io(format!("opening {}", snapshot.data_path.display()), e))?
            .len();
        if size != snapshot.envelope.size {
            return Err(Error::Snapdir(SnapdirError::SizeMismatch {
                meta: snapshot.meta_path.clone(),
                data: snapshot.data_path.clone(),
                expected: snapshot.envelope.size,
                actual: size,
            }));
        }
        let index = snapshot.envelope.chunk_index.as_ref().map(|name| {
            let path = dir.join(name);
            dir.open_file(name)
                .map_err(|e| match not_regular(&path, &e) {
                    Some(refused) => refused.to_string(),
                    None => format!("chunk index {}: {e}", path.display()),
                })
        });
        Ok(OpenSnapshot {
            snapshot,
            data: Arc::new(data),
            index,
        })
    }
}

/// Reads chunks of a data file whose digests are known (from the node's chunk index, or
/// from this publish's own cut), checking each: bytes that do not hash to the expected
/// digest are never uploaded. Reads go through the descriptor opened when the publish
/// began, at explicit offsets.
struct ChunkReader {
    file: Arc<File>,
    data: PathBuf,
    /// The chunk index the digests came from, if they came from one.
    index: Option<PathBuf>,
}

impl ChunkReader {
    fn new(snapshot: &OpenSnapshot, index: Option<PathBuf>) -> ChunkReader {
        ChunkReader {
            file: snapshot.data.clone(),
            data: snapshot.data_path.clone(),
            index,
        }
    }

    /// Blocking: the chunk at `offset`, verified.
    fn read(&mut self, sha256: Digest, offset: u64, len: u64) -> Result<bytes::Bytes> {
        let mismatch = |reason: String| match &self.index {
            Some(index) => Error::IndexMismatch {
                data: self.data.clone(),
                index: index.clone(),
                offset,
                len,
                reason,
            },
            None => Error::io(
                format!("re-reading {}", self.data.display()),
                io::Error::other(format!(
                    "the snapshot file changed during the publish (at offset {offset}: {reason})"
                )),
            ),
        };
        // `len` is at most the repository's max_size (16 MiB at most), checked with the
        // index or set by the cut. read_to_end fills the spare capacity without zeroing it first.
        let mut buf = Vec::with_capacity(len as usize);
        chunk::ReadAt::new(&*self.file, offset)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", self.data.display()), e))?;
        if (buf.len() as u64) < len {
            return Err(mismatch("the file ends before this chunk".into()));
        }
        let actual = Digest::of(&buf);
        if actual != sha256 {
            return Err(mismatch(format!(
                "the bytes hash to {actual}, expected {sha256}"
            )));
        }
        Ok(buf.into())
    }
}
