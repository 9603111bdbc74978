//! Format 2 of the two documents the store holds besides packs: `repository.json` (the
//! format and the features it requires, the cluster id, the incarnation, and the parameters
//! every writer must share: chunking, chunk ids, compression, pack size and tree grouping;
//! written once) and one immutable [`Manifest`] per published snapshot (the snapshot's
//! blocks, and the packs they use).
//!
//! A repository whose `repository.json` has the `packs` feature is read and written in this
//! format by publish, fetch, GC and verify (see [`crate::layout`]); one without it is the
//! chunk-object format of [`crate::manifest`].
//!
//! Both documents are validated on the way in: a manifest is input from the network like
//! any other, and a bad one must fail with a reason, never with a panic or an absurd
//! allocation. Their signatures are not part of them: each is stored in a signed envelope
//! around its exact bytes (see [`crate::signing`]).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkParams, Digest};
use crate::pack::{Compression, Encoding, PackId, PackKind, MAX_PACK_SIZE};
use crate::tree::{Location, TreeParams};

/// The `repository.json` format this build reads and writes. Format 1 predates GC leases.
pub const REPOSITORY_FORMAT: u32 = 2;
/// The features this build implements, all of which it declares in every repository it
/// creates. A repository's `features` lists what every reader and writer must implement:
/// a build meets one it does not know and refuses the repository, naming it. New features
/// are added here, not by another format bump.
///
/// - `leases`: publishes and GCs take leases under `leases/` (see [`crate::lease`]); a GC
///   that does not could delete data a concurrent publish relies on.
/// - `packs`: chunks and tree blocks live in packs, and manifests are format 2 (see
///   [`crate::pack`], [`crate::tree`]). A build without it would see a repository with no
///   chunks in it.
pub const FEATURES: &[&str] = &["leases", "packs"];
pub const MANIFEST_FORMAT: u32 = 2;
/// A manifest object larger than this is refused before it is parsed. A block entry takes
/// about 330 bytes of JSON (450 in its envelope's base64), and a block ~6 MiB of data at
/// the default chunking: 64 MiB allows snapshots of hundreds of GiB.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The only chunk id scheme this build implements: the sha256 of a chunk's plain bytes (and
/// of a block's bytes, for a block id). A keyed scheme (`"hmac-sha256"`, with a repository
/// key) is a value of `chunk_id`, not a new format; a build meets one it does not know and
/// refuses the repository, naming it.
pub const CHUNK_ID_SHA256: &str = "sha256";
/// The default target size of a pack: large enough that a GiB is a few dozen objects, small
/// enough that a follower's ranged reads and a publisher's parts stay a few MiB each.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;
/// The zstd level new repositories record by default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// `repository.json`'s compression: how publishers encode blobs. `algorithm` is a string,
/// not an enum, so that an unknown one is refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    /// `zstd` or `none`.
    pub algorithm: String,
    /// The zstd level (absent for `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
}

impl CompressionSpec {
    pub fn of(compression: Compression) -> CompressionSpec {
        match compression {
            Compression::None => CompressionSpec {
                algorithm: "none".into(),
                level: None,
            },
            Compression::Zstd { level } => CompressionSpec {
                algorithm: "zstd".into(),
                level: Some(level),
            },
        }
    }

    pub fn compression(&self) -> Result<Compression, String> {
        match (self.algorithm.as_str(), self.level) {
            ("none", None) => Ok(Compression::None),
            ("zstd", Some(level)) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
            ("zstd", level) => Err(format!(
                "compression.level {level:?} must be a zstd level from 1 to 19"
            )),
            ("none", Some(_)) => Err("compression \"none\" takes no level".into()),
            (other, _) => Err(format!(
                "compression algorithm {other:?} is not implemented by this build (it knows \
                 \"zstd\" and \"none\"): upgrade snaprelay"
            )),
        }
    }
}

/// What a new repository is created with (`repository.json` then rules every writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRepository {
    pub chunking: ChunkParams,
    pub compression: Compression,
    pub pack_size: u64,
    pub tree: TreeParams,
}

impl Default for NewRepository {
    fn default() -> Self {
        NewRepository {
            chunking: ChunkParams::PACKED,
            compression: Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            pack_size: DEFAULT_PACK_SIZE,
            tree: TreeParams::default(),
        }
    }
}

