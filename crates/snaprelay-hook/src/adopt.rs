//! What the application's state machine implements to receive the leader's snapshot
//! ([`AdoptSnapshot`]), and what it receives ([`Incoming`]).
//!
//! The state machine only *stages* the file (moves it to a staging name of its own); nothing is
//! installed and its state is untouched. The staged snapshot becomes current later, in
//! `try_create_snapshot_builder`, once the node has applied up to its index (see
//! [`crate::decision`]). The hook has already checked, before the state machine sees the
//! request, that the file is a regular file directly inside the incoming directory and has the
//! envelope's size ([`resolve_incoming`]).

use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use snaprelay_contract::ipc::LogIdRef;
use snaprelay_contract::snapdir::{self, Envelope};

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
}

impl Incoming {
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

/// What the state machine did with an [`Incoming`] snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Moved to the state machine's staging name; it replaces any older staged snapshot.
    Staged,
    /// Not newer than the current or the staged snapshot; the file was left alone.
    Stale,
}

/// Implemented by the application's state machine, which openraft owns: the hook calls it
/// through `Raft::with_state_machine`, so it runs in order with `apply`, snapshot installs and
/// builder creation.
pub trait AdoptSnapshot: Send + 'static {
    /// Stages `incoming` (rename its file to a staging name in the snapshot directory) and
    /// answers [`StageOutcome::Staged`], or answers [`StageOutcome::Stale`] when it is not
    /// newer than the current snapshot or the one already staged.
    ///
    /// The caller has checked that the file is complete and inside the incoming directory.
    /// An error is reported to the sidecar as an internal error; the file may stay where it is.
    fn force_save_snapshot(
        &mut self,
        incoming: Incoming,
    ) -> impl Future<Output = io::Result<StageOutcome>> + Send;
}

/// Checks a `save_snapshot` request's data file, and returns its canonical path.
///
/// The path must be absolute, name a regular file (after resolving symlinks) directly inside
/// `incoming_dir`, with a committed name (not hidden, not `.tmp`/`.partial`), of the
/// envelope's size. This is what keeps a client from making the node read, or rename, an
/// arbitrary file. `incoming_dir` must be canonical.
pub fn resolve_incoming(
    path: &str,
    incoming_dir: &Path,
    envelope: &Envelope,
) -> Result<PathBuf, String> {
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
    let meta = canonical
        .metadata()
        .map_err(|e| format!("path {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("path {path:?} is not a regular file"));
    }
    if meta.size() != envelope.size {
        return Err(format!(
            "path {path:?} is {} bytes, but the envelope says {}",
            meta.size(),
            envelope.size
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
        resolve_incoming(path.to_str().unwrap(), &f.incoming, &envelope(size))
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
        let err = resolve_incoming("good.bin", &f.incoming, &envelope(3)).unwrap_err();
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
        let incoming = Incoming {
            envelope: envelope(3),
            path: PathBuf::from("/x"),
            sha256: "00".repeat(32),
        };
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
}
