//! Follower side: a manifest → a verified snapshot in a target directory, in the snapshot
//! directory layout.
//!
//! The file is assembled in a hidden staging file next to its final name
//! (`.<data>.partial`, never read by a node). Each chunk comes from the first of: the staging
//! file itself (a previous attempt that was killed), a local snapshot that has the chunk,
//! or the store, `concurrency` at a time. Every chunk's sha256 is checked before its bytes
//! are written, and the whole file's sha256 before it is renamed into place; the envelope is
//! written last, so a node sees the snapshot whole or not at all. On an error the staging
//! file is removed and the target directory is as it was.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::chunk::{ChunkSpan, Digest, WholeFileHasher, WriteBehind};
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, Manifest};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::snapdir::{self, Envelope, ENVELOPE_FORMAT};

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub index: u64,
    pub term: u64,
    pub size: u64,
    pub sha256: String,
    pub chunks_total: u64,
    pub chunks_transferred: u64,
    pub chunks_reused: u64,
    pub bytes_transferred: u64,
    pub bytes_reused: u64,
    pub data: PathBuf,
    pub meta: PathBuf,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::publish::as_millis")]
    pub elapsed: Duration,
}

/// A local file whose chunks may be reused: a previous snapshot and its chunk list (from its
/// manifest, or from cutting the file again with the repository's parameters). Its bytes
/// are trusted no more than the store's: every reused chunk is hashed again.
#[derive(Debug, Clone)]
pub struct ReuseSource {
    pub path: PathBuf,
    pub chunks: Vec<ChunkSpan>,
}

impl ReuseSource {
    pub fn from_manifest(path: PathBuf, manifest: &Manifest) -> ReuseSource {
        let chunks = manifest
            .offsets()
            .map(|(offset, c)| ChunkSpan {
                sha256: c.sha256,
                offset,
                len: c.len,
            })
            .collect();
        ReuseSource { path, chunks }
    }
}

/// Reuse sources for a fetch into `dir`: its newest `limit` committed snapshots, with their
/// chunk lists from their manifest when the store has one for the same log id, otherwise
/// found by cutting the file again with the repository's parameters (a snapshot the node
/// built itself). Unreadable snapshots are skipped with a warning.
pub async fn local_sources(repo: &Repo, dir: &Path, limit: usize) -> Result<Vec<ReuseSource>> {
    let scan =
        snapdir::scan(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    for rejected in &scan.rejected {
        tracing::warn!(error = %rejected, "not reusing an unreadable snapshot");
    }
    let mut sources = Vec::new();
    for local in scan.snapshots.iter().rev().take(limit) {
        let (index, term) = local.envelope.log_id();
        let manifest = match repo.manifest_for(index, term).await? {
            Some(id) => repo.read_manifest(&id).await.ok(),
            None => None,
        };
        let chunks = match manifest {
            Some(m) if m.size == local.envelope.size => {
                ReuseSource::from_manifest(local.data_path.clone(), &m).chunks
            }
            _ => {
                let path = local.data_path.clone();
                let params = repo.params();
                let cut = tokio::task::spawn_blocking(move || {
                    File::open(&path).and_then(|f| crate::chunk::index(f, params))
                })
                .await
                .map_err(|e| Error::io("chunking task", io::Error::other(e)))?;
                match cut {
                    Ok(chunks) => chunks,
                    Err(e) => {
                        tracing::warn!(path = %local.data_path.display(), error = %e, "cannot read a local snapshot for reuse");
                        continue;
                    }
                }
            }
        };
        sources.push(ReuseSource {
            path: local.data_path.clone(),
            chunks,
        });
    }
    Ok(sources)
}

/// Where a chunk's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Already in the staging file at the right offset: nothing to write.
    InPlace,
    Local,
    Store,
}

struct Piece {
    offset: u64,
    bytes: Bytes,
    origin: Origin,
}

struct Located {
    file: Arc<File>,
    offset: u64,
}

pub struct Fetcher<'a> {
    repo: &'a Repo,
    concurrency: usize,
    progress: &'a dyn Progress,
}

impl<'a> Fetcher<'a> {
    pub fn new(repo: &'a Repo, concurrency: usize, progress: &'a dyn Progress) -> Self {
        Fetcher {
            repo,
            concurrency: concurrency.max(1),
            progress,
        }
    }

