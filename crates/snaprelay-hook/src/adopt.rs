//! What the application's state machine implements to receive the leader's snapshot
//! ([`AdoptSnapshot`]), and what it receives ([`Incoming`]).
//!
//! The state machine only *stages* the file (moves it to a staging name of its own); nothing is
//! installed and its state is untouched. The staged snapshot becomes current later, in
//! `try_create_snapshot_builder`, once the node has applied up to its index (see
//! [`crate::decision`]). The hook has already checked, before the state machine sees the
//! request, that the file is directly inside the incoming directory ([`resolve_incoming`]),
//! and has opened it as the node: a regular file of the envelope's size
//! ([`crate::verify::open_incoming`]).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use snaprelay_contract::ipc::{ErrorCode, LogIdRef};
use snaprelay_contract::snapdir::{self, Envelope};

use crate::chunks::IncomingIndex;
use crate::verify::{name_in, open_in, open_incoming, IncomingFile, Refusal};

/// A verified snapshot the sidecar hands to the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The leader's envelope; `raft_meta` is the leader's `SnapshotMeta`, verbatim.
    pub envelope: Envelope,
    /// Canonical path of the data file, directly inside the incoming directory, which is on
    /// the snapshot directory's filesystem: a rename moves it.
    pub path: PathBuf,
    /// sha256 of the data file (64 lowercase hex digits), as the sidecar verified it.
    pub sha256: String,
    /// The data file, opened by the node: staging checks that the staged name is this inode.
    pub file: IncomingFile,
    /// The chunk index the envelope names beside the data file (`chunk_index`), opened and
    /// checked against the file's size and `sha256`: the node then checks the file chunk by
    /// chunk ([`crate::chunks`]). `None` when the envelope names none, or names one that is
    /// unusable (said in a warning): the whole file is hashed instead.
    pub index: Option<IncomingIndex>,
}

impl Incoming {
    /// Checks a `save_snapshot` request's path ([`resolve_incoming`]) and opens its file
    /// ([`crate::verify::open_incoming`]). `incoming_dir` must be canonical.
    pub fn open(
        envelope: Envelope,
        path: &str,
        incoming_dir: &Path,
        sha256: String,
    ) -> Result<Incoming, Refusal> {
        let path = resolve_incoming(path, incoming_dir)
            .map_err(|reason| Refusal::new(ErrorCode::BadRequest, reason))?;
        let name = name_in(&path, incoming_dir).ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadRequest,
                format!("path {} has no UTF-8 file name", path.display()),
            )
        })?;
        let file = open_incoming(incoming_dir, &name, envelope.size)?;
        let index = envelope
            .chunk_index
            .as_deref()
            .and_then(|index| open_index(incoming_dir, index, envelope.size, &sha256));
        Ok(Incoming {
            envelope,
            path,
            sha256,
            file,
            index,
        })
    }

    pub fn log_id(&self) -> LogIdRef {
        LogIdRef {
            term: self.envelope.last_log_term,
            index: self.envelope.last_log_index,
        }
    }

    /// The leader's snapshot meta, as the application's openraft type
    /// (`SnapshotMeta<C>` / `SnapshotMetaOf<C>`).
    pub fn raft_meta<M: DeserializeOwned>(&self) -> Result<M, serde_json::Error> {
        serde_json::from_value(self.envelope.raft_meta.clone())
    }
}

/// The chunk index `name` in `incoming_dir`, if it is usable for a data file of `size` bytes
/// and `sha256`; an unusable one is only warned about (the whole file is hashed instead).
fn open_index(incoming_dir: &Path, name: &str, size: u64, sha256: &str) -> Option<IncomingIndex> {
    let path = incoming_dir.join(name);
    let opened = open_in(incoming_dir, name)
        .map_err(|r| r.message)
        .and_then(|(file, _)| {
            IncomingIndex::check(file, &path, size, sha256).map_err(|e| e.to_string())
        });
    match opened {
        Ok(index) => Some(index),
        Err(why) => {
            tracing::warn!(index = %path.display(), error = %why, "not using the chunk index handed over; hashing the whole file");
            None
        }
    }
}

/// What the state machine did with an [`Incoming`] snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Moved to the state machine's staging name; it replaces any older staged snapshot.
    Staged,
    /// Not newer than the current or the staged snapshot; the file was left alone.
    Stale,
}

