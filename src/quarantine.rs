//! Follower: the manifests a sidecar does not fetch again, and why ([`Quarantine`]), and
//! which failures put a manifest there ([`Reason::of`]).
//!
//! A failure is *permanent for a manifest* when it is a property of that manifest: its
//! signature or its content does not check out, a chunk it names is missing from the store
//! or corrupt (in a repository of packs: the pack or the tree block holding it), the file
//! it describes does not hash to its sha256, or the node refused the snapshot itself
//! (`checksum_mismatch`, `invalid_snapshot`, `log_mismatch`). Such a manifest is
//! quarantined and the daemon moves on at once to the next candidate. Every
//! other failure (the store or the node not answering, a full disk, a deployment problem
//! such as an incoming directory the node cannot read) is retried with backoff, and the
//! fetch resumes where it stopped.
//!
//! A quarantined manifest is tried again after `daemon.quarantine_retry` (its bytes cannot
//! heal, but a missing chunk can be re-uploaded), or once an operator clears it with
//! `snaprelay quarantine clear`. An entry applies to the object it was made for: if the
//! object under that name changes (a leader's publish replaces a forgery planted at the name
//! of its manifest), it is judged afresh. Entries at or below the node's snapshot are
//! dropped: they are no longer candidates.
//!
//! # The file
//!
//! `daemon.state_dir/quarantine.json`, so that a restarted sidecar does not fetch a poison
//! again (without a state dir the quarantine lives in memory, and the daemon says so once).
//! Written atomically (temp file, fsync, rename); every change is a read-modify-write under
//! an advisory lock on `quarantine.lock` in the same directory, which the daemon and the
//! `snaprelay quarantine` commands both take, so an operator's `clear` is never undone by
//! the daemon's next write. The daemon re-reads the file when it changes. At most
//! [`MAX_ENTRIES`] entries are kept (the oldest go first), so a store full of planted
//! manifests cannot grow it without bound.
//!
//! ```json
//! {"format": 1, "manifests": [
//!   {"manifest": "00000000000000000137-00000000000000000002-89ab….json",
//!    "reason": "chunk_missing", "error": "chunk 5f… is missing from the store",
//!    "quarantined_at": "2025-01-01T10:00:00Z", "retry_after": "2025-01-01T11:00:00Z",
//!    "stored_size": 1834, "last_modified": "2025-01-01T09:59:58Z"}]}
//! ```
//! (`signature`, the signature check's own reason, is present for `reason = "signature"`.)

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ipc::ErrorCode;
use crate::node::HookError;
use crate::repo::{ManifestEntry, ManifestId};

