//! The fetch of a pack repository (format 2): [`crate::assemble`] writes the snapshot into
//! the same hidden staging file, and it is committed and handed over exactly as a
//! chunk-object fetch's is.
//!
//! What is reused: the chunks a prefetch of this process wrote into the staging file
//! ([`Fetcher::prefetched`]: checked when they were written, left as they are); otherwise a
//! staging file of the right size that an earlier attempt left (resumed: every chunk in it
//! is hashed against its block before it stays); and the newest local snapshot, known by
//! its manifest from the store or by cutting it. That snapshot's bytes are copied without
//! being read when a fetch of this user assembled it against the same manifest and nobody
//! else can have written it since ([`crate::verified`]: the mark every pack fetch leaves on
//! the file it commits); any other local byte is read, hashed and written from the bytes
//! hashed. Every downloaded blob is checked against its id, and every tree block against
//! its manifest, so the file is the chunks the manifest names, in its order;
//! [`Fetcher::verify_file`] also hashes the whole file, and a whole file that does not
//! match after marked bytes were copied is assembled again trusting no local byte.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{commit, hand_over, open_staging, FetchReport, Fetcher, Staging, Target};
use crate::assemble::{assemble, LocalSnapshot};
use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::manifest_v2::Manifest;
use crate::pack::plan::RangeLimits;
use crate::repo::Repo;
use crate::snapdir;
use snaprelay_contract::dir::{self as safe_dir, Dir};

/// A local snapshot file and its manifest from the store, if it has one: what a pack fetch
/// copies unchanged blocks and chunks from. Without a manifest (a snapshot the node built
/// itself), the file is cut with the repository's chunking to find its chunks.
#[derive(Debug, Clone)]
pub struct PackedSource {
    pub path: PathBuf,
    pub manifest: Option<Manifest>,
}

/// The newest of `dirs`' committed snapshots, with its manifest when the store has one for
/// its log id and size. Unreadable snapshots are skipped with a warning.
pub async fn packed_source(repo: &Repo, dirs: &[&Path]) -> Result<Option<PackedSource>> {
    let mut found: Vec<snapdir::Snapshot> = Vec::new();
    for dir in dirs {
        let scan =
            snapdir::scan(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        for rejected in &scan.rejected {
            tracing::warn!(error = %rejected, "not reusing an unreadable snapshot");
        }
        found.extend(scan.snapshots);
    }
    found.sort_by_key(|l| l.envelope.log_id());
    let Some(local) = found.last() else {
        return Ok(None);
    };
    let (index, term) = local.envelope.log_id();
    let manifest = match repo.manifest_for(index, term).await? {
        None => None,
        Some(id) => match repo.read_packed_manifest(&id).await {
            Ok(m) if m.size == local.envelope.size => Some(m),
            Ok(_) => None,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::debug!(manifest = %id, error = %e, "not using the manifest of a local snapshot, which does not read back; cutting the file instead");
                None
            }
        },
    };
    Ok(Some(PackedSource {
        path: local.data_path.clone(),
        manifest,
    }))
}

/// The chunks of `file`, cut with `params`: chunk id → first offset (blocking).
fn cut_local(file: &File, params: crate::chunk::ChunkParams) -> io::Result<HashMap<Digest, u64>> {
    let mut at = HashMap::new();
    crate::chunk::split(crate::chunk::ReadAt::new(file, 0), params, |c| {
        at.entry(Digest::of(&c.data)).or_insert(c.offset);
        Ok(())
    })?;
    Ok(at)
}

