//! The snapshot directory contract (the README's "Snapshot directory contract"), shared by the node (writer) and snaprelay
//! (reader; writer only of pulled snapshots and of the follower's incoming directory).
//!
//! A snapshot is a data file plus `<name>.meta.json`, the [`Envelope`]. The meta file is the
//! commit marker: it is written only after the data file is complete and fsynced, through a
//! temp file, fsync and rename. Names starting with `.` or ending in `.tmp`/`.partial` are
//! work in progress and never read.
//!
//! Both sides may share the directory with another user, so every file in it is reached
//! through the directory's descriptor, never through a symbolic link, and only regular
//! files are read ([`crate::dir`]).

use std::io;
use std::path::{Path, PathBuf};

use crate::dir::{Dir, NotRegular};

use serde::{Deserialize, Serialize};

/// The only envelope format this build reads and writes.
pub const ENVELOPE_FORMAT: u32 = 1;
/// Suffix of envelope files.
pub const META_SUFFIX: &str = ".meta.json";
/// An envelope larger than this is not an envelope (raft_meta holds a membership config,
/// kilobytes at most).
const MAX_ENVELOPE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapdirError {
    #[error("snapshot meta file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot meta file {path} is not a valid envelope: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("snapshot meta file {meta} names data file {data}, which does not exist")]
    MissingData { meta: PathBuf, data: PathBuf },
    #[error(
        "snapshot data file {data} is {actual} bytes, but its meta file {meta} says {expected}"
    )]
    SizeMismatch {
        meta: PathBuf,
        data: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot file {path} is {kind}, not a regular file; refusing to use it")]
    NotRegular { path: PathBuf, kind: String },
    #[error("writing snapshot file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, SnapdirError>;

/// The meta file's content: snaprelay's envelope around openraft's `SnapshotMeta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub format: u32,
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// File name (no directory) of the data file, in the same directory.
    pub data: String,
    pub size: u64,
    /// openraft's `SnapshotMeta` as serde JSON, carried verbatim.
    pub raft_meta: serde_json::Value,
    /// File name (no directory) of the data file's chunk index
    /// ([`crate::chunking::ChunkIndex`]) in the same directory, if the node wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_index: Option<String>,
    /// sha256 of the data file (64 lowercase hex digits), if the writer recorded it. The
    /// hook library records it for every snapshot it commits and checks it when the node
    /// starts; optional, so envelopes without it (older nodes, other writers) still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Envelope {
    pub fn log_id(&self) -> (u64, u64) {
        (self.last_log_index, self.last_log_term)
    }

    /// Checks the fields that do not need the file system.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_fields()?;
        self.validate_raft_meta()
    }

    /// Checks everything but `raft_meta`: the format, the file names, the sha256's form.
    /// (A hook server answers these with `bad_request`, and a `raft_meta` that is not this
    /// snapshot's, [`Envelope::validate_raft_meta`], as an invalid snapshot.)
    pub fn validate_fields(&self) -> std::result::Result<(), String> {
        if self.format != ENVELOPE_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {ENVELOPE_FORMAT})",
                self.format
            ));
        }
        validate_data_name(&self.data)?;
        if let Some(sha256) = &self.sha256 {
            let hex = sha256.len() == 64
                && sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex {
                return Err(format!("sha256 {sha256:?} is not 64 lowercase hex digits"));
            }
        }
        if let Some(index) = &self.chunk_index {
            validate_data_name(index).map_err(|e| format!("chunk_index: {e}"))?;
            if *index == self.data {
                return Err(format!("chunk_index {index:?} names the data file"));
            }
        }
        Ok(())
    }
}

impl Envelope {
    /// `raft_meta` must be openraft's `SnapshotMeta` of this very snapshot: a JSON object
    /// whose `last_log_id.index` is the envelope's index and whose leader term, where the
    /// log id carries one, is the envelope's term. A node adopting a snapshot whose meta
    /// says something else would restart into a state its log does not describe.
    pub fn validate_raft_meta(&self) -> std::result::Result<(), String> {
        let kind = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        let meta = self.raft_meta.as_object().ok_or_else(|| {
            format!(
                "raft_meta must be openraft's SnapshotMeta (a JSON object), not {}",
                kind(&self.raft_meta)
            )
        })?;
        let last = meta.get("last_log_id").unwrap_or(&serde_json::Value::Null);
        let last = last.as_object().ok_or_else(|| {
            format!(
                "raft_meta.last_log_id must be the snapshot's log id (an object), not {}",
                kind(last)
            )
        })?;
        let index = last.get("index").and_then(|i| i.as_u64()).ok_or_else(|| {
            "raft_meta.last_log_id.index must be a non-negative integer".to_owned()
        })?;
        if index != self.last_log_index {
            return Err(format!(
                "raft_meta.last_log_id.index is {index}, but last_log_index is {}",
                self.last_log_index
            ));
        }
        // openraft writes the leader id as {"term": t, "node_id": n}; some leader id types
        // serialize as the bare term.
        let term = match last.get("leader_id") {
            Some(serde_json::Value::Object(leader)) => leader.get("term").and_then(|t| t.as_u64()),
            Some(serde_json::Value::Number(term)) => term.as_u64(),
            _ => None,
        };
        match term {
            Some(term) if term != self.last_log_term => Err(format!(
                "raft_meta.last_log_id.leader_id.term is {term}, but last_log_term is {}",
                self.last_log_term
            )),
            _ => Ok(()),
        }
    }
}

