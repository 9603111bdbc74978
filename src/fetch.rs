//! Follower side: a manifest → a verified snapshot in a target directory, in the snapshot
//! directory layout.
//!
//! The file is assembled in a hidden staging file next to its final name
//! (`.<data>.partial`, never read by a node). Each chunk comes from the first of: the staging
//! file itself (a previous attempt that was killed), a local snapshot that has the chunk,
//! or the store, `concurrency` at a time. Every chunk from the store has its sha256 checked
//! before its bytes are written, and the whole file's sha256 before it is renamed into
//! place; the envelope is
//! written last, so a node sees the snapshot whole or not at all. On an error the staging
//! file is removed and the target directory is as it was; a daemon's fetcher
//! ([`Fetcher::resumable`]) keeps it instead unless the manifest itself is at fault, so the
//! next attempt resumes where this one stopped. One fetch (or prefetch) at a time writes
//! into a directory: each holds an exclusive lock on it, and another is refused at once.
//!
//! [`clean_incoming`] and [`release`] keep a node's incoming directory to what a sidecar is
//! doing right now: at most the one staging file it resumes, nothing once the node answered.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
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
use snaprelay_contract::dir::{self as safe_dir, Dir};

mod packed;

pub use packed::{packed_source, PackedSource};

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
    /// The chunk index written beside the data (pack fetches), which the envelope names.
    pub chunk_index: Option<PathBuf>,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::progress::as_millis")]
    pub elapsed: Duration,
    /// The local snapshot whose bytes were copied without being read (it carried this
    /// user's mark, see [`crate::verified`]): if the whole file turns out wrong, its mark
    /// is what to doubt.
    pub copied_unchecked_from: Option<PathBuf>,
    /// Of a pack fetch handed to a node: what to mark, or doubt, once the node checked it.
    #[serde(skip)]
    pub pending: Option<crate::verified::Pending>,
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
                    safe_dir::open_regular(&path, false)
                        .and_then(|f| crate::chunk::index(f, params))
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
#[derive(Debug)]
enum Origin {
    /// Already in the staging file at the right offset: nothing to write.
    InPlace,
    /// Read from a local snapshot (covered by the whole-file hash).
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
    node: Option<NodeAccess>,
    resumable: bool,
    /// Offsets of the staging file this process wrote verified chunks at, with their
    /// digests, when a prefetch of this process prepared it ([`Fetcher::prefetched`]).
    prefetched: Option<HashMap<u64, Digest>>,
    /// Hash the whole assembled file of a pack fetch too (see [`Fetcher::verify_file`]).
    verify_file: bool,
    /// Copy a marked local snapshot's bytes unchecked (see [`Fetcher::trust_marked`]).
    trust_marked: bool,
}

impl<'a> Fetcher<'a> {
    pub fn new(repo: &'a Repo, concurrency: usize, progress: &'a dyn Progress) -> Self {
        Fetcher {
            repo,
            concurrency: concurrency.max(1),
            progress,
            node: None,
            resumable: false,
            prefetched: None,
            verify_file: false,
            trust_marked: true,
        }
    }

    /// Whether a pack fetch copies the bytes of a local snapshot that carries this user's
    /// mark for its manifest without reading them ([`crate::verified`]); on by default.
    /// Off, every byte taken from a local file is read and hashed first: what a retry does
    /// after the node found a file built from marked bytes to be wrong.
    pub fn trust_marked(mut self, yes: bool) -> Self {
        self.trust_marked = yes;
        self
    }

    /// A pack fetch also hashes the whole assembled file and compares it with the
    /// manifest's sha256 before committing it. Not needed for its integrity (every byte is
    /// in a blob checked against its id, see docs/format.md), but it is what an operator
    /// checks with `sha256sum`. A chunk-object fetch always does it.
    pub fn verify_file(mut self, yes: bool) -> Self {
        self.verify_file = yes;
        self
    }