/// Implemented by the application's state machine, which openraft owns: the hook calls
/// [`AdoptSnapshot::force_save_snapshot`] through `Raft::with_state_machine`, so it runs in
/// order with `apply`, snapshot installs and builder creation.
pub trait AdoptSnapshot: Send + 'static {
    /// The application's check of a snapshot's data before it can be staged: decode it (and
    /// check that the decoded state is at `log_id`), or do a cheaper structural check. An
    /// `Err` names the reason; the snapshot is refused (`invalid_snapshot`), its file removed.
    ///
    /// Runs on a blocking thread outside the state machine worker, after the hook has
    /// checked the envelope against `raft_meta`, and beside the file's sha256 check, whole
    /// or chunk by chunk (the hash is taken from the bytes `data` yields): `data` reads the opened file from its
    /// start, and its bytes are not yet verified. A file that fails its sha256 is refused
    /// as `checksum_mismatch` whatever this answers, a panic included; but a validation
    /// that hangs or allocates without bound on arbitrary bytes holds the check up.
    fn validate(data: &mut dyn io::Read, log_id: LogIdRef) -> Result<(), String>;

    /// Stages `incoming` (rename its file to a staging name in the snapshot directory with
    /// [`crate::SnapshotDir::stage`], which checks that the staged file is the one the hook
    /// verified) and answers [`StageOutcome::Staged`], or answers [`StageOutcome::Stale`]
    /// when it is not newer than the current snapshot or the one already staged.
    ///
    /// The hook has checked the file (path, size, sha256, [`AdoptSnapshot::validate`]).
    /// A [`Refusal`] is reported to the sidecar with its code.
    fn force_save_snapshot(
        &mut self,
        incoming: Incoming,
    ) -> impl Future<Output = Result<StageOutcome, Refusal>> + Send;
}

/// Checks a `save_snapshot` request's data file path, and returns it canonical.
///
/// The path must be absolute and name an entry directly inside `incoming_dir` (after
/// resolving symlinks in its directories), with a committed name (not hidden, not
/// `.tmp`/`.partial`). This is what keeps a client from making the node read, or rename, an
/// arbitrary file; the file itself is opened without following a symlink
/// ([`crate::verify::open_incoming`]). `incoming_dir` must be canonical.
pub fn resolve_incoming(path: &str, incoming_dir: &Path) -> Result<PathBuf, String> {
    let given = Path::new(path);
    if !given.is_absolute() {
        return Err(format!("path {path:?} is not absolute"));
    }
    let canonical = given
        .canonicalize()
        .map_err(|e| format!("path {path:?}: {e}"))?;
    if canonical.parent() != Some(incoming_dir) {
        return Err(format!(
            "path {path:?} is not a file directly inside the incoming directory {}",
            incoming_dir.display()
        ));
    }
    let name = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("path {path:?} has no UTF-8 file name"))?;
    if snapdir::is_ignored(name) {
        return Err(format!(
            "path {path:?} is a hidden or temporary name (starts with '.' or ends with .tmp/.partial)"
        ));
    }
    Ok(canonical)
}

