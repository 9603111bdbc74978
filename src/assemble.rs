//! Assembling a format-2 snapshot into a file: the data path of a follower's fetch. Blocks
//! whose logical id a local snapshot has are copied from it with `copy_file_range` (a reflink
//! where the file system has them, an in-kernel copy otherwise), neighbouring blocks in one
//! call; every other block is read from its tree pack (neighbouring blocks in one ranged
//! GET, a few ranges ahead of their use) and checked against the manifest, its
//! chunks that the local snapshot's other blocks hold are copied likewise, and the rest are
//! read from the data packs in coalesced ranged GETs ([`crate::pack::plan`]),
//! each blob decoded and checked against its id before it is written where it belongs.
//!
//! A local snapshot is either *trusted* (the caller knows it is a file it assembled and
//! verified, unchanged since), and its bytes are copied without being read, or not, and then
//! every chunk taken from it is read, hashed, and written from the bytes hashed (a kernel
//! copy would copy whatever the file holds by then); a chunk that does not match is fetched
//! from the store instead. Either way the assembled file is the chunks the
//! manifest names, in its order (see docs/format.md for why that needs no whole-file hash).
//!
//! [`crate::fetch`] assembles into its staging file with this (a resumed staging file is its
//! own untrusted local snapshot). Memory: at most [`TREE_RANGES_AHEAD`] + 2 ranges of tree
//! blocks of at most [`TREE_RANGE`] (queued, one read and waiting for room, one being
//! taken), a few blocks and their ranges in flight, [`WRITES_QUEUED`] + 2 runs of local
//! bytes of at most [`RUN_BYTES`] (queued, being written, being hashed),
//! plus the chunk map of the local snapshot's changed blocks (proportional to the change;
//! [`crate::window`] is what would bound it, not used yet).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::manifest_v2::{Manifest, Repository};
use crate::pack::decode_blob;
#[cfg(test)]
use crate::pack::plan::MAX_RANGES_IN_FLIGHT;
use crate::pack::plan::{coalesce, Needed, RangeLimits};
use crate::repo::Repo;
use crate::tree::Block;

/// Blocks whose chunks are fetched at once (their ranges share `limits.in_flight`).
const BLOCKS_IN_FLIGHT: usize = 4;
/// Bytes of a local file read in one call when its chunks are checked.
const RUN_BYTES: u64 = 4 << 20;
/// Tree blocks stored close together are read in ranges of at most this many bytes (about
/// 70 blocks: a GiB's tree in a few requests instead of one per block)...
const TREE_RANGE: u64 = 1 << 20;
/// ...with at most this many ranges read ahead of the block being planned.
const TREE_RANGES_AHEAD: usize = 2;

/// A snapshot already on this machine: with its (validated) manifest, or with the chunks
/// found by cutting it (a snapshot the node built itself, which the store has no manifest
/// for).
pub struct LocalSnapshot<'a> {
    pub file: Arc<File>,
    pub manifest: Option<&'a Manifest>,
    /// Chunk id → offset in `file`, of a file cut with the repository's chunking.
    pub cut: HashMap<Digest, u64>,
    /// The caller vouches that the file is what it verified against `manifest`.
    pub trusted: bool,
}

impl<'a> LocalSnapshot<'a> {
    /// A local snapshot known by its manifest.
    pub fn of_manifest(file: Arc<File>, manifest: &'a Manifest, trusted: bool) -> Self {
        LocalSnapshot {
            file,
            manifest: Some(manifest),
            cut: HashMap::new(),
            trusted,
        }
    }
}

/// What [`assemble`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssembleStats {
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    pub blocks_fetched: u64,
    /// Chunks of changed blocks taken from the local snapshot.
    pub chunks_copied: u64,
    pub chunks_fetched: u64,
    /// Plain bytes of the chunks fetched.
    pub bytes_fetched: u64,
    /// Chunks left as the output held them (prefetched).
    pub chunks_in_place: u64,
    /// Stored bytes read from data packs (gaps read through included).
    pub bytes_read: u64,
    pub ranges_read: u64,
}