    /// The staging file of this snapshot was prepared by a prefetch of this process
    /// ([`crate::prefetch`]), which downloaded, checked and wrote `chunks` there (offset,
    /// digest). Only those are looked for in place, and they are not hashed one by one
    /// again: like chunks copied from a local snapshot, they are covered by the whole
    /// file's sha256, and a whole file that does not match is assembled again with every
    /// chunk checked. The rest of the file holds nothing yet (a new snapshot's chunks the
    /// node already has are left to local copies), so reading and hashing it in place
    /// would only cost a pass over the file. Only the sidecar's user (or root) can write
    /// the staging file (mode 0640, its own; a file anyone else put at its name is never
    /// reused). A pack fetch ([`Fetcher::fetch_packed`]) leaves these chunks as they are,
    /// as checked when they were written: it has no whole-file pass (the node's hook has
    /// one, and `pull` never prefetches).
    pub fn prefetched(mut self, chunks: impl IntoIterator<Item = (u64, Digest)>) -> Self {
        self.prefetched = Some(chunks.into_iter().collect());
        self
    }

    /// Keeps the staging file when a fetch fails for a reason that is not the manifest's
    /// (the store stopped answering, the disk filled up): the next fetch of the same
    /// snapshot reuses its verified chunks instead of downloading them again. (A failure
    /// that condemns the manifest, such as a missing or corrupt chunk, still removes it.)
    pub fn resumable(mut self, yes: bool) -> Self {
        self.resumable = yes;
        self
    }

    /// Whether a failed fetch leaves its staging file for the next attempt.
    fn keeps_staging(&self, err: &Error) -> bool {
        self.resumable && crate::quarantine::Reason::of_error(err).is_none()
    }

    /// The files fetched are for `node`, which must be able to read them: each is given
    /// the node's group where this process may, and the fetch fails with
    /// [`Error::Handover`] before anything is downloaded if the node still could not read
    /// it.
    pub fn hand_over_to(mut self, node: NodeAccess) -> Self {
        self.node = Some(node);
        self
    }

