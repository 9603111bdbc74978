//! Leader side: one committed snapshot → its chunks in the store → its manifest.
//!
//! The file is read once, in order, on a blocking thread that cuts chunks and hashes the
//! whole file; chunk hashing and uploads run `concurrency` at a time. Chunks the store
//! already holds are not uploaded again. The manifest goes last: it is the commit point, so
//! abandoning a publish at any moment (error, cancel, SIGKILL) leaves only unreferenced
//! chunks, which the next attempt reuses and GC eventually removes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::chunk::{self, Digest, RawChunk};
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, Encoding, Manifest, Publisher as PublisherInfo, MANIFEST_FORMAT};
use crate::progress::Progress;
use crate::repo::{Repo, StoredChunk};
use crate::snapdir::{SnapdirError, Snapshot};

/// What a publish did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    pub index: u64,
    pub term: u64,
    pub size: u64,
    pub sha256: Option<String>,
    pub manifest: String,
    /// True when a manifest for this log id already existed; nothing was uploaded.
    pub already_published: bool,
    pub chunks_total: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
}

pub(crate) fn as_millis<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

pub struct Publisher<'a> {
    repo: &'a Repo,
    concurrency: usize,
    node_id: Option<u64>,
    progress: &'a dyn Progress,
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
        }
    }

    /// Publishes `snapshot` unless a manifest for its log id exists already.
    ///
    /// Cancel safety: dropping the future stops reading and uploading; nothing becomes
    /// visible as a snapshot, because the manifest is written last.
    pub async fn publish(&self, snapshot: &Snapshot) -> Result<PublishReport> {
        let started = Instant::now();
        let env = &snapshot.envelope;
        let (index, term) = env.log_id();
        if let Some(id) = self.repo.manifest_for(index, term).await? {
            tracing::debug!(index, term, manifest = %id, "already published");
            return Ok(PublishReport {
                index,
                term,
                size: env.size,
                sha256: None,
                manifest: id.to_string(),
                already_published: true,
                chunks_total: 0,
                chunks_transferred: 0,
                bytes_transferred: 0,
                elapsed: started.elapsed(),
            });
        }
        // One listing tells which chunks need no upload: those of earlier snapshots and those
        // a killed push left behind.
        let present = self.repo.list_chunks().await?;

        let file = File::open(&snapshot.data_path)
            .map_err(|e| Error::io(format!("opening {}", snapshot.data_path.display()), e))?;
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

        self.progress.begin(env.size);
        let transferred = AtomicU64::new(0);
        let transferred_bytes = AtomicU64::new(0);
        let chunks =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .map(|raw| self.store_chunk(raw, &present, &transferred, &transferred_bytes))
                .buffered(self.concurrency)
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

        self.restore_vanished(snapshot, &chunks).await?;

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
            signature: None,
        };
        let id = self.repo.put_manifest(&manifest).await?;
        self.progress.finish();
        let report = PublishReport {
            index,
            term,
            size,
            sha256: Some(sha256.to_hex()),
            manifest: id.to_string(),
            already_published: false,
            chunks_total: manifest.chunks.len() as u64,
            chunks_transferred: transferred.into_inner(),
            bytes_transferred: transferred_bytes.into_inner(),
            elapsed: started.elapsed(),
        };
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

    /// A GC running elsewhere (an operator's `snaprelay gc`, a deposed leader) may have
    /// deleted an old, unreferenced chunk this publish counted as present. Listing once more
    /// just before the manifest — the commit point — and re-sending what vanished keeps the
    /// rule that a manifest exists only when all its chunks do.
    async fn restore_vanished(&self, snapshot: &Snapshot, chunks: &[ChunkRef]) -> Result<()> {
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
        let file = std::sync::Arc::new(
            File::open(&snapshot.data_path)
                .map_err(|e| Error::io(format!("opening {}", snapshot.data_path.display()), e))?,
        );
        for (offset, c) in missing {
            let file = file.clone();
            let path = snapshot.data_path.clone();
            let data = tokio::task::spawn_blocking(move || -> Result<bytes::Bytes> {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; c.len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| Error::io(format!("re-reading {}", path.display()), e))?;
                if Digest::of(&buf) != c.sha256 {
                    return Err(Error::io(
                        format!("re-reading {}", path.display()),
                        io::Error::other("the snapshot file changed during the publish"),
                    ));
                }
                Ok(buf.into())
            })
            .await
            .map_err(|e| Error::io("re-reading task", io::Error::other(e)))??;
            self.repo.put_chunk(&c.sha256, data).await?;
        }
        Ok(())
    }

    async fn store_chunk(
        &self,
        raw: RawChunk,
        present: &HashMap<Digest, StoredChunk>,
        transferred: &AtomicU64,
        transferred_bytes: &AtomicU64,
    ) -> Result<ChunkRef> {
        let len = raw.data.len() as u64;
        let data = raw.data;
        let (sha, data) = tokio::task::spawn_blocking(move || (Digest::of(&data), data))
            .await
            .map_err(|e| Error::io("hashing task", io::Error::other(e)))?;
        if present.get(&sha).map(|c| c.size) != Some(len) {
            self.repo.put_chunk(&sha, data).await?;
            transferred.fetch_add(1, Ordering::Relaxed);
            transferred_bytes.fetch_add(len, Ordering::Relaxed);
            tracing::debug!(chunk = %sha, offset = raw.offset, len, "uploaded chunk");
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