/// Writes the snapshot `manifest` (validated against `descriptor`) into `out`, which is set
/// to the snapshot's size; `out_name` names it in errors. `in_place`: chunks `out` already
/// holds, by offset, that this process wrote there after checking them (a prefetch): they
/// are left as they are.
#[allow(clippy::too_many_arguments)]
pub async fn assemble(
    repo: &Repo,
    descriptor: &Repository,
    manifest: &Manifest,
    out: Arc<File>,
    out_name: &str,
    mut local: Option<LocalSnapshot<'_>>,
    in_place: Option<&HashMap<u64, Digest>>,
    limits: RangeLimits,
) -> Result<AssembleStats> {
    let placed = |at: u64, id: &Digest| in_place.is_some_and(|m| m.get(&at) == Some(id));
    let io_err = |what: &str| {
        let what = format!("{what} {out_name}");
        move |e: std::io::Error| Error::io(what, e)
    };
    out.set_len(manifest.size).map_err(io_err("sizing"))?;
    // Where each block of the local snapshot is, with its length: a block is taken from
    // there only if the new manifest gives it the same length (two manifests that disagree
    // on the length of the same logical block are not both right; the new one's blocks are
    // then read from the store and checked).
    let local_blocks: HashMap<Digest, (u64, u64)> = local
        .as_ref()
        .and_then(|l| l.manifest)
        .map(|m| {
            m.block_offsets()
                .map(|(at, b)| (b.logical, (at, b.bytes)))
                .collect()
        })
        .unwrap_or_default();
    let local_at = |b: &crate::manifest_v2::BlockRef| {
        local_blocks
            .get(&b.logical)
            .filter(|(_, bytes)| *bytes == b.bytes)
            .map(|(at, _)| *at)
    };
    // The chunks of the local snapshot's blocks that the new one does not have as a whole:
    // where changed blocks find most of their chunks (a scattered update changes every
    // block, and only a few chunks of each). A local file without a manifest has only these.
    let mut local_chunks: HashMap<Digest, u64> = local
        .as_mut()
        .map(|l| std::mem::take(&mut l.cut))
        .unwrap_or_default();
    if let Some(lm) = local.as_ref().and_then(|l| l.manifest) {
        let logicals: std::collections::HashSet<Digest> =
            manifest.blocks.iter().map(|b| b.logical).collect();
        let offsets: Vec<u64> = lm.block_offsets().map(|(at, _)| at).collect();
        let changed: Vec<usize> = (0..lm.blocks.len())
            .filter(|&i| !logicals.contains(&lm.blocks[i].logical))
            .collect();
        let mut blocks = TreeReader::start(repo, descriptor, lm, &changed, None);
        for &i in &changed {
            let block = blocks.next(i).await?;
            let mut at = offsets[i];
            for c in &block.chunks {
                local_chunks.entry(c.id).or_insert(at);
                at += c.plain_len as u64;
            }
        }
    }
    let mut stats = AssembleStats::default();
    // A pending copy from the local file: (from, to, len), grown while blocks follow on.
    let mut copy: Option<(u64, u64, u64)> = None;
    // Checked local bytes are written by a thread of their own while the next are read and
    // hashed; blocks copied in file order while nothing is being fetched also start their
    // writeback there, so the disk writes the front while the rest is read.
    let writer = LocalWriter::start(out.clone()).map_err(io_err("starting a writer for"))?;
    // Blocks whose chunks are being read from the store, a few at once so that the next
    // block's ranges are requested while the last ones arrive; all their ranges share one
    // bound.
    let ranges_in_flight = Arc::new(tokio::sync::Semaphore::new(limits.in_flight.max(1)));
    let (jobs, queued) = tokio::sync::mpsc::channel::<(Block, Vec<(usize, u64)>)>(BLOCKS_IN_FLIGHT);
    // Reads the queued blocks' chunks, BLOCKS_IN_FLIGHT at once, while the loop below plans
    // the next ones (both run in this task: `join!` polls them in turn).
    let fetcher =
        futures::stream::unfold(
            queued,
            |mut q| async move { q.recv().await.map(|job| (job, q)) },
        )
        .map(|(block, wanted)| {
            fetch_block(
                repo,
                manifest,
                block,
                wanted,
                out.clone(),
                limits,
                &ranges_in_flight,
            )
        })
        .buffer_unordered(BLOCKS_IN_FLIGHT)
        .try_fold(AssembleStats::default(), |mut all, one| async move {
            all.add(one);
            Ok(all)
        });
    // Every block but those copied whole from a trusted local snapshot is read, in order,
    // ahead of the planner; its ranges share the data ranges' bound (with `in_flight` 1, one
    // request at a time).
    let copied_whole = |b: &crate::manifest_v2::BlockRef| {
        local.as_ref().is_some_and(|l| l.trusted) && local_at(b).is_some()
    };
    let tree_blocks: Vec<usize> = (0..manifest.blocks.len())
        .filter(|&i| !copied_whole(&manifest.blocks[i]))
        .collect();
    let mut blocks = TreeReader::start(
        repo,
        descriptor,
        manifest,
        &tree_blocks,
        Some(ranges_in_flight.clone()),
    );
    let planner = async {
        for (i, (at, b)) in manifest.block_offsets().enumerate() {
            if let (Some(l), Some(from)) = (&local, local_at(b)) {
                if l.trusted {
                    stats.blocks_copied += 1;
                    stats.bytes_copied += b.bytes;
                    copy = match copy {
                        Some((f, t, n)) if f + n == from && t + n == at => {
                            Some((f, t, n + b.bytes))
                        }
                        other => {
                            if let Some(c) = other {
                                copy_range(&l.file, &out, c)
                                    .await
                                    .map_err(io_err("copying into"))?;
                            }
                            Some((from, at, b.bytes))
                        }
                    };
                    continue;
                }
                // Untrusted: each chunk is read, hashed and written from the bytes hashed (a
                // copy by the kernel would copy whatever the file holds by then); the chunks
                // that do not match are fetched.
                let block = blocks.next(i).await?;
                let mut spans = Vec::with_capacity(block.chunks.len());
                let (mut f, mut t) = (from, at);
                for (j, c) in block.chunks.iter().enumerate() {
                    if placed(t, &c.id) {
                        stats.chunks_in_place += 1;
                    } else {
                        spans.push((j, f, t));
                    }
                    f += c.plain_len as u64;
                    t += c.plain_len as u64;
                }
                let missed = reuse_chunks(&l.file, false, &out, &writer, &block, &spans, &mut copy)
                    .await
                    .map_err(io_err("copying into"))?;
                stats.chunks_copied += (spans.len() - missed.len()) as u64;
                if missed.is_empty() {
                    stats.blocks_copied += 1;
                    stats.bytes_copied += b.bytes;
                    if copy.is_none() && jobs.capacity() == BLOCKS_IN_FLIGHT {
                        writer.written_to(at + b.bytes).await;
                    }
                    continue;
                }
                if jobs.send((block, missed)).await.is_err() {
                    // The fetcher stopped on an error: it is the one reported.
                    return Ok(stats);
                }
                stats.blocks_fetched += 1;
                continue;
            }
            let block = blocks.next(i).await?;
            // Chunks the local file has: copied (trusted) or hashed first; the rest fetched.
            let mut wanted = Vec::new();
            let mut from_local = Vec::new();
            let mut to = at;
            for (j, c) in block.chunks.iter().enumerate() {
                if placed(to, &c.id) {
                    stats.chunks_in_place += 1;
                    to += c.plain_len as u64;
                    continue;
                }
                match (&local, local_chunks.get(&c.id)) {
                    (Some(_), Some(&from)) => from_local.push((j, from, to)),
                    _ => wanted.push((j, to)),
                }
                to += c.plain_len as u64;
            }
            if let Some(l) = &local {
                let missed = reuse_chunks(
                    &l.file,
                    l.trusted,
                    &out,
                    &writer,
                    &block,
                    &from_local,
                    &mut copy,
                )
                .await
                .map_err(io_err("copying into"))?;
                stats.chunks_copied += (from_local.len() - missed.len()) as u64;
                wanted.extend(missed);
            }
            if jobs.send((block, wanted)).await.is_err() {
                return Ok(stats);
            }
            stats.blocks_fetched += 1;
        }
        drop(jobs);
        if let (Some(l), Some(c)) = (&local, copy) {
            copy_range(&l.file, &out, c)
                .await
                .map_err(io_err("copying into"))?;
        }
        Ok::<_, Error>(stats)
    };
    let (planned, fetched) = tokio::join!(planner, fetcher);
    // Every checked local byte is written before the file is handed on; a failed write is
    // the error to report (the planner only saw that the writer had stopped).
    writer.finish().await.map_err(io_err("writing into"))?;
    let fetched = fetched.map_err(|e| match e {
        Error::Io { source, .. } => Error::io(format!("writing {out_name}"), source),
        other => other,
    })?;
    let mut stats = planned?;
    stats.add(fetched);
    Ok(stats)
}