    /// Assembles `manifest`'s snapshot in `dir` as `snapshot-<index>-<term>.bin` plus its
    /// envelope, reusing chunks from `sources` where their bytes verify.
    ///
    /// `dir` may be writable by another user (the node's incoming directory): every file in
    /// it is created, opened, renamed and removed through the directory's descriptor, never
    /// through a symbolic link, and whatever was planted at a name this fetch writes is
    /// removed rather than written through.
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
        let Target {
            dir,
            staging,
            envelope,
            data_name,
            meta_name,
        } = Target::prepare(
            dir,
            (manifest.last_log_index, manifest.last_log_term),
            manifest.size,
            &manifest.raft_meta,
            &manifest.sha256,
        )?;
        // Chunks copied from the node's own snapshot are covered by the whole-file sha256
        // rather than hashed one by one (they do not arrive from anywhere; hashing them
        // twice cost a core-second per GiB). If the whole file then fails, a local copy was
        // damaged: assemble again, checking every local chunk.
        let result = match self
            .assemble(manifest, &dir, &staging, sources, false)
            .await
        {
            Err(Error::FileCorrupt { .. }) if !sources.is_empty() || self.prefetched.is_some() => {
                tracing::warn!(
                    index = manifest.last_log_index,
                    "a chunk copied from a local snapshot or prefetched was damaged; fetching again with every chunk verified"
                );
                let _ = dir.remove(&staging.name);
                self.assemble(manifest, &dir, &staging, sources, true).await
            }
            other => other,
        };
        let counts = match result {
            Ok(counts) => counts,
            Err(e) => {
                if self.keeps_staging(&e) {
                    tracing::debug!(path = %staging.path.display(), error = %e, "keeping the staging file for the next attempt");
                } else {
                    let _ = dir.remove(&staging.name);
                }
                return Err(e);
            }
        };
        let committed = commit(
            &dir, &staging, &data_name, &meta_name, &envelope, self.node, None,
        );
        let (data, meta) = match committed {
            Ok(paths) => paths,
            Err(e) => {
                let _ = dir.remove(&staging.name);
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
            chunk_index: None,
            elapsed: started.elapsed(),
            copied_unchecked_from: None,
            pending: None,
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
        dir: &Dir,
        staging: &Staging,
        sources: &[ReuseSource],
        verify_local: bool,
    ) -> Result<Counts> {
        let staging_err = |e| Error::io(format!("staging file {}", staging.path.display()), e);
        let (file, resumable) = open_staging(dir, staging, manifest.size).map_err(staging_err)?;
        if let Some(node) = self.node {
            // A cheap probe on the empty file, before a byte is downloaded.
            hand_over(&file, dir, node)?;
        }
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
                match &piece.origin {
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
            .map_err(Stop::Failed)
            .try_for_each(|piece| {
                let tx = tx.clone();
                // A closed channel means the writer stopped on an error of its own, which
                // is the one reported below.
                async move {
                    tx.send(piece)
                        .await
                        .map_err(|_| Stop::Writer(WriterStopped))
                }
            })
            .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::io("writer task", io::Error::other(e)))?;
        // The writer's own error (a full disk, say) is the cause; the sender only saw the
        // channel close behind it.
        let (digest, counts) = match (sent, written) {
            (_, Err(e)) => {
                return Err(Error::io(
                    format!("writing the staging file {}", staging.path.display()),
                    e,
                ))
            }
            (Err(Stop::Failed(e)), Ok(_)) => return Err(e),
            (Err(Stop::Writer(WriterStopped)), Ok(_)) => {
                return Err(Error::io(
                    format!("writing the staging file {}", staging.path.display()),
                    io::Error::other("the writer stopped without an error"),
                ))
            }
            (Ok(()), Ok(written)) => written,
        };
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
        // In place: Some(what to check it against), or None: not looked for there.
        let in_place = match &self.prefetched {
            // Checked when it was written; the whole-file hash covers it.
            Some(written) if !verify_local => match written.get(&offset) {
                Some(digest) if *digest == sha => Some(None),
                _ => None,
            },
            _ => Some(Some(sha)),
        };
        if let (Some(file), Some(expect)) = (staging, in_place) {
            if let Some(bytes) = read_chunk(file.clone(), offset, len, expect).await {
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

/// Why sending pieces to the writer stopped.
enum Stop {
    /// Obtaining a chunk failed (the store, a corrupt chunk).
    Failed(Error),
    Writer(WriterStopped),
}

/// The writer task is gone; its own result says why.
struct WriterStopped;

/// Where a fetch puts a snapshot: the target directory, opened; the staging file's name;
/// the envelope it commits and the final names.
struct Target {
    dir: Dir,
    staging: Staging,
    envelope: Envelope,
    data_name: String,
    meta_name: String,
}

impl Target {
    /// The envelope of the snapshot at `log_id` (checked before anything is downloaded: the
    /// node would refuse, or worse adopt, a snapshot whose raft_meta is not this snapshot's),
    /// and `dir`, created if needed and opened. The envelope's sha256 is verified by the
    /// fetch before it is committed; the node checks the file against it again.
    fn prepare(
        dir: &Path,
        (index, term): (u64, u64),
        size: u64,
        raft_meta: &serde_json::Value,
        sha256: &Digest,
    ) -> Result<Target> {
        let (data_name, meta_name) = snapdir::file_names(index, term);
        let envelope = Envelope {
            format: ENVELOPE_FORMAT,
            last_log_index: index,
            last_log_term: term,
            data: data_name.clone(),
            size,
            raft_meta: raft_meta.clone(),
            chunk_index: None,
            sha256: Some(sha256.to_hex()),
        };
        envelope
            .validate()
            .map_err(|reason| Error::InvalidManifest {
                key: format!("for snapshot {index} (term {term})"),
                reason,
            })?;
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let dir = Dir::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        lock_exclusive(&dir)?;
        let staging = Staging {
            name: format!(".{data_name}.partial"),
            path: dir.join(&format!(".{data_name}.partial")),
        };
        Ok(Target {
            dir,
            staging,
            envelope,
            data_name,
            meta_name,
        })
    }
}

/// Makes this the only fetch (or prefetch) writing into `dir` until `dir` is dropped: an
/// exclusive lock on the directory, refused at once if another holds it.
///
/// Two fetchers running as the same user (a `snaprelay pull` into the directory a sidecar
/// fetches into, or two sidecars given one node) would otherwise share a staging file,
/// since its name is the snapshot's: the second takes the first's file as its own
/// resumable one, and whichever commits first renames a file the other is still writing.
/// What the other writes then lands in a committed snapshot after its checks, or a
/// truncation empties it. The loser of the lock touches nothing in the directory.
fn lock_exclusive(dir: &Dir) -> Result<()> {
    let context = || format!("locking {} for a fetch", dir.path().display());
    match dir.try_lock_exclusive() {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::io(
            context(),
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "another fetch into this directory is running (a `snaprelay pull` or a \
                 sidecar, as this user); it was left alone: wait for it to end, or stop it",
            ),
        )),
        Err(e) => Err(Error::io(context(), e)),
    }
}

/// The hidden file a snapshot is assembled in, by its name in the target directory.
struct Staging {
    name: String,
    path: PathBuf,
}

/// The mode of every file a fetch creates: a node running as another user reads it through
/// its group; nobody else needs to. Set explicitly, not left to the umask.
pub(crate) const FILE_MODE: u32 = 0o640;

/// Opens the staging file: the one a killed attempt left, if it is this process's own
/// regular file of the right size (its verified chunks are reused), or a new one. Whatever
/// else is at its name (a symbolic link, a hard link to a file elsewhere, another user's
/// file) is removed, never written through.
fn open_staging(dir: &Dir, staging: &Staging, size: u64) -> io::Result<(File, bool)> {
    let (file, resumable) = match dir.open_own(&staging.name)? {
        Some(file) if file.metadata()?.len() == size => (file, true),
        Some(file) => {
            file.set_len(0)?;
            (file, false)
        }
        None => (dir.create_new(&staging.name, FILE_MODE)?, false),
    };
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    file.set_len(size)?;
    Ok((file, resumable))
}

/// Opens the staging file a fetch of the snapshot at (index, term), `size` bytes, into `dir`
/// will use, for a prefetch to write verified chunks into ([`crate::prefetch`]): an
/// existing one of that size is kept, anything else at its name is emptied or replaced, as
/// for a fetch. The fetch that follows verifies every chunk in it again.
///
/// The directory comes back with the file, locked as a fetch locks it: hold it for as long
/// as anything may still write the file.
pub fn open_staging_for(
    dir: &Path,
    (index, term): (u64, u64),
    size: u64,
    node: Option<NodeAccess>,
) -> Result<(File, Dir)> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let dir = Dir::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    lock_exclusive(&dir)?;
    let name = format!(".{}.partial", snapdir::file_names(index, term).0);
    let staging = Staging {
        path: dir.join(&name),
        name,
    };
    let (file, _) = open_staging(&dir, &staging, size)
        .map_err(|e| Error::io(format!("staging file {}", staging.path.display()), e))?;
    if let Some(node) = node {
        hand_over(&file, &dir, node)?;
    }
    Ok((file, dir))
}

/// Removes the staging file of the snapshot at (index, term) from `dir`, if there is one.
pub fn discard_staging(dir: &Path, (index, term): (u64, u64)) -> io::Result<()> {
    let dir = match Dir::open(dir) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match dir.remove(&format!(".{}.partial", snapdir::file_names(index, term).0)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Puts the assembled, fsynced staging file and its envelope in place so that nothing that
/// looks like a snapshot exists unless both are complete: the envelope's temp file is
/// written and fsynced first (a full disk fails here, before anything has a final name),
/// then the data file is renamed into place, then the envelope. On a failure after the
/// data file's rename, it is removed again. Returns the data and meta paths.
fn commit(
    dir: &Dir,
    staging: &Staging,
    data_name: &str,
    meta_name: &str,
    envelope: &Envelope,
    node: Option<NodeAccess>,
    index: Option<safe_dir::Pending<'_>>,
) -> Result<(PathBuf, PathBuf)> {
    let data = dir.join(data_name);
    let meta = dir.join(meta_name);
    let json = snapdir::envelope_json(envelope, &meta)?;
    let meta_err = |e| Error::io(format!("writing {}", meta.display()), e);
    let mut pending = dir.create_temp(meta_name, FILE_MODE).map_err(meta_err)?;
    let file = pending.file();
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .and_then(|()| file.write_all(&json))
        .and_then(|()| file.sync_all())
        .map_err(meta_err)?;
    if let Some(node) = node {
        hand_over(pending.file(), dir, node)?;
    }
    dir.rename(&staging.name, data_name)
        .map_err(|e| Error::io(format!("renaming {} into place", staging.path.display()), e))?;
    let index_name = envelope.chunk_index.as_deref().filter(|_| index.is_some());
    if let (Some(index), Some(name)) = (index, index_name) {
        // Synced when it was written; in place before the envelope that names it. Without
        // it the node hashes the whole file: not a reason to fail the fetch.
        if let Err(e) = index.commit() {
            tracing::warn!(index = %dir.join(name).display(), error = %e, "cannot put the chunk index in place; the node hashes the whole file");
            let _ = dir.remove(name);
        }
    }
    if let Err(e) = pending.commit() {
        // Nothing may look like a snapshot: neither an envelope nor a final-named data file.
        let _ = dir.remove(meta_name);
        let _ = dir.remove(data_name);
        if let Some(name) = index_name {
            let _ = dir.remove(name);
        }
        return Err(meta_err(e));
    }
    Ok((data, meta))
}

/// What a sidecar may have left in a node's incoming directory, by its name: the files of
/// one fetch of the snapshot at (index, term), or a temp file of a write or a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ours {
    Data(u64, u64),
    Meta(u64, u64),
    Index,
    Staging(u64, u64),
    Temp,
}

impl Ours {
    fn of(name: &str) -> Option<Ours> {
        // The names `fetch` writes: `file_names(index, term)`, the hidden staging file of
        // the data, and `Dir::create_temp`'s `.<name>.<pid>.tmp` of the meta file.
        if name.starts_with(".snaprelay-handover-probe.") && name.ends_with(".tmp") {
            return Some(Ours::Temp);
        }
        let (hidden, rest) = match name.strip_prefix('.') {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let digits = rest.strip_prefix("snapshot-")?;
        let index = digits.get(..20)?.parse().ok()?;
        let term = digits.get(21..41)?.parse().ok()?;
        let (data, meta) = snapdir::file_names(index, term);
        let chunks = snapdir::index_file_name(index, term);
        match (hidden, rest) {
            (false, r) if r == data => Some(Ours::Data(index, term)),
            (false, r) if r == meta => Some(Ours::Meta(index, term)),
            (false, r) if r == chunks => Some(Ours::Index),
            (true, r) if r.starts_with(&format!("{chunks}.")) && r.ends_with(".tmp") => {
                Some(Ours::Temp)
            }
            (true, r) if r == format!("{data}.partial") => Some(Ours::Staging(index, term)),
            (true, r) if r.starts_with(&format!("{meta}.")) && r.ends_with(".tmp") => {
                Some(Ours::Temp)
            }
            _ => None,
        }
    }
}

/// Removes what fetches left in `dir` (a node's incoming directory), except what resumes
/// one fetch: the files of the first of `resume` (log ids (index, term), the most wanted
/// first) that has any there. That is its staging file, or its whole data file of an
/// attempt the node never answered, which becomes the staging file again (every chunk in
/// it is verified again before it is used). Files this module does not name are left
/// alone. Returns how many files were removed.
///
/// It holds the directory's fetch lock while it works: if a fetch or prefetch (of this
/// process or another) holds it, nothing is removed, since what is there may be that
/// fetch's, and `Ok(0)` is returned.
pub fn clean_incoming(dir: &Path, resume: &[(u64, u64)]) -> io::Result<usize> {
    let opened = match Dir::open(dir) {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !opened.try_lock_exclusive()? {
        tracing::debug!(dir = %dir.display(), "another fetch holds the incoming directory; not cleaning it now");
        return Ok(0);
    }
    let names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let staging_of =
        |(index, term): (u64, u64)| format!(".{}.partial", snapdir::file_names(index, term).0);
    let ours: Vec<(&String, Ours)> = names
        .iter()
        .filter_map(|n| Some((n, Ours::of(n)?)))
        .collect();
    let has_files = |id: (u64, u64)| {
        ours.iter()
            .any(|(_, o)| matches!(o, Ours::Staging(i, t) | Ours::Data(i, t) if (*i, *t) == id))
    };
    let keep = resume.iter().copied().find(|&id| has_files(id));
    let has_staging = keep.is_some_and(|k| names.contains(&staging_of(k)));
    let mut removed = 0;
    for (name, what) in ours {
        let resumed = match what {
            Ours::Staging(i, t) => keep == Some((i, t)),
            Ours::Data(i, t) if keep == Some((i, t)) && !has_staging => {
                opened.rename(name, &staging_of((i, t))).is_ok()
            }
            _ => false,
        };
        if resumed {
            tracing::debug!(dir = %dir.display(), name, "kept to resume a fetch");
            continue;
        }
        match opened.remove(name) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::debug!(dir = %dir.display(), name, error = %e, "cannot remove a leftover")
            }
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed leftovers of earlier fetches from the incoming directory");
    }
    Ok(removed)
}

/// After the node answered a handover of `report`'s files: removes the envelope, and the
/// data file if the node left it there, unless `resume` (the node will take the same
/// snapshot later: it is renamed back to its staging file, which the next fetch reuses
/// without downloading).
///
/// Like [`clean_incoming`], it touches nothing while another fetch holds the directory (the
/// files at those names may be that fetch's by now); the next cleaning removes them.
pub fn release(report: &FetchReport, resume: bool) -> io::Result<()> {
    let Some(dir) = report.data.parent() else {
        return Ok(());
    };
    let opened = Dir::open(dir)?;
    if !opened.try_lock_exclusive()? {
        tracing::debug!(dir = %dir.display(), "another fetch holds the incoming directory; leaving the handed-over files to the next cleaning");
        return Ok(());
    }
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    if let Some(meta) = name(&report.meta) {
        opened.remove(&meta)?;
    }
    if let Some(index) = report.chunk_index.as_deref().and_then(name) {
        opened.remove(&index)?;
    }
    let Some(data) = name(&report.data) else {
        return Ok(());
    };
    if resume && opened.entry(&data)?.is_some() {
        return opened.rename(&data, &format!(".{data}.partial"));
    }
    opened.remove(&data)
}

/// Who a fetched file is handed over to: the node's uid and gid, those of its hook socket
/// (the node created it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAccess {
    pub uid: u32,
    pub gid: u32,
}

impl NodeAccess {
    /// The owner and group of the node's hook socket.
    pub fn of_socket(path: &Path) -> Result<NodeAccess> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).map_err(|e| {
            Error::io(
                format!("reading the owner of the hook socket {}", path.display()),
                e,
            )
        })?;
        Ok(NodeAccess {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// Whether the node can read a file with this owner, group and mode.
    fn can_read(&self, uid: u32, gid: u32, mode: u32) -> bool {
        self.uid == 0
            || (uid == self.uid && mode & 0o400 != 0)
            || (gid == self.gid && mode & 0o040 != 0)
            || mode & 0o004 != 0
    }
}

/// Whether this process may give a file it owns to group `gid`.
fn may_use_group(gid: u32) -> bool {
    rustix::process::geteuid().is_root()
        || rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// Makes `file` (created by this process in `dir`) readable by the node: gives it the
/// node's group if it has another and this process is in the node's group, then checks.
/// The error names the directory, its owner and mode, the node's ids and the fixes.
pub fn hand_over(file: &File, dir: &Dir, node: NodeAccess) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let io_err = |e| {
        Error::io(
            format!("handing a file over in {}", dir.path().display()),
            e,
        )
    };
    let meta = file.metadata().map_err(io_err)?;
    if meta.gid() != node.gid && may_use_group(node.gid) {
        rustix::fs::fchown(file, None, Some(rustix::fs::Gid::from_raw(node.gid)))
            .map_err(|e| io_err(e.into()))?;
    }
    let meta = file.metadata().map_err(io_err)?;
    if node.can_read(meta.uid(), meta.gid(), meta.mode()) {
        return Ok(());
    }
    let d = dir.stat().map_err(io_err)?;
    let (me_uid, me_gid) = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    Err(Error::Handover {
        dir: dir.path().to_owned(),
        reason: format!(
            "the node (uid {nu}, gid {ng}: the owner of its hook socket) could not read what \
             this sidecar (uid {me_uid}, gid {me_gid}) writes there: a file created in it is \
             owned by {fu}:{fg} with mode {fm:04o}, and this sidecar is not in group {ng} to \
             give it to the node. The directory is owned by {du}:{dg} with mode {dm:04o}. \
             Fix: give the directory the node's group and the setgid bit, as the node creates \
             it (chgrp {ng} {dir} && chmod 2770 {dir}), or add the node's group to the \
             sidecar (SupplementaryGroups= in its unit)",
            nu = node.uid,
            ng = node.gid,
            fu = meta.uid(),
            fg = meta.gid(),
            fm = meta.mode() & 0o7777,
            du = d.st_uid,
            dg = d.st_gid,
            dm = d.st_mode & 0o7777,
            dir = dir.path().display(),
        ),
    })
}

/// Checks, with an empty probe file, that files fetched into `dir` can be handed over to
/// `node` (for `check-config`). The probe file is removed.
pub fn probe_handover(dir: &Path, node: NodeAccess) -> Result<()> {
    let opened = Dir::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    let name = format!(".snaprelay-handover-probe.{}.tmp", std::process::id());
    let file = opened
        .create_new(&name, FILE_MODE)
        .and_then(|f| {
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map(|()| f)
        })
        .map_err(|e| Error::io(format!("creating a file in {}", dir.display()), e))?;
    let result = hand_over(&file, &opened, node);
    let _ = opened.remove(&name);
    result
}

/// Maps each chunk the manifest needs to one local place that should hold it. Files that
/// cannot be opened are skipped: reuse is an optimisation, never a requirement.
fn index_sources(sources: &[ReuseSource], manifest: &Manifest) -> HashMap<Digest, Located> {
    let wanted = manifest.unique_chunks();
    let mut found = HashMap::new();
    for source in sources {
        // The node's directories are the node's user's to write: a data file swapped for a
        // symbolic link since the scan must not make this process read another file.
        let file = match safe_dir::open_regular(&source.path, false) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_fetches_write_are_ours() {
        let (data, meta) = snapdir::file_names(12, 3);
        assert_eq!(Ours::of(&data), Some(Ours::Data(12, 3)));
        assert_eq!(Ours::of(&meta), Some(Ours::Meta(12, 3)));
        assert_eq!(
            Ours::of(&format!(".{data}.partial")),
            Some(Ours::Staging(12, 3))
        );
        assert_eq!(Ours::of(&format!(".{meta}.4242.tmp")), Some(Ours::Temp));
        let index = snapdir::index_file_name(12, 3);
        assert_eq!(Ours::of(&index), Some(Ours::Index));
        assert_eq!(Ours::of(&format!(".{index}.4242.tmp")), Some(Ours::Temp));
        assert_eq!(
            Ours::of(".snaprelay-handover-probe.77.tmp"),
            Some(Ours::Temp)
        );
        for other in [
            "node-12-3.snap",
            "snapshot-12-3.bin",
            &format!("{data}.partial"),
            &format!(".{data}"),
            &format!("{data}x"),
            ".snapshot-x",
            "",
        ] {
            assert_eq!(Ours::of(other), None, "{other}");
        }
    }

    #[test]
    fn cleaning_keeps_only_what_resumes_the_current_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (old_data, old_meta) = snapdir::file_names(5, 1);
        let (data, meta) = snapdir::file_names(9, 2);
        for name in [
            old_data.clone(),
            old_meta.clone(),
            format!(".{old_data}.partial"),
            format!(".{meta}.99.tmp"),
            data.clone(),
            meta.clone(),
            "the-nodes-own-file".into(),
        ] {
            fs::write(d.join(name), b"x").unwrap();
        }
        // The most wanted snapshot has nothing there: the next one's files are kept.
        assert_eq!(clean_incoming(d, &[(11, 2), (9, 2)]).unwrap(), 5);
        let mut left: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // The whole file the node never took is the staging file of the fetch again.
        assert_eq!(
            left,
            [format!(".{data}.partial"), "the-nodes-own-file".into()]
        );
        // Fetching something else: the staging file goes too.
        assert_eq!(clean_incoming(d, &[(11, 2)]).unwrap(), 1);
        assert_eq!(clean_incoming(&d.join("missing"), &[]).unwrap(), 0);
    }
}