/// A data file name must be a plain, visible, committed file name in the same directory.
pub fn validate_data_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(format!("data file name {name:?} must be a plain file name"));
    }
    if is_ignored(name) {
        return Err(format!(
            "data file name {name:?} is a hidden or temporary name (starts with '.' or ends with .tmp/.partial)"
        ));
    }
    if name.ends_with(META_SUFFIX) {
        return Err(format!("data file name {name:?} ends with {META_SUFFIX}"));
    }
    Ok(())
}

/// Whether a directory entry is work in progress that must never be read.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".partial")
}

/// The canonical file names snaprelay uses for a snapshot it writes: `(data, meta)`.
pub fn file_names(index: u64, term: u64) -> (String, String) {
    let stem = stem(index, term);
    (format!("{stem}.bin"), format!("{stem}{META_SUFFIX}"))
}

/// The canonical name of a snapshot's chunk index.
pub fn index_file_name(index: u64, term: u64) -> String {
    format!("{}{}", stem(index, term), crate::chunking::INDEX_SUFFIX)
}

fn stem(index: u64, term: u64) -> String {
    format!("snapshot-{index:020}-{term:020}")
}

/// A committed snapshot found in a directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub meta_path: PathBuf,
    pub data_path: PathBuf,
    pub envelope: Envelope,
}

impl Snapshot {
    /// Where the envelope says the chunk index is, if it names one.
    pub fn chunk_index_path(&self) -> Option<PathBuf> {
        let name = self.envelope.chunk_index.as_ref()?;
        Some(self.meta_path.parent().unwrap_or(Path::new(".")).join(name))
    }

    /// Reads an envelope and checks that its data file is there, a regular file, and
    /// complete.
    pub fn open(meta_path: &Path) -> Result<Snapshot> {
        let (dir, name) = split(meta_path)?;
        let dir = Dir::open(dir).map_err(|source| SnapdirError::Read {
            path: meta_path.to_owned(),
            source,
        })?;
        Snapshot::open_in(&dir, name)
    }

    /// [`Snapshot::open`] for the meta file `meta_name` in an opened directory.
    pub fn open_in(dir: &Dir, meta_name: &str) -> Result<Snapshot> {
        let meta_path = dir.join(meta_name);
        let envelope = read_envelope(dir, meta_name)?;
        let data_path = dir.join(&envelope.data);
        let stat = dir
            .entry(&envelope.data)
            .map_err(|source| SnapdirError::Read {
                path: data_path.clone(),
                source,
            })?;
        let actual = match stat {
            None => {
                return Err(SnapdirError::MissingData {
                    meta: meta_path,
                    data: data_path,
                })
            }
            Some(stat) => match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
                rustix::fs::FileType::RegularFile => stat.st_size as u64,
                other => {
                    return Err(SnapdirError::NotRegular {
                        path: data_path,
                        kind: crate::dir::kind_name(other).to_owned(),
                    })
                }
            },
        };
        if actual != envelope.size {
            return Err(SnapdirError::SizeMismatch {
                meta: meta_path,
                data: data_path,
                expected: envelope.size,
                actual,
            });
        }
        Ok(Snapshot {
            meta_path,
            data_path,
            envelope,
        })
    }
}

/// A path's directory (`.` for a bare name) and file name.
fn split(path: &Path) -> Result<(&Path, &str)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| SnapdirError::Read {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a UTF-8 file name"),
        })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// The error for a file that could not be opened: a file that is not a regular file gets
/// its own variant, naming what it is.
fn open_error(path: PathBuf, source: io::Error) -> SnapdirError {
    match NotRegular::of(&source) {
        Some(n) => SnapdirError::NotRegular {
            path,
            kind: n.kind.to_owned(),
        },
        None => SnapdirError::Read { path, source },
    }
}

