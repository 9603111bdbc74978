//! Which incarnation of the repository a sidecar follows.
//!
//! `repository.json` carries a random incarnation id made with it. A cluster re-created from
//! scratch that reuses its `cluster_id` (and its store prefix, once emptied) makes a new
//! repository with a new incarnation, and its snapshots must not reach a node of the old
//! cluster: openraft refuses to start, or panics, on a snapshot that conflicts with its vote
//! or committed log. So a sidecar records the incarnation it first sees (or creates) and
//! refuses, fatally, a store whose incarnation has changed or whose repository is gone.
//!
//! The record lives in `daemon.state_dir/incarnation.json`:
//!
//! ```json
//! {"store": "s3://bucket/prefix", "cluster_id": "prod", "incarnation": "<32 hex>",
//!  "recorded_at": "2025-01-01T00:00:00Z"}
//! ```
//!
//! A record for another store URL (the operator moved the cluster to a new prefix) is
//! replaced. Without a state directory the record lives in memory for the life of the
//! process, which says so once in its log.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::repo::Descriptor;
use crate::snapdir;

/// The record's file name in `daemon.state_dir`.
pub const FILE: &str = "incarnation.json";

/// Why a sidecar refuses its store. Fatal: only the operator can decide.
#[derive(Debug, thiserror::Error)]
pub enum IncarnationError {
    #[error(
        "the repository at {store} was re-created: this node recorded incarnation {recorded}, \
         the store now holds incarnation {found}. Snapshots from another incarnation of a \
         cluster with the same id must not reach this node, so snaprelay stops. If the \
         cluster was re-created on purpose, {remedy}"
    )]
    Changed {
        store: String,
        recorded: String,
        found: String,
        remedy: String,
    },
    #[error(
        "the repository at {store} is gone (no repository.json) but this node recorded \
         incarnation {recorded}; not creating a new one, as that would be another \
         incarnation. If the store was emptied on purpose, {remedy}"
    )]
    Gone {
        store: String,
        recorded: String,
        remedy: String,
    },
    #[error("the repository incarnation record {file} is unreadable ({reason}); remove it if the store at {store} is the one this node follows")]
    Unreadable {
        file: PathBuf,
        store: String,
        reason: String,
    },
    #[error("cannot record the repository incarnation in {file}: {reason}")]
    Unwritable { file: PathBuf, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub store: String,
    pub cluster_id: String,
    pub incarnation: String,
    pub recorded_at: DateTime<Utc>,
}

