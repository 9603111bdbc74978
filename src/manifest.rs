//! The two documents the store holds besides chunks: `repository.json` (the format and the
//! features it requires, the cluster id, the incarnation and the chunking parameters,
//! written once) and one immutable [`Manifest`] per published snapshot.
//! Both are validated on the way in: a manifest is input from the network like any other,
//! and a bad one must fail with a reason, never with a panic or an absurd allocation.
//! Their signatures are not part of them: each is stored in a signed envelope around its
//! exact bytes (see [`crate::signing`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkParams, Digest};

/// The `repository.json` format this build reads and writes. Format 1 predates GC leases.
pub const REPOSITORY_FORMAT: u32 = 2;
/// The features this build implements, all of which it declares in every repository it
/// creates. A repository's `features` lists what every reader and writer must implement:
/// a build meets one it does not know and refuses the repository, naming it. New features
/// are added here, not by another format bump.
///
/// - `leases`: publishes and GCs take leases under `leases/` (see [`crate::lease`]); a GC
///   that does not could delete chunks a concurrent publish relies on.
pub const FEATURES: &[&str] = &["leases"];
pub const MANIFEST_FORMAT: u32 = 1;
/// A manifest object larger than this is refused before it is parsed. At about 175 bytes per
/// chunk entry in its envelope (130 of JSON, in base64) this allows over 350,000 chunks
/// (hundreds of GiB at the default sizes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// `repository.json`: pins the cluster, the chunking parameters and the features of a
/// prefix, and names this incarnation of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub format: u32,
    /// What every reader and writer must implement (see [`FEATURES`]).
    pub features: Vec<String>,
    pub cluster_id: String,
    /// 128 random bits in hex, made with the repository: a repository re-created under the
    /// same prefix (a re-created cluster reusing its cluster id) has another one, which a
    /// sidecar that recorded the first refuses.
    pub incarnation: String,
    pub chunking: ChunkParams,
    pub created_at: DateTime<Utc>,
}

/// Just enough of any `repository.json` to decide whether this build can read the rest.
#[derive(Deserialize)]
struct Header {
    format: u32,
    #[serde(default)]
    features: Vec<String>,
}

impl Repository {
    /// A new repository's descriptor, with a fresh incarnation.
    pub fn new(cluster_id: &str, chunking: ChunkParams) -> Repository {
        Repository {
            format: REPOSITORY_FORMAT,
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            cluster_id: cluster_id.to_owned(),
            incarnation: format!("{:032x}", rand::random::<u128>()),
            chunking,
            created_at: Utc::now(),
        }
    }

    /// Parses and validates `repository.json`. The format and features are read first, so
    /// that a repository this build cannot use is refused with what it lacks, not with a
    /// complaint about a field it does not know.
    pub fn parse(bytes: &[u8]) -> Result<Repository, String> {
        let header: Header = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        check_format(header.format)?;
        check_features(&header.features)?;
        let repository: Repository = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        repository.validate()?;
        Ok(repository)
    }

    pub fn validate(&self) -> Result<(), String> {
        check_format(self.format)?;
        check_features(&self.features)?;
        check_incarnation(&self.incarnation)?;
        self.chunking.validate()
    }
}

fn check_format(format: u32) -> Result<(), String> {
    match format {
        REPOSITORY_FORMAT => Ok(()),
        1 => Err(
            "it is format 1, from a snaprelay without GC leases: a GC that takes no lease could \
             delete chunks a concurrent publish relies on, so this build does not use it. \
             Re-publish from the leader into a fresh prefix: point store.url (on every \
             sidecar) at an empty prefix, and the leader's sidecar publishes its node's \
             current snapshot there; then delete the old prefix"
                .into(),
        ),
        other => Err(format!(
            "format {other} is not supported (this build reads format {REPOSITORY_FORMAT}); \
             a newer snaprelay wrote it: upgrade this one"
        )),
    }
}

fn check_features(features: &[String]) -> Result<(), String> {
    check_known_features(features, FEATURES)
}

/// Every feature in `features` is one of `known`, and none is listed twice (shared by both
/// descriptor formats).
pub(crate) fn check_known_features(features: &[String], known: &[&str]) -> Result<(), String> {
    for (i, feature) in features.iter().enumerate() {
        if !known.contains(&feature.as_str()) {
            return Err(format!(
                "it requires feature {feature:?}, which this build does not implement (it \
                 implements {known:?}): upgrade snaprelay"
            ));
        }
        if features[..i].contains(feature) {
            return Err(format!("feature {feature:?} is listed twice"));
        }
    }
    Ok(())
}

/// An incarnation is 32 lowercase hex digits (shared by both descriptor formats).
pub(crate) fn check_incarnation(incarnation: &str) -> Result<(), String> {
    if incarnation.len() != 32
        || !incarnation
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(format!(
            "incarnation {incarnation:?} is not 32 lowercase hex digits"
        ));
    }
    Ok(())
}