impl From<ChunkParams> for NewRepository {
    fn from(chunking: ChunkParams) -> Self {
        NewRepository {
            chunking,
            ..NewRepository::default()
        }
    }
}

/// The pack sizes a repository may ask for: at least a MiB (fewer objects is the point),
/// at most a GiB (a pack is at most 4 GiB, as blob offsets are 32-bit).
pub const PACK_SIZES: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);

/// `repository.json`: pins the cluster, the parameters every writer must share and the
/// features of a prefix, and names this incarnation of it.
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
    /// How chunk (and block) ids are computed: [`CHUNK_ID_SHA256`].
    pub chunk_id: String,
    pub compression: CompressionSpec,
    /// The size publishers close a pack at (a pack may exceed it by one blob and its
    /// trailer).
    pub pack_size: u64,
    pub tree: TreeParams,
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
    pub fn new(cluster_id: &str, settings: NewRepository) -> Repository {
        Repository {
            format: REPOSITORY_FORMAT,
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            cluster_id: cluster_id.to_owned(),
            incarnation: format!("{:032x}", rand::random::<u128>()),
            chunking: settings.chunking,
            chunk_id: CHUNK_ID_SHA256.into(),
            compression: CompressionSpec::of(settings.compression),
            pack_size: settings.pack_size,
            tree: settings.tree,
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
        crate::manifest::check_incarnation(&self.incarnation)?;
        if self.chunk_id != CHUNK_ID_SHA256 {
            return Err(format!(
                "chunk id scheme {:?} is not implemented by this build (it knows {CHUNK_ID_SHA256:?}): \
                 upgrade snaprelay",
                self.chunk_id
            ));
        }
        self.compression.compression()?;
        if !PACK_SIZES.contains(&self.pack_size) {
            return Err(format!(
                "pack_size {} must be between {} and {}",
                self.pack_size,
                PACK_SIZES.start(),
                PACK_SIZES.end()
            ));
        }
        self.tree.validate()?;
        self.chunking.validate()
    }

    /// How blobs are compressed (validated with the descriptor).
    pub fn compression(&self) -> Compression {
        self.compression.compression().unwrap_or(Compression::None)
    }
}

fn check_format(format: u32) -> Result<(), String> {
    match format {
        REPOSITORY_FORMAT => Ok(()),
        1 => Err(
            "it is format 1, from a snaprelay without GC leases or packs, which this build \
             does not read. Re-publish from the leader into a fresh prefix: point store.url \
             (on every sidecar) at an empty prefix, and the leader's sidecar publishes its \
             node's current snapshot there; then delete the old prefix"
                .into(),
        ),
        other => Err(format!(
            "format {other} is not supported (this build reads format {REPOSITORY_FORMAT}); \
             a newer snaprelay wrote it: upgrade this one"
        )),
    }
}

fn check_features(features: &[String]) -> Result<(), String> {
    crate::manifest::check_known_features(features, FEATURES)?;
    if !features.iter().any(|f| f == "packs") {
        return Err(
            "it stores every chunk as an object of its own (a repository from before packs, \
             with format-1 manifests), which this build does not read. Re-publish from the \
             leader into a fresh prefix: point store.url (on every sidecar) at an empty \
             prefix, and the leader's sidecar publishes its node's current snapshot there; \
             then delete the old prefix"
                .into(),
        );
    }
    Ok(())
}

/// One pack a manifest uses, with what the publisher knew of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackRef {
    pub id: PackId,
    pub kind: PackKind,
    /// The pack object's size, trailer included.
    pub size: u64,
    /// Stored bytes of this pack that the snapshot's blocks point at (a blob counted once
    /// per block that names it, and the sum at most `size`): what compaction compares with
    /// `size`.
    pub used: u64,
}