    /// Assembles `manifest`'s snapshot in `dir` as `snapshot-<index>-<term>.bin` plus its
    /// envelope, reusing chunks from `sources` where their bytes verify.
    ///
    /// Cancel safety: if the future is dropped (or the process killed), only the hidden
    /// staging file remains; the next fetch of the same snapshot reuses its verified chunks.
    pub async fn fetch(
        &self,
        manifest: &Manifest,
        dir: &Path,
        sources: &[ReuseSource],
    ) -> Result<FetchReport> {
        let started = Instant::now();
        let (data_name, meta_name) =
            snapdir::file_names(manifest.last_log_index, manifest.last_log_term);
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let staging = dir.join(format!(".{data_name}.partial"));
        // Chunks copied from the node's own snapshot are covered by the whole-file sha256
        // rather than hashed one by one (they do not arrive from anywhere; hashing them
        // twice cost a core-second per GiB). If the whole file then fails, a local copy was
        // damaged: assemble again, checking every local chunk.
        let result = match self.assemble(manifest, &staging, sources, false).await {
            Err(Error::FileCorrupt { .. }) if !sources.is_empty() => {
                tracing::warn!(
                    index = manifest.last_log_index,
                    "a local chunk copy was damaged; fetching again with every local chunk verified"
                );
                let _ = fs::remove_file(&staging);
                self.assemble(manifest, &staging, sources, true).await
            }
            other => other,
        };
        let counts = match result {
            Ok(counts) => counts,
            Err(e) => {
                let _ = fs::remove_file(&staging);
                return Err(e);
            }
        };
        let data = dir.join(&data_name);
        let commit = (|| -> Result<PathBuf> {
            fs::rename(&staging, &data)
                .map_err(|e| Error::io(format!("renaming {} into place", staging.display()), e))?;
            let envelope = Envelope {
                format: ENVELOPE_FORMAT,
                last_log_index: manifest.last_log_index,
                last_log_term: manifest.last_log_term,
                data: data_name.clone(),
                size: manifest.size,
                raft_meta: manifest.raft_meta.clone(),
                chunk_index: None,
                sha256: None,
            };
            Ok(snapdir::commit_envelope(dir, &meta_name, &envelope)?)
        })();
        let meta = match commit {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(&staging);
                return Err(e);
            }
        };
        self.progress.finish();
        let report = FetchReport {
            index: manifest.last_log_index,
            term: manifest.last_log_term,
            size: manifest.size,
            sha256: manifest.sha256.to_hex(),
            chunks_total: manifest.chunks.len() as u64,
            chunks_transferred: counts.transferred,
            chunks_reused: counts.reused,
            bytes_transferred: counts.bytes_transferred,
            bytes_reused: counts.bytes_reused,
            data,
            meta,
            elapsed: started.elapsed(),
        };
        tracing::debug!(
            index = report.index,
            term = report.term,
            bytes = report.size,
            chunks = report.chunks_total,
            chunks_downloaded = report.chunks_transferred,
            bytes_downloaded = report.bytes_transferred,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "fetched"
        );
        Ok(report)
    }

    async fn assemble(
        &self,
        manifest: &Manifest,
        staging: &Path,
        sources: &[ReuseSource],
        verify_local: bool,
    ) -> Result<Counts> {
        let staging_err = |e| Error::io(format!("staging file {}", staging.display()), e);
        // A staging file of the right size may hold verified chunks from a killed attempt.
        let resumable =
            fs::metadata(staging).is_ok_and(|m| m.is_file() && m.len() == manifest.size);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!resumable)
            .open(staging)
            .map_err(staging_err)?;
        file.set_len(manifest.size).map_err(staging_err)?;
        let file = Arc::new(file);
        let local = index_sources(sources, manifest);

        self.progress.begin(manifest.size);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(2);
        let writer_file = file.clone();
        let hasher =
            WholeFileHasher::spawn().map_err(|e| Error::io("starting the file hasher", e))?;
        let writer = tokio::task::spawn_blocking(move || -> io::Result<(Digest, Counts)> {
            let mut counts = Counts::default();
            let mut write_behind = WriteBehind::new();
            while let Some(piece) = rx.blocking_recv() {
                hasher.feed(piece.bytes.clone());
                let len = piece.bytes.len() as u64;
                match piece.origin {
                    Origin::InPlace => {}
                    Origin::Local | Origin::Store => {
                        writer_file.write_all_at(&piece.bytes, piece.offset)?
                    }
                }
                match piece.origin {
                    Origin::Store => {
                        counts.transferred += 1;
                        counts.bytes_transferred += len;
                    }
                    Origin::InPlace | Origin::Local => {
                        counts.reused += 1;
                        counts.bytes_reused += len;
                    }
                }
                // Pieces arrive in file order.
                write_behind.written_to(&writer_file, piece.offset + len);
            }
            writer_file.sync_all()?;
            Ok((hasher.finish(), counts))
        });

        let sent = futures::stream::iter(manifest.offsets())
            .map(|(offset, c)| {
                self.obtain(c, offset, resumable.then_some(&file), &local, verify_local)
            })
            .buffered(self.concurrency)
            .map_ok(|piece| {
                self.progress.advance(piece.bytes.len() as u64);
                piece
            })
            .try_for_each(|piece| {
                let tx = tx.clone();
                async move {
                    tx.send(piece).await.map_err(|_| {
                        Error::io(
                            "writing the staging file",
                            io::Error::other("writer stopped"),
                        )
                    })
                }
            })
            .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::io("writer task", io::Error::other(e)))?;
        sent?;
        let (digest, counts) = written.map_err(staging_err)?;
        if digest != manifest.sha256 {
            return Err(Error::FileCorrupt {
                index: manifest.last_log_index,
                expected: manifest.sha256.to_hex(),
                actual: digest.to_hex(),
            });
        }
        Ok(counts)
    }

    /// Gets one chunk's verified bytes from the cheapest place that has them.
    async fn obtain(
        &self,
        chunk: &ChunkRef,
        offset: u64,
        staging: Option<&Arc<File>>,
        local: &HashMap<Digest, Located>,
        verify_local: bool,
    ) -> Result<Piece> {
        let sha = chunk.sha256;
        let len = chunk.len;
        if let Some(file) = staging {
            if let Some(bytes) = read_chunk(file.clone(), offset, len, Some(sha)).await {
                return Ok(Piece {
                    offset,
                    bytes,
                    origin: Origin::InPlace,
                });
            }
        }
        if let Some(found) = local.get(&sha) {
            let expect = verify_local.then_some(sha);
            if let Some(bytes) = read_chunk(found.file.clone(), found.offset, len, expect).await {
                return Ok(Piece {
                    offset,
                    bytes,
                    origin: Origin::Local,
                });
            }
            tracing::warn!(chunk = %sha, "local copy of a chunk does not verify; downloading it");
        }
        let bytes = self.repo.get_chunk(&sha, len).await?;
        tracing::debug!(chunk = %sha, offset, len, "downloaded chunk");
        Ok(Piece {
            offset,
            bytes,
            origin: Origin::Store,
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    transferred: u64,
    reused: u64,
    bytes_transferred: u64,
    bytes_reused: u64,
}

/// Maps each chunk the manifest needs to one local place that should hold it. Files that
/// cannot be opened are skipped: reuse is an optimisation, never a requirement.
fn index_sources(sources: &[ReuseSource], manifest: &Manifest) -> HashMap<Digest, Located> {
    let wanted = manifest.unique_chunks();
    let mut found = HashMap::new();
    for source in sources {
        let file = match File::open(&source.path) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::warn!(path = %source.path.display(), error = %e, "cannot reuse local snapshot");
                continue;
            }
        };
        for span in &source.chunks {
            if wanted.contains(&span.sha256) {
                found.entry(span.sha256).or_insert_with(|| Located {
                    file: file.clone(),
                    offset: span.offset,
                });
            }
        }
    }
    found
}

/// Reads `len` bytes at `offset`; with `expect`, returns them only if they hash to it.
async fn read_chunk(
    file: Arc<File>,
    offset: u64,
    len: u64,
    expect: Option<Digest>,
) -> Option<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).ok()?;
        expect
            .is_none_or(|sha| Digest::of(&buf) == sha)
            .then(|| Bytes::from(buf))
    })
    .await
    .ok()
    .flatten()
}
