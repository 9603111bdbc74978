//! The two documents the store holds besides chunks: `repository.json` (the cluster id and
//! chunking parameters, written once) and one immutable [`Manifest`] per published snapshot.
//! Both are validated on the way in: a manifest is input from the network like any other,
//! and a bad one must fail with a reason, never with a panic or an absurd allocation.
//! Their signatures are not part of them: each is stored in a signed envelope around its
//! exact bytes (see [`crate::signing`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkParams, Digest};

pub const REPOSITORY_FORMAT: u32 = 1;
pub const MANIFEST_FORMAT: u32 = 1;
/// A manifest object larger than this is refused before it is parsed. At about 175 bytes per
/// chunk entry in its envelope (130 of JSON, in base64) this allows over 350,000 chunks
/// (hundreds of GiB at the default sizes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// `repository.json`: pins the cluster and the chunking parameters of a prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub format: u32,
    pub cluster_id: String,
    pub chunking: ChunkParams,
    pub created_at: DateTime<Utc>,
}

impl Repository {
    pub fn validate(&self) -> Result<(), String> {
        if self.format != REPOSITORY_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {REPOSITORY_FORMAT})",
                self.format
            ));
        }
        self.chunking.validate()
    }
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