impl Fetcher<'_> {
    /// [`Fetcher::fetch`] for a format-2 manifest of a pack repository, reusing `source`.
    pub async fn fetch_packed(
        &self,
        manifest: &Manifest,
        dir: &Path,
        source: Option<&PackedSource>,
    ) -> Result<FetchReport> {
        let started = Instant::now();
        let descriptor = self.repo.packs().ok_or_else(|| Error::InvalidManifest {
            key: format!("for snapshot {}", manifest.last_log_index),
            reason: "a format-2 manifest, but the repository stores chunk objects".into(),
        })?;
        let (index, term) = (manifest.last_log_index, manifest.last_log_term);
        let Target {
            dir,
            staging,
            mut envelope,
            data_name,
            meta_name,
        } = Target::prepare(
            dir,
            (index, term),
            manifest.size,
            &manifest.raft_meta,
            &manifest.sha256,
        )?;
        let result = self
            .assemble_packed(descriptor, manifest, &dir, &staging, source)
            .await;
        let (stats, pending) = match result {
            Ok(done) => done,
            Err(e) => {
                if self.keeps_staging(&e) {
                    tracing::debug!(path = %staging.path.display(), error = %e, "keeping the staging file for the next attempt");
                } else {
                    let _ = dir.remove(&staging.name);
                }
                return Err(e);
            }
        };
        // The manifest's chunk list, beside the data: the node checks the file against it
        // chunk by chunk, and proves the chunks it shares with its last snapshot instead of
        // hashing them. Without one the node hashes the whole file: a failure (the store
        // gone between the assembly and this) only costs that. Written for a node only: a
        // `pull` target holds the snapshot as the node wrote it.
        let index_name = snapdir::index_file_name(index, term);
        let chunk_index = match self.node {
            None => None,
            Some(_) => match self
                .write_chunk_index(descriptor, manifest, &dir, &index_name)
                .await
            {
                Ok(pending) => {
                    envelope.chunk_index = Some(index_name.clone());
                    Some(pending)
                }
                Err(e) => {
                    tracing::warn!(index = %index_name, error = %e, "cannot write the chunk index; the node hashes the whole file");
                    None
                }
            },
        };
        let (data, meta) = match commit(
            &dir,
            &staging,
            &data_name,
            &meta_name,
            &envelope,
            self.node,
            chunk_index,
        ) {
            Ok(paths) => paths,
            Err(e) => {
                let _ = dir.remove(&staging.name);
                return Err(e);
            }
        };
        self.progress.finish();
        let report = FetchReport {
            index,
            term,
            size: manifest.size,
            sha256: manifest.sha256.to_hex(),
            chunks_total: manifest.chunks,
            chunks_transferred: stats.chunks_fetched,
            chunks_reused: manifest.chunks.saturating_sub(stats.chunks_fetched),
            bytes_transferred: stats.bytes_read,
            bytes_reused: manifest.size.saturating_sub(stats.bytes_fetched),
            chunk_index: envelope.chunk_index.as_ref().map(|name| dir.join(name)),
            data,
            meta,
            elapsed: started.elapsed(),
            copied_unchecked_from: pending
                .as_ref()
                .and_then(|p| p.copied_unread_from().map(Path::to_path_buf)),
            pending: pending.filter(|_| self.node.is_some()),
        };
        tracing::debug!(
            index,
            term,
            bytes = report.size,
            chunks = report.chunks_total,
            chunks_downloaded = report.chunks_transferred,
            bytes_downloaded = report.bytes_transferred,
            ranges = stats.ranges_read,
            blocks_copied = stats.blocks_copied,
            blocks_fetched = stats.blocks_fetched,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "fetched"
        );
        Ok(report)
    }

    /// Writes `manifest`'s chunk list as a chunk index (the contract's format 2) in a temp
    /// file of `dir`, synced and readable by the node; committing it is the caller's.
    async fn write_chunk_index<'d>(
        &self,
        descriptor: &crate::manifest_v2::Repository,
        manifest: &Manifest,
        dir: &'d Dir,
        name: &str,
    ) -> Result<safe_dir::Pending<'d>> {
        use snaprelay_contract::chunking::{IndexWriter, RecordSink};
        let io_err = |e| {
            Error::io(
                format!("writing the chunk index {}", dir.join(name).display()),
                e,
            )
        };
        let mut pending = dir.create_temp(name, super::FILE_MODE).map_err(io_err)?;
        let mut writer =
            IndexWriter::new(pending.file().try_clone().map_err(io_err)?).map_err(io_err)?;
        crate::assemble::chunk_list(self.repo, descriptor, manifest, |id, len| {
            writer.record(id, len)
        })
        .await?;
        let (params, size, sha256) = (self.repo.params(), manifest.size, manifest.sha256);
        let file = tokio::task::spawn_blocking(move || writer.finish(params, size, sha256))
            .await
            .map_err(|e| io_err(io::Error::other(e)))?
            .map_err(io_err)?;
        if let Some(node) = self.node {
            hand_over(&file, dir, node)?;
        }
        Ok(pending)
    }

    /// `source` opened (and cut, without a manifest); `None` if it cannot be read. Its
    /// bytes are trusted if `trust` and it carries this user's mark for its manifest.
    async fn open_source<'s>(
        &self,
        source: &'s PackedSource,
        trust: bool,
    ) -> Result<Option<LocalSnapshot<'s>>> {
        let path = source.path.clone();
        let params = self.repo.params();
        let cut = source.manifest.is_none();
        let fingerprint = source
            .manifest
            .as_ref()
            .and_then(crate::verified::fingerprint)
            .filter(|_| trust);
        let opened = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let file = safe_dir::open_regular(&path, false)?;
            let chunks = match cut {
                true => cut_local(&file, params)?,
                false => HashMap::new(),
            };
            let trusted = match fingerprint {
                Some(f) => crate::verified::check(&file, &f),
                None if cut => Err("no manifest".to_owned()),
                None => Err("not trusting marks now".to_owned()),
            };
            Ok((file, chunks, trusted))
        })
        .await
        .map_err(|e| Error::io("chunking task", io::Error::other(e)))?;
        match opened {
            Ok((file, cut, trusted)) => {
                match &trusted {
                    Ok(()) => {
                        tracing::debug!(path = %source.path.display(), "copying a marked local snapshot's bytes unchecked")
                    }
                    Err(why) => {
                        tracing::debug!(path = %source.path.display(), why = %why, "checking every byte taken from a local snapshot")
                    }
                }
                Ok(Some(LocalSnapshot {
                    file: Arc::new(file),
                    manifest: source.manifest.as_ref(),
                    cut,
                    trusted: trusted.is_ok(),
                }))
            }
            Err(e) => {
                tracing::warn!(path = %source.path.display(), error = %e, "cannot read a local snapshot for reuse");
                Ok(None)
            }
        }
    }

    /// Assembles and syncs the staging file, and marks it when every byte in it was
    /// checked (or the whole file was); returns, with what it did, what is left to mark or
    /// doubt once the node checked the file (always, with a node: the mark waits for its
    /// check).
    async fn assemble_packed(
        &self,
        descriptor: &crate::manifest_v2::Repository,
        manifest: &Manifest,
        dir: &Dir,
        staging: &Staging,
        source: Option<&PackedSource>,
    ) -> Result<(
        crate::assemble::AssembleStats,
        Option<crate::verified::Pending>,
    )> {
        let staging_err = |e| Error::io(format!("staging file {}", staging.path.display()), e);
        let fingerprint = crate::verified::fingerprint(manifest);
        let mut trust = self.trust_marked;
        loop {
            let (file, resumable) =
                open_staging(dir, staging, manifest.size).map_err(staging_err)?;
            if let Some(node) = self.node {
                // A cheap probe on the empty file, before a byte is downloaded.
                hand_over(&file, dir, node)?;
            }
            let file = Arc::new(file);
            // A staging file a prefetch of this process wrote: what it wrote stays as it is,
            // and the rest comes from the local snapshot and the store. One an earlier
            // attempt left: its own (untrusted) local snapshot, every chunk hashed before it
            // stays.
            let in_place = self.prefetched.as_ref().filter(|_| resumable);
            let local = match (resumable && in_place.is_none(), source) {
                (true, _) => Some(LocalSnapshot::of_manifest(file.clone(), manifest, false)),
                (false, Some(source)) => self.open_source(source, trust).await?,
                (false, None) => None,
            };
            // The marked file whose bytes may be copied unread.
            let marked = match (&local, source) {
                (Some(l), Some(s)) if l.trusted => Some((s.path.clone(), l.file.clone())),
                _ => None,
            };
            self.progress.begin(manifest.size);
            let name = staging.path.display().to_string();
            let assembled = assemble(
                self.repo,
                descriptor,
                manifest,
                file.clone(),
                &name,
                local,
                in_place,
                RangeLimits::with_concurrency(self.concurrency),
            )
            .await;
            let stats = match (assembled, &marked) {
                (Ok(stats), _) => stats,
                (Err(e @ Error::Io { .. }), Some((path, source))) => {
                    // Copying marked bytes failed (a bad sector under the mark, a file
                    // system that will not copy): once more, every local byte read and
                    // checked, which fetches what cannot be read.
                    tracing::warn!(path = %path.display(), error = %e, "copying a marked local snapshot failed; assembling again, checking every local byte");
                    crate::verified::forget_or_log(source, path);
                    let _ = dir.remove(&staging.name);
                    trust = false;
                    continue;
                }
                (Err(e), _) => return Err(e),
            };
            let copied_unread = marked.filter(|_| stats.blocks_copied + stats.chunks_copied > 0);
            let verify = self.verify_file;
            let expected = manifest.sha256;
            let checked = file.clone();
            let synced = tokio::task::spawn_blocking(move || -> io::Result<Option<Digest>> {
                let actual = match verify {
                    true => Some(crate::chunk::sha256_of(&checked)?).filter(|d| *d != expected),
                    false => None,
                };
                checked.sync_all()?;
                Ok(actual)
            })
            .await
            .map_err(|e| Error::io("syncing task", io::Error::other(e)))?
            .map_err(staging_err)?;
            let Some(actual) = synced else {
                let Some(fingerprint) = fingerprint else {
                    return Ok((stats, None));
                };
                // Synced first: a mark is only ever on durable bytes. Bytes copied unread
                // are as good as their source's mark: the file is marked only once its
                // whole sha256 matched here, or the node checked it (whole, or chunk by
                // chunk against the manifest's chunk list).
                if self.node.is_none() && (verify || copied_unread.is_none()) {
                    crate::verified::mark_or_log(&file, &fingerprint, &staging.path);
                }
                let pending = crate::verified::Pending {
                    file,
                    shown: staging.path.clone(),
                    fingerprint,
                    source: copied_unread,
                };
                return Ok((stats, Some(pending)));
            };
            if let Some((path, source)) = copied_unread {
                // Marked bytes that were not what their mark said (bit rot): the source
                // loses its mark, and the file is assembled again from checked bytes only.
                tracing::warn!(path = %path.display(), "a marked local snapshot did not hold what its mark said; assembling again, checking every local byte");
                crate::verified::forget_or_log(&source, &path);
                let _ = dir.remove(&staging.name);
                trust = false;
                continue;
            }
            return Err(Error::FileCorrupt {
                index: manifest.last_log_index,
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            });
        }
    }
}
