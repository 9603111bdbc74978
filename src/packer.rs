//! Writing a snapshot into packs: the data path of a format-2 publish. Given the snapshot's
//! chunk list (from the node's index, or from cutting the file) and a base manifest, it
//! reuses every block whose logical id the base has (nothing read from the file), looks the
//! chunks of the other blocks up among the base's changed blocks, uploads the chunks not
//! found into data packs, writes the new blocks into tree packs, and returns the manifest's
//! `packs` and `blocks`. Taking leases and committing the manifest stay the caller's, in the
//! order they have today: every pack is finished before this returns, so a manifest written
//! afterwards names only packs that exist.
//!
//! [`crate::publish`] packs a snapshot of a pack repository with this. Memory: the block plan
//! (a few dozen bytes per block), the base's changed blocks within [`crate::window::SPAN`]
//! of the position being packed, the chunks this publish uploaded last (at most
//! [`RECENT_UPLOADS`]), one batch of new chunks being read and encoded, and the parts being
//! filled and in flight ([`PartBudget`]); none of it grows with the snapshot.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::inprogress::Announcer;
use crate::manifest_v2::{BlockRef, Manifest, PackRef, Repository};
use crate::pack::upload::{PackWriter, PartBudget};
use crate::pack::{Encoder, Encoding, PackId, PackKind};
use crate::repo::Repo;
use crate::tree::{BlockBuilder, Grouper, Location, LogicalHasher};
use crate::window::Window;

/// What [`pack_snapshot`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    pub blocks_reused: u64,
    pub blocks_written: u64,
    /// Chunks found in the base's changed blocks (or earlier in this snapshot).
    pub chunks_found: u64,
    pub chunks_uploaded: u64,
    /// Plain and stored bytes of the uploaded chunks.
    pub bytes_uploaded: u64,
    pub stored_uploaded: u64,
    pub packs_written: u64,
}

/// A snapshot's tree, as the manifest lists it.
#[derive(Debug, Clone)]
pub struct PackedSnapshot {
    pub packs: Vec<PackRef>,
    pub blocks: Vec<BlockRef>,
    pub chunks: u64,
    pub size: u64,
    pub stats: PackStats,
}

/// One block of the new snapshot, planned from the chunk list alone.
struct Planned {
    first: usize,
    count: usize,
    offset: u64,
    logical: Digest,
}

/// Groups a chunk list into blocks by the tree rule, with their logical ids.
fn plan(descriptor: &Repository, chunks: &dyn ChunkRecords) -> Result<Vec<Planned>> {
    let mut out = Vec::new();
    let mut grouper = Grouper::new(descriptor.tree);
    let mut hasher = LogicalHasher::new();
    let (mut first, mut offset, mut block_offset) = (0, 0u64, 0u64);
    let total = chunks.count();
    for (i, record) in chunks.records().enumerate() {
        let (id, len) = record?;
        hasher.push(&id, len as u32);
        offset += len;
        if grouper.push(&id) || i as u64 + 1 == total {
            out.push(Planned {
                first,
                count: i + 1 - first,
                offset: block_offset,
                logical: std::mem::take(&mut hasher).finish(),
            });
            first = i + 1;
            block_offset = offset;
        }
    }
    Ok(out)
}

/// A snapshot's chunk list, `(sha256, length)` in file order, read in passes: the plan
/// reads it whole, in order, holding only a block at a time, and packing reads each
/// block's records when it packs the block. A chunk index file is read from disk; a list
/// in memory serves tests and small files.
pub trait ChunkRecords: Sync {
    fn count(&self) -> u64;
    fn records(&self) -> Box<dyn Iterator<Item = Result<(Digest, u64)>> + '_>;
    /// Records `first..first + count`.
    fn read(&self, first: u64, count: usize) -> Result<Vec<(Digest, u64)>>;
}

/// A chunk list that cannot be read (or read back).
fn index_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::io("reading the chunk list", std::io::Error::other(e))
}

impl ChunkRecords for snaprelay_contract::chunking::IndexFile {
    fn count(&self) -> u64 {
        self.header().chunks
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<(Digest, u64)>> + '_> {
        Box::new(
            snaprelay_contract::chunking::IndexFile::records(self).map(|r| r.map_err(index_error)),
        )
    }

    fn read(&self, first: u64, count: usize) -> Result<Vec<(Digest, u64)>> {
        snaprelay_contract::chunking::IndexFile::read(self, first, count).map_err(index_error)
    }
}

impl ChunkRecords for [(Digest, u64)] {
    fn count(&self) -> u64 {
        self.len() as u64
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<(Digest, u64)>> + '_> {
        Box::new(self.iter().map(|&r| Ok(r)))
    }