/// One block of a manifest's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRef {
    /// sha256 of the block's bytes.
    pub id: Digest,
    /// sha256 of its chunk ids and lengths (see [`crate::tree`]).
    pub logical: Digest,
    /// Index into the manifest's `packs` of the tree pack holding it.
    pub pack: u32,
    pub offset: u32,
    pub stored_len: u32,
    pub encoding: Encoding,
    /// Its chunks, and their plain bytes.
    pub chunks: u32,
    pub bytes: u64,
    /// The data packs its chunks are in (indexes into `packs`), with the stored bytes it
    /// points at in each.
    pub uses: Vec<(u32, u64)>,
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
    /// The repository's incarnation: a manifest copied from an earlier incarnation of the
    /// prefix names packs that may not exist here.
    pub incarnation: String,
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// openraft's `SnapshotMeta`, verbatim from the leader's envelope.
    pub raft_meta: serde_json::Value,
    pub size: u64,
    /// sha256 of the whole data file, as the node computed it (a follower need not compute
    /// it again: every byte it assembles is in a blob verified against its id, listed in a
    /// block verified against this manifest, whose signature is checked).
    pub sha256: Digest,
    /// The snapshot's chunks (the sum of its blocks').
    pub chunks: u64,
    /// Every pack any of its blocks or chunks is in: GC keeps exactly these.
    pub packs: Vec<PackRef>,
    /// The chunk list, in file order.
    pub blocks: Vec<BlockRef>,
    pub created_at: DateTime<Utc>,
    pub publisher: Publisher,
}

/// A stored block is at most this long: a block of [`crate::tree::MAX_CHUNKS`] chunks.
pub const MAX_BLOCK_STORED: u32 = 16 + crate::tree::MAX_CHUNKS * (16 + 48);

