//! The chunk list of a snapshot as a sequence of content-defined blocks: the tree under a
//! format-2 manifest. Pure format (no I/O).
//!
//! A snapshot's chunks, in file order, are grouped into blocks by a rule over the chunk ids
//! alone ([`TreeParams`]): a block ends after a chunk whose id ends in `boundary_bits` zero
//! bits, once it holds at least `min_chunks` chunks, and at `max_chunks` in any case. An
//! edit therefore changes the block it falls in (two if it moves a boundary) wherever it is,
//! and the blocks before and after it are the same blocks as before.
//!
//! A block lists, for each of its chunks in file order, the chunk's id and plain length and
//! where its blob is (pack, offset, stored length, encoding), with a table of the packs it
//! uses so that a pack id is not repeated per chunk:
//!
//! ```text
//! "SRBK" | version: u8 = 1 | 3 zero bytes | chunk_count: u32 LE | pack_count: u16 LE | 2 zero bytes
//! pack_count × pack id: [u8; 16]
//! chunk_count × { id: [u8; 32] | plain_len: u32 LE | pack: u16 LE | encoding: u8 | 0: u8
//!                 | offset: u32 LE | stored_len: u32 LE }
//! ```
//!
//! A block is stored as a blob in a tree pack; its id is the sha256 of these bytes. Its
//! *logical id* is the sha256 of `"SRLB" 0x01` followed by each chunk's id and plain length
//! (u32 LE): it names the content alone, so two blocks that hold the same chunks in packs of
//! their own have different ids and the same logical id. That is how a publish reuses a
//! block without reading its chunks, and a follower copies a block's bytes from a snapshot
//! it already has.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::chunk::Digest;
use crate::pack::{Encoding, PackId};

pub const MAGIC: &[u8; 4] = b"SRBK";
pub const VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
const PACK_LEN: usize = 16;
pub const ENTRY_LEN: usize = 48;
const LOGICAL_DOMAIN: &[u8; 5] = b"SRLB\x01";

/// How chunks are grouped into blocks (pinned in `repository.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeParams {
    pub min_chunks: u32,
    pub max_chunks: u32,
    /// A chunk whose id ends in this many zero bits ends a block (1 in 2^bits chunks).
    pub boundary_bits: u8,
}

impl Default for TreeParams {
    /// About 320 chunks per block on average (64 + 256): ~6 MiB of data at the default
    /// chunking, a ~15 KB block, ~170 blocks per GiB.
    fn default() -> Self {
        TreeParams {
            min_chunks: 64,
            max_chunks: 1024,
            boundary_bits: 8,
        }
    }
}

/// The most chunks a block may hold whatever `repository.json` says: it bounds what a
/// reader allocates for one block (3 MB).
pub const MAX_CHUNKS: u32 = 65_535;

impl TreeParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.min_chunks == 0 || self.min_chunks > self.max_chunks {
            return Err(format!(
                "tree.min_chunks {} must be between 1 and tree.max_chunks ({})",
                self.min_chunks, self.max_chunks
            ));
        }
        if self.max_chunks > MAX_CHUNKS {
            return Err(format!(
                "tree.max_chunks {} must be at most {MAX_CHUNKS}",
                self.max_chunks
            ));
        }
        if !(1..=16).contains(&self.boundary_bits) {
            return Err(format!(
                "tree.boundary_bits {} must be between 1 and 16",
                self.boundary_bits
            ));
        }
        Ok(())
    }

    /// Whether a chunk with this id ends a block that holds `count` chunks with it.
    pub fn ends_block(&self, id: &Digest, count: u32) -> bool {
        let low = u16::from_be_bytes([id.0[30], id.0[31]]);
        let mask = ((1u32 << self.boundary_bits) - 1) as u16;
        count >= self.max_chunks || (count >= self.min_chunks && low & mask == 0)
    }

    /// The largest encoded block these parameters allow.
    pub fn max_block_len(&self) -> usize {
        HEADER_LEN + self.max_chunks as usize * (PACK_LEN + ENTRY_LEN)
    }
}

/// Groups a chunk sequence into blocks: feed chunk ids in order; `push` says when a block
/// ends after the chunk just fed. The last block of a sequence ends with the sequence.
#[derive(Debug, Clone)]
pub struct Grouper {
    params: TreeParams,
    count: u32,
}

