//! The snapshot directory contract (DESIGN §1), shared by the node (writer) and snaprelay
//! (reader; writer only of pulled snapshots and of the follower's incoming directory).
//!
//! A snapshot is a data file plus `<name>.meta.json`, the [`Envelope`]. The meta file is the
//! commit marker: it is written only after the data file is complete and fsynced, through a
//! temp file, fsync and rename. Names starting with `.` or ending in `.tmp`/`.partial` are
//! work in progress and never read.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

    /// Reads an envelope and checks that its data file is there and complete.
    pub fn open(meta_path: &Path) -> Result<Snapshot> {
        let envelope = read_envelope(meta_path)?;
        let dir = meta_path.parent().unwrap_or(Path::new("."));
        let data_path = dir.join(&envelope.data);
        let actual = match fs::metadata(&data_path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) | Err(_) => {
                return Err(SnapdirError::MissingData {
                    meta: meta_path.to_owned(),
                    data: data_path,
                })
            }
        };
        if actual != envelope.size {
            return Err(SnapdirError::SizeMismatch {
                meta: meta_path.to_owned(),
                data: data_path,
                expected: envelope.size,
                actual,
            });
        }
        Ok(Snapshot {
            meta_path: meta_path.to_owned(),
            data_path,
            envelope,
        })
    }
}

fn read_envelope(path: &Path) -> Result<Envelope> {
    let read_err = |source| SnapdirError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_ENVELOPE_BYTES {
        return Err(SnapdirError::Malformed {
            path: path.to_owned(),
            reason: format!("{len} bytes is larger than the {MAX_ENVELOPE_BYTES}-byte limit"),
        });
    }
    let envelope: Envelope =
        serde_json::from_reader(io::BufReader::new(file)).map_err(|e| SnapdirError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    envelope
        .validate()
        .map_err(|reason| SnapdirError::Malformed {
            path: path.to_owned(),
            reason,
        })?;
    Ok(envelope)
}

/// Problems met while scanning a directory: entries that look like snapshots but are not.
#[derive(Debug, Default)]
pub struct Scan {
    /// Committed snapshots, oldest log id first.
    pub snapshots: Vec<Snapshot>,
    /// Meta files that could not be used, with the reason.
    pub rejected: Vec<SnapdirError>,
}

/// Lists the committed snapshots in `dir`. A missing directory holds no snapshots.
pub fn scan(dir: &Path) -> io::Result<Scan> {
    let mut scan = Scan::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_ignored(name) || !name.ends_with(META_SUFFIX) {
            continue;
        }
        match Snapshot::open(&entry.path()) {
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
    let json = serde_json::to_vec_pretty(envelope).map_err(|e| SnapdirError::Write {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    write_atomic(&path, &json)?;
    Ok(path)
}

/// temp file + fsync + rename + directory fsync: readers see the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let werr = |source| SnapdirError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| werr(io::Error::other("not a file name")))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

/// fsyncs a directory so that renames and creations in it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut e = envelope(1, "s.bin", 1);
        e.format = 9;
        fs::write(&path, serde_json::to_vec(&e).unwrap()).unwrap();
        let err = Snapshot::open(&path).unwrap_err().to_string();
        assert!(err.contains("format 9"), "{err}");
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
