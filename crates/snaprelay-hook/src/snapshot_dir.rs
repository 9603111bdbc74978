//! [`SnapshotDir`]: the node's side of the snapshot directory contract (the README's "Snapshot directory contract").
//!
//! The node is the only writer of its snapshot directory; the sidecar writes only into the
//! incoming directory (default `<dir>/.incoming`, same filesystem, so adoption is a rename).
//! Every snapshot is committed the same way, whether built locally, received through
//! replication or adopted from the leader: the data file is complete and fsynced under its
//! final name first, then the envelope is written (temp file, fsync, rename): the envelope is
//! the commit marker. A crash leaves at worst a data file without an envelope, or a hidden
//! temp or staging file, which nobody reads and [`SnapshotDir::remove_leftovers`] removes.
//!
//! All functions do blocking file I/O; call them from `spawn_blocking` when they may take
//! long (writing a large snapshot).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use snaprelay_contract::chunking::{ChunkParams, IndexingWriter};
use snaprelay_contract::ipc::LogIdRef;
use snaprelay_contract::snapdir::{
    self, commit_envelope, Envelope, SnapdirError, Snapshot, ENVELOPE_FORMAT,
};

use crate::adopt::Incoming;
use crate::verify::sha256_of;

/// Prefix of the file a staged (not yet adopted) snapshot waits under.
const STAGED_PREFIX: &str = ".staged-";
/// Name of the default incoming directory, inside the snapshot directory.
pub const INCOMING_DIR: &str = ".incoming";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotDirError {
    #[error(transparent)]
    Contract(#[from] SnapdirError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot meta for {log_id} cannot be serialized: {reason}")]
    Meta { log_id: LogIdRef, reason: String },
    #[error("{path} was replaced after the node verified it; the staged file was removed")]
    Replaced { path: PathBuf },
}

impl From<SnapshotDirError> for io::Error {
    fn from(e: SnapshotDirError) -> io::Error {
        match e {
            SnapshotDirError::Io { ref source, .. } => io::Error::new(source.kind(), e),
            e => io::Error::other(e),
        }
    }
}

type Result<T> = std::result::Result<T, SnapshotDirError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotDirError {
    let path = path.to_owned();
    move |source| SnapshotDirError::Io {
        action,
        path,
        source,
    }
}

/// A node's snapshot directory and its incoming directory.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    incoming: PathBuf,
    /// Chunking of the index written beside each locally built snapshot; `None` writes none.
    index: Option<ChunkParams>,
}