impl Manifest {
    /// Checks internal consistency against the repository's parameters, before anything is
    /// fetched. The cluster id and incarnation are checked by the caller, which reports a
    /// mismatch as a usage error (or a misplaced manifest), not corruption.
    pub fn validate(&self, repo: &Repository) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        let mut ids = HashSet::with_capacity(self.packs.len());
        for (i, p) in self.packs.iter().enumerate() {
            if !ids.insert(p.id) {
                return Err(format!("pack {} is listed twice", p.id));
            }
            if p.size < crate::pack::FOOTER_LEN || p.size > MAX_PACK_SIZE {
                return Err(format!(
                    "pack {i} ({}) has size {}, impossible",
                    p.id, p.size
                ));
            }
            if p.used > p.size {
                return Err(format!(
                    "pack {i} ({}) is {} bytes, of which it says {} are used",
                    p.id, p.size, p.used
                ));
            }
        }
        let pack = |i: u32, kind: PackKind, what: &str| -> Result<&PackRef, String> {
            match self.packs.get(i as usize) {
                Some(p) if p.kind == kind => Ok(p),
                Some(p) => Err(format!(
                    "{what} names pack {} ({:?}), not a {kind:?} pack",
                    p.id, p.kind
                )),
                None => Err(format!(
                    "{what} names pack {i} of a table of {}",
                    self.packs.len()
                )),
            }
        };
        let mut referenced = vec![false; self.packs.len()];
        let (mut chunks, mut bytes) = (0u64, 0u64);
        let max_chunk = repo.chunking.max_size as u64;
        for (i, b) in self.blocks.iter().enumerate() {
            let what = format!("block {i} ({})", b.id);
            if b.chunks == 0 || b.chunks > repo.tree.max_chunks {
                return Err(format!(
                    "{what} has {} chunks, outside 1..={}",
                    b.chunks, repo.tree.max_chunks
                ));
            }
            if b.bytes < b.chunks as u64 || b.bytes > b.chunks as u64 * max_chunk {
                return Err(format!(
                    "{what} holds {} bytes, impossible for {} chunks of at most {max_chunk}",
                    b.bytes, b.chunks
                ));
            }
            let tree = pack(b.pack, PackKind::Tree, &what)?;
            if b.stored_len == 0
                || b.stored_len > MAX_BLOCK_STORED
                || b.offset as u64 + b.stored_len as u64 > tree.size
            {
                return Err(format!(
                    "{what} is {} bytes at offset {} of pack {} ({} bytes)",
                    b.stored_len, b.offset, tree.id, tree.size
                ));
            }
            referenced[b.pack as usize] = true;
            if b.uses.is_empty() || b.uses.len() > b.chunks as usize {
                return Err(format!(
                    "{what} says it uses {} data packs for {} chunks",
                    b.uses.len(),
                    b.chunks
                ));
            }
            for (j, &(p, n)) in b.uses.iter().enumerate() {
                let data = pack(p, PackKind::Data, &what)?;
                if b.uses[..j].iter().any(|&(q, _)| q == p) {
                    return Err(format!("{what} lists pack {} twice", data.id));
                }
                if n == 0 || n > data.size {
                    return Err(format!(
                        "{what} says it uses {n} bytes of pack {} ({} bytes)",
                        data.id, data.size
                    ));
                }
                referenced[p as usize] = true;
            }
            chunks += b.chunks as u64;
            bytes = bytes
                .checked_add(b.bytes)
                .ok_or_else(|| "block sizes overflow".to_owned())?;
        }
        if let Some(i) = referenced.iter().position(|r| !r) {
            return Err(format!(
                "pack {} is listed but no block uses it",
                self.packs[i].id
            ));
        }
        if chunks != self.chunks {
            return Err(format!(
                "it says {} chunks, its blocks hold {chunks}",
                self.chunks
            ));
        }
        if bytes != self.size {
            return Err(format!(
                "size {} does not equal the sum of its blocks' bytes ({bytes})",
                self.size
            ));
        }
        Ok(())
    }

    /// Each block with its offset in the file, in order.
    pub fn block_offsets(&self) -> impl Iterator<Item = (u64, &BlockRef)> {
        self.blocks.iter().scan(0u64, |offset, b| {
            let at = *offset;
            *offset += b.bytes;
            Some((at, b))
        })
    }

    /// Where a block is stored (the manifest must have been validated).
    pub fn block_location(&self, b: &BlockRef) -> Location {
        Location {
            pack: self.packs[b.pack as usize].id,
            offset: b.offset,
            stored_len: b.stored_len,
            encoding: b.encoding,
        }
    }

    /// The ids of the packs it uses.
    pub fn pack_ids(&self) -> impl Iterator<Item = PackId> + '_ {
        self.packs.iter().map(|p| p.id)
    }

    /// The plain length of block `b`'s bytes: its header, a pack table entry per data pack
    /// it uses, and a record per chunk.
    pub fn block_plain_len(b: &BlockRef) -> u32 {
        16 + 16 * b.uses.len() as u32 + 48 * b.chunks
    }

    /// Decodes block `index` from its stored bytes and checks it against this manifest
    /// (validated): its id, its logical id, its totals, the data packs it uses (and how
    /// much of each), and the tree rule (every block but the last ends where the rule ends
    /// one).
    pub fn decode_block(
        &self,
        repo: &Repository,
        index: usize,
        stored: &[u8],
    ) -> Result<crate::tree::Block, String> {
        let b = &self.blocks[index];
        let plain = crate::pack::decode_blob(stored, b.encoding, Self::block_plain_len(b), &b.id)?;
        let block = crate::tree::Block::decode(&plain, &repo.tree, repo.chunking.max_size)?;
        if block.chunks.len() != b.chunks as usize || block.plain_bytes() != b.bytes {
            return Err(format!(
                "it holds {} chunks of {} bytes, the manifest says {} of {}",
                block.chunks.len(),
                block.plain_bytes(),
                b.chunks,
                b.bytes
            ));
        }
        let logical = block.logical_id();
        if logical != b.logical {
            return Err(format!(
                "its logical id is {logical}, the manifest says {}",
                b.logical
            ));
        }
        let uses = block.uses();
        let named: Vec<(PackId, u64)> = b
            .uses
            .iter()
            .map(|&(p, n)| (self.packs[p as usize].id, n))
            .collect();
        if uses != named {
            return Err(format!(
                "its chunks are in packs {uses:?}, the manifest says {named:?}"
            ));
        }
        if index + 1 < self.blocks.len() && !block.ends_by_rule(&repo.tree) {
            return Err("it does not end where the tree rule ends a block".into());
        }
        Ok(block)
    }

    /// Bytes the store holds for this snapshot's data (blobs as stored, counted per use).
    pub fn stored_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|b| b.uses.iter().map(|u| u.1))
            .sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn repository() -> Repository {
        Repository::new("c", NewRepository::default())
    }

    pub(crate) fn manifest() -> Manifest {
        let r = repository();
        Manifest {
            format: 2,
            cluster_id: "c".into(),
            incarnation: r.incarnation.clone(),
            last_log_index: 10,
            last_log_term: 2,
            raft_meta: serde_json::json!({"x": 1}),
            size: 3000,
            sha256: Digest::of(b"x"),
            chunks: 3,
            packs: vec![
                PackRef {
                    id: PackId([1; 16]),
                    kind: PackKind::Data,
                    size: 5000,
                    used: 2000,
                },
                PackRef {
                    id: PackId([2; 16]),
                    kind: PackKind::Tree,
                    size: 500,
                    used: 300,
                },
            ],
            blocks: vec![
                BlockRef {
                    id: Digest::of(b"b1"),
                    logical: Digest::of(b"l1"),
                    pack: 1,
                    offset: 0,
                    stored_len: 160,
                    encoding: Encoding::Raw,
                    chunks: 2,
                    bytes: 2000,
                    uses: vec![(0, 1500)],
                },
                BlockRef {
                    id: Digest::of(b"b2"),
                    logical: Digest::of(b"l2"),
                    pack: 1,
                    offset: 160,
                    stored_len: 100,
                    encoding: Encoding::Raw,
                    chunks: 1,
                    bytes: 1000,
                    uses: vec![(0, 500)],
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
        assert!(json.contains("\"encoding\":\"raw\""), "{json}");
        assert!(json.contains("\"uses\":[[0,1500]]"), "{json}");
        assert!(
            json.contains(&format!("\"id\":\"{}\"", PackId([1; 16]))),
            "{json}"
        );
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        back.validate(&repository()).unwrap();
        let offsets: Vec<u64> = m.block_offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0, 2000]);
        assert_eq!(m.block_location(&m.blocks[1]).offset, 160);
        assert_eq!(m.stored_bytes(), 2000);
    }

    #[test]
    fn repository_round_trip_and_refusals() {
        let r = repository();
        assert_eq!(r.format, 2);
        assert_eq!(r.features, vec!["leases".to_owned(), "packs".to_owned()]);
        assert_eq!(r.incarnation.len(), 32);
        assert_eq!(r.chunking, ChunkParams::new(4096, 16384, 65536).unwrap());
        assert_eq!(r.compression(), Compression::Zstd { level: 3 });
        assert_eq!(r.pack_size, 32 << 20);
        assert_ne!(r.incarnation, repository().incarnation);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["compression"],
            serde_json::json!({"algorithm": "zstd", "level": 3})
        );
        assert_eq!(json["chunk_id"], "sha256");
        assert_eq!(
            json["tree"],
            serde_json::json!({"min_chunks": 64, "max_chunks": 1024, "boundary_bits": 8})
        );
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
        // So does a repository of chunk objects (before packs).
        let e = with(&|v| {
            v["features"] = serde_json::json!(["leases"]);
            let o = v.as_object_mut().unwrap();
            for k in ["chunk_id", "compression", "pack_size", "tree"] {
                o.remove(k);
            }
            o.insert(
                "chunking".into(),
                serde_json::json!({"min_size": 262144, "avg_size": 1048576, "max_size": 4194304}),
            );
        });
        assert!(
            e.contains("object of its own") && e.contains("fresh prefix"),
            "{e}"
        );
        let e = with(&|v| v["format"] = 3.into());
        assert!(e.contains("format 3") && e.contains("upgrade"), "{e}");
        // An unknown feature is named, even with fields this build has never heard of.
        let e = with(&|v| {
            v["features"] = serde_json::json!(["leases", "packs", "encryption"]);
            v["encryption"] = serde_json::json!({"key_id": "k"});
        });
        assert!(e.contains("\"encryption\"") && e.contains("upgrade"), "{e}");
        let e = with(&|v| v["features"] = serde_json::json!(["leases", "packs", "packs"]));
        assert!(e.contains("twice"), "{e}");
        let e = with(&|v| v["incarnation"] = "ABC".into());
        assert!(e.contains("incarnation"), "{e}");
        // An unknown chunk id scheme or compression is named.
        let e = with(&|v| v["chunk_id"] = "hmac-sha256".into());
        assert!(
            e.contains("\"hmac-sha256\"") && e.contains("upgrade"),
            "{e}"
        );
        let e = with(&|v| v["compression"] = serde_json::json!({"algorithm": "lz4", "level": 1}));
        assert!(e.contains("\"lz4\""), "{e}");
        let e = with(&|v| v["compression"]["level"] = 40.into());
        assert!(e.contains("compression.level"), "{e}");
        let none =
            with(&|v| v["compression"] = serde_json::json!({"algorithm": "none", "level": 1}));
        assert!(none.contains("no level"), "{none}");
        let e = with(&|v| v["pack_size"] = 1000.into());
        assert!(e.contains("pack_size"), "{e}");
        let e = with(&|v| v["tree"]["max_chunks"] = 0.into());
        assert!(e.contains("tree."), "{e}");
        let e = with(&|v| v["chunking"]["min_size"] = 10.into());
        assert!(e.contains("chunking.min_size"), "{e}");
        // Without a feature flag, an unknown field is an error still.
        let e = with(&|v| v["extra"] = 1.into());
        assert!(e.contains("extra"), "{e}");
        // No compression is a valid choice.
        let plain = Repository::new(
            "c",
            NewRepository {
                compression: Compression::None,
                ..NewRepository::default()
            },
        );
        let v = serde_json::to_value(&plain).unwrap();
        assert_eq!(v["compression"], serde_json::json!({"algorithm": "none"}));
        assert_eq!(
            Repository::parse(v.to_string().as_bytes())
                .unwrap()
                .compression(),
            Compression::None
        );
    }

    #[test]
    fn inconsistent_manifests_are_refused_before_anything_is_fetched() {
        let r = repository();
        let refuse = |f: &dyn Fn(&mut Manifest), needle: &str| {
            let mut m = manifest();
            f(&mut m);
            let e = m.validate(&r).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        refuse(&|m| m.format = 1, "format 1");
        refuse(&|m| m.size = 1 << 50, "does not equal the sum");
        refuse(&|m| m.chunks = 4, "says 4 chunks");
        refuse(&|m| m.blocks[0].chunks = 0, "outside");
        refuse(&|m| m.blocks[0].chunks = 5000, "outside");
        refuse(&|m| m.blocks[0].bytes = 1 << 40, "impossible");
        refuse(&|m| m.blocks[0].pack = 0, "not a Tree pack");
        refuse(&|m| m.blocks[0].pack = 9, "of a table of 2");
        refuse(&|m| m.blocks[0].offset = 400, "offset 400");
        refuse(&|m| m.blocks[0].stored_len = u32::MAX, "bytes at offset");
        refuse(&|m| m.blocks[0].uses = vec![], "uses 0 data packs");
        refuse(&|m| m.blocks[0].uses = vec![(1, 10)], "not a Data pack");
        refuse(&|m| m.blocks[0].uses = vec![(0, 10), (0, 10)], "twice");
        refuse(
            &|m| m.blocks[0].uses = vec![(0, 1 << 40)],
            "uses 1099511627776",
        );
        refuse(&|m| m.packs[0].used = 1 << 40, "are used");
        refuse(&|m| m.packs[1].size = 3, "impossible");
        refuse(
            &|m| {
                let dup = m.packs[0];
                m.packs.push(dup);
            },
            "twice",
        );
        refuse(
            &|m| {
                m.packs.push(PackRef {
                    id: PackId([3; 16]),
                    kind: PackKind::Data,
                    size: 100,
                    used: 0,
                })
            },
            "no block uses it",
        );
        // An empty snapshot has no blocks and no packs.
        let mut empty = manifest();
        empty.size = 0;
        empty.chunks = 0;
        empty.blocks.clear();
        empty.packs.clear();
        empty.validate(&r).unwrap();
    }

    #[test]
    fn bad_ids_and_encodings_fail_to_parse() {
        let json = serde_json::to_string(&manifest()).unwrap();
        let evil = json.replace(&Digest::of(b"b1").to_hex(), "../../../etc/passwd");
        let e = serde_json::from_str::<Manifest>(&evil)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a sha256"), "{e}");
        let evil = json.replace(&PackId([1; 16]).to_hex(), "../x");
        let e = serde_json::from_str::<Manifest>(&evil)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a pack id"), "{e}");
        let aead = json.replace("\"raw\"", "\"aead\"");
        let e = serde_json::from_str::<Manifest>(&aead)
            .unwrap_err()
            .to_string();
        assert!(e.contains("aead"), "{e}");
    }
}