    fn read(&self, first: u64, count: usize) -> Result<Vec<(Digest, u64)>> {
        let first = first as usize;
        self.get(first..first + count)
            .map(<[_]>::to_vec)
            .ok_or_else(|| index_error(format!("records {first}.. are past its end")))
    }
}

impl ChunkRecords for Vec<(Digest, u64)> {
    fn count(&self) -> u64 {
        self.as_slice().count()
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<(Digest, u64)>> + '_> {
        self.as_slice().records()
    }

    fn read(&self, first: u64, count: usize) -> Result<Vec<(Digest, u64)>> {
        self.as_slice().read(first, count)
    }
}

/// The manifest's pack table, built as packs are used.
#[derive(Default)]
struct PackTable {
    packs: Vec<PackRef>,
    index: HashMap<PackId, u32>,
}

impl PackTable {
    fn slot(&mut self, id: PackId, kind: PackKind, size: u64) -> u32 {
        *self.index.entry(id).or_insert_with(|| {
            self.packs.push(PackRef {
                id,
                kind,
                size,
                used: 0,
            });
            (self.packs.len() - 1) as u32
        })
    }
}

/// The pack being filled of one kind, rotated before it would outgrow `pack_size` (its
/// trailer included).
struct Filling<'a> {
    kind: PackKind,
    pack_size: u64,
    budget: PartBudget,
    writer: Option<PackWriter>,
    written: Vec<(PackId, u64)>,
    /// Told of every finished pack (streaming).
    announcer: Option<&'a Announcer>,
}

impl Filling<'_> {
    async fn append(
        &mut self,
        repo: &Repo,
        id: Digest,
        encoding: Encoding,
        plain_len: u32,
        stored: Bytes,
    ) -> Result<Location> {
        let full = self
            .writer
            .as_ref()
            .is_some_and(|w| w.is_full() || w.size_with(stored.len()) > self.pack_size);
        if full {
            self.finish_current().await?;
        }
        let (kind, budget) = (self.kind, &self.budget);
        let writer = self
            .writer
            .get_or_insert_with(|| repo.new_pack(kind, budget.clone()));
        let stored_len = stored.len() as u32;
        let offset = writer.append(id, encoding, plain_len, stored).await?;
        Ok(Location {
            pack: writer.id(),
            offset,
            stored_len,
            encoding,
        })
    }

    async fn finish_current(&mut self) -> Result<()> {
        if let Some(writer) = self.writer.take() {
            let written = writer.finish().await?;
            self.written.push((written.id, written.size));
            if let Some(announcer) = self.announcer {
                announcer.pack_finished(written.id, written.size);
            }
        }
        Ok(())
    }
}

/// Where a snapshot's chunk list came from, for errors: the file was cut here (a chunk
/// that does not match means the file changed since), or the node's chunk index says so.
#[derive(Debug, Clone, Copy)]
pub enum ChunkList<'a> {
    Cut,
    Index(&'a std::path::Path),
}

/// Chunks uploaded by one publish that it remembers, to store a chunk that repeats once:
/// half a GiB's worth of 16 KiB chunks, about 5 MiB. A repeat further away is stored again, as a
/// blob of its own (more bytes, never a wrong manifest); what a publish holds does not grow
/// with the snapshot.
const RECENT_UPLOADS: usize = 1 << 15;

/// Where a publish finds the chunks it packs blocks of: the base's, from its blocks that
/// changed, held around the corresponding position ([`Window`]), and the ones it uploaded
/// itself, the most recent [`RECENT_UPLOADS`] of them.
struct Known {
    base: Window<Location>,
    /// The base block of each window candidate, and where it starts in the base's file.
    candidates: Vec<(usize, u64)>,
    uploads: HashMap<Digest, Location>,
    order: std::collections::VecDeque<Digest>,
    recent: usize,
}

impl Known {
    fn remembering(recent: usize) -> Known {
        Known {
            base: Window::new(Vec::new(), crate::window::SPAN),
            candidates: Vec::new(),
            uploads: HashMap::new(),
            order: Default::default(),
            recent,
        }
    }

    /// Looks in `base`'s blocks that no planned block reuses whole, through a window.
    fn with_base(&mut self, base: &Manifest, reused: &std::collections::HashSet<usize>) {
        let mut ranges = Vec::new();
        for (i, (at, b)) in base.block_offsets().enumerate() {
            if !reused.contains(&i) {
                ranges.push((at, at + b.bytes));
                self.candidates.push((i, at));
            }
        }
        self.base = Window::new(ranges, crate::window::SPAN);
    }