/// Distinguishes temp files of concurrent writers in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl SnapshotDir {
    /// Opens `dir`, with the incoming directory `dir/.incoming`, creating both if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<SnapshotDir> {
        let dir = dir.into();
        let incoming = dir.join(INCOMING_DIR);
        SnapshotDir::with_incoming(dir, incoming)
    }

    /// Opens `dir` with an incoming directory elsewhere (it must be on the same filesystem),
    /// creating both if needed. Both paths are made canonical.
    pub fn with_incoming(
        dir: impl Into<PathBuf>,
        incoming: impl Into<PathBuf>,
    ) -> Result<SnapshotDir> {
        let (dir, incoming) = (dir.into(), incoming.into());
        fs::create_dir_all(&dir).map_err(io_err("creating snapshot directory", &dir))?;
        // Private until the hook server sets the mode its deployment needs
        // (`prepare_incoming_dir`); an existing one is left as it is.
        match fs::DirBuilder::new().mode(0o700).create(&incoming) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("creating incoming directory", &incoming)(e))
            }
            _ => {}
        }
        Ok(SnapshotDir {
            dir: dir.canonicalize().map_err(io_err("resolving", &dir))?,
            incoming: incoming
                .canonicalize()
                .map_err(io_err("resolving", &incoming))?,
            index: Some(ChunkParams::PACKED),
        })
    }

    /// Sets the chunking of the chunk index written beside every snapshot built with
    /// [`SnapshotDir::write`] (default: [`ChunkParams::PACKED`], the chunking of a
    /// repository of packs, snaprelay's default), or turns the index off with `None`.
    ///
    /// The index is cut and hashed from the bytes as they are written, so the sidecar can
    /// publish a snapshot by reading only the chunks the store lacks. It must use the
    /// repository's chunking (`[chunking]` in the sidecar's config) to be used; with other
    /// parameters the sidecar ignores it and cuts the file itself.
    pub fn with_chunk_index(mut self, params: Option<ChunkParams>) -> Result<SnapshotDir> {
        if let Some(p) = params {
            p.validate().map_err(|reason| SnapshotDirError::Io {
                action: "configuring the chunk index of",
                path: self.dir.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, reason),
            })?;
        }
        self.index = params;
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn incoming_dir(&self) -> &Path {
        &self.incoming
    }

    /// Writes a complete file under a hidden temp name in the snapshot directory and fsyncs
    /// it; returns its path. Use it to receive a snapshot from the leader (replication)
    /// before [`SnapshotDir::commit_file`].
    pub fn write_temp(
        &self,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<PathBuf> {
        Ok(self.write_temp_indexed(None, write)?.0)
    }

    /// [`SnapshotDir::write_temp`], indexing the bytes on the way when `index` is set (into
    /// a temp index file beside the data, streamed: the index never sits in memory), and
    /// hashing them either way: returns the data's path, the index's path and the sha256.
    fn write_temp_indexed(
        &self,
        index: Option<ChunkParams>,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(PathBuf, Option<PathBuf>, String)> {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!(".snaprelay-{}-{seq}.tmp", std::process::id()));
        let index_path = index.map(|_| {
            self.dir.join(format!(
                ".snaprelay-{}-{seq}.chunks.tmp",
                std::process::id()
            ))
        });
        let result = (|| {
            let file = File::create(&path)?;
            let (file, sha256) = match (index, &index_path) {
                (Some(params), Some(index_path)) => {
                    let index_file = File::create(index_path)?;
                    let mut out = BufWriter::new(IndexingWriter::new(file, params, index_file)?);
                    write(&mut out)?;
                    let (file, _, header) =
                        out.into_inner().map_err(|e| e.into_error())?.finish()?;
                    (file, header.sha256.to_string())
                }
                _ => {
                    let mut out = BufWriter::new(HashingWriter::new(file));
                    write(&mut out)?;
                    out.into_inner().map_err(|e| e.into_error())?.finish()
                }
            };
            file.sync_all()?;
            Ok(sha256)
        })();
        match result {
            Ok(sha256) => Ok((path, index_path, sha256)),
            Err(e) => {
                let _ = fs::remove_file(&path);
                if let Some(index_path) = &index_path {
                    let _ = fs::remove_file(index_path);
                }
                Err(io_err("writing snapshot data", &path)(e))
            }
        }
    }

    /// Writes the snapshot at `log_id`: data through `write`, then its chunk index (unless
    /// turned off, see [`SnapshotDir::with_chunk_index`]), then the envelope carrying
    /// `raft_meta` (the application's openraft `SnapshotMeta`). If a snapshot at `log_id`
    /// is already committed, it is kept and returned: two snapshots at one log id hold the
    /// same state.
    pub fn write(
        &self,
        log_id: LogIdRef,
        raft_meta: &impl Serialize,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<Snapshot> {
        let raft_meta = serde_json::to_value(raft_meta).map_err(|e| SnapshotDirError::Meta {
            log_id,
            reason: e.to_string(),
        })?;
        if let Some(existing) = self.committed(log_id)? {
            return Ok(existing);
        }
        let (temp, index, sha256) = self.write_temp_indexed(self.index, write)?;
        self.commit(&temp, log_id, raft_meta, index, Some(sha256))
    }

    /// Commits a complete, fsynced file of this filesystem (a staged or received snapshot) as
    /// the snapshot at `log_id`: renames it to the data name, then writes the envelope with
    /// `raft_meta` verbatim and the file's `sha256` (computed from the file when not given),
    /// which startup checks. If a snapshot at `log_id` is already committed, it is returned
    /// and `file` removed (unless `file` is that snapshot's own data file).
    pub fn commit_file(
        &self,
        file: &Path,
        log_id: LogIdRef,
        raft_meta: serde_json::Value,
        sha256: Option<&str>,
    ) -> Result<Snapshot> {
        self.commit(file, log_id, raft_meta, None, sha256.map(str::to_owned))
    }

    /// Commits data, then the index (if any), then the envelope: the envelope names the
    /// index only once both files are durable.
    fn commit(
        &self,
        file: &Path,
        log_id: LogIdRef,
        raft_meta: serde_json::Value,
        index: Option<PathBuf>,
        sha256: Option<String>,
    ) -> Result<Snapshot> {
        if let Some(existing) = self.committed(log_id)? {
            if !same_file(file, &existing.data_path) {
                self.discard(file)?;
            }
            if let Some(index) = &index {
                self.discard(index)?;
            }
            return Ok(existing);
        }
        let sha256 = match sha256 {
            Some(sha256) => sha256,
            None => {
                let mut data = File::open(file).map_err(io_err("reading snapshot data", file))?;
                sha256_of(&mut data)
                    .map_err(io_err("reading snapshot data", file))?
                    .0
            }
        };
        let (data_name, meta_name) = snapdir::file_names(log_id.index, log_id.term);
        let data_path = self.dir.join(&data_name);
        rename_durable(file, &data_path)
            .map_err(io_err("moving snapshot data into place", file))?;
        let size = fs::metadata(&data_path)
            .map_err(io_err("reading snapshot data", &data_path))?
            .len();
        let chunk_index = match index {
            Some(index) => {
                // Written and fsynced by the indexer; the envelope names it only once it is
                // in place.
                let name = snapdir::index_file_name(log_id.index, log_id.term);
                rename_durable(&index, &self.dir.join(&name))
                    .map_err(io_err("moving the chunk index into place", &index))?;
                Some(name)
            }
            None => None,
        };
        let envelope = Envelope {
            format: ENVELOPE_FORMAT,
            last_log_index: log_id.index,
            last_log_term: log_id.term,
            data: data_name,
            size,
            raft_meta,
            chunk_index,
            sha256: Some(sha256),
        };
        let meta_path = commit_envelope(&self.dir, &meta_name, &envelope)?;
        Ok(Snapshot {
            meta_path,
            data_path,
            envelope,
        })
    }

    /// The committed snapshot at `log_id`, if there is one.
    pub fn committed(&self, log_id: LogIdRef) -> Result<Option<Snapshot>> {
        let (_, meta_name) = snapdir::file_names(log_id.index, log_id.term);
        let meta_path = self.dir.join(meta_name);
        if !meta_path.exists() {
            return Ok(None);
        }
        Ok(Some(Snapshot::open(&meta_path)?))
    }

    /// Moves an incoming file to this directory's staging name for its log id; returns the
    /// staged path. A staged file is hidden: nobody reads it until it is committed.
    ///
    /// The staged name must then be the inode the hook opened and verified
    /// ([`Incoming::file`]); if the sidecar swapped another file in at the incoming name
    /// meanwhile, the staged file is removed and [`SnapshotDirError::Replaced`] returned.
    pub fn stage(&self, incoming: &Incoming) -> Result<PathBuf> {
        let log_id = incoming.log_id();
        let staged = self.dir.join(format!(
            "{STAGED_PREFIX}{:020}-{:020}.bin",
            log_id.index, log_id.term
        ));
        rename_durable(&incoming.path, &staged).map_err(io_err("staging", &incoming.path))?;
        if !incoming.file.is_at(&staged) {
            self.discard(&staged)?;
            return Err(SnapshotDirError::Replaced {
                path: incoming.path.clone(),
            });
        }
        Ok(staged)
    }

    /// Removes a staged or temp file that will not be committed. A missing file is fine.
    pub fn discard(&self, path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
            _ => Ok(()),
        }
    }

    /// All committed snapshots, oldest first. Meta files that cannot be used are skipped
    /// with a warning.
    pub fn list(&self) -> Result<Vec<Snapshot>> {
        let scan = snapdir::scan(&self.dir).map_err(io_err("listing", &self.dir))?;
        for rejected in &scan.rejected {
            tracing::warn!(error = %rejected, "ignoring unusable snapshot meta file");
        }
        Ok(scan.snapshots)
    }

    /// The newest committed snapshot (unchecked; see [`SnapshotDir::newest_valid`]).
    pub fn newest(&self) -> Result<Option<Snapshot>> {
        Ok(self.list()?.pop())
    }

    /// The newest committed snapshot that passes the startup checks, and what `check` made
    /// of it: what a node loads when it starts. Checks, in order: the data file's sha256 is
    /// the envelope's (when the envelope records one), then `check` (the label against
    /// `raft_meta`, the application's decode), which reads the data file from its start.
    ///
    /// A snapshot that fails is moved aside into [`REJECTED_DIR`] with an ERROR log naming
    /// it and the reason, and the next older one is tried; none left is `Ok(None)` (the node
    /// starts empty and catches up from the leader). So no file in the directory can stop
    /// the node from starting; only an I/O error moving a bad snapshot aside is an error.
    pub fn newest_valid<T>(
        &self,
        mut check: impl FnMut(&Snapshot, &mut dyn Read) -> std::result::Result<T, String>,
    ) -> Result<Option<(Snapshot, T)>> {
        let mut snapshots = self.list()?;
        while let Some(snapshot) = snapshots.pop() {
            match startup_check(&snapshot, &mut check) {
                Ok(value) => return Ok(Some((snapshot, value))),
                Err(reason) => {
                    let moved = self.reject(&snapshot)?;
                    tracing::error!(
                        snapshot = %snapshot.meta_path.display(),
                        %reason,
                        moved_to = %moved.display(),
                        "the newest snapshot is unusable: moved it aside, trying the previous one"
                    );
                }
            }
        }
        Ok(None)
    }

    /// Moves a committed snapshot (envelope first, then data and index) into
    /// [`REJECTED_DIR`], where nobody reads it; returns that directory.
    pub fn reject(&self, snapshot: &Snapshot) -> Result<PathBuf> {
        let rejected = self.dir.join(REJECTED_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&rejected) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("creating", &rejected)(e))
            }
            _ => {}
        }
        let mut files = vec![snapshot.meta_path.clone(), snapshot.data_path.clone()];
        files.extend(snapshot.chunk_index_path());
        for file in files {
            let Some(name) = file.file_name() else {
                continue;
            };
            match fs::rename(&file, rejected.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("moving aside", &file)(e))
                }
                _ => {}
            }
        }
        snapdir::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir))?;
        Ok(rejected)
    }

    /// Removes all but the newest `keep` committed snapshots (at least one is always kept);
    /// returns the removed ones. The envelope goes first, so a crash between the two removals
    /// leaves an orphan data file, never an envelope without data.
    pub fn prune(&self, keep: usize) -> Result<Vec<Snapshot>> {
        let mut snapshots = self.list()?;
        let keep = keep.max(1);
        if snapshots.len() <= keep {
            return Ok(Vec::new());
        }
        let removed: Vec<Snapshot> = snapshots.drain(..snapshots.len() - keep).collect();
        for snapshot in &removed {
            self.discard(&snapshot.meta_path)?;
            self.discard(&snapshot.data_path)?;
            if let Some(index) = snapshot.chunk_index_path() {
                self.discard(&index)?;
            }
        }
        Ok(removed)
    }

    /// Removes what an interrupted run left behind: staged files (the sidecar sends the
    /// snapshot again) and temp files. Call it at startup, before anything is written.
    pub fn remove_leftovers(&self) -> Result<usize> {
        let entries = fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let leftover = name.starts_with(STAGED_PREFIX) || name.ends_with(".tmp");
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if leftover && is_file {
                self.discard(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> HashingWriter<W> {
        use sha2::Digest;
        HashingWriter {
            inner,
            hasher: sha2::Sha256::new(),
        }
    }

    fn finish(self) -> (W, String) {
        use sha2::Digest;
        let digest = self.hasher.finalize();
        (
            self.inner,
            digest.iter().map(|b| format!("{b:02x}")).collect(),
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Mode of the incoming directory in group mode: the sidecar, a member of the node's group,
/// writes there, and setgid makes every file it writes belong to the node's group, so the
/// node can read it (the sidecar's umask 0027 leaves it group-readable).
pub const INCOMING_MODE_GROUP: u32 = 0o2770;
/// Mode of the incoming directory otherwise: the sidecar runs as the node's user.
pub const INCOMING_MODE_PRIVATE: u32 = 0o700;

/// Creates the incoming directory with the mode the deployment needs
/// ([`INCOMING_MODE_GROUP`] with `group_access`, else [`INCOMING_MODE_PRIVATE`]), or corrects
/// the mode of an existing one this process owns. One owned by another user (an operator's
/// choice) is left alone. A symlink or non-directory at the path is an error.
pub fn prepare_incoming_dir(path: &Path, group_access: bool) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let mode = if group_access {
        INCOMING_MODE_GROUP
    } else {
        INCOMING_MODE_PRIVATE
    };
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "incoming directory {} is not a directory",
            path.display()
        )));
    }
    let own_uid = nix::unistd::geteuid().as_raw();
    let found = meta.mode() & 0o7777;
    if meta.uid() == own_uid && found != mode {
        // Explicitly: mkdir's mode is cut by the umask, and setgid needs chmod.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        tracing::info!(dir = %path.display(), from = format!("{found:o}"), to = format!("{mode:o}"), "set the incoming directory's mode");
    } else if meta.uid() != own_uid {
        tracing::info!(dir = %path.display(), mode = format!("{found:o}"), owner = meta.uid(), "incoming directory belongs to another user; leaving its mode");
    }
    Ok(())
}