impl Grouper {
    pub fn new(params: TreeParams) -> Grouper {
        Grouper { params, count: 0 }
    }

    /// Feeds the next chunk; true if the block ends after it.
    pub fn push(&mut self, id: &Digest) -> bool {
        self.count += 1;
        let ends = self.params.ends_block(id, self.count);
        if ends {
            self.count = 0;
        }
        ends
    }
}

/// Computes a logical id from chunks fed in order.
#[derive(Clone)]
pub struct LogicalHasher(Sha256);

impl LogicalHasher {
    pub fn new() -> LogicalHasher {
        let mut h = Sha256::new();
        h.update(LOGICAL_DOMAIN);
        LogicalHasher(h)
    }

    pub fn push(&mut self, id: &Digest, plain_len: u32) {
        self.0.update(id.0);
        self.0.update(plain_len.to_le_bytes());
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl Default for LogicalHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Where one chunk of a block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub id: Digest,
    pub plain_len: u32,
    /// Index into the block's pack table.
    pub pack: u16,
    pub encoding: Encoding,
    pub offset: u32,
    pub stored_len: u32,
}

/// A decoded block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    pub packs: Vec<PackId>,
    pub chunks: Vec<ChunkEntry>,
}

impl Block {
    /// The block's bytes (its id is their sha256).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.packs.len() * PACK_LEN + self.chunks.len() * ENTRY_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.packs.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        for p in &self.packs {
            out.extend_from_slice(&p.0);
        }
        for c in &self.chunks {
            out.extend_from_slice(&c.id.0);
            out.extend_from_slice(&c.plain_len.to_le_bytes());
            out.extend_from_slice(&c.pack.to_le_bytes());
            out.push(c.encoding.code());
            out.push(0);
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.stored_len.to_le_bytes());
        }
        out
    }

    /// Parses a block and checks it against itself and the tree parameters: layout, counts,
    /// pack indexes, encodings and lengths (against `max_chunk`, the repository's maximum
    /// chunk size). Whether it is the block the manifest names is the caller's check (its
    /// id, logical id and totals).
    pub fn decode(bytes: &[u8], params: &TreeParams, max_chunk: u32) -> Result<Block, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("{} bytes is too short for a block", bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err("it does not start with the block magic \"SRBK\"".into());
        }
        if bytes[4] != VERSION {
            return Err(format!(
                "block version {} is not supported (this build reads version {VERSION}): upgrade snaprelay",
                bytes[4]
            ));
        }
        if bytes[5..8] != [0; 3] || bytes[14..16] != [0; 2] {
            return Err("reserved block header bytes are not zero".into());
        }
        let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let packs = u16::from_le_bytes(bytes[12..14].try_into().expect("2 bytes")) as usize;
        if count == 0 || count > params.max_chunks {
            return Err(format!(
                "it holds {count} chunks, outside 1..={}",
                params.max_chunks
            ));
        }
        if packs == 0 || packs > count as usize {
            return Err(format!(
                "its pack table of {packs} is impossible for {count} chunks"
            ));
        }
        let expected = HEADER_LEN + packs * PACK_LEN + count as usize * ENTRY_LEN;
        if bytes.len() != expected {
            return Err(format!(
                "it is {} bytes, but {count} chunks in {packs} packs take {expected}",
                bytes.len()
            ));
        }
        let mut table = Vec::with_capacity(packs);
        for p in bytes[HEADER_LEN..HEADER_LEN + packs * PACK_LEN].chunks_exact(PACK_LEN) {
            let id = PackId(p.try_into().expect("16 bytes"));
            if table.contains(&id) {
                return Err(format!("pack {id} is listed twice in its pack table"));
            }
            table.push(id);
        }
        let mut used = vec![false; packs];
        let mut chunks = Vec::with_capacity(count as usize);
        let mut grouper = Grouper::new(*params);
        let entries = &bytes[HEADER_LEN + packs * PACK_LEN..];
        for (i, e) in entries.chunks_exact(ENTRY_LEN).enumerate() {
            let chunk = ChunkEntry {
                id: Digest(e[..32].try_into().expect("32 bytes")),
                plain_len: u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")),
                pack: u16::from_le_bytes(e[36..38].try_into().expect("2 bytes")),
                encoding: Encoding::from_code(e[38]).map_err(|r| format!("chunk {i}: {r}"))?,
                offset: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
                stored_len: u32::from_le_bytes(e[44..48].try_into().expect("4 bytes")),
            };
            if e[39] != 0 {
                return Err(format!("chunk {i}: a reserved byte is not zero"));
            }
            if chunk.plain_len == 0 || chunk.plain_len > max_chunk {
                return Err(format!(
                    "chunk {i} ({}) has length {}, outside 1..={max_chunk}",
                    chunk.id, chunk.plain_len
                ));
            }
            chunk
                .encoding
                .check_lengths(chunk.stored_len, chunk.plain_len)
                .map_err(|r| format!("chunk {i} ({}): {r}", chunk.id))?;
            let Some(seen) = used.get_mut(chunk.pack as usize) else {
                return Err(format!(
                    "chunk {i} ({}) names pack {} of a table of {packs}",
                    chunk.id, chunk.pack
                ));
            };
            *seen = true;
            // Only the last chunk of a block may end it.
            let ends = grouper.push(&chunk.id);
            if ends && i + 1 < count as usize {
                return Err(format!(
                    "chunk {i} ({}) ends a block by the tree rule, but the block goes on",
                    chunk.id
                ));
            }
            chunks.push(chunk);
        }
        if let Some(p) = used.iter().position(|u| !u) {
            return Err(format!(
                "pack {} of its table is used by no chunk",
                table[p]
            ));
        }
        Ok(Block {
            packs: table,
            chunks,
        })
    }

    pub fn logical_id(&self) -> Digest {
        let mut h = LogicalHasher::new();
        for c in &self.chunks {
            h.push(&c.id, c.plain_len);
        }
        h.finish()
    }

    /// Whether the block ends where the tree rule ends a block (every block but a
    /// snapshot's last must).
    pub fn ends_by_rule(&self, params: &TreeParams) -> bool {
        self.chunks
            .last()
            .is_some_and(|c| params.ends_block(&c.id, self.chunks.len() as u32))
    }

    /// The sum of the chunks' plain lengths.
    pub fn plain_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.plain_len as u64).sum()
    }

    /// Stored bytes this block's chunks take in each pack of its table, each blob counted
    /// once however often the block names it.
    pub fn uses(&self) -> Vec<(PackId, u64)> {
        let mut out: Vec<(PackId, u64)> = self.packs.iter().map(|p| (*p, 0)).collect();
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        for c in &self.chunks {
            if seen.insert((c.pack, c.offset)) {
                out[c.pack as usize].1 += c.stored_len as u64;
            }
        }
        out
    }
}