/// The file, in `daemon.state_dir`.
pub const FILE: &str = "quarantine.json";
/// The advisory lock every writer of [`FILE`] holds.
const LOCK: &str = "quarantine.lock";
const FORMAT: u32 = 1;
/// Entries kept at most.
pub const MAX_ENTRIES: usize = 1000;
/// The file is a few hundred bytes per entry; anything much larger is not ours.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Why a manifest is quarantined: the `reason` label of
/// `snaprelay_manifests_quarantined_total`, a fixed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// It fails the signature check (`snaprelay_signature_failures_total` says how).
    Signature,
    /// Not a valid manifest: malformed, inconsistent, misnamed, of another cluster, too
    /// large, or its raft_meta is not the snapshot it names.
    InvalidManifest,
    /// A chunk it names is not in the store (in a repository of packs: a pack it names).
    ChunkMissing,
    /// A chunk it names does not hash to its name, or has the wrong length (in a repository
    /// of packs, also: a pack of another size than it says, or a tree block that does not
    /// match it).
    ChunkCorrupt,
    /// Its chunks verify, but the file they make does not hash to its sha256.
    FileMismatch,
    /// The node hashed the file and refused it.
    ChecksumMismatch,
    /// The node refused the snapshot: its label, meta or content is not what it says.
    InvalidSnapshot,
    /// The node's log disagrees with the snapshot's log id: relabelled, or another history.
    LogMismatch,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Signature,
        Reason::InvalidManifest,
        Reason::ChunkMissing,
        Reason::ChunkCorrupt,
        Reason::FileMismatch,
        Reason::ChecksumMismatch,
        Reason::InvalidSnapshot,
        Reason::LogMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Signature => "signature",
            Reason::InvalidManifest => "invalid_manifest",
            Reason::ChunkMissing => "chunk_missing",
            Reason::ChunkCorrupt => "chunk_corrupt",
            Reason::FileMismatch => "file_mismatch",
            Reason::ChecksumMismatch => "checksum_mismatch",
            Reason::InvalidSnapshot => "invalid_snapshot",
            Reason::LogMismatch => "log_mismatch",
        }
    }

    /// Whether `err`, from reading, fetching or handing over one manifest, is permanent
    /// for that manifest, and why; with the signature check's reason for a signature
    /// failure. `None`: retry (resuming), the manifest is not to blame.
    pub fn of(err: &anyhow::Error) -> Option<(Reason, Option<crate::signing::Reason>)> {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<Error>() {
                return Self::of_error(e);
            }
            if let Some(HookError::Refused { code, .. }) = cause.downcast_ref::<HookError>() {
                return Self::of_refusal(*code).map(|r| (r, None));
            }
        }
        None
    }

    /// [`Reason::of`] for the library's error.
    pub fn of_error(err: &Error) -> Option<(Reason, Option<crate::signing::Reason>)> {
        let reason = match err {
            Error::Unauthenticated { refusal, .. } => {
                return Some((Reason::Signature, Some(refusal.reason)))
            }
            // The manifest names another cluster: a copy from elsewhere. (Of
            // repository.json, the same error stops the daemon; it never gets here.)
            Error::InvalidManifest { .. }
            | Error::MisnamedManifest { .. }
            | Error::ClusterMismatch { .. }
            | Error::ObjectTooLarge { .. } => Reason::InvalidManifest,
            // A pack holds chunks (and the blocks listing them): whichever is missing or
            // damaged, the manifest's chunks are, under the same labels.
            Error::ChunkMissing { .. } | Error::PackMissing { .. } => Reason::ChunkMissing,
            Error::ChunkCorrupt { .. } | Error::PackCorrupt { .. } | Error::BlockCorrupt { .. } => {
                Reason::ChunkCorrupt
            }
            Error::FileCorrupt { .. } => Reason::FileMismatch,
            _ => return None,
        };
        Some((reason, None))
    }

    /// The node's refusals of the snapshot itself. (`unreadable` is the deployment's
    /// problem, not the snapshot's: every manifest would get it.)
    fn of_refusal(code: ErrorCode) -> Option<Reason> {
        match code {
            ErrorCode::ChecksumMismatch => Some(Reason::ChecksumMismatch),
            ErrorCode::InvalidSnapshot => Some(Reason::InvalidSnapshot),
            ErrorCode::LogMismatch => Some(Reason::LogMismatch),
            _ => None,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One quarantined manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The manifest's file name (its id).
    pub manifest: String,
    pub reason: Reason,
    /// The signature check's reason, for [`Reason::Signature`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// What failed, for people.
    pub error: String,
    pub quarantined_at: DateTime<Utc>,
    /// When the daemon tries it again by itself.
    pub retry_after: DateTime<Utc>,
    /// The object the entry was made for: another object under the same name is judged
    /// afresh.
    pub stored_size: u64,
    #[serde(default)]
    pub last_modified: Option<DateTime<Utc>>,
}

impl Entry {
    fn is_for(&self, object: &ManifestEntry) -> bool {
        self.stored_size == object.stored_size
            && self
                .last_modified
                .is_none_or(|t| Some(t) == object.last_modified)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: u32,
    manifests: Vec<Entry>,
}

/// What the quarantine says about a listed manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not quarantined: a candidate.
    Clear,
    /// Quarantined: pass over it.
    Held,
    /// Its retry time came: a candidate again (the entry is dropped; a new failure puts it
    /// back).
    Retry(Entry),
}

/// The quarantined manifests, by id: a cache of the file, when there is one.
#[derive(Debug)]
pub struct Quarantine {
    dir: Option<PathBuf>,
    retry: Duration,
    entries: BTreeMap<ManifestId, Entry>,
    /// What the file looked like when last read or written (changed → read again).
    seen: Option<Stamp>,
}

/// Enough of a file's metadata to notice that it was replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

impl Quarantine {
    /// Opens the quarantine kept in `state_dir` (in memory only if `None`, which is said
    /// once, as a warning). An unreadable file is reported and the quarantine starts empty:
    /// the worst outcome is one more attempt at each poison.
    pub fn open(state_dir: Option<&Path>, retry: Duration) -> Quarantine {
        let mut q = Quarantine {
            dir: state_dir.map(Path::to_owned),
            retry,
            entries: BTreeMap::new(),
            seen: None,
        };
        match &q.dir {
            None => tracing::warn!(
                "daemon.state_dir is not set: quarantined manifests are remembered in memory only, and tried again after a restart"
            ),
            Some(_) => q.refresh(),
        }
        q
    }

    /// Where the file is, if there is one.
    pub fn file(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(FILE))
    }

    /// Reads the file again if it changed since this process last read or wrote it (an
    /// operator's `snaprelay quarantine clear`).
    pub fn refresh(&mut self) {
        let Some(path) = self.file() else { return };
        let now = stamp(&path);
        if now.is_some() && now == self.seen {
            return;
        }
        match read(&path) {
            Ok(entries) => {
                self.entries = entries;
                self.seen = now;
            }
            Err(e) => {
                if self.seen.is_some() || now.is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the quarantine; keeping what this process knows");
                }
                self.seen = now;
            }
        }
    }

    /// What to do with the listed manifest `object` at `now`.
    pub fn verdict(&self, object: &ManifestEntry, now: DateTime<Utc>) -> Verdict {
        match self.entries.get(&object.id) {
            Some(e) if !e.is_for(object) => Verdict::Clear,
            Some(e) if now >= e.retry_after => Verdict::Retry(e.clone()),
            Some(_) => Verdict::Held,
            None => Verdict::Clear,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Quarantines `object` until `now + retry`. Returns the entry written.
    pub fn insert(
        &mut self,
        object: &ManifestEntry,
        reason: Reason,
        signature: Option<crate::signing::Reason>,
        error: String,
        now: DateTime<Utc>,
    ) -> Entry {
        let entry = Entry {
            manifest: object.id.to_string(),
            reason,
            signature: signature.map(|s| s.as_str().to_owned()),
            error,
            quarantined_at: now,
            retry_after: now
                + chrono::Duration::from_std(self.retry).unwrap_or(chrono::Duration::MAX),
            stored_size: object.stored_size,
            last_modified: object.last_modified,
        };
        let id = object.id.clone();
        let written = entry.clone();
        self.update(move |entries| {
            entries.insert(id, entry);
            while entries.len() > MAX_ENTRIES {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, e)| e.quarantined_at)
                    .map(|(id, _)| id.clone());
                match oldest {
                    Some(id) => entries.remove(&id),
                    None => break,
                };
            }
            true
        });
        written
    }

    /// Drops the entry for `id` (its retry came, or the object changed).
    pub fn remove(&mut self, id: &ManifestId) {
        if self.entries.contains_key(id) {
            let id = id.clone();
            self.update(move |entries| entries.remove(&id).is_some());
        }
    }

    /// Drops entries at or below `index`: no longer candidates.
    pub fn forget_through(&mut self, index: Option<u64>) {
        let Some(index) = index else { return };
        if self.entries.keys().any(|id| id.index <= index) {
            self.update(move |entries| {
                let before = entries.len();
                entries.retain(|id, _| id.index > index);
                entries.len() != before
            });
        }
    }

    /// Removes the entry named `manifest`, or every entry; returns what was removed.
    pub fn clear(&mut self, manifest: Option<&str>) -> Vec<Entry> {
        let mut removed = Vec::new();
        let wanted = manifest.map(str::to_owned);
        self.update(|entries| {
            entries.retain(|id, e| {
                let drop = wanted.as_deref().is_none_or(|m| m == id.to_string());
                if drop {
                    removed.push(e.clone());
                }
                !drop
            });
            !removed.is_empty()
        });
        removed
    }

    /// Applies `change` to the entries, through the file when there is one: under its lock,
    /// to what it holds now, then written back if `change` says it changed anything. A file
    /// that cannot be written is reported; the change still holds in memory.
    fn update(&mut self, change: impl FnOnce(&mut BTreeMap<ManifestId, Entry>) -> bool) {
        let Some(dir) = self.dir.clone() else {
            change(&mut self.entries);
            return;
        };
        let path = dir.join(FILE);
        let locked = lock(&dir);
        if let Err(e) = &locked {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot lock the quarantine");
        }
        let mut entries = match read(&path) {
            Ok(entries) => entries,
            Err(_) => self.entries.clone(),
        };
        if change(&mut entries) {
            if let Err(e) = write(&path, &entries) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the quarantine; it holds in memory until a restart");
            }
        }
        self.entries = entries;
        self.seen = stamp(&path);
        drop(locked);
    }
}