    /// Loads the base blocks the window reaches for the new block at `start..end`, and
    /// drops the ones far behind.
    async fn follow(
        &mut self,
        repo: &Repo,
        descriptor: &Repository,
        base: &Manifest,
        (start, end): (u64, u64),
    ) -> Result<()> {
        for c in self.base.to_request(end) {
            let (i, mut at) = self.candidates[c];
            let block = repo.read_block(descriptor, base, i).await?;
            let mut chunks = Vec::with_capacity(block.chunks.len());
            for (j, chunk) in block.chunks.iter().enumerate() {
                chunks.push((chunk.id, at, block.location(j)));
                at += chunk.plain_len as u64;
            }
            self.base.insert(c, chunks);
        }
        self.base.evict(start);
        Ok(())
    }

    /// Where `id` is, for the new snapshot's position `at` (a base hit re-aligns the window).
    fn find(&mut self, id: &Digest, at: u64) -> Option<&Location> {
        match self.uploads.contains_key(id) {
            true => self.uploads.get(id),
            false => self.base.find(id, at),
        }
    }

    fn get(&self, id: &Digest) -> Option<&Location> {
        self.uploads.get(id).or_else(|| self.base.get(id))
    }

    /// Where this publish uploaded `id`, if it remembers: what an announcement lists (a
    /// follower holds the others, from the base, or fetches them after the manifest).
    fn uploaded_here(&self, id: &Digest) -> Option<&Location> {
        self.uploads.get(id)
    }

    fn uploaded(&mut self, id: Digest, at: Location) {
        if self.uploads.insert(id, at).is_none() {
            self.order.push_back(id);
        }
    }

    /// Called between blocks (a block's own chunks stay while it is built).
    fn forget_old_uploads(&mut self) {
        while self.order.len() > self.recent {
            if let Some(id) = self.order.pop_front() {
                self.uploads.remove(&id);
            }
        }
    }
}

/// Plain bytes of missing chunks read and encoded at once, in a publish: one batch is what
/// a publish holds besides the parts in flight.
const BATCH_BYTES: u64 = 2 << 20;

/// Reads, checks and encodes `batch` (`(id, file offset, length)`) off the reactor; gives
/// the encoder back with the result.
async fn encode_batch(
    file: Arc<File>,
    file_name: &str,
    index: Option<&std::path::Path>,
    mut enc: Encoder,
    batch: Vec<(Digest, u64, u64)>,
) -> Result<(Encoder, Result<Vec<(Digest, u32, Bytes, Encoding)>>)> {
    let name = file_name.to_owned();
    let index = index.map(std::path::Path::to_owned);
    tokio::task::spawn_blocking(move || {
        let result: Result<Vec<(Digest, u32, Bytes, Encoding)>> = batch
            .iter()
            .map(|&(id, offset, len)| {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| Error::io(format!("reading {name}"), e))?;
                let actual = Digest::of(&buf);
                if actual != id {
                    return Err(match &index {
                        Some(index) => Error::IndexMismatch {
                            data: name.clone().into(),
                            index: index.clone(),
                            offset,
                            len,
                            reason: format!("the bytes hash to {actual}, expected {id}"),
                        },
                        None => Error::io(
                            format!("reading {name}"),
                            std::io::Error::other(format!(
                                "the {len} bytes at offset {offset} do not hash to chunk {id}: \
                                 the file changed after it was cut"
                            )),
                        ),
                    });
                }
                let (stored, encoding) = enc.encode(Bytes::from(buf));
                Ok((id, len as u32, stored, encoding))
            })
            .collect();
        (enc, result)
    })
    .await
    .map_err(|e| Error::io("packing task", std::io::Error::other(e)))
}