impl Record {
    /// Reads the record in `state_dir`, if there is one.
    pub fn read(state_dir: &Path) -> Result<Option<Record>, String> {
        let path = state_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The incarnation this sidecar follows, and where it is recorded.
#[derive(Debug)]
pub struct Incarnation {
    /// The record's file; `None`: in memory only.
    file: Option<PathBuf>,
    store: String,
    recorded: Option<Record>,
}

impl Incarnation {
    /// Loads what was recorded for `store` in `state_dir` (nothing yet, or no state
    /// directory: the first repository seen is recorded).
    pub fn load(state_dir: Option<&Path>, store: &str) -> Result<Incarnation, IncarnationError> {
        let Some(dir) = state_dir else {
            tracing::warn!(
                "daemon.state_dir is not set: the repository's incarnation is remembered only \
                 while this process runs, so a restarted sidecar cannot tell a re-created \
                 repository from the one it followed"
            );
            return Ok(Incarnation {
                file: None,
                store: store.to_owned(),
                recorded: None,
            });
        };
        let file = dir.join(FILE);
        let recorded = Record::read(dir).map_err(|reason| IncarnationError::Unreadable {
            file: file.clone(),
            store: store.to_owned(),
            reason,
        })?;
        let recorded = match recorded {
            Some(r) if r.store != store => {
                tracing::info!(
                    recorded_store = %r.store,
                    store,
                    "the store changed; recording the incarnation of the new one"
                );
                None
            }
            other => other,
        };
        Ok(Incarnation {
            file: Some(file),
            store: store.to_owned(),
            recorded,
        })
    }

    /// The incarnation recorded, if any.
    pub fn recorded(&self) -> Option<&str> {
        self.recorded.as_ref().map(|r| r.incarnation.as_str())
    }

    /// What the operator does to accept a re-created repository.
    fn remedy(&self) -> String {
        match &self.file {
            Some(file) => format!("remove {} and restart snaprelay", file.display()),
            None => "restart snaprelay (daemon.state_dir is not set, so the incarnation \
                     was recorded in memory only)"
                .into(),
        }
    }

    /// Checks `descriptor` against the record; records it if nothing is recorded yet.
    pub fn check(&mut self, descriptor: &Descriptor) -> Result<(), IncarnationError> {
        match &self.recorded {
            Some(r) if r.incarnation == descriptor.incarnation() => Ok(()),
            Some(r) => Err(IncarnationError::Changed {
                store: self.store.clone(),
                recorded: r.incarnation.clone(),
                found: descriptor.incarnation().to_owned(),
                remedy: self.remedy(),
            }),
            None => {
                let record = Record {
                    store: self.store.clone(),
                    cluster_id: descriptor.cluster_id().to_owned(),
                    incarnation: descriptor.incarnation().to_owned(),
                    recorded_at: Utc::now(),
                };
                if let Some(file) = &self.file {
                    // serde_json serializes a struct of strings and a date.
                    let json = serde_json::to_vec_pretty(&record).expect("record serializes");
                    let written = file
                        .parent()
                        .map_or(Ok(()), std::fs::create_dir_all)
                        .map_err(|e| e.to_string())
                        .and_then(|()| {
                            snapdir::write_atomic(file, &json).map_err(|e| e.to_string())
                        });
                    if let Err(reason) = written {
                        return Err(IncarnationError::Unwritable {
                            file: file.clone(),
                            reason,
                        });
                    }
                }
                tracing::info!(
                    incarnation = %record.incarnation,
                    store = %self.store,
                    "following this incarnation of the repository"
                );
                self.recorded = Some(record);
                Ok(())
            }
        }
    }

    /// The store holds no repository: fine before anything was recorded (nothing published
    /// yet), an error after.
    pub fn missing(&self) -> Result<(), IncarnationError> {
        self.gone().map_or(Ok(()), Err)
    }

    /// The error for a store without a repository, once an incarnation is recorded.
    pub fn gone(&self) -> Option<IncarnationError> {
        self.recorded.as_ref().map(|r| IncarnationError::Gone {
            store: self.store.clone(),
            recorded: r.incarnation.clone(),
            remedy: self.remedy(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkParams;
    use crate::manifest::Repository;

    #[test]
    fn records_the_first_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let a = Descriptor::Chunks(Repository::new("c", ChunkParams::default()));
        let b = Descriptor::Chunks(Repository::new("c", ChunkParams::default()));
        let mut inc = Incarnation::load(Some(dir.path()), "file:///s").unwrap();
        assert!(inc.missing().is_ok(), "nothing recorded yet");
        inc.check(&a).unwrap();
        inc.check(&a).unwrap();
        let record = Record::read(dir.path()).unwrap().unwrap();
        assert_eq!(record.incarnation, a.incarnation());
        assert_eq!(record.store, "file:///s");

        // A restarted sidecar remembers.
        let mut again = Incarnation::load(Some(dir.path()), "file:///s").unwrap();
        assert_eq!(again.recorded(), Some(a.incarnation()));
        let e = again.check(&b).unwrap_err().to_string();
        for part in [
            "file:///s was re-created",
            a.incarnation(),
            b.incarnation(),
            &dir.path().join(FILE).display().to_string(),
        ] {
            assert!(e.contains(part), "{e} lacks {part}");
        }
        assert!(again.missing().unwrap_err().to_string().contains("gone"));

        // Another store: a fresh record.
        let mut moved = Incarnation::load(Some(dir.path()), "file:///t").unwrap();
        assert_eq!(moved.recorded(), None);
        moved.check(&b).unwrap();
        assert_eq!(
            Record::read(dir.path()).unwrap().unwrap().incarnation,
            b.incarnation()
        );
    }

    #[test]
    fn in_memory_without_a_state_dir_and_a_bad_record_is_refused() {
        let a = Descriptor::Chunks(Repository::new("c", ChunkParams::default()));
        let b = Descriptor::Chunks(Repository::new("c", ChunkParams::default()));
        let mut inc = Incarnation::load(None, "memory://").unwrap();
        inc.check(&a).unwrap();
        let e = inc.check(&b).unwrap_err().to_string();
        assert!(e.contains("in memory only"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let e = Incarnation::load(Some(dir.path()), "memory://").unwrap_err();
        assert!(e.to_string().contains("unreadable"), "{e}");
    }
}