fn read_envelope(dir: &Dir, name: &str) -> Result<Envelope> {
    let path = dir.join(name);
    let file = dir
        .open_file(name)
        .map_err(|e| open_error(path.clone(), e))?;
    let bytes = crate::dir::read_limited(file, MAX_ENVELOPE_BYTES).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => SnapdirError::Malformed {
            path: path.clone(),
            reason: format!("it {e}"),
        },
        _ => SnapdirError::Read {
            path: path.clone(),
            source: e,
        },
    })?;
    let envelope: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| SnapdirError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    envelope
        .validate()
        .map_err(|reason| SnapdirError::Malformed { path, reason })?;
    Ok(envelope)
}

/// Problems met while scanning a directory: entries that look like snapshots but are not.
#[derive(Debug, Default)]
pub struct Scan {
    /// Committed snapshots, oldest log id first.
    pub snapshots: Vec<Snapshot>,
    /// Meta files that could not be used, with the reason (a meta name that is not a
    /// regular file among them).
    pub rejected: Vec<SnapdirError>,
}

/// Lists the committed snapshots in `dir`. A missing directory holds no snapshots.
pub fn scan(dir: &Path) -> io::Result<Scan> {
    let mut scan = Scan::default();
    let opened = match Dir::open(dir) {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(e),
    };
    let entries = std::fs::read_dir(dir)?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_ignored(name) || !name.ends_with(META_SUFFIX) {
            continue;
        }
        match Snapshot::open_in(&opened, name) {
            Ok(s) => scan.snapshots.push(s),
            Err(e) => scan.rejected.push(e),
        }
    }
    scan.snapshots.sort_by_key(|s| s.envelope.log_id());
    Ok(scan)
}

/// Writes `envelope` as `<dir>/<meta_name>` atomically: temp file, fsync, rename, fsync of
/// the directory. Call it only after the data file is complete and fsynced.
pub fn commit_envelope(dir: &Path, meta_name: &str, envelope: &Envelope) -> Result<PathBuf> {
    let path = dir.join(meta_name);
    let json = envelope_json(envelope, &path)?;
    write_atomic(&path, &json)?;
    Ok(path)
}

/// The envelope as the meta file holds it.
pub fn envelope_json(envelope: &Envelope, path: &Path) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(envelope).map_err(|e| SnapdirError::Write {
        path: path.to_owned(),
        source: io::Error::other(e),
    })
}

/// temp file + fsync + rename + directory fsync: readers see the old file or the whole new one.
/// The temp file is created with `O_CREAT|O_EXCL|O_NOFOLLOW` in the directory's
/// descriptor: whatever another user planted at its name is removed, never written through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, name) = split(path).map_err(|e| match e {
        SnapdirError::Read { path, source } => SnapdirError::Write { path, source },
        other => other,
    })?;
    Dir::open(dir)
        .and_then(|dir| dir.write_atomic(name, bytes))
        .map_err(|source| SnapdirError::Write {
            path: path.to_owned(),
            source,
        })
}