/// Writes the snapshot `file`, cut into `chunks` (id and length, in file order), into packs
/// of `repo` (described by `descriptor`), reusing what `base` (a validated manifest of the
/// same repository) already stores. Every chunk read from the file is checked against its id
/// before it is stored. `file_name` names the file in errors, `listed` where `chunks` came
/// from. With an `announcer` (streaming), every chunk uploaded is announced, at each offset
/// where the snapshot has it, with where its blob is, and every data pack once finished.
#[allow(clippy::too_many_arguments)]
pub async fn pack_snapshot(
    repo: &Repo,
    descriptor: &Repository,
    base: Option<&Manifest>,
    file: Arc<File>,
    file_name: &str,
    chunks: &dyn ChunkRecords,
    listed: ChunkList<'_>,
    budget: PartBudget,
    announcer: Option<&Announcer>,
) -> Result<PackedSnapshot> {
    let snapshot = (base, file.clone(), file_name, chunks, listed);
    match pack(
        repo,
        descriptor,
        snapshot,
        budget.clone(),
        announcer,
        RECENT_UPLOADS,
    )
    .await?
    {
        Attempt::Done(packed) => Ok(packed),
        Attempt::BaseGone(e) => {
            // A pack of the base may be gone legitimately: once this publish's lease
            // lapsed, a GC elsewhere may have deleted the base manifest and the packs only
            // it used. Packed again as if there were no base (more is uploaded, and no
            // manifest names a pack that is gone; what the first attempt uploaded is
            // garbage for a GC). The retry announces nothing: its list would start over.
            tracing::warn!(base = base.map(|m| m.last_log_index), error = %e, "not packing onto the base manifest, whose blocks do not read back; uploading every chunk");
            let snapshot = (None, file, file_name, chunks, listed);
            match pack(repo, descriptor, snapshot, budget, None, RECENT_UPLOADS).await? {
                Attempt::Done(packed) => Ok(packed),
                Attempt::BaseGone(e) => Err(e),
            }
        }
    }
}

/// How one packing attempt ended.
enum Attempt {
    Done(PackedSnapshot),
    /// A block of the base did not read back (not a transient failure).
    BaseGone(Error),
}