/// The entries in the file at `path`; none if there is no file.
fn read(path: &Path) -> io::Result<BTreeMap<ManifestId, Entry>> {
    let file = match snaprelay_contract::dir::open_regular(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let bytes = snaprelay_contract::dir::read_limited(file, MAX_FILE_BYTES)?;
    let doc: Document = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if doc.format != FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "format {} is not supported (this build reads format {FORMAT})",
                doc.format
            ),
        ));
    }
    Ok(doc
        .manifests
        .into_iter()
        .filter_map(|e| Some((ManifestId::parse(&e.manifest)?, e)))
        .collect())
}

fn write(path: &Path, entries: &BTreeMap<ManifestId, Entry>) -> io::Result<()> {
    let doc = Document {
        format: FORMAT,
        manifests: entries.values().cloned().collect(),
    };
    // Only strings, numbers and timestamps: serialization cannot fail.
    let json = serde_json::to_vec_pretty(&doc).expect("the quarantine serializes");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::snapdir::write_atomic(path, &json).map_err(io::Error::other)
}

/// An exclusive advisory lock on `dir/quarantine.lock`, held until the file is dropped.
fn lock(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(LOCK))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(file)
}

/// The quarantine in `state_dir` as the `snaprelay quarantine` commands see it.
pub fn open_for_operator(state_dir: &Path) -> io::Result<Quarantine> {
    let path = state_dir.join(FILE);
    let entries = read(&path)?;
    Ok(Quarantine {
        dir: Some(state_dir.to_owned()),
        retry: Duration::ZERO,
        entries,
        seen: stamp(&path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(index: u64, size: u64) -> ManifestEntry {
        ManifestEntry {
            id: ManifestId {
                index,
                term: 2,
                sha_prefix: "0123456789abcdef".into(),
            },
            stored_size: size,
            last_modified: Some(DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_100, 0).unwrap()
    }

    #[test]
    fn permanent_failures_are_told_from_transient_ones() {
        let chunk = anyhow::Error::new(Error::ChunkMissing {
            sha256: "ab".into(),
        })
        .context("fetching snapshot 7");
        assert_eq!(Reason::of(&chunk), Some((Reason::ChunkMissing, None)));
        let refused = anyhow::Error::new(HookError::Refused {
            op: "save_snapshot",
            code: ErrorCode::LogMismatch,
            message: "no".into(),
        });
        assert_eq!(Reason::of(&refused), Some((Reason::LogMismatch, None)));
        for transient in [
            anyhow::Error::new(HookError::Refused {
                op: "save_snapshot",
                code: ErrorCode::NotCommitted,
                message: "later".into(),
            }),
            // The deployment's problem: every manifest would get it.
            anyhow::Error::new(HookError::Refused {
                op: "save_snapshot",
                code: ErrorCode::Unreadable,
                message: "mode".into(),
            }),
            anyhow::Error::new(Error::Store {
                op: "get",
                key: "chunks/ab/ab".into(),
                source: object_store::Error::Generic {
                    store: "S3",
                    source: "connection refused".into(),
                },
            }),
            anyhow::Error::new(Error::io(
                "writing the staging file",
                io::Error::new(io::ErrorKind::StorageFull, "No space left on device"),
            )),
        ] {
            assert_eq!(Reason::of(&transient), None, "{transient:#}");
        }
    }

    /// In a repository of packs, a chunk is missing when the pack holding it (or the tree
    /// block listing it) is, and damaged when its pack or block is: the same property of
    /// the manifest as a missing or corrupt chunk object, quarantined the same way.
    #[test]
    fn a_missing_or_damaged_pack_or_block_is_the_manifests_own_failure() {
        let cases = [
            (
                Error::PackMissing { pack: "ab".into() },
                Reason::ChunkMissing,
            ),
            (
                Error::PackCorrupt {
                    pack: "ab".into(),
                    reason: "the store holds 10 bytes under its name, the manifest says 20".into(),
                },
                Reason::ChunkCorrupt,
            ),
            (
                Error::BlockCorrupt {
                    block: "cd".into(),
                    pack: "ab".into(),
                    reason: "sha256 mismatch".into(),
                },
                Reason::ChunkCorrupt,
            ),
        ];
        for (error, reason) in cases {
            let err = anyhow::Error::new(error).context("fetching snapshot 7");
            assert_eq!(Reason::of(&err), Some((reason, None)), "{err:#}");
        }
    }

    #[test]
    fn entries_expire_follow_their_object_and_are_forgotten_below_the_node() {
        let mut q = Quarantine::open(None, Duration::from_secs(3600));
        let o = object(10, 500);
        assert_eq!(q.verdict(&o, now()), Verdict::Clear);
        q.insert(&o, Reason::ChunkMissing, None, "gone".into(), now());
        assert_eq!(q.verdict(&o, now()), Verdict::Held);
        let later = now() + chrono::Duration::seconds(3600);
        assert!(matches!(q.verdict(&o, later), Verdict::Retry(_)));
        // Another object under the same name (a publish replaced a forgery) is a candidate.
        assert_eq!(q.verdict(&object(10, 501), now()), Verdict::Clear);
        q.forget_through(Some(9));
        assert_eq!(q.len(), 1);
        q.forget_through(Some(10));
        assert!(q.is_empty());
    }

    #[test]
    fn the_file_survives_a_restart_and_an_operators_clear_is_not_undone() {
        let dir = tempfile::tempdir().unwrap();
        let retry = Duration::from_secs(3600);
        let mut daemon = Quarantine::open(Some(dir.path()), retry);
        daemon.insert(
            &object(10, 1),
            Reason::ChunkCorrupt,
            None,
            "bad".into(),
            now(),
        );
        daemon.insert(
            &object(11, 1),
            Reason::Signature,
            Some(crate::signing::Reason::UnknownKey),
            "who?".into(),
            now(),
        );
        let restarted = Quarantine::open(Some(dir.path()), retry);
        assert_eq!(restarted.len(), 2);
        let e = restarted
            .entries()
            .find(|e| e.reason == Reason::Signature)
            .unwrap();
        assert_eq!(e.signature.as_deref(), Some("unknown_key"));

        let mut operator = open_for_operator(dir.path()).unwrap();
        let cleared = operator.clear(Some(&object(10, 1).id.to_string()));
        assert_eq!(cleared.len(), 1);
        // The daemon's next change starts from the file, so the cleared entry stays gone.
        daemon.insert(
            &object(12, 1),
            Reason::FileMismatch,
            None,
            "x".into(),
            now(),
        );
        let names: Vec<u64> = open_for_operator(dir.path())
            .unwrap()
            .entries()
            .map(|e| ManifestId::parse(&e.manifest).unwrap().index)
            .collect();
        assert_eq!(names, [11, 12]);
        // And it sees the operator's clear of everything before it looks again.
        open_for_operator(dir.path()).unwrap().clear(None);
        daemon.refresh();
        assert!(daemon.is_empty());
    }

    #[test]
    fn an_unreadable_file_starts_an_empty_quarantine_and_size_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{ not json").unwrap();
        let q = Quarantine::open(Some(dir.path()), Duration::from_secs(60));
        assert!(q.is_empty());
        let mut q = Quarantine::open(None, Duration::from_secs(60));
        for i in 0..(MAX_ENTRIES as u64 + 5) {
            q.insert(
                &object(100 + i, 1),
                Reason::InvalidManifest,
                None,
                "x".into(),
                now() + chrono::Duration::seconds(i as i64),
            );
        }
        assert_eq!(q.len(), MAX_ENTRIES);
        // The oldest went first.
        assert!(q
            .entries()
            .all(|e| !e.manifest.starts_with("00000000000000000100-")));
    }
}