/// Name of the directory, inside the snapshot directory, that snapshots found unusable at
/// startup are moved into (hidden, so neither the node nor the sidecar reads it; the
/// operator may inspect and delete it).
pub const REJECTED_DIR: &str = ".rejected";

fn startup_check<T>(
    snapshot: &Snapshot,
    check: &mut impl FnMut(&Snapshot, &mut dyn Read) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    let open =
        || File::open(&snapshot.data_path).map_err(|e| format!("opening the data file: {e}"));
    if let Some(expected) = &snapshot.envelope.sha256 {
        let (actual, _) =
            sha256_of(&mut open()?).map_err(|e| format!("reading the data file: {e}"))?;
        if actual != *expected {
            return Err(format!(
                "its data file has sha256 {actual}, but its envelope says {expected}"
            ));
        }
    }
    check(snapshot, &mut io::BufReader::new(open()?))
}

/// Whether two paths name the same file (both must exist to be the same).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Renames `from` to `to` (same filesystem) and fsyncs the target directory, so that the
/// rename survives a power loss.
fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    snapdir::sync_dir(to.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use snaprelay_contract::chunking::IndexFile;

    fn id(index: u64) -> LogIdRef {
        LogIdRef { term: 2, index }
    }

    fn meta(index: u64) -> serde_json::Value {
        serde_json::json!({"last_log_id": {"leader_id": {"term": 2, "node_id": 1}, "index": index}})
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn written_snapshot_is_committed_in_the_contract_layout() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path().join("snapshots")).unwrap();
        assert!(dir.incoming_dir().is_dir());
        let snapshot = dir
            .write(id(7), &meta(7), |w| w.write_all(b"state at 7"))
            .unwrap();
        assert_eq!(fs::read(&snapshot.data_path).unwrap(), b"state at 7");
        assert_eq!(snapshot.envelope.size, 10);
        assert_eq!(snapshot.envelope.raft_meta, meta(7));
        assert_eq!(snapshot.envelope.log_id(), (7, 2));
        // The daemon's reader sees exactly this snapshot, and no temp file is left.
        let scan = snapdir::scan(dir.path()).unwrap();
        assert_eq!(scan.snapshots, vec![snapshot.clone()]);
        assert!(scan.rejected.is_empty());
        let (data, meta_name) = snapdir::file_names(7, 2);
        let index_name = snapdir::index_file_name(7, 2);
        assert_eq!(
            names(dir.path()),
            vec![".incoming".to_string(), data, index_name.clone(), meta_name]
        );
        // The chunk index describes exactly the bytes written.
        assert_eq!(snapshot.envelope.chunk_index, Some(index_name));
        let index = IndexFile::open(&snapshot.chunk_index_path().unwrap(), 10)
            .unwrap()
            .read_all()
            .unwrap();
        let mut expected = snaprelay_contract::chunking::Indexer::new(ChunkParams::PACKED);
        expected.update(b"state at 7");
        assert_eq!(index, expected.finish());
        assert_eq!(dir.newest().unwrap(), Some(snapshot));
    }

    #[test]
    fn the_chunk_index_can_be_turned_off_or_recut() {
        let root = tempfile::tempdir().unwrap();
        let off = SnapshotDir::open(root.path().join("off"))
            .unwrap()
            .with_chunk_index(None)
            .unwrap();
        let snapshot = off.write(id(7), &meta(7), |w| w.write_all(b"x")).unwrap();
        assert_eq!(snapshot.envelope.chunk_index, None);
        assert_eq!(names(off.path()).len(), 3, ".incoming, data, meta");

        // Not the default (PACKED): the index follows the chunking it is given.
        let small = ChunkParams::new(4096, 8192, 32768).unwrap();
        let recut = SnapshotDir::open(root.path().join("recut"))
            .unwrap()
            .with_chunk_index(Some(small))
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let snapshot = recut
            .write(id(7), &meta(7), |w| w.write_all(&data))
            .unwrap();
        let index = IndexFile::open(&snapshot.chunk_index_path().unwrap(), 300_000)
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(index.chunking, small);
        assert!(index.chunks.len() > 4, "{}", index.chunks.len());

        let bad = ChunkParams {
            min_size: 1,
            ..small
        };
        let err = SnapshotDir::open(root.path().join("bad"))
            .unwrap()
            .with_chunk_index(Some(bad))
            .unwrap_err();
        assert!(err.to_string().contains("min_size"), "{err}");
    }

    #[test]
    fn writing_an_existing_log_id_keeps_the_committed_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let first = dir.write(id(7), &meta(7), |w| w.write_all(b"one")).unwrap();
        let called = std::cell::Cell::new(false);
        let again = dir
            .write(id(7), &meta(7), |w| {
                called.set(true);
                w.write_all(b"other")
            })
            .unwrap();
        assert_eq!(again, first);
        assert!(!called.get(), "the data is not written twice");
        assert_eq!(fs::read(&first.data_path).unwrap(), b"one");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let err = dir
            .write(id(7), &meta(7), |w| {
                w.write_all(b"half")?;
                Err(io::Error::other("disk on fire"))
            })
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(names(dir.path()), vec![".incoming".to_string()]);
        assert_eq!(dir.newest().unwrap(), None);
    }

    #[test]
    fn incoming_file_is_staged_then_committed_with_the_leaders_meta() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let path = dir.incoming_dir().join("from-leader.bin");
        fs::write(&path, b"leader bytes").unwrap();
        let envelope = Envelope {
            format: 1,
            last_log_index: 9,
            last_log_term: 2,
            data: "whatever.bin".into(),
            size: 12,
            raft_meta: meta(9),
            chunk_index: None,
            sha256: None,
        };
        let incoming = Incoming::open(
            envelope,
            path.to_str().unwrap(),
            dir.incoming_dir(),
            "00".repeat(32),
        )
        .unwrap();
        let staged = dir.stage(&incoming).unwrap();
        assert!(!path.exists());
        assert!(staged
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".staged-"));
        assert_eq!(
            dir.newest().unwrap(),
            None,
            "a staged file is not a snapshot"
        );
        let snapshot = dir
            .commit_file(
                &staged,
                incoming.log_id(),
                incoming.envelope.raft_meta.clone(),
                Some(&incoming.sha256),
            )
            .unwrap();
        assert!(!staged.exists());
        assert_eq!(fs::read(&snapshot.data_path).unwrap(), b"leader bytes");
        assert_eq!(snapshot.envelope.raft_meta, meta(9));
        assert_eq!(snapshot.envelope.data, snapdir::file_names(9, 2).0);
        assert_eq!(dir.newest().unwrap(), Some(snapshot));
    }

    #[test]
    fn committing_the_current_data_file_again_keeps_it() {
        // openraft may hand the current snapshot back (restore at startup): committing a
        // snapshot's own data file again must not delete it.
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let first = dir.write(id(7), &meta(7), |w| w.write_all(b"one")).unwrap();
        let again = dir
            .commit_file(&first.data_path, id(7), meta(7), None)
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(fs::read(&first.data_path).unwrap(), b"one");
        // A different file for an already committed log id is dropped.
        let received = dir.write_temp(|w| w.write_all(b"one")).unwrap();
        assert_eq!(
            dir.commit_file(&received, id(7), meta(7), None).unwrap(),
            first
        );
        assert!(!received.exists());
    }

    #[test]
    fn prune_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        for index in [30, 10, 20] {
            dir.write(id(index), &meta(index), |w| w.write_all(b"x"))
                .unwrap();
        }
        let removed = dir.prune(2).unwrap();
        let removed: Vec<u64> = removed.iter().map(|s| s.envelope.last_log_index).collect();
        assert_eq!(removed, vec![10]);
        let left: Vec<u64> = dir
            .list()
            .unwrap()
            .iter()
            .map(|s| s.envelope.last_log_index)
            .collect();
        assert_eq!(left, vec![20, 30]);
        assert_eq!(dir.prune(0).unwrap().len(), 1, "keep 0 still keeps one");
        assert_eq!(dir.newest().unwrap().unwrap().envelope.last_log_index, 30);
        assert_eq!(
            names(dir.path()).len(),
            4,
            ".incoming, one data, its index, one meta"
        );
    }

    #[test]
    fn incoming_dir_gets_the_deployments_mode() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path().join("s")).unwrap();
        assert_eq!(
            mode(dir.incoming_dir()),
            0o700,
            "private until the hook says more"
        );
        prepare_incoming_dir(dir.incoming_dir(), true).unwrap();
        assert_eq!(mode(dir.incoming_dir()), 0o2770);
        prepare_incoming_dir(dir.incoming_dir(), false).unwrap();
        assert_eq!(mode(dir.incoming_dir()), 0o700);
        // Created with the mode, whatever the umask.
        let fresh = root.path().join("fresh");
        prepare_incoming_dir(&fresh, true).unwrap();
        assert_eq!(mode(&fresh), 0o2770);
        // Not a directory (a symlink to one counts as not one).
        std::os::unix::fs::symlink(&fresh, root.path().join("link")).unwrap();
        let err = prepare_incoming_dir(&root.path().join("link"), true).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn written_and_committed_snapshots_record_their_sha256() {
        let root = tempfile::tempdir().unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        for index in [None, Some(ChunkParams::default())] {
            let dir = SnapshotDir::open(root.path().join(format!("{}", index.is_some())))
                .unwrap()
                .with_chunk_index(index)
                .unwrap();
            let written = dir.write(id(3), &meta(3), |w| w.write_all(b"abc")).unwrap();
            assert_eq!(written.envelope.sha256.as_deref(), Some(abc));
            let temp = dir.write_temp(|w| w.write_all(b"abc")).unwrap();
            let committed = dir.commit_file(&temp, id(4), meta(4), None).unwrap();
            assert_eq!(committed.envelope.sha256.as_deref(), Some(abc));
        }
    }

    #[test]
    fn bad_newest_snapshots_are_moved_aside_at_startup() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let good = dir
            .write(id(5), &meta(5), |w| w.write_all(b"five"))
            .unwrap();
        let corrupt = dir
            .write(id(6), &meta(6), |w| w.write_all(b"six!"))
            .unwrap();
        let refused = dir
            .write(id(7), &meta(7), |w| w.write_all(b"7777"))
            .unwrap();
        // Same size, other bytes: only the recorded sha256 can tell.
        fs::write(&corrupt.data_path, b"SIX!").unwrap();
        let mut checked = Vec::new();
        let loaded = dir
            .newest_valid(|snapshot, data| {
                let mut bytes = Vec::new();
                data.read_to_end(&mut bytes).unwrap();
                checked.push(snapshot.envelope.last_log_index);
                if bytes == b"7777" {
                    return Err("the application says no".into());
                }
                Ok(bytes)
            })
            .unwrap()
            .unwrap();
        assert_eq!(loaded, (good.clone(), b"five".to_vec()));
        assert_eq!(
            checked,
            vec![7, 5],
            "the corrupt one never reached the application"
        );
        assert_eq!(
            dir.list().unwrap(),
            vec![good],
            "the bad ones are gone from the directory"
        );
        let mut aside = names(&dir.path().join(REJECTED_DIR));
        aside.sort();
        let mut expected: Vec<String> = [&corrupt, &refused]
            .iter()
            .flat_map(|s| {
                let mut v = vec![
                    s.meta_path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    s.data_path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                ];
                v.extend(
                    s.chunk_index_path()
                        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned()),
                );
                v
            })
            .collect();
        expected.sort();
        assert_eq!(aside, expected);
        // Nothing usable at all: no snapshot, no error.
        let dir2 = SnapshotDir::open(root.path().join("other")).unwrap();
        dir2.write(id(1), &meta(1), |w| w.write_all(b"x")).unwrap();
        assert_eq!(
            dir2.newest_valid(|_, _| Err::<(), _>("no".into())).unwrap(),
            None
        );
    }

    #[test]
    fn leftovers_are_removed_and_snapshots_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(root.path()).unwrap();
        let kept = dir.write(id(5), &meta(5), |w| w.write_all(b"x")).unwrap();
        fs::write(
            dir.path()
                .join(".staged-00000000000000000009-00000000000000000002.bin"),
            b"s",
        )
        .unwrap();
        fs::write(dir.path().join(".snaprelay-1-1.tmp"), b"t").unwrap();
        fs::write(dir.incoming_dir().join("sidecar.partial"), b"p").unwrap();
        assert_eq!(dir.remove_leftovers().unwrap(), 2);
        assert_eq!(dir.list().unwrap(), vec![kept]);
        assert!(
            dir.incoming_dir().join("sidecar.partial").exists(),
            "the incoming directory is the sidecar's"
        );
    }
}