/// [`pack_snapshot`], remembering `recent_uploads` of the chunks it uploads.
#[allow(clippy::type_complexity)]
async fn pack(
    repo: &Repo,
    descriptor: &Repository,
    (base, file, file_name, chunks, listed): (
        Option<&Manifest>,
        Arc<File>,
        &str,
        &dyn ChunkRecords,
        ChunkList<'_>,
    ),
    budget: PartBudget,
    announcer: Option<&Announcer>,
    recent_uploads: usize,
) -> Result<Attempt> {
    let planned = plan(descriptor, chunks)?;
    let mut stats = PackStats::default();

    // Which base blocks match a new block by content; the chunks of the others are looked
    // up near where they sit (a window over the base's blocks, loaded as packing moves on).
    let mut known = Known::remembering(recent_uploads);
    let base_logical: HashMap<Digest, usize> = base
        .map(|m| {
            m.blocks
                .iter()
                .enumerate()
                .map(|(i, b)| (b.logical, i))
                .collect()
        })
        .unwrap_or_default();
    if let Some(m) = base {
        let reused = planned
            .iter()
            .filter_map(|p| base_logical.get(&p.logical).copied())
            .collect();
        known.with_base(m, &reused);
    }
    let base_offsets: Vec<u64> = base
        .map(|m| m.block_offsets().map(|(at, _)| at).collect())
        .unwrap_or_default();

    let mut table = PackTable::default();
    let mut blocks = Vec::with_capacity(planned.len());
    let mut data = Filling {
        kind: PackKind::Data,
        pack_size: descriptor.pack_size,
        budget: budget.clone(),
        writer: None,
        written: Vec::new(),
        announcer,
    };
    // Tree packs are one part at most, so each is a single PUT and the tree's pending bytes
    // stay within a part however large the snapshot (its blocks are ~2.5 MB per GiB).
    let mut tree = Filling {
        kind: PackKind::Tree,
        pack_size: descriptor.pack_size.min(budget.part_size() as u64),
        budget,
        writer: None,
        written: Vec::new(),
        announcer: None,
    };
    let mut encoder = Some(Encoder::new(descriptor.compression()));
    for p in &planned {
        if let Some(&b) = base_logical.get(&p.logical) {
            // Same content: the base's block as it is, its packs carried over.
            let m = base.expect("a logical id came from the base");
            let old = &m.blocks[b];
            let mut new = old.clone();
            let tree_pack = &m.packs[old.pack as usize];
            new.pack = table.slot(tree_pack.id, PackKind::Tree, tree_pack.size);
            table.packs[new.pack as usize].used += old.stored_len as u64;
            for (slot, n) in new.uses.iter_mut() {
                let data_pack = &m.packs[*slot as usize];
                *slot = table.slot(data_pack.id, PackKind::Data, data_pack.size);
                table.packs[*slot as usize].used += *n;
            }
            blocks.push(new);
            stats.blocks_reused += 1;
            known.base.anchor(p.offset, base_offsets[b]);
            continue;
        }
        known.forget_old_uploads();
        // The chunks of this block the store lacks (each once, where it first occurs).
        let mine = &chunks.read(p.first as u64, p.count)?;
        // The list is read twice (the plan, then here): a chunk index the node rewrote in
        // between must not give a block other chunks than the ones it was planned with.
        let mut logical = LogicalHasher::new();
        for (id, len) in mine {
            logical.push(id, *len as u32);
        }
        if logical.finish() != p.logical {
            return Err(Error::io(
                format!("reading the chunk list of {file_name}"),
                std::io::Error::other(format!(
                    "records {}..{} changed while the publish read them",
                    p.first,
                    p.first + p.count
                )),
            ));
        }
        if let Some(m) = base {
            let end = p.offset + mine.iter().map(|c| c.1).sum::<u64>();
            match known.follow(repo, descriptor, m, (p.offset, end)).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => return Ok(Attempt::BaseGone(e)),
            }
        }
        let mut missing = Vec::new();
        let mut listed_here = std::collections::HashSet::new();
        let mut at = p.offset;
        for (id, len) in mine {
            if known.find(id, at).is_none() && listed_here.insert(*id) {
                missing.push((*id, at, *len));
            }
            at += len;
        }
        // Appended in file order, each announced right after its append (before the next
        // one can finish the pack), repeats of uploaded chunks wherever they occur. The
        // missing chunks are read and encoded a batch of at most BATCH_BYTES at a time,
        // when the first of the batch is reached: what is held is one batch, not a block.
        let index = match listed {
            ChunkList::Index(path) => Some(path),
            ChunkList::Cut => None,
        };
        let mut encoded: std::collections::VecDeque<(Digest, u32, Bytes, Encoding)> =
            Default::default();
        let mut next = 0;
        let mut offset = p.offset;
        for (id, len) in mine {
            if encoded.is_empty() && missing.get(next).is_some_and(|(m, _, _)| m == id) {
                let mut end = next;
                let mut bytes = 0u64;
                while end < missing.len() && (end == next || bytes + missing[end].2 <= BATCH_BYTES)
                {
                    bytes += missing[end].2;
                    end += 1;
                }
                let enc = encoder
                    .take()
                    .expect("the encoder is put back after each batch");
                let batch = missing[next..end].to_vec();
                let (enc, result) =
                    encode_batch(file.clone(), file_name, index, enc, batch).await?;
                encoder = Some(enc);
                encoded = result?.into();
                next = end;
            }
            if encoded.front().is_some_and(|(e, ..)| e == id) {
                if let Some((id, plain_len, stored, encoding)) = encoded.pop_front() {
                    stats.chunks_uploaded += 1;
                    stats.bytes_uploaded += plain_len as u64;
                    stats.stored_uploaded += stored.len() as u64;
                    let at = data.append(repo, id, encoding, plain_len, stored).await?;
                    known.uploaded(id, at);
                }
            }
            if let Some(announcer) = announcer {
                if let Some(at) = known.uploaded_here(id) {
                    announcer.plan_blob(offset, *len, at);
                }
            }
            offset += len;
        }
        stats.chunks_found += (p.count - missing.len()) as u64;
        let mut builder = BlockBuilder::default();
        for (id, len) in mine {
            let at = known.get(id).ok_or_else(|| {
                Error::io(
                    "packing",
                    std::io::Error::other(format!("chunk {id} was neither found nor uploaded")),
                )
            })?;
            builder.push(*id, *len as u32, *at);
        }
        let block = builder.finish();
        let plain = Bytes::from(block.encode());
        let block_id = Digest::of(&plain);
        let plain_len = plain.len() as u32;
        let (stored, encoding) = encoder.as_mut().expect("the encoder is back").encode(plain);
        let loc = tree
            .append(repo, block_id, encoding, plain_len, stored)
            .await?;
        // Sizes of new packs are filled in once they are finished.
        let pack = table.slot(loc.pack, PackKind::Tree, 0);
        table.packs[pack as usize].used += loc.stored_len as u64;
        let uses = block
            .uses()
            .into_iter()
            .map(|(id, n)| {
                let slot = table.slot(id, PackKind::Data, 0);
                table.packs[slot as usize].used += n;
                (slot, n)
            })
            .collect();
        blocks.push(BlockRef {
            id: block_id,
            logical: p.logical,
            pack,
            offset: loc.offset,
            stored_len: loc.stored_len,
            encoding: loc.encoding,
            chunks: p.count as u32,
            bytes: mine.iter().map(|c| c.1).sum(),
            uses,
        });
        stats.blocks_written += 1;
    }
    // Data packs first, then tree packs: what the tree names exists before the tree does.
    data.finish_current().await?;
    tree.finish_current().await?;
    for (id, size) in data.written.iter().chain(&tree.written) {
        stats.packs_written += 1;
        if let Some(&slot) = table.index.get(id) {
            table.packs[slot as usize].size = *size;
        }
    }
    // Base packs found through the chunk map carry the base's recorded size.
    if let Some(m) = base {
        for p in &m.packs {
            if let Some(&slot) = table.index.get(&p.id) {
                table.packs[slot as usize].size = p.size;
            }
        }
    }
    // A blob that several blocks name is counted by each: bounded by what the pack holds.
    for p in &mut table.packs {
        p.used = p.used.min(p.size);
    }
    Ok(Attempt::Done(PackedSnapshot {
        packs: table.packs,
        size: blocks.iter().map(|b| b.bytes).sum(),
        blocks,
        chunks: chunks.count(),
        stats,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::test_data::{file_of, random};
    use crate::chunk::ChunkParams;
    use crate::manifest_v2::{self as v2, NewRepository};
    use crate::pack::decode_blob;
    use crate::store::{Store, StoreSettings, StoreUrl};

    fn cut(data: &[u8], params: ChunkParams) -> Vec<(Digest, u64)> {
        crate::chunk::index_to_scratch(data, params)
            .unwrap()
            .read_all()
            .unwrap()
            .chunks
    }

    /// [`pack_snapshot`] of `data`, cut into `chunks`, onto `base`: what most tests here do.
    async fn pack_cut(
        repo: &Repo,
        d: &Repository,
        base: Option<&Manifest>,
        data: &[u8],
        chunks: &dyn ChunkRecords,
        budget: PartBudget,
    ) -> Result<PackedSnapshot> {
        pack_snapshot(
            repo,
            d,
            base,
            file_of(data),
            "snapshot",
            chunks,
            ChunkList::Cut,
            budget,
            None,
        )
        .await
    }

    /// A new repository in memory.
    async fn memory_repo() -> Repo {
        let store = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap()
    }

    fn manifest(d: &Repository, packed: &PackedSnapshot, data: &[u8], index: u64) -> Manifest {
        Manifest {
            format: v2::MANIFEST_FORMAT,
            cluster_id: d.cluster_id.clone(),
            incarnation: d.incarnation.clone(),
            last_log_index: index,
            last_log_term: 1,
            raft_meta: serde_json::json!({}),
            size: packed.size,
            sha256: Digest::of(data),
            chunks: packed.chunks,
            packs: packed.packs.clone(),
            blocks: packed.blocks.clone(),
            created_at: chrono::Utc::now(),
            publisher: v2::Publisher {
                node_id: None,
                version: "test".into(),
            },
        }
    }

    /// Reads a snapshot back the way a follower does: every block and blob checked.
    async fn read_back(repo: &Repo, d: &Repository, m: &Manifest) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..m.blocks.len() {
            let block = repo.read_block(d, m, i).await.unwrap();
            for (j, c) in block.chunks.iter().enumerate() {
                let at = block.location(j);
                let size = m.packs.iter().find(|p| p.id == at.pack).unwrap().size;
                let stored = repo
                    .read_pack(
                        &at.pack,
                        size,
                        at.offset as u64..at.offset as u64 + at.stored_len as u64,
                    )
                    .await
                    .unwrap();
                out.extend_from_slice(
                    &decode_blob(&stored, c.encoding, c.plain_len, &c.id).unwrap(),
                );
            }
        }
        out
    }

    /// Packs never outgrow the repository's pack size, trailer included, and tree packs stay
    /// within one part, so each is a single PUT and the tree's pending bytes are bounded by a
    /// part however large the snapshot.
    #[tokio::test]
    async fn packs_keep_to_the_pack_size_and_tree_packs_to_one_part() {
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", crate::chunk::test_data::small_tree_settings());
        // About 18 KB of tree blocks: several parts of 8 KiB.
        let part = 8 << 10;
        let a = random(6 << 20, 3);
        let ca = cut(&a, d.chunking);
        let packed = pack_cut(&repo, &d, None, &a, &ca, PartBudget::new(2, part))
            .await
            .unwrap();
        let m = manifest(&d, &packed, &a, 1);
        m.validate(&d).unwrap();
        let tree: Vec<u64> = m
            .packs
            .iter()
            .filter(|p| p.kind == PackKind::Tree)
            .map(|p| p.size)
            .collect();
        assert!(tree.len() >= 2, "the tree spans several packs: {tree:?}");
        assert!(tree.iter().all(|&s| s <= part as u64), "{tree:?}");
        let data: Vec<u64> = m
            .packs
            .iter()
            .filter(|p| p.kind == PackKind::Data)
            .map(|p| p.size)
            .collect();
        assert!(data.len() >= 6, "{data:?}");
        assert!(data.iter().all(|&s| s <= d.pack_size), "{data:?}");
        assert!(
            data.iter()
                .filter(|&&s| s > d.pack_size - (64 << 10))
                .count()
                >= data.len() - 1,
            "packs are filled close to the pack size: {data:?}"
        );
        assert_eq!(read_back(&repo, &d, &m).await, a);
    }

    /// A first snapshot, then one with scattered edits onto it: the second reuses every
    /// block the edits missed, uploads about the edited chunks, and both read back whole.
    #[tokio::test]
    async fn an_incremental_snapshot_reuses_blocks_and_uploads_the_change() {
        let repo = memory_repo().await;
        // Small tree parameters, so that 8 MiB makes dozens of blocks.
        let d = v2::Repository::new("c", crate::chunk::test_data::small_tree_settings());
        let budget = PartBudget::new(2, 1 << 20);

        // Half random, half compressible text.
        let mut a = random(4 << 20, 1);
        a.extend(
            (0..200_000u32)
                .flat_map(|i| format!("key{i:08} value {} \n", i % 97).into_bytes())
                .take(4 << 20),
        );
        let ca = cut(&a, d.chunking);
        let first = pack_cut(&repo, &d, None, &a, &ca, budget.clone())
            .await
            .unwrap();
        let ma = manifest(&d, &first, &a, 1);
        ma.validate(&d).unwrap();
        assert_eq!(first.stats.blocks_reused, 0);
        assert_eq!(first.stats.chunks_uploaded as usize, ca.len());
        assert!(first.stats.packs_written >= 4, "{:?}", first.stats);
        assert!(
            first.stats.stored_uploaded < first.stats.bytes_uploaded * 8 / 10,
            "the text half compresses: {:?}",
            first.stats
        );
        assert_eq!(read_back(&repo, &d, &ma).await, a);

        // Four 100-byte overwrites and an insertion, spread over the file.
        let mut b = a.clone();
        for k in 1..=4 {
            let at = k * b.len() / 5;
            b[at..at + 100].copy_from_slice(&random(100, 10 + k as u64));
        }
        b.splice(6 << 20..6 << 20, random(3000, 20));
        let cb = cut(&b, d.chunking);
        let second = pack_cut(&repo, &d, Some(&ma), &b, &cb, budget)
            .await
            .unwrap();
        let mb = manifest(&d, &second, &b, 2);
        mb.validate(&d).unwrap();
        let s = second.stats;
        assert!(s.blocks_written <= 12, "{s:?}");
        assert!(s.blocks_reused >= 2 * s.blocks_written, "{s:?}");
        assert!(s.chunks_found > 0, "{s:?}");
        assert!(s.bytes_uploaded < 20 * 65536, "{s:?}");
        assert_eq!(read_back(&repo, &d, &mb).await, b);
        // Every pack either manifest names exists, with the size it records.
        let listed = repo.list_packs().await.unwrap();
        for p in ma.packs.iter().chain(&mb.packs) {
            assert_eq!(listed[&p.id].size, p.size, "{p:?}");
        }
    }

    /// A state that repeats itself (the kv example's values, say) names one blob from many
    /// places: the manifest still validates, and what it says a pack holds in use never
    /// exceeds the pack (found by a 3-node cluster whose followers quarantined such a
    /// manifest as invalid).
    #[tokio::test]
    async fn a_snapshot_of_repeated_chunks_validates() {
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", NewRepository::default());
        // 4 MiB of one 64 KiB pattern: the same few chunks over and over.
        let unit = random(64 << 10, 9);
        let a: Vec<u8> = unit.iter().copied().cycle().take(4 << 20).collect();
        let ca = cut(&a, d.chunking);
        let packed = pack_cut(&repo, &d, None, &a, &ca, PartBudget::new(2, 1 << 20))
            .await
            .unwrap();
        let m = manifest(&d, &packed, &a, 1);
        m.validate(&d).unwrap();
        for p in &m.packs {
            assert!(p.used <= p.size, "{p:?}");
        }
        assert_eq!(read_back(&repo, &d, &m).await, a);
    }

    /// A publish remembers only its recent uploads: a chunk that repeats after it was
    /// forgotten is stored again, and the manifest is still valid and reads back. With
    /// room to remember, it is stored once.
    #[tokio::test]
    async fn a_chunk_repeated_after_it_was_forgotten_is_stored_again() {
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", crate::chunk::test_data::small_tree_settings());
        let x = random(256 << 10, 31);
        let mut a = x.clone();
        a.extend(random(4 << 20, 32));
        a.extend(&x);
        let ca = cut(&a, d.chunking);
        let distinct = ca
            .iter()
            .map(|c| c.0)
            .collect::<std::collections::HashSet<_>>()
            .len() as u64;
        assert!(distinct < ca.len() as u64, "x repeats");
        for (recent, stored_twice) in [(8, true), (RECENT_UPLOADS, false)] {
            let snapshot = (
                None,
                file_of(&a),
                "a",
                &ca as &dyn ChunkRecords,
                ChunkList::Cut,
            );
            let packed = pack(
                &repo,
                &d,
                snapshot,
                PartBudget::new(2, 1 << 20),
                None,
                recent,
            )
            .await
            .unwrap();
            let Attempt::Done(packed) = packed else {
                panic!("there is no base")
            };
            let m = manifest(&d, &packed, &a, 1);
            m.validate(&d).unwrap();
            assert_eq!(read_back(&repo, &d, &m).await, a);
            let uploaded = packed.stats.chunks_uploaded;
            assert_eq!(
                uploaded > distinct,
                stored_twice,
                "remembering {recent}: {uploaded} of {distinct}"
            );
        }
    }

    /// A chunk list that reads back otherwise the second time (a node rewriting its index
    /// while the publish reads it) fails the publish; nothing is planned on one list and
    /// packed from another.
    #[tokio::test]
    async fn a_chunk_list_that_changes_between_its_reads_is_refused() {
        struct Changing(Vec<(Digest, u64)>);
        impl ChunkRecords for Changing {
            fn count(&self) -> u64 {
                self.0.count()
            }
            fn records(&self) -> Box<dyn Iterator<Item = Result<(Digest, u64)>> + '_> {
                self.0.records()
            }
            fn read(&self, first: u64, count: usize) -> Result<Vec<(Digest, u64)>> {
                let mut r = self.0.read(first, count)?;
                r[0].0 = Digest::of(b"another chunk");
                Ok(r)
            }
        }
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", NewRepository::default());
        let a = random(1 << 20, 41);
        let list = Changing(cut(&a, d.chunking));
        let e = pack_cut(&repo, &d, None, &a, &list, PartBudget::new(2, 1 << 20))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("changed while the publish read them"),
            "{e}"
        );
    }

    /// A base whose tree pack is gone (a GC deleted it once the publish's lease lapsed, say)
    /// is not packed onto: the snapshot is packed whole into new packs, and its manifest
    /// names none of the base's (found by the GC interleavings of packs: the publish failed
    /// with "pack … is missing" instead of packing again).
    #[tokio::test]
    async fn a_base_whose_blocks_are_gone_is_not_packed_onto() {
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", crate::chunk::test_data::small_tree_settings());
        let budget = PartBudget::new(2, 1 << 20);
        let a = random(2 << 20, 5);
        let ca = cut(&a, d.chunking);
        let first = pack_cut(&repo, &d, None, &a, &ca, budget.clone())
            .await
            .unwrap();
        let ma = manifest(&d, &first, &a, 1);
        for p in ma.packs.iter().filter(|p| p.kind == PackKind::Tree) {
            repo.delete_pack(&p.id).await.unwrap();
        }
        // Every block changed, so every base block would be read for its chunks.
        let mut b = a.clone();
        for k in 0..64 {
            b[k * (32 << 10)] ^= 1;
        }
        let cb = cut(&b, d.chunking);
        let second = pack_cut(&repo, &d, Some(&ma), &b, &cb, budget)
            .await
            .unwrap();
        let mb = manifest(&d, &second, &b, 2);
        mb.validate(&d).unwrap();
        assert_eq!(second.stats.blocks_reused, 0, "{:?}", second.stats);
        assert_eq!(second.stats.chunks_uploaded as usize, cb.len());
        assert!(mb
            .packs
            .iter()
            .all(|p| !ma.packs.iter().any(|q| q.id == p.id)));
        assert_eq!(read_back(&repo, &d, &mb).await, b);
    }

    /// A file that no longer matches its chunk list is refused, not stored.
    #[tokio::test]
    async fn a_chunk_that_does_not_match_its_id_is_not_stored() {
        let repo = memory_repo().await;
        let d = v2::Repository::new("c", NewRepository::default());
        let a = random(300_000, 3);
        let chunks = cut(&a, d.chunking);
        let mut changed = a.clone();
        changed[150_000] ^= 1;
        let e = pack_cut(
            &repo,
            &d,
            None,
            &changed,
            &chunks,
            PartBudget::new(2, 1 << 20),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("do not hash to chunk"), "{e}");
    }
}