/// How a chunk's bytes are stored. Only `identity` exists today; a reader meeting an
/// encoding it does not know fails with serde's "unknown variant" naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Identity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// sha256 of the chunk's plain bytes: also its object key.
    pub sha256: Digest,
    pub len: u64,
    pub stored_len: u64,
    pub encoding: Encoding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publisher {
    pub node_id: Option<u64>,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub cluster_id: String,
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// openraft's `SnapshotMeta`, verbatim from the leader's envelope.
    pub raft_meta: serde_json::Value,
    pub size: u64,
    /// sha256 of the whole data file.
    pub sha256: Digest,
    pub chunks: Vec<ChunkRef>,
    pub created_at: DateTime<Utc>,
    pub publisher: Publisher,
}

impl Manifest {
    /// Checks internal consistency against the repository's parameters. The cluster id is
    /// checked by the caller, which reports a mismatch as a usage error, not corruption.
    pub fn validate(&self, params: &ChunkParams) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        let max = params.max_size as u64;
        let mut total: u64 = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.len == 0 || c.len > max {
                return Err(format!(
                    "chunk {i} ({}) has length {}, outside 1..={max}",
                    c.sha256, c.len
                ));
            }
            if c.stored_len != c.len {
                return Err(format!(
                    "chunk {i} ({}) is stored as identity but stored_len {} != len {}",
                    c.sha256, c.stored_len, c.len
                ));
            }
            total = total
                .checked_add(c.len)
                .ok_or_else(|| "chunk lengths overflow".to_owned())?;
        }
        if total != self.size {
            return Err(format!(
                "size {} does not equal the sum of its chunk lengths ({total})",
                self.size
            ));
        }
        Ok(())
    }

    /// Offsets of each chunk in the file, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |offset, c| {
            let at = *offset;
            *offset += c.len;
            Some((at, c))
        })
    }

    /// Distinct chunk digests.
    pub fn unique_chunks(&self) -> std::collections::HashSet<Digest> {
        self.chunks.iter().map(|c| c.sha256).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let a = Digest::of(b"aa");
        let b = Digest::of(b"b");
        Manifest {
            format: 1,
            cluster_id: "c".into(),
            last_log_index: 10,
            last_log_term: 2,
            raft_meta: serde_json::json!({"x": 1}),
            size: 3,
            sha256: Digest::of(b"aab"),
            chunks: vec![
                ChunkRef {
                    sha256: a,
                    len: 2,
                    stored_len: 2,
                    encoding: Encoding::Identity,
                },
                ChunkRef {
                    sha256: b,
                    len: 1,
                    stored_len: 1,
                    encoding: Encoding::Identity,
                },
            ],
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            publisher: Publisher {
                node_id: Some(1),
                version: "0.1.0".into(),
            },
        }
    }

    #[test]
    fn round_trip() {
        let m = manifest();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"encoding\":\"identity\""));
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        back.validate(&ChunkParams::default()).unwrap();
        let offsets: Vec<u64> = m.offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0, 2]);
    }

    #[test]
    fn repository_round_trip_and_refusals() {
        let r = Repository::new("c", ChunkParams::default());
        assert_eq!(r.format, 2);
        assert_eq!(r.features, vec!["leases".to_owned()]);
        assert_eq!(r.incarnation.len(), 32);
        assert_ne!(
            r.incarnation,
            Repository::new("c", ChunkParams::default()).incarnation
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(Repository::parse(json.to_string().as_bytes()).unwrap(), r);

        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = json.clone();
            f(&mut v);
            Repository::parse(v.to_string().as_bytes()).unwrap_err()
        };
        // Format 1 tells the operator what to do.
        let e = with(&|v| {
            v["format"] = 1.into();
            let o = v.as_object_mut().unwrap();
            o.remove("features");
            o.remove("incarnation");
        });
        assert!(e.contains("format 1") && e.contains("fresh prefix"), "{e}");
        let e = with(&|v| v["format"] = 3.into());
        assert!(e.contains("format 3") && e.contains("upgrade"), "{e}");
        // An unknown feature is named, even with fields this build has never heard of.
        let e = with(&|v| {
            v["features"] = serde_json::json!(["leases", "encryption"]);
            v["encryption"] = serde_json::json!({"key_id": "k"});
        });
        assert!(e.contains("\"encryption\"") && e.contains("upgrade"), "{e}");
        let e = with(&|v| v["features"] = serde_json::json!(["leases", "leases"]));
        assert!(e.contains("twice"), "{e}");
        let e = with(&|v| v["incarnation"] = "ABC".into());
        assert!(e.contains("incarnation"), "{e}");
        // Without a feature flag, an unknown field is an error still.
        let e = with(&|v| v["extra"] = 1.into());
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let mut m = manifest();
        m.size = 1 << 50;
        let e = m.validate(&ChunkParams::default()).unwrap_err();
        assert!(e.contains("does not equal the sum"), "{e}");
        let mut m = manifest();
        m.chunks[0].len = 64 << 20;
        assert!(m
            .validate(&ChunkParams::default())
            .unwrap_err()
            .contains("outside"));
    }

    #[test]
    fn bad_chunk_keys_and_encodings_fail_to_parse() {
        let json = serde_json::to_string(&manifest()).unwrap();
        let evil = json.replace(&Digest::of(b"b").to_hex(), "../../../etc/passwd");
        let e = serde_json::from_str::<Manifest>(&evil)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a sha256"), "{e}");
        let zstd = json.replace("identity", "zstd");
        let e = serde_json::from_str::<Manifest>(&zstd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("zstd"), "{e}");
    }
}