/// Every chunk of `manifest` (validated against `descriptor`), in file order, as
/// `(id, plain length)`: its tree blocks read from the store (a few coalesced ranges per
/// GiB) and each checked against the manifest, so that the list is the manifest's. What a
/// follower writes beside a snapshot it hands over, as its chunk index.
pub async fn chunk_list(
    repo: &Repo,
    descriptor: &Repository,
    manifest: &Manifest,
    mut each: impl FnMut(Digest, u64) -> std::io::Result<()>,
) -> Result<()> {
    let all: Vec<usize> = (0..manifest.blocks.len()).collect();
    let mut blocks = TreeReader::start(repo, descriptor, manifest, &all, None);
    for i in all {
        let block = blocks.next(i).await?;
        for c in &block.chunks {
            each(c.id, c.plain_len as u64).map_err(|e| Error::io("writing a chunk list", e))?;
        }
    }
    Ok(())
}

/// The file system block a reflink shares: 4 KiB on XFS and btrfs as they are made by
/// default.
const REFLINK_BLOCK: u64 = 4096;

/// Copies `len` bytes at `from` in `src` to `to` in `dst`: `copy_file_range`, falling back
/// to reads and writes where the kernel or file system does not do it.
///
/// Where the file system has reflinks, the kernel shares the blocks of a range instead of
/// copying them only if the range starts on a block boundary in both files; it copies the
/// bytes otherwise. Blocks of chunks start anywhere, but an unchanged stretch of a file
/// rewritten in place sits at the same offset in both: its head up to the next boundary is
/// copied on its own, so that the rest is shared, and the kernel copies the partial block at
/// its tail.
async fn copy_range(
    src: &Arc<File>,
    dst: &Arc<File>,
    (from, to, len): (u64, u64, u64),
) -> std::io::Result<()> {
    let (src, dst) = (src.clone(), dst.clone());
    tokio::task::spawn_blocking(move || {
        let (mut off_in, mut off_out, mut left) = (from, to, len);
        while left > 0 {
            let head = REFLINK_BLOCK - off_in % REFLINK_BLOCK;
            let step = match off_in % REFLINK_BLOCK == off_out % REFLINK_BLOCK {
                true if head < REFLINK_BLOCK => head.min(left),
                _ => left.min(1 << 30),
            } as usize;
            match rustix::fs::copy_file_range(
                &src,
                Some(&mut off_in),
                &dst,
                Some(&mut off_out),
                step,
            ) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the local snapshot is shorter than its manifest says",
                    ))
                }
                Ok(n) => left -= n as u64,
                Err(rustix::io::Errno::INTR) => {}
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {
                    let mut buf = vec![0u8; left.min(1 << 20) as usize];
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        src.read_exact_at(&mut buf[..n], off_in)?;
                        dst.write_all_at(&buf[..n], off_out)?;
                        off_in += n as u64;
                        off_out += n as u64;
                        left -= n as u64;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Copies chunks `(index in block, local offset, new offset)` from the local file: trusted,
/// by extending the pending copy (flushing it when they do not follow on); otherwise each
/// read and hashed first. Returns the `(index, new offset)` of those that did not match.
async fn reuse_chunks(
    file: &Arc<File>,
    trusted: bool,
    out: &Arc<File>,
    writer: &LocalWriter,
    block: &Block,
    chunks: &[(usize, u64, u64)],
    copy: &mut Option<(u64, u64, u64)>,
) -> std::io::Result<Vec<(usize, u64)>> {
    if trusted {
        for &(j, from, to) in chunks {
            let len = block.chunks[j].plain_len as u64;
            *copy = match copy.take() {
                Some((f, t, n)) if f + n == from && t + n == to => Some((f, t, n + len)),
                other => {
                    if let Some(c) = other {
                        copy_range(file, out, c).await?;
                    }
                    Some((from, to, len))
                }
            };
        }
        return Ok(Vec::new());
    }
    let same_file = Arc::ptr_eq(file, out);
    let (file, queue) = (file.clone(), writer.queue.clone());
    let chunks: Vec<_> = chunks
        .iter()
        .map(|&(j, from, to)| (j, from, to, block.chunks[j].id, block.chunks[j].plain_len))
        .collect();
    // A resumed staging file is its own source: its verified chunks are already in place.
    tokio::task::spawn_blocking(move || {
        let write = |at: u64, bytes: Vec<u8>| {
            queue
                .blocking_send(Write::At(at, bytes))
                .map_err(|_| std::io::Error::other("the writer stopped"))
        };
        let mut missed = Vec::new();
        // Runs of chunks contiguous in both files, read (and written) in one call each, up
        // to RUN_BYTES: a block is a few MiB of 16 KiB chunks.
        let mut i = 0;
        while i < chunks.len() {
            let (_, from0, to0, _, _) = chunks[i];
            let mut j = i;
            let mut len = 0u64;
            while j < chunks.len()
                && chunks[j].1 == from0 + len
                && chunks[j].2 == to0 + len
                && (j == i || len + chunks[j].4 as u64 <= RUN_BYTES)
            {
                len += chunks[j].4 as u64;
                j += 1;
            }
            let mut buf = vec![0u8; len as usize];
            let read = file.read_exact_at(&mut buf, from0).is_ok();
            // Verified stretches of the run.
            let mut good: Vec<(usize, usize)> = Vec::new();
            let mut at = 0usize;
            for &(k, _, to, id, clen) in &chunks[i..j] {
                let end = at + clen as usize;
                if read && Digest::of(&buf[at..end]) == id {
                    match good.last_mut() {
                        Some((_, e)) if *e == at => *e = end,
                        _ => good.push((at, end)),
                    }
                } else {
                    missed.push((k, to));
                }
                at = end;
            }
            if !(same_file && from0 == to0) {
                if good == [(0, buf.len())] {
                    write(to0, buf)?;
                } else {
                    for (start, end) in good {
                        write(to0 + start as u64, buf[start..end].to_vec())?;
                    }
                }
            }
            i = j;
        }
        Ok(missed)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What the [`LocalWriter`] is asked to do, in order.
enum Write {
    /// Checked bytes, to write at this offset.
    At(u64, Vec<u8>),
    /// The file holds its final bytes up to here: its writeback may start.
    WrittenTo(u64),
}

/// Writes the local bytes [`reuse_chunks`] checked on a thread of its own, so that reading
/// and hashing the next run and the kernel's copy of this one each take a core. At most
/// [`WRITES_QUEUED`] runs wait (memory: that many runs of [`RUN_BYTES`] besides the one
/// being written and the one being hashed). After a failed write it drops what comes and
/// its queue closes; [`LocalWriter::finish`] reports the failure.
///
/// The thread is not one of the runtime's blocking pool: it lives as long as the fetch, and
/// the fetch's hashing, copies and range checks need the pool meanwhile; a pool thread held
/// for the whole fetch would leave a pool that is small or busy with none, and the fetch
/// waiting forever.
struct LocalWriter {
    queue: tokio::sync::mpsc::Sender<Write>,
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
}

/// Runs of checked local bytes that wait for the writer.
const WRITES_QUEUED: usize = 1;

impl LocalWriter {
    fn start(out: Arc<File>) -> std::io::Result<LocalWriter> {
        let (queue, mut writes) = tokio::sync::mpsc::channel::<Write>(WRITES_QUEUED);
        let (report, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snaprelay-write".into())
            .spawn(move || {
                let result = (|| {
                    let mut write_behind = crate::chunk::WriteBehind::new();
                    while let Some(w) = writes.blocking_recv() {
                        match w {
                            Write::At(at, bytes) => out.write_all_at(&bytes, at)?,
                            Write::WrittenTo(end) => write_behind.written_to(&out, end),
                        }
                    }
                    Ok(())
                })();
                // The queue closes before the result is sent: a sender blocked on a failed
                // writer is refused, not left waiting.
                drop(writes);
                let _ = report.send(result);
            })?;
        Ok(LocalWriter { queue, done })
    }

    /// Every byte written so far is final up to `end`.
    async fn written_to(&self, end: u64) {
        // A writer that stopped has failed, which `finish` reports.
        let _ = self.queue.send(Write::WrittenTo(end)).await;
    }

    /// Waits until everything queued is written.
    async fn finish(self) -> std::io::Result<()> {
        drop(self.queue);
        self.done
            .await
            .map_err(|_| std::io::Error::other("the writer thread panicked"))?
    }
}

/// One ranged read of a tree pack: the blocks it holds, `(index, start in the range, stored
/// length)`, in the order they are taken.
struct TreeRange {
    pack: usize,
    range: std::ops::Range<u64>,
    blocks: Vec<(usize, usize, u32)>,
}

/// Groups `wanted` (block indexes, in the order they will be taken) into ranged reads: a
/// block joins the range before it when it follows it in the same tree pack, at most
/// [`TREE_RANGE`] from its start and 64 KiB from its end. Nothing is reordered, so a reader
/// holds no block it is not about to hand out.
fn tree_ranges(manifest: &Manifest, wanted: &[usize]) -> Vec<TreeRange> {
    let mut out: Vec<TreeRange> = Vec::new();
    for &i in wanted {
        let b = &manifest.blocks[i];
        let (start, end) = (b.offset as u64, b.offset as u64 + b.stored_len as u64);
        if let Some(r) = out.last_mut() {
            if r.pack == b.pack as usize
                && start >= r.range.end
                && start - r.range.end <= 64 << 10
                && end - r.range.start <= TREE_RANGE
            {
                r.blocks
                    .push((i, (start - r.range.start) as usize, b.stored_len));
                r.range.end = end;
                continue;
            }
        }
        out.push(TreeRange {
            pack: b.pack as usize,
            range: start..end,
            blocks: vec![(i, 0, b.stored_len)],
        });
    }
    out
}

/// The tree blocks a fetch takes, in order, read ahead by a task of its own in ranges of
/// neighbouring blocks ([`tree_ranges`]), at most [`TREE_RANGES_AHEAD`] ranges ahead of the
/// one being taken; each block is decoded and checked against the manifest as it is taken.
/// Dropping the reader stops the task.
struct TreeReader<'a> {
    descriptor: &'a Repository,
    manifest: &'a Manifest,
    ranges: tokio::sync::mpsc::Receiver<Result<(TreeRange, bytes::Bytes)>>,
    current: Option<(TreeRange, bytes::Bytes, usize)>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl<'a> TreeReader<'a> {
    /// Starts reading `wanted` of `manifest` (validated against `descriptor`); each request
    /// holds one of `budget`'s permits, when there is one.
    fn start(
        repo: &Repo,
        descriptor: &'a Repository,
        manifest: &'a Manifest,
        wanted: &[usize],
        budget: Option<Arc<tokio::sync::Semaphore>>,
    ) -> TreeReader<'a> {
        let plan = tree_ranges(manifest, wanted);
        let packs: Vec<(crate::pack::PackId, u64)> =
            manifest.packs.iter().map(|p| (p.id, p.size)).collect();
        let (tx, ranges) = tokio::sync::mpsc::channel(TREE_RANGES_AHEAD);
        let repo = repo.clone();
        let task = tokio::spawn(async move {
            for r in plan {
                let read = async {
                    let _permit =
                        match &budget {
                            Some(b) => Some(b.acquire().await.map_err(|e| {
                                Error::io("range budget", std::io::Error::other(e))
                            })?),
                            None => None,
                        };
                    let (id, size) = packs[r.pack];
                    repo.read_pack(&id, size, r.range.clone()).await
                };
                let result = read.await;
                let failed = result.is_err();
                if tx.send(result.map(|bytes| (r, bytes))).await.is_err() || failed {
                    return;
                }
            }
        });
        TreeReader {
            descriptor,
            manifest,
            ranges,
            current: None,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Block `index`, which must be the next one `wanted` listed.
    async fn next(&mut self, index: usize) -> Result<Block> {
        if self
            .current
            .as_ref()
            .is_none_or(|(r, _, taken)| *taken == r.blocks.len())
        {
            let next = self.ranges.recv().await.ok_or_else(|| {
                Error::io(
                    "reading tree blocks",
                    std::io::Error::other("the reader stopped"),
                )
            })??;
            self.current = Some((next.0, next.1, 0));
        }
        let (r, bytes, taken) = self.current.as_mut().expect("set above");
        let (i, start, len) = r.blocks[*taken];
        *taken += 1;
        if i != index {
            return Err(Error::io(
                "reading tree blocks",
                std::io::Error::other(format!("block {index} was asked for, {i} is next")),
            ));
        }
        crate::repo::checked_block(
            self.descriptor,
            self.manifest,
            i,
            &bytes[start..start + len as usize],
        )
    }
}

/// Reads chunks `(index in block, offset in the file)` of a block from the store (coalesced
/// ranges), checks each, and writes it at its offset; returns what it read. Each range holds
/// one of `ranges`' permits from its request until its chunks are written, so that the
/// ranges of every block in flight together stay within that bound (memory: permits times
/// the largest range).
async fn fetch_block(
    repo: &Repo,
    manifest: &Manifest,
    block: Block,
    wanted: Vec<(usize, u64)>,
    out: Arc<File>,
    limits: RangeLimits,
    ranges_in_flight: &tokio::sync::Semaphore,
) -> Result<AssembleStats> {
    let needed: Vec<Needed<(usize, u64)>> = wanted
        .iter()
        .map(|&(j, to)| {
            let c = &block.chunks[j];
            Needed {
                pack: block.packs[c.pack as usize],
                offset: c.offset as u64,
                stored_len: c.stored_len,
                tag: (j, to),
            }
        })
        .collect();
    let ranges = coalesce(&needed, limits);
    let stats = AssembleStats {
        ranges_read: ranges.len() as u64,
        chunks_fetched: needed.len() as u64,
        bytes_fetched: wanted
            .iter()
            .map(|&(j, _)| block.chunks[j].plain_len as u64)
            .sum(),
        bytes_read: ranges.iter().map(|r| r.range.end - r.range.start).sum(),
        ..AssembleStats::default()
    };
    let block = &block;
    futures::stream::iter(ranges)
        .map(|r| {
            // A validated block names only packs of its manifest; 0 makes any other corrupt.
            let size = manifest
                .packs
                .iter()
                .find(|p| p.id == r.pack)
                .map_or(0, |p| p.size);
            let out = out.clone();
            async move {
                let _permit = ranges_in_flight
                    .acquire()
                    .await
                    .map_err(|e| Error::io("range budget", std::io::Error::other(e)))?;
                let bytes = repo.read_pack(&r.pack, size, r.range.clone()).await?;
                let chunks: Vec<_> = r
                    .blobs
                    .iter()
                    .map(|&((j, to), start, len)| {
                        let c = block.chunks[j];
                        (c, to, bytes.slice(start..start + len as usize))
                    })
                    .collect();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let mut pieces = Vec::with_capacity(chunks.len());
                    for (c, to, stored) in chunks {
                        let corrupt = |reason| Error::ChunkCorrupt {
                            sha256: c.id.to_hex(),
                            reason,
                        };
                        // A raw blob is checked and written where it lies in the range.
                        let plain = match c.encoding {
                            crate::pack::Encoding::Raw if stored.len() == c.plain_len as usize => {
                                crate::pack::check_id(&stored, &c.id).map_err(corrupt)?;
                                stored
                            }
                            _ => decode_blob(&stored, c.encoding, c.plain_len, &c.id)
                                .map_err(corrupt)?,
                        };
                        pieces.push((to, plain));
                    }
                    // Written once all are checked: a damaged chunk fails the range before
                    // anything of it is written.
                    crate::chunk::write_pieces_at(&out, &pieces)
                        .map_err(|e| Error::io("writing", e))
                })
                .await
                .map_err(|e| Error::io("verifying task", std::io::Error::other(e)))?
            }
        })
        .buffer_unordered(limits.in_flight.max(1))
        .try_collect::<()>()
        .await?;
    Ok(stats)
}

impl AssembleStats {
    fn add(&mut self, o: AssembleStats) {
        self.blocks_copied += o.blocks_copied;
        self.bytes_copied += o.bytes_copied;
        self.blocks_fetched += o.blocks_fetched;
        self.chunks_copied += o.chunks_copied;
        self.chunks_fetched += o.chunks_fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.chunks_in_place += o.chunks_in_place;
        self.bytes_read += o.bytes_read;
        self.ranges_read += o.ranges_read;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::test_data::{file_of, random};
    use crate::chunk::ChunkParams;
    use crate::manifest_v2 as v2;
    use crate::pack::upload::PartBudget;
    use crate::packer::pack_snapshot;
    use crate::store::{Store, StoreSettings, StoreUrl};

    fn contents(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    /// Ranges in the same place of both files, on and off block boundaries, and ranges
    /// that move: each lands whole and exactly where it belongs, whatever part of it the
    /// file system shares and whatever part it copies.
    #[tokio::test]
    async fn copied_ranges_land_exactly_whether_aligned_or_not() {
        let data = random(5 * REFLINK_BLOCK as usize + 1234, 8);
        let src = file_of(&data);
        let b = REFLINK_BLOCK;
        for (from, to, len) in [
            (0, 0, data.len() as u64),
            (b, b, 2 * b),
            (100, 100, 3 * b),
            (b - 1, b - 1, 2),
            (100, 100, 50),
            (7, 7 + b, 2 * b + 9),
            (3, 5, 3 * b),
            (b + 10, 10, 2 * b),
            (b + 10, b + 10, data.len() as u64 - b - 10),
        ] {
            let out = file_of(&vec![0xaa; data.len()]);
            copy_range(&src, &out, (from, to, len)).await.unwrap();
            let mut want = vec![0xaa; data.len()];
            let (f, t, n) = (from as usize, to as usize, len as usize);
            want[t..t + n].copy_from_slice(&data[f..f + n]);
            assert!(contents(&out) == want, "({from}, {to}, {len})");
        }
        // A local file shorter than its manifest says.
        let out = file_of(&vec![0; data.len()]);
        let e = copy_range(&src, &out, (b, b, data.len() as u64))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// [`assemble`] of `m` into `out`, with the default limits and nothing prefetched: what
    /// most tests here do.
    async fn assemble_into(
        repo: &Repo,
        d: &Repository,
        m: &Manifest,
        out: Arc<File>,
        local: Option<LocalSnapshot<'_>>,
    ) -> Result<AssembleStats> {
        assemble(repo, d, m, out, "out", local, None, RangeLimits::default()).await
    }

    /// A repository of `store` with small tree blocks (dozens of blocks in a few MiB).
    async fn small_repo(store: Store) -> (Repo, Repository) {
        let repo = Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap();
        let d = v2::Repository::new("c", crate::chunk::test_data::small_tree_settings());
        (repo, d)
    }

    /// [`small_repo`] in memory behind an [`InFlight`] store, which sees every ranged read.
    async fn counted_repo() -> (Arc<InFlight>, Repo, Repository) {
        let counted = Arc::new(InFlight::default());
        let store = Store {
            backend: counted.clone(),
            prefix: object_store::path::Path::default(),
            url: StoreUrl::Memory,
        };
        let (repo, d) = small_repo(store).await;
        (counted, repo, d)
    }

    async fn publish(
        repo: &Repo,
        d: &Repository,
        base: Option<&Manifest>,
        data: &[u8],
        index: u64,
    ) -> Manifest {
        let chunks = crate::chunk::index_to_scratch(data, d.chunking)
            .unwrap()
            .read_all()
            .unwrap()
            .chunks;
        let p = pack_snapshot(
            repo,
            d,
            base,
            file_of(data),
            "node file",
            &chunks,
            crate::packer::ChunkList::Cut,
            PartBudget::new(2, 1 << 20),
            None,
        )
        .await
        .unwrap();
        let m = Manifest {
            format: v2::MANIFEST_FORMAT,
            cluster_id: d.cluster_id.clone(),
            incarnation: d.incarnation.clone(),
            last_log_index: index,
            last_log_term: 1,
            raft_meta: serde_json::json!({}),
            size: p.size,
            sha256: Digest::of(data),
            chunks: p.chunks,
            packs: p.packs,
            blocks: p.blocks,
            created_at: chrono::Utc::now(),
            publisher: v2::Publisher {
                node_id: None,
                version: "test".into(),
            },
        };
        m.validate(d).unwrap();
        m
    }

    /// Counts the ranged reads in flight at once (each yields before it reads, so that the
    /// reads a reader lets overlap do overlap on the test's single thread).
    #[derive(Debug, Default)]
    struct InFlight {
        inner: object_store::memory::InMemory,
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        /// The key of every ranged read.
        ranged: std::sync::Mutex<Vec<String>>,
    }

    impl std::fmt::Display for InFlight {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "InFlight")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for InFlight {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            use std::sync::atomic::Ordering::SeqCst;
            if options.range.is_none() {
                return self.inner.get_opts(location, options).await;
            }
            self.ranged.lock().unwrap().push(location.to_string());
            let now = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let result = self.inner.get_opts(location, options).await;
            self.now.fetch_sub(1, SeqCst);
            result
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// `download.concurrency` bounds the ranged reads of packs in flight (so that one
    /// range at a time is one range at a time), up to [`MAX_RANGES_IN_FLIGHT`].
    #[tokio::test]
    async fn ranged_reads_in_flight_follow_the_configured_concurrency() {
        use std::sync::atomic::Ordering::SeqCst;
        let (counted, repo, d) = counted_repo().await;
        let data = random(4 << 20, 7);
        let m = publish(&repo, &d, None, &data, 1).await;
        for (concurrency, expected) in [(1, 1), (2, 2), (64, MAX_RANGES_IN_FLIGHT)] {
            counted.most.store(0, SeqCst);
            let out = file_of(b"");
            let limits = RangeLimits {
                // Many small ranges, so that there is always another to start.
                max_range: 64 << 10,
                ..RangeLimits::with_concurrency(concurrency)
            };
            let s = assemble(&repo, &d, &m, out.clone(), "out", None, None, limits)
                .await
                .unwrap();
            assert_eq!(contents(&out), data);
            assert!(s.ranges_read > 16, "{s:?}");
            assert_eq!(
                counted.most.load(SeqCst),
                expected,
                "download.concurrency = {concurrency}"
            );
        }
    }

    /// A write of checked local bytes that fails stops the writer: what is queued after it
    /// is refused at once (the hashing side never waits on a writer that is gone), and
    /// `finish` reports the failure itself.
    #[tokio::test]
    async fn a_failed_local_write_stops_the_writer_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let read_only = Arc::new(File::open(&path).unwrap());
        let writer = LocalWriter::start(read_only).unwrap();
        let mut refused = 0;
        for i in 0..4 {
            if writer
                .queue
                .send(Write::At(i * 10, vec![1; 10]))
                .await
                .is_err()
            {
                refused += 1;
            }
        }
        writer.written_to(40).await;
        let e = writer.finish().await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert!(refused >= 2, "{refused} of 4 writes refused");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 4096]);
    }

    /// Tree blocks are read in ranges of neighbours, not one request each, whether the whole
    /// snapshot is fetched or an untrusted local one is checked block by block.
    #[tokio::test]
    async fn tree_blocks_are_read_in_ranges_of_neighbours() {
        let (counted, repo, d) = counted_repo().await;
        let data = random(8 << 20, 11);
        let m = publish(&repo, &d, None, &data, 1).await;
        assert!(m.blocks.len() >= 30, "{} blocks", m.blocks.len());
        let tree_reads = |m: &Manifest| {
            let tree: Vec<String> = m
                .packs
                .iter()
                .filter(|p| p.kind == crate::pack::PackKind::Tree)
                .map(|p| p.id.to_hex())
                .collect();
            let ranged = std::mem::take(&mut *counted.ranged.lock().unwrap());
            ranged
                .iter()
                .filter(|k| tree.iter().any(|t| k.contains(t.as_str())))
                .count()
        };
        let tree_packs = m
            .packs
            .iter()
            .filter(|p| p.kind == crate::pack::PackKind::Tree)
            .count();

        let out = file_of(b"");
        assemble_into(&repo, &d, &m, out.clone(), None)
            .await
            .unwrap();
        assert_eq!(contents(&out), data);
        assert_eq!(tree_reads(&m), tree_packs, "{} blocks", m.blocks.len());

        // Every block again, checked against an untrusted copy of the same file.
        let local = file_of(&data);
        let out = file_of(b"");
        let s = assemble_into(
            &repo,
            &d,
            &m,
            out.clone(),
            Some(LocalSnapshot::of_manifest(local, &m, false)),
        )
        .await
        .unwrap();
        assert_eq!(contents(&out), data);
        assert_eq!(s.blocks_copied as usize, m.blocks.len());
        assert_eq!(tree_reads(&m), tree_packs);
    }

    /// A full assembly, then an incremental one from the first file: unchanged blocks are
    /// copied (trusted or, after hashing, untrusted), changed ones fetched in few ranges; a
    /// damaged local file is not copied from, and a damaged pack is refused.
    #[tokio::test]
    async fn a_snapshot_assembles_from_the_store_and_from_a_local_one() {
        let (repo, d) =
            small_repo(Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap()).await;
        let a = random(6 << 20, 1);
        let ma = publish(&repo, &d, None, &a, 1).await;
        let mut b = a.clone();
        for k in 1..=3 {
            let at = k * b.len() / 4;
            b[at..at + 50].copy_from_slice(&random(50, k as u64));
        }
        let mb = publish(&repo, &d, Some(&ma), &b, 2).await;

        let fa = file_of(b"");
        let s = assemble_into(&repo, &d, &ma, fa.clone(), None)
            .await
            .unwrap();
        assert_eq!(contents(&fa), a);
        assert_eq!(s.blocks_copied, 0);
        assert!(s.ranges_read <= s.blocks_fetched * 2, "{s:?}");

        for trusted in [true, false] {
            let fb = file_of(b"");
            let local = LocalSnapshot::of_manifest(fa.clone(), &ma, trusted);
            let s = assemble_into(&repo, &d, &mb, fb.clone(), Some(local))
                .await
                .unwrap();
            assert_eq!(contents(&fb), b, "trusted: {trusted}");
            assert!(
                s.blocks_copied >= 2 * s.blocks_fetched && s.blocks_fetched <= 6,
                "{s:?}"
            );
            assert!(
                s.chunks_copied > 0,
                "changed blocks take most chunks locally: {s:?}"
            );
            // Three 50-byte edits: at most a few chunks each come from the store.
            assert!(s.chunks_fetched <= 12, "{s:?}");
        }

        // An untrusted local file that does not hold what its manifest says is not copied.
        let mut spoiled = a.clone();
        spoiled[100] ^= 1;
        let fb = file_of(b"");
        let local = LocalSnapshot::of_manifest(file_of(&spoiled), &ma, false);
        assemble_into(&repo, &d, &mb, fb.clone(), Some(local))
            .await
            .unwrap();
        assert_eq!(contents(&fb), b);

        // A data pack with a flipped byte in a blob: refused, naming the chunk.
        let block = repo.read_block(&d, &mb, 0).await.unwrap();
        let at = block.location(0);
        let size = mb.packs.iter().find(|p| p.id == at.pack).unwrap().size;
        let mut body = repo
            .read_pack(&at.pack, size, 0..size)
            .await
            .unwrap()
            .to_vec();
        body[at.offset as usize] ^= 1;
        repo.put_raw_pack(&at.pack, body.into()).await.unwrap();
        let e = assemble_into(&repo, &d, &mb, file_of(b""), None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ChunkCorrupt { .. }), "{e}");
    }

    /// A manifest whose tree blocks are out of order in their packs (a snapshot whose halves
    /// swapped places, its blocks carried over from the base) and repeated (a quarter of it
    /// twice): every way of assembling it gives exactly its bytes.
    #[tokio::test]
    async fn tree_blocks_out_of_order_and_repeated_assemble_every_way() {
        let (repo, d) =
            small_repo(Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap()).await;
        let a = random(4 << 20, 21);
        let ma = publish(&repo, &d, None, &a, 1).await;
        let (half, quarter) = (a.len() / 2, a.len() / 4);
        let b = [&a[half..], &a[..half], &a[..quarter]].concat();
        let mb = publish(&repo, &d, Some(&ma), &b, 2).await;
        // The tree really is out of order and repeats blocks.
        let descending = (0..mb.blocks.len()).any(|j| {
            mb.blocks[j + 1..]
                .iter()
                .any(|l| l.pack == mb.blocks[j].pack && l.offset < mb.blocks[j].offset)
        });
        let logicals: std::collections::HashSet<_> = mb.blocks.iter().map(|b| b.logical).collect();
        assert!(descending, "no block before its predecessor in a pack");
        assert!(logicals.len() < mb.blocks.len(), "no repeated block");

        let fa = file_of(&a);
        let cases = [
            ("store only", None),
            ("trusted local", Some(true)),
            ("untrusted local", Some(false)),
        ];
        for (what, local) in cases {
            let out = file_of(b"");
            let local = local.map(|t| LocalSnapshot::of_manifest(fa.clone(), &ma, t));
            assemble_into(&repo, &d, &mb, out.clone(), local)
                .await
                .unwrap();
            assert!(contents(&out) == b, "{what}");
        }
        // A resumed staging file, its own source: every other 64 KiB of it lost.
        let mut partial = b.clone();
        for piece in partial.chunks_mut(64 << 10).step_by(2) {
            piece.fill(0);
        }
        let out = file_of(&partial);
        assemble_into(
            &repo,
            &d,
            &mb,
            out.clone(),
            Some(LocalSnapshot::of_manifest(out.clone(), &mb, false)),
        )
        .await
        .unwrap();
        assert!(contents(&out) == b, "resumed");
    }

    /// A damaged tree block in the middle of a range of neighbours is refused by name (the
    /// block and its pack), whichever reader meets it; a deleted tree pack is named missing.
    #[tokio::test]
    async fn a_damaged_or_missing_tree_pack_is_named() {
        let (repo, d) =
            small_repo(Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap()).await;
        let a = random(4 << 20, 31);
        let ma = publish(&repo, &d, None, &a, 1).await;
        let mut b = a.clone();
        for k in 1..=7 {
            let at = k * b.len() / 8;
            b[at..at + 50].copy_from_slice(&random(50, 100 + k as u64));
        }
        let mb = publish(&repo, &d, Some(&ma), &b, 2).await;
        // A block of `ma` in the middle of its tree pack, that `mb` does not have.
        let mb_logicals: std::collections::HashSet<_> =
            mb.blocks.iter().map(|b| b.logical).collect();
        let k = (1..ma.blocks.len() - 1)
            .find(|&k| {
                !mb_logicals.contains(&ma.blocks[k].logical)
                    && ma.blocks[k - 1].pack == ma.blocks[k].pack
                    && ma.blocks[k + 1].pack == ma.blocks[k].pack
            })
            .expect("a changed block between neighbours");
        let bad = &ma.blocks[k];
        let tree = ma.packs[bad.pack as usize];
        let original = repo
            .read_pack(&tree.id, tree.size, 0..tree.size)
            .await
            .unwrap();
        let mut body = original.to_vec();
        body[bad.offset as usize + bad.stored_len as usize / 2] ^= 0x40;
        repo.put_raw_pack(&tree.id, body.into()).await.unwrap();

        // Fetched from the store: block k is the one refused.
        let e = assemble_into(&repo, &d, &ma, file_of(b""), None)
            .await
            .unwrap_err();
        match &e {
            Error::BlockCorrupt { block, pack, .. } => {
                assert_eq!(block, &bad.id.to_hex(), "{e}");
                assert_eq!(pack, &tree.id.to_hex(), "{e}");
            }
            other => panic!("{other}"),
        }
        // Read as a local snapshot's changed block: the same.
        let e = assemble_into(
            &repo,
            &d,
            &mb,
            file_of(b""),
            Some(LocalSnapshot::of_manifest(file_of(&a), &ma, false)),
        )
        .await
        .unwrap_err();
        match &e {
            Error::BlockCorrupt { block, .. } => assert_eq!(block, &bad.id.to_hex(), "{e}"),
            other => panic!("{other}"),
        }
        repo.put_raw_pack(&tree.id, original).await.unwrap();

        // The last tree pack of `mb` deleted: named missing.
        let last = &mb.packs[mb.blocks.last().unwrap().pack as usize];
        repo.delete_pack(&last.id).await.unwrap();
        for limits in [RangeLimits::default(), RangeLimits::with_concurrency(1)] {
            let e = assemble(
                &repo,
                &d,
                &mb,
                file_of(b""),
                "b",
                Some(LocalSnapshot::of_manifest(file_of(&a), &ma, false)),
                None,
                limits,
            )
            .await
            .unwrap_err();
            match &e {
                Error::PackMissing { pack } => assert_eq!(pack, &last.id.to_hex(), "{e}"),
                other => panic!("{other}"),
            }
        }
    }

    /// The local writer does not hold a thread of the runtime's blocking pool for the whole
    /// fetch: with a pool of one thread, a fetch (whose ranges, copies and hashing each
    /// take that thread in turn) still completes instead of waiting forever for a thread the
    /// idle writer keeps.
    #[test]
    fn a_fetch_completes_with_a_blocking_pool_of_one_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (repo, d) =
                small_repo(Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap()).await;
            let a = random(2 << 20, 41);
            let ma = publish(&repo, &d, None, &a, 1).await;
            let mut b = a.clone();
            b[a.len() / 2] ^= 1;
            let mb = publish(&repo, &d, Some(&ma), &b, 2).await;
            for (what, local) in [("from the store", None), ("from a local one", Some(&a))] {
                let out = file_of(b"");
                let local = local.map(|a| LocalSnapshot::of_manifest(file_of(a), &ma, false));
                let done = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    assemble_into(&repo, &d, &mb, out.clone(), local),
                )
                .await;
                assert!(done.is_ok(), "{what}: no progress in 30 s");
                done.unwrap().unwrap();
                assert!(contents(&out) == b, "{what}");
            }
        });
    }
}