/// Whether `s` is a sha256 as the protocol writes it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn envelope(size: u64) -> Envelope {
        Envelope {
            format: 1,
            last_log_index: 9,
            last_log_term: 2,
            data: "x.bin".into(),
            size,
            raft_meta: serde_json::json!({"last_log_id": null}),
            chunk_index: None,
            sha256: None,
        }
    }

    /// A snapshot dir with an incoming dir, a good file in it, and files around it.
    struct Fixture {
        _root: tempfile::TempDir,
        incoming: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let incoming = root_path.join("snapshots/.incoming");
        fs::create_dir_all(incoming.join("sub")).unwrap();
        fs::write(incoming.join("good.bin"), b"abc").unwrap();
        fs::write(incoming.join("sub/nested.bin"), b"abc").unwrap();
        fs::write(incoming.join("x.partial"), b"abc").unwrap();
        fs::write(incoming.join(".hidden"), b"abc").unwrap();
        let outside = root_path.join("secret");
        fs::write(&outside, b"abc").unwrap();
        std::os::unix::fs::symlink(&outside, incoming.join("link.bin")).unwrap();
        Fixture {
            _root: root,
            incoming,
            outside,
        }
    }

    fn resolve(f: &Fixture, path: &Path, size: u64) -> Result<PathBuf, String> {
        Incoming::open(
            envelope(size),
            path.to_str().unwrap(),
            &f.incoming,
            "00".repeat(32),
        )
        .map(|incoming| incoming.path)
        .map_err(|refusal| refusal.message)
    }

    #[test]
    fn file_in_incoming_dir_is_accepted() {
        let f = fixture();
        let path = f.incoming.join("good.bin");
        assert_eq!(resolve(&f, &path, 3), Ok(path.clone()));
        // A path that only reaches the same file through `..` resolves to it.
        let roundabout = f.incoming.join("sub/../good.bin");
        assert_eq!(resolve(&f, &roundabout, 3), Ok(path));
    }

    #[test]
    fn paths_outside_incoming_dir_are_refused() {
        let f = fixture();
        for path in [
            f.outside.clone(),
            f.incoming.join("../../secret"),
            f.incoming.join("link.bin"),
            f.incoming.join("sub/nested.bin"),
            f.incoming.join("sub/../../../secret"),
            f.incoming.clone(),
        ] {
            let err = resolve(&f, &path, 3).unwrap_err();
            assert!(
                err.contains("not a file directly inside the incoming directory"),
                "{path:?}: {err}"
            );
        }
    }

    #[test]
    fn relative_missing_temporary_and_wrong_size_files_are_refused() {
        let f = fixture();
        let err = resolve_incoming("good.bin", &f.incoming).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");
        let err = resolve(&f, &f.incoming.join("missing.bin"), 3).unwrap_err();
        assert!(err.contains("missing.bin"), "{err}");
        for name in ["x.partial", ".hidden"] {
            let err = resolve(&f, &f.incoming.join(name), 3).unwrap_err();
            assert!(err.contains("temporary"), "{name}: {err}");
        }
        let err = resolve(&f, &f.incoming.join("good.bin"), 4).unwrap_err();
        assert!(
            err.contains("is 3 bytes") && err.contains("says 4"),
            "{err}"
        );
    }

    #[test]
    fn sha256_format() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_sha256_hex(&"ab".repeat(31)));
        assert!(!is_sha256_hex(&"zz".repeat(32)));
    }

    #[test]
    fn incoming_reads_raft_meta_and_log_id() {
        let f = fixture();
        let path = f.incoming.join("good.bin");
        let incoming = Incoming::open(
            envelope(3),
            path.to_str().unwrap(),
            &f.incoming,
            "00".repeat(32),
        )
        .unwrap();
        assert!(incoming.file.is_at(&path));
        assert_eq!(incoming.log_id(), LogIdRef { term: 2, index: 9 });
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Meta {
            last_log_id: Option<u64>,
        }
        assert_eq!(
            incoming.raft_meta::<Meta>().unwrap(),
            Meta { last_log_id: None }
        );
    }

    /// An index is used only if it is a regular file (no symlink followed) of this data
    /// file's size and the request's sha256; otherwise the whole file is hashed.
    #[test]
    fn only_a_usable_chunk_index_is_taken() {
        use snaprelay_contract::chunking::{ChunkParams, IndexWriter, Indexer};
        let f = fixture();
        let params = ChunkParams::default();
        let write_index = |path: &Path| {
            let file = fs::File::create(path).unwrap();
            let mut indexer = Indexer::with_sink(params, IndexWriter::new(file).unwrap());
            indexer.feed(b"abc").unwrap();
            let (writer, size, sha256) = indexer.end().unwrap();
            writer.finish(params, size, sha256).unwrap();
            sha256.to_hex()
        };
        let sha = write_index(&f.incoming.join("good.chunks"));
        write_index(&f.outside.with_extension("chunks"));
        std::os::unix::fs::symlink(
            f.outside.with_extension("chunks"),
            f.incoming.join("link.chunks"),
        )
        .unwrap();
        let path = f.incoming.join("good.bin");
        let open = |index: &str, sha256: &str| {
            let mut e = envelope(3);
            e.chunk_index = Some(index.to_owned());
            Incoming::open(e, path.to_str().unwrap(), &f.incoming, sha256.to_owned())
                .unwrap()
                .index
                .is_some()
        };
        assert!(open("good.chunks", &sha));
        assert!(!open("good.chunks", &"00".repeat(32)), "another sha256");
        assert!(!open("link.chunks", &sha), "a symlink");
        assert!(!open("missing.chunks", &sha), "no such file");
        assert!(!open("sub", &sha), "a directory");
    }
}