/// fsyncs a directory so that renames and creations in it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    Dir::open(dir)?.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn envelope(index: u64, data: &str, size: u64) -> Envelope {
        Envelope {
            format: 1,
            last_log_index: index,
            last_log_term: 2,
            data: data.into(),
            size,
            raft_meta: serde_json::json!({"last_log_id": {"leader_id": {"term": 2, "node_id": 1}, "index": index}}),
            chunk_index: None,
            sha256: None,
        }
    }

    #[test]
    fn envelope_round_trip_and_scan_order() {
        let dir = tempfile::tempdir().unwrap();
        for (index, body) in [(20u64, "bbbb"), (7, "a")] {
            let (data, meta) = file_names(index, 2);
            fs::write(dir.path().join(&data), body).unwrap();
            commit_envelope(
                dir.path(),
                &meta,
                &envelope(index, &data, body.len() as u64),
            )
            .unwrap();
        }
        // Work in progress is never read, even when it looks like a snapshot.
        fs::write(dir.path().join(".hidden.meta.json"), "{").unwrap();
        fs::write(dir.path().join("x.meta.json.tmp"), "{").unwrap();
        let scan = scan(dir.path()).unwrap();
        assert!(scan.rejected.is_empty(), "{:?}", scan.rejected);
        let indexes: Vec<u64> = scan
            .snapshots
            .iter()
            .map(|s| s.envelope.last_log_index)
            .collect();
        assert_eq!(indexes, vec![7, 20]);
        assert_eq!(
            scan.snapshots[1].envelope,
            envelope(20, &file_names(20, 2).0, 4)
        );
        // commit_envelope leaves no temp file behind (only the one this test planted).
        let tmp: Vec<String> = dir
            .path()
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert_eq!(tmp, vec!["x.meta.json.tmp".to_string()]);
    }

    #[test]
    fn missing_data_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let meta = commit_envelope(dir.path(), "s.meta.json", &envelope(1, "s.bin", 3)).unwrap();
        let err = Snapshot::open(&meta).unwrap_err().to_string();
        assert!(
            err.contains("s.meta.json") && err.contains("s.bin") && err.contains("does not exist"),
            "{err}"
        );
    }

    #[test]
    fn size_mismatch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("s.bin"), b"12").unwrap();
        let meta = commit_envelope(dir.path(), "s.meta.json", &envelope(1, "s.bin", 3)).unwrap();
        let err = Snapshot::open(&meta).unwrap_err().to_string();
        assert!(
            err.contains("is 2 bytes") && err.contains("says 3"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.meta.json");
        fs::write(&path, b"{\"format\": 1,").unwrap();
        let err = Snapshot::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("s.meta.json") && err.contains("not a valid envelope"),
            "{err}"
        );
        fs::write(
            &path,
            serde_json::to_vec(&envelope(1, "../etc/passwd", 1)).unwrap(),
        )
        .unwrap();
        let err = Snapshot::open(&path).unwrap_err().to_string();
        assert!(err.contains("plain file name"), "{err}");
        for (raft_meta, why) in [
            (
                serde_json::json!(null),
                "raft_meta must be openraft's SnapshotMeta (a JSON object), not null",
            ),
            (
                serde_json::json!({"last_log_id": null}),
                "raft_meta.last_log_id must be the snapshot's log id (an object), not null",
            ),
            (
                serde_json::json!({"last_log_id": {"index": 2}}),
                "raft_meta.last_log_id.index is 2, but last_log_index is 1",
            ),
            (
                serde_json::json!({"last_log_id": {"leader_id": {"term": 5, "node_id": 1}, "index": 1}}),
                "raft_meta.last_log_id.leader_id.term is 5, but last_log_term is 2",
            ),
        ] {
            let mut e = envelope(1, "s.bin", 1);
            e.raft_meta = raft_meta;
            fs::write(&path, serde_json::to_vec(&e).unwrap()).unwrap();
            let err = Snapshot::open(&path).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let mut e = envelope(1, "s.bin", 1);
        e.format = 9;
        fs::write(&path, serde_json::to_vec(&e).unwrap()).unwrap();
        let err = Snapshot::open(&path).unwrap_err().to_string();
        assert!(err.contains("format 9"), "{err}");
    }

    /// Entries another user planted (a symbolic link as the meta or the data file, a FIFO
    /// as the meta file) are rejected by name and kind, never followed or read.
    #[test]
    fn planted_entries_are_rejected_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        fs::create_dir(&dir).unwrap();
        let outside = root.path().join("passwd");
        fs::write(&outside, "root:x:0:0").unwrap();
        // A symbolic link as the data file.
        std::os::unix::fs::symlink(&outside, dir.join("a.bin")).unwrap();
        commit_envelope(&dir, "a.meta.json", &envelope(1, "a.bin", 10)).unwrap();
        let err = Snapshot::open(&dir.join("a.meta.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.bin is a symbolic link"), "{err}");
        // A symbolic link as the meta file, pointing at a valid envelope elsewhere.
        fs::write(root.path().join("b.bin"), "12").unwrap();
        commit_envelope(root.path(), "b.meta.json", &envelope(2, "b.bin", 2)).unwrap();
        std::os::unix::fs::symlink(root.path().join("b.meta.json"), dir.join("b.meta.json"))
            .unwrap();
        // A FIFO as the meta file: opening it must not wait for a writer.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("c.meta.json"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let scan = scan(&dir).unwrap();
        assert!(scan.snapshots.is_empty(), "{:?}", scan.snapshots);
        let mut reasons: Vec<String> = scan.rejected.iter().map(|e| e.to_string()).collect();
        reasons.sort();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].contains("a.bin is a symbolic link"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].contains("b.meta.json is a symbolic link"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("c.meta.json is a FIFO"), "{reasons:?}");
    }

    #[test]
    fn ignored_names() {
        for name in [".x", "a.tmp", "a.partial", ".incoming"] {
            assert!(is_ignored(name), "{name}");
        }
        for name in ["a.bin", "snapshot-1.meta.json", "tmp"] {
            assert!(!is_ignored(name), "{name}");
        }
        assert!(validate_data_name("a.partial").is_err());
        assert!(validate_data_name("x.meta.json").is_err());
        assert!(validate_data_name("a/b").is_err());
        assert!(validate_data_name("ok.bin").is_ok());
    }
}