/// Builds a block chunk by chunk, keeping its pack table.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    block: Block,
}

/// Where a chunk's blob is, by pack id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub pack: PackId,
    pub offset: u32,
    pub stored_len: u32,
    pub encoding: Encoding,
}

impl BlockBuilder {
    pub fn push(&mut self, id: Digest, plain_len: u32, at: Location) {
        let pack = match self.block.packs.iter().position(|p| *p == at.pack) {
            Some(i) => i,
            None => {
                self.block.packs.push(at.pack);
                self.block.packs.len() - 1
            }
        };
        self.block.chunks.push(ChunkEntry {
            id,
            plain_len,
            pack: pack as u16,
            encoding: at.encoding,
            offset: at.offset,
            stored_len: at.stored_len,
        });
    }

    pub fn len(&self) -> usize {
        self.block.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.block.chunks.is_empty()
    }

    pub fn finish(self) -> Block {
        self.block
    }
}

impl Block {
    /// Where chunk `i` is, by pack id.
    pub fn location(&self, i: usize) -> Location {
        let c = &self.chunks[i];
        Location {
            pack: self.packs[c.pack as usize],
            offset: c.offset,
            stored_len: c.stored_len,
            encoding: c.encoding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64, seed: u64) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest::of(&[seed.to_le_bytes(), i.to_le_bytes()].concat()))
            .collect()
    }

    fn group(ids: &[Digest], params: TreeParams) -> Vec<usize> {
        let mut g = Grouper::new(params);
        let mut out = Vec::new();
        let mut n = 0;
        for id in ids {
            n += 1;
            if g.push(id) {
                out.push(n);
                n = 0;
            }
        }
        if n > 0 {
            out.push(n);
        }
        out
    }

    /// Block boundaries recorded from this rule (chunk ids sha256(seed LE || i LE)): logical
    /// ids, and so block reuse across publishers and versions, depend on every boundary.
    /// If this test fails, the rule changed: that is a new format, not a fix.
    #[test]
    fn block_boundaries_match_the_recorded_golden_vectors() {
        let lens = group(&ids(4000, 1), TreeParams::default());
        assert_eq!(lens.iter().sum::<usize>(), 4000);
        assert_eq!(
            lens,
            [484, 315, 67, 403, 132, 92, 292, 165, 118, 230, 115, 566, 451, 468, 64, 38]
        );
        let small = TreeParams {
            min_chunks: 2,
            max_chunks: 6,
            boundary_bits: 2,
        };
        assert_eq!(
            group(&ids(40, 2), small),
            [2, 3, 3, 6, 3, 2, 4, 2, 6, 5, 2, 2]
        );
        // The digest of the block lengths of 200,000 ids pins the rest.
        let many = group(&ids(200_000, 3), TreeParams::default());
        assert_eq!(many.len(), 594);
        assert_eq!(
            Digest::of(format!("{many:?}").as_bytes()).to_hex(),
            "5b7ae357dd433707fb5b294deeed815e9ad84617df2c613495008364d5eb5a33"
        );
    }

    #[test]
    fn an_edit_changes_only_the_blocks_around_it() {
        let a = ids(20_000, 4);
        let mut b = a.clone();
        b[10_000] = Digest([9; 32]);
        b.insert(15_000, Digest([8; 32]));
        let logical = |ids: &[Digest]| {
            let mut out = std::collections::HashSet::new();
            let mut g = Grouper::new(TreeParams::default());
            let mut h = LogicalHasher::new();
            for id in ids {
                h.push(id, 100);
                if g.push(id) {
                    out.insert(std::mem::take(&mut h).finish());
                }
            }
            out.insert(h.finish());
            out
        };
        let (la, lb) = (logical(&a), logical(&b));
        let changed = lb.difference(&la).count();
        assert!(changed <= 4, "{changed} blocks of {} changed", lb.len());
        assert!(lb.len() > 50);
    }

    fn sample_block() -> Block {
        let mut b = BlockBuilder::default();
        let p1 = PackId([1; 16]);
        let p2 = PackId([2; 16]);
        for (i, id) in ids(3, 5).into_iter().enumerate() {
            let pack = if i == 1 { p2 } else { p1 };
            b.push(
                id,
                1000 + i as u32,
                Location {
                    pack,
                    offset: i as u32 * 5000,
                    stored_len: if i == 2 { 10 } else { 1000 + i as u32 },
                    encoding: if i == 2 {
                        Encoding::Zstd
                    } else {
                        Encoding::Raw
                    },
                },
            );
        }
        b.finish()
    }

    fn relaxed() -> TreeParams {
        // Small enough that the sample's chunks never end a block early.
        TreeParams {
            min_chunks: 1000,
            max_chunks: 1024,
            boundary_bits: 8,
        }
    }

    #[test]
    fn block_round_trip_layout_and_logical_id() {
        let block = sample_block();
        let bytes = block.encode();
        assert_eq!(bytes.len(), 16 + 2 * 16 + 3 * 48);
        assert_eq!(&bytes[..16], b"SRBK\x01\0\0\0\x03\0\0\0\x02\0\0\0");
        assert_eq!(&bytes[16..32], &[1; 16]);
        let first = &bytes[48..96];
        assert_eq!(
            &first[32..48],
            &[0xe8, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0]
        );
        let back = Block::decode(&bytes, &relaxed(), 65536).unwrap();
        assert_eq!(back, block);
        assert_eq!(back.location(1).pack, PackId([2; 16]));
        assert_eq!(
            back.uses(),
            vec![(PackId([1; 16]), 1010), (PackId([2; 16]), 1001)]
        );
        // The logical id depends on the chunks and their lengths only.
        let mut moved = block.clone();
        moved.packs[0] = PackId([3; 16]);
        moved.chunks[0].offset = 77;
        assert_ne!(Digest::of(&moved.encode()), Digest::of(&bytes));
        assert_eq!(moved.logical_id(), block.logical_id());
        let mut longer = block.clone();
        longer.chunks[0].plain_len += 1;
        longer.chunks[0].stored_len += 1;
        assert_ne!(longer.logical_id(), block.logical_id());
        let mut h = LogicalHasher::new();
        for c in &block.chunks {
            h.push(&c.id, c.plain_len);
        }
        assert_eq!(h.finish(), block.logical_id());
    }

    #[test]
    fn bad_blocks_are_refused_with_a_reason() {
        let bytes = sample_block().encode();
        let refuse = |b: &[u8], needle: &str| {
            let e = Block::decode(b, &relaxed(), 65536).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        refuse(&bytes[..10], "too short");
        refuse(&bytes[..bytes.len() - 1], "take");
        let mut b = bytes.clone();
        b.push(0);
        refuse(&b, "take");
        let mut b = bytes.clone();
        b[0] = b'X';
        refuse(&b, "magic");
        let mut b = bytes.clone();
        b[4] = 2;
        refuse(&b, "version 2");
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        refuse(&b, "outside");
        let mut b = bytes.clone();
        b[12..14].copy_from_slice(&9u16.to_le_bytes());
        refuse(&b, "impossible");
        // A chunk naming a pack beyond the table; a table entry nobody uses.
        let mut b = bytes.clone();
        b[48 + 36] = 5;
        refuse(&b, "names pack 5");
        let mut b = bytes.clone();
        b[48 + 48 + 36] = 0;
        refuse(&b, "used by no chunk");
        let mut b = bytes.clone();
        b[32..48].copy_from_slice(&[1; 16]);
        refuse(&b, "twice");
        // Lengths: zero, above the repository's maximum, and a raw blob of another size.
        let mut b = bytes.clone();
        b[48 + 32..48 + 36].copy_from_slice(&0u32.to_le_bytes());
        refuse(&b, "outside");
        let e = Block::decode(&bytes, &relaxed(), 1001).unwrap_err();
        assert!(e.contains("outside 1..=1001"), "{e}");
        let mut b = bytes.clone();
        b[48 + 44..48 + 48].copy_from_slice(&5u32.to_le_bytes());
        refuse(&b, "stored as 5");
        let mut b = bytes.clone();
        b[48 + 38] = 2;
        refuse(&b, "aead");
        let mut b = bytes.clone();
        b[48 + 39] = 1;
        refuse(&b, "reserved");
        // A block that the tree rule would have ended earlier.
        let strict = TreeParams {
            min_chunks: 1,
            max_chunks: 1,
            boundary_bits: 8,
        };
        let e = Block::decode(&bytes, &strict, 65536).unwrap_err();
        assert!(e.contains("outside 1..=1"), "{e}");
        let every = TreeParams {
            min_chunks: 1,
            max_chunks: 1024,
            boundary_bits: 1,
        };
        let ids = ids(64, 6);
        let first_boundary = ids.iter().position(|id| every.ends_block(id, 1)).unwrap();
        let mut builder = BlockBuilder::default();
        for id in &ids[..first_boundary + 2] {
            builder.push(
                *id,
                1,
                Location {
                    pack: PackId([1; 16]),
                    offset: 0,
                    stored_len: 1,
                    encoding: Encoding::Raw,
                },
            );
        }
        let e = Block::decode(&builder.finish().encode(), &every, 65536).unwrap_err();
        assert!(e.contains("ends a block by the tree rule"), "{e}");
    }

    #[test]
    fn tree_params_are_validated() {
        TreeParams::default().validate().unwrap();
        for (p, needle) in [
            (
                TreeParams {
                    min_chunks: 0,
                    ..TreeParams::default()
                },
                "min_chunks",
            ),
            (
                TreeParams {
                    min_chunks: 2000,
                    ..TreeParams::default()
                },
                "min_chunks",
            ),
            (
                TreeParams {
                    max_chunks: 70_000,
                    ..TreeParams::default()
                },
                "max_chunks",
            ),
            (
                TreeParams {
                    boundary_bits: 0,
                    ..TreeParams::default()
                },
                "boundary_bits",
            ),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
