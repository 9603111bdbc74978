//! Checking a handed-over file chunk by chunk, against the chunk index the sidecar writes
//! beside it (the manifest's chunk list), and proving the chunks it shares with the node's
//! last checked snapshot without reading them twice.
//!
//! A follower's sidecar assembles a snapshot that differs from the previous one in a few
//! places: where the file system has reflinks (XFS, btrfs), the unchanged stretches of the
//! new file *are* the previous file's blocks, shared, not copies. Hashing the whole new file
//! then mostly re-hashes bytes the node hashed when it adopted the previous snapshot. So, when
//! the envelope names a chunk index, the node checks the file against it chunk by chunk:
//!
//! - a chunk that the previous checked snapshot holds at the same offset with the same
//!   sha256 and length, and whose every byte the file system maps (`FIEMAP`) to the same
//!   physical bytes in both files, is *proven*: those physical bytes are the ones the node
//!   checked, and neither file has been written since (below);
//! - every other chunk is hashed and compared with the index: a mismatch is
//!   `checksum_mismatch`, naming the chunk.
//!
//! The application's validation still reads every byte, so the file is read once either way;
//! what proofs save is the sha256 of the unchanged bytes (0.9 CPU-s per GiB with SHA-NI) and
//! their copy for the hashing thread: the proofs are taken first (a walk of both indexes
//! and both files' extent maps, before the pass), and the pass hands the hashing thread only
//! the bytes outside the proven ranges.
//!
//! Why a proof holds. Physical bytes shared by two files are never written in place: a write
//! to either file gets new blocks (copy on write), and moves that file's mapping and its
//! modification time. The previous file is known by its open descriptor and its size and
//! mtime when it was checked, and the new file by its size and mtime when its check
//! started; all are compared again once the pass ends. A new file (or index) that moved is
//! refused; if the old one moved, every chunk is hashed in a second pass, or, where the
//! validation read proven ranges through it (see [`Anchor`]), the handover is refused as
//! transient. (A write whose
//! mtime is put back, which only the file's owner or root can do, is not seen: the same limit
//! as the sidecar's mark on the files it assembles.) Extents the file system marks as
//! anything but plain data (delayed allocation, unwritten, inline, encoded, encrypted,
//! unaligned, unknown) prove nothing; `FIEMAP_FLAG_SYNC` first writes dirty pages back, so
//! that what is mapped is what is on disk. File systems without shared blocks (ext4, tmpfs)
//! never map two files to the same bytes, and every chunk is hashed: the same cost as the
//! whole-file hash.
//!
//! What the chunk check does not compare is the whole file with the index's `sha256`: the
//! index must carry the sha256 the request names, and the file is exactly the index's chunks,
//! but that the chunks hash to that sha256 is the publisher's claim (both are in the
//! manifest, computed from the same file). The envelope records the sha256, and the startup
//! check hashes the whole file against it: a manifest whose chunks and sha256 disagree
//! (forged while signing is off, or a publisher's bug) is adopted, then moved aside at the
//! node's next start.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use snaprelay_contract::chunking::{Digest, IndexError, IndexFile};
use snaprelay_contract::ipc::ErrorCode;

use crate::verify::{IncomingFile, Refusal};

/// A file's size, modification time and link count: any write moves `mtime`; a rename
/// (which moves only ctime) or an unlink does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime: (i64, i64),
    pub links: u64,
}

impl Stamp {
    pub fn of(file: &File) -> io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp {
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            links: m.nlink(),
        })
    }

    /// Same size and modification time: the link count aside.
    fn same_content(&self, other: &Stamp) -> bool {
        (self.size, self.mtime) == (other.size, other.mtime)
    }
}

/// A chunk index the node opened beside a handed-over file (no symlink followed), checked
/// against the file's size and the request's sha256.
#[derive(Debug, Clone)]
pub struct IncomingIndex {
    pub(crate) index: Arc<IndexFile>,
    pub(crate) dev_ino: (u64, u64),
}

impl PartialEq for IncomingIndex {
    fn eq(&self, other: &IncomingIndex) -> bool {
        self.dev_ino == other.dev_ino
    }
}

impl IncomingIndex {
    /// Checks the index in `file` (opened by the caller, regular) for a data file of
    /// `size` bytes whose sha256 the request says is `sha256`.
    pub(crate) fn check(
        file: File,
        path: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<IncomingIndex, IndexError> {
        let meta = file.metadata().map_err(|source| IndexError::Read {
            path: path.to_owned(),
            source,
        })?;
        let index = IndexFile::from_file(file, path, size)?;
        let said = index.header().sha256.to_hex();
        if said != sha256 {
            return Err(IndexError::Invalid {
                path: path.to_owned(),
                reason: format!("its sha256 is {said}, but the request says {sha256}"),
            });
        }
        Ok(IncomingIndex {
            index: Arc::new(index),
            dev_ino: (meta.dev(), meta.ino()),
        })
    }

    pub fn index(&self) -> &IndexFile {
        &self.index
    }
}

/// The snapshot the node checked last, chunk by chunk: its data and index, held open, as
/// they were when the check started. What the next check proves chunks against.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub data: Arc<File>,
    pub dev: u64,
    pub data_stamp: Stamp,
    pub index: Arc<IndexFile>,
    pub index_stamp: Stamp,
    /// Where this file's bytes are in the page cache, in the ranges it shares with an
    /// earlier snapshot: that one. `None`: the check read the whole file through it.
    pub anchor: Option<Anchor>,
}

/// An earlier checked snapshot whose bytes a later one holds in `ranges`, proven (a chain of
/// proofs, each against the one before), and whose page cache holds them: the check read
/// the file through it. Reading those ranges through it instead of through the new file
/// (whose page cache has none of its shared blocks) is what keeps a check of a 1%-changed
/// snapshot from reading the other 99% from disk. Held open, so a snapshot the node has
/// removed stays on disk while it anchors (its blocks are mostly shared with the newer
/// ones; a check drops an anchor that covers less than [`ANCHOR_COVERAGE`] of the file).
#[derive(Debug, Clone)]
pub(crate) struct Anchor {
    file: Arc<File>,
    stamp: Stamp,
    ranges: Arc<Ranges>,
}

/// The share of a file its anchor must cover (in quarters) to be kept: below, the check
/// reads the whole file through itself, which then becomes what later checks read through.
const ANCHOR_COVERAGE: u64 = 3;

impl Anchor {
    /// Unchanged since its check (it may have been removed: it is held open).
    fn holds(&self) -> bool {
        Stamp::of(&self.file).is_ok_and(|s| s.same_content(&self.stamp))
    }
}

/// Ranges of a file to read through another file, which holds the same bytes there.
type ReadsElsewhere = Vec<(u64, u64, Arc<File>)>;

/// Where the check of a file reads its proven ranges `proven` from, and the anchor the
/// file's own record keeps: the anchor of `against` where it still covers most of the file,
/// else `against` itself if its check read it whole, else nothing (the file is read whole
/// through itself, and anchors the next).
fn read_plan(
    against: Option<&Checked>,
    proven: &Ranges,
    size: u64,
) -> (ReadsElsewhere, Option<Anchor>) {
    let Some(old) = against else {
        return (Vec::new(), None);
    };
    let (file, ranges, stamp) = match &old.anchor {
        None => (old.data.clone(), proven.clone(), old.data_stamp),
        Some(a) if a.holds() => (a.file.clone(), intersect(proven, &a.ranges), a.stamp),
        Some(_) => return (Vec::new(), None),
    };
    // Enough of both files, so that an anchor never keeps much more than itself on disk
    // (a file that shrank leaves the anchor's tail unshared).
    let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let most = size.max(stamp.size);
    if most == 0 || u128::from(covered) * 4 < u128::from(most) * u128::from(ANCHOR_COVERAGE) {
        return (Vec::new(), None);
    }
    let reads = ranges.iter().map(|&(s, e)| (s, e, file.clone())).collect();
    let anchor = Anchor {
        file,
        stamp,
        ranges: Arc::new(ranges),
    };
    (reads, Some(anchor))
}

/// The ranges in both `a` and `b` (each sorted, apart).
fn intersect(a: &Ranges, b: &Ranges) -> Ranges {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl Checked {
    /// Whether both files still hold what was checked, and the data file is still linked:
    /// a removed snapshot is not kept alive for proofs.
    pub fn holds(&self) -> bool {
        self.unchanged(true)
    }

    /// Whether both files still hold what was checked, removed or not.
    fn unchanged(&self, linked: bool) -> bool {
        let data = Stamp::of(&self.data);
        let index = Stamp::of(self.index.file());
        matches!((data, index), (Ok(d), Ok(i))
            if (d.links > 0 || !linked) && d.same_content(&self.data_stamp) && i.same_content(&self.index_stamp))
    }
}

/// One extent of a file's mapping, as `FIEMAP` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// `FIEMAP_EXTENT_LAST`: the file's last extent.
pub const EXTENT_LAST: u32 = 0x1;
/// `FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED`: flags of plain, allocated, written data.
const PLAIN_FLAGS: u32 = 0x1000 | 0x2000;

impl Extent {
    fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    /// Allocated, written data at a known place, nothing else said about it.
    fn plain(&self) -> bool {
        self.flags & !(PLAIN_FLAGS | EXTENT_LAST) == 0
    }
}

/// Where a file's bytes are on disk.
pub trait ExtentSource: Send + Sync {
    /// Up to `max` extents of `file` that end after `from`, in logical order, after writing
    /// its dirty pages back. Fewer than `max`, or one flagged [`EXTENT_LAST`], ends the map.
    fn extents(&self, file: &File, from: u64, max: usize) -> io::Result<Vec<Extent>>;
}

/// The kernel's `FS_IOC_FIEMAP`, with `FIEMAP_FLAG_SYNC`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fiemap;

#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapHeader {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `_IOWR('f', 11, struct fiemap)`: read and write (3 << 30), the 32-byte header's size,
/// type 'f', number 11.
const FS_IOC_FIEMAP: u64 =
    (3 << 30) | ((size_of::<FiemapHeader>() as u64) << 16) | (0x66 << 8) | 11;
const FIEMAP_FLAG_SYNC: u32 = 0x1;

impl ExtentSource for Fiemap {
    fn extents(&self, file: &File, from: u64, max: usize) -> io::Result<Vec<Extent>> {
        use std::os::fd::AsRawFd;
        let max = max.clamp(1, 4096);
        // The header, then room for `max` extents, in one buffer of extent-sized words.
        let words = 1 + max;
        let mut buf = vec![FiemapExtent::default(); words];
        let header = FiemapHeader {
            start: from,
            length: u64::MAX - from,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: max as u32,
            reserved: 0,
        };
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` is at least header + `max` extents long and aligned for both; the
        // kernel writes at most `extent_count` extents after the 32-byte header.
        let extents = unsafe {
            base.cast::<FiemapHeader>().write(header);
            if libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, base) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mapped = (*base.cast::<FiemapHeader>()).mapped_extents as usize;
            let first = base.add(size_of::<FiemapHeader>()).cast::<FiemapExtent>();
            (0..mapped.min(max))
                .map(|i| first.add(i).read_unaligned())
                .collect::<Vec<_>>()
        };
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            })
            .collect())
    }
}

/// Extents fetched for this many at a time.
const EXTENT_BATCH: usize = 512;

/// A file's extents, read in batches as a walk in file order needs them: memory stays a
/// batch or two whatever the file's fragmentation.
struct ExtentCursor<'a> {
    source: &'a dyn ExtentSource,
    file: &'a File,
    held: VecDeque<Extent>,
    next: u64,
    done: bool,
}

impl<'a> ExtentCursor<'a> {
    fn new(source: &'a dyn ExtentSource, file: &'a File) -> ExtentCursor<'a> {
        ExtentCursor {
            source,
            file,
            held: VecDeque::new(),
            next: 0,
            done: false,
        }
    }

    /// The extent holding byte `at` (walked in increasing order), or `None` for a hole.
    fn at(&mut self, at: u64) -> io::Result<Option<Extent>> {
        loop {
            while self.held.front().is_some_and(|e| e.end() <= at) {
                self.held.pop_front();
            }
            if let Some(e) = self.held.front() {
                return Ok((e.logical <= at).then_some(*e));
            }
            if self.done {
                return Ok(None);
            }
            let batch = self
                .source
                .extents(self.file, self.next.max(at), EXTENT_BATCH)?;
            match batch.last() {
                Some(last) if last.end() > self.next.max(at) => {
                    self.done = batch.len() < EXTENT_BATCH || last.flags & EXTENT_LAST != 0;
                    self.next = last.end();
                    self.held.extend(batch.into_iter().filter(|e| e.end() > at));
                }
                _ => self.done = true,
            }
        }
    }
}

/// Proves chunks of a new file against a checked one: same offset, same sha256 and length in
/// its index, every byte mapped to the same physical bytes. Walked in file order.
struct Prover<'a> {
    new: ExtentCursor<'a>,
    old: ExtentCursor<'a>,
    old_records: snaprelay_contract::chunking::Records<'a>,
    /// The old index's chunk at `old_at`.
    old_chunk: Option<(Digest, u64)>,
    old_at: u64,
    /// A failure stops the proofs (every chunk after it is hashed).
    failed: Option<String>,
}

impl<'a> Prover<'a> {
    fn new(source: &'a dyn ExtentSource, new: &'a File, old: &'a Checked) -> Prover<'a> {
        let mut old_records = old.index.records();
        let old_chunk = old_records.next().and_then(Result::ok);
        Prover {
            new: ExtentCursor::new(source, new),
            old: ExtentCursor::new(source, &old.data),
            old_records,
            old_chunk,
            old_at: 0,
            failed: None,
        }
    }

    fn proves(&mut self, at: u64, len: u64, id: &Digest) -> bool {
        if self.failed.is_some() {
            return false;
        }
        match self.try_proves(at, len, id) {
            Ok(yes) => yes,
            Err(e) => {
                self.failed = Some(e.to_string());
                false
            }
        }
    }

    fn try_proves(&mut self, at: u64, len: u64, id: &Digest) -> io::Result<bool> {
        while let Some((_, old_len)) = self.old_chunk.filter(|_| self.old_at < at) {
            self.old_at += old_len;
            self.old_chunk = self
                .old_records
                .next()
                .transpose()
                .map_err(io::Error::other)?;
        }
        if self.old_at != at || self.old_chunk != Some((*id, len)) {
            return Ok(false);
        }
        let end = at + len;
        let mut pos = at;
        while pos < end {
            let (Some(n), Some(o)) = (self.new.at(pos)?, self.old.at(pos)?) else {
                return Ok(false);
            };
            if !n.plain() || !o.plain() {
                return Ok(false);
            }
            let here = |e: &Extent| e.physical.checked_add(pos - e.logical);
            if here(&n).is_none() || here(&n) != here(&o) {
                return Ok(false);
            }
            pos = n.end().min(o.end()).min(end);
        }
        Ok(true)
    }
}

/// What a chunk check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ChunkCheck {
    pub bytes: u64,
    pub chunks: u64,
    pub proven_chunks: u64,
    pub proven_bytes: u64,
    /// The first chunk that does not match, said as the refusal will say it.
    pub mismatch: Option<String>,
    /// Why proofs stopped, if they did.
    pub proofs_failed: Option<String>,
    /// Bytes the validation read through an earlier snapshot (its page cache).
    pub read_elsewhere: u64,
}

/// Byte ranges `[start, end)` of a file, sorted and apart.
pub(crate) type Ranges = Vec<(u64, u64)>;

/// The ranges of the new file made of chunks proven against `old`, and why proving stopped,
/// if it did: what the pass then neither copies for the hashing thread nor hashes. Memory:
/// a range per run of proven chunks.
fn plan(
    new: &File,
    index: &IndexFile,
    old: &Checked,
    source: &dyn ExtentSource,
) -> Result<(Ranges, Option<String>), IndexError> {
    let mut prover = Prover::new(source, new, old);
    let mut proven: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    for r in index.records() {
        let (id, len) = r?;
        if prover.proves(at, len, &id) {
            match proven.last_mut() {
                Some(last) if last.1 == at => last.1 += len,
                _ => proven.push((at, at + len)),
            }
        }
        at += len;
    }
    Ok((proven, prover.failed))
}

/// Checks a file against `index`: the chunks inside the `proven` ranges are taken as they
/// are, and every other chunk is hashed from the bytes arriving on `pieces` (`(offset,
/// bytes)`, in order, none of the proven ranges' bytes).
pub(crate) fn check_pieces(
    pieces: impl Iterator<Item = (u64, Vec<u8>)>,
    index: &IndexFile,
    proven: &[(u64, u64)],
) -> Result<ChunkCheck, IndexError> {
    let mut pieces = pieces;
    // The piece being consumed, and how far.
    let mut piece: Option<(u64, Vec<u8>, usize)> = None;
    let mut ranges = proven;
    let mut check = ChunkCheck::default();
    let mut at = 0u64;
    let mut ended = false;
    for r in index.records() {
        let (id, len) = r?;
        while ranges.first().is_some_and(|r| r.1 <= at) {
            ranges = &ranges[1..];
        }
        check.chunks += 1;
        if ranges.first().is_some_and(|r| r.0 <= at && at + len <= r.1) {
            check.proven_chunks += 1;
            check.proven_bytes += len;
            check.bytes += len;
            at += len;
            continue;
        }
        let mut hasher = Sha256::new();
        let mut left = len;
        while left > 0 && !ended {
            if piece
                .as_ref()
                .is_none_or(|(_, data, used)| *used == data.len())
            {
                piece = pieces.next().map(|(offset, data)| (offset, data, 0));
            }
            let Some((offset, data, used)) = piece.as_mut() else {
                ended = true;
                break;
            };
            let here = *offset + *used as u64;
            let want = at + (len - left);
            if here != want {
                // Bytes the stream skipped, or sent twice: nothing to hash them from.
                check.mismatch.get_or_insert(format!(
                    "the check was given offset {here} where chunk {} needs offset {want}",
                    check.chunks - 1
                ));
                ended = true;
                break;
            }
            let take = (data.len() - *used).min(left as usize);
            hasher.update(&data[*used..*used + take]);
            *used += take;
            left -= take as u64;
            check.bytes += take as u64;
        }
        if left > 0 {
            check.mismatch.get_or_insert(format!(
                "the file ends {left} bytes into chunk {} ({len} bytes at offset {at})",
                check.chunks - 1
            ));
        } else {
            let actual = Digest(hasher.finalize().into());
            if actual != id && check.mismatch.is_none() {
                check.mismatch = Some(format!(
                    "chunk {} ({len} bytes at offset {at}) has sha256 {actual}, but the chunk index says {id}",
                    check.chunks - 1
                ));
            }
        }
        at += len;
    }
    // Bytes past the index's chunks: the size check says so.
    if let Some((_, data, used)) = piece {
        check.bytes += (data.len() - used) as u64;
    }
    check.bytes += pieces.map(|(_, data)| data.len() as u64).sum::<u64>();
    Ok(check)
}

/// The refusal for a chunk check that found a mismatch, or a file that is not its size.
pub(crate) fn refusal(check: &ChunkCheck, size: u64, shown: &Path) -> Option<Refusal> {
    if check.bytes != size {
        return Some(Refusal::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "{} changed size while it was checked ({} bytes, opened at {size})",
                shown.display(),
                check.bytes
            ),
        ));
    }
    check.mismatch.as_ref().map(|m| {
        Refusal::new(
            ErrorCode::ChecksumMismatch,
            format!("{}: {m}", shown.display()),
        )
    })
}

/// What [`verify_chunks_while`] answers: the check and what the next one proves against;
/// `None` when the index turned out unusable and the whole file was hashed instead.
pub(crate) type ChunkCheckResult = Result<Option<(Checked, ChunkCheck)>, Refusal>;

/// Checks `file` against its chunk `index` while `read` runs on the same bytes (one pass, as
/// [`IncomingFile::verify_sha256_while`]), proving chunks against `against` through
/// `source`. Answers, with `read`'s result, what the next check proves against. Blocking.
pub(crate) fn verify_chunks_while<R>(
    file: &IncomingFile,
    index: &IncomingIndex,
    against: Option<&Checked>,
    source: &dyn ExtentSource,
    shown: &Path,
    read: impl FnOnce(&mut dyn io::Read) -> R,
) -> (ChunkCheckResult, std::thread::Result<R>) {
    let internal = |e: io::Error| {
        Refusal::new(
            ErrorCode::Internal,
            format!("reading {}: {e}", shown.display()),
        )
    };
    let stamps = || -> io::Result<(Stamp, Stamp)> {
        Ok((Stamp::of(file.file())?, Stamp::of(index.index.file())?))
    };
    let before = match stamps() {
        Ok(s) => s,
        Err(e) => return (Err(internal(e)), Ok(read(&mut io::empty()))),
    };
    let dev = file.dev();
    // Physical addresses compare only within one file system.
    let against = against.filter(|c| c.dev == dev && c.holds());
    let planned = against.map(|old| plan(file.file(), &index.index, old, source));
    let (proven, proofs_failed) = match planned {
        Some(Ok(plan)) => plan,
        Some(Err(e)) => (Vec::new(), Some(e.to_string())),
        None => (Vec::new(), None),
    };
    let (reads, anchor) = read_plan(against, &proven, file.size());
    let elsewhere: Vec<(u64, u64, &File)> = reads.iter().map(|(s, e, f)| (*s, *e, &**f)).collect();
    let (first, answer) = file.tee_while(&proven, &elsewhere, checker(&index.index, &proven), read);
    let result = (|| {
        // The new file must not have moved at all while it was checked: the validation
        // read it, and the proofs were taken of its mapping.
        let unwritten = || match stamps() {
            // Size and mtime, as for the old snapshot: a rename or an unlink (the sidecar
            // cleaning up) moves only ctime and is not a write; a write whose mtime is put
            // back is its writer's, the sidecar's user, which could hand over anything.
            Ok((d, i)) if d.same_content(&before.0) && i.same_content(&before.1) => Ok(()),
            Ok(_) => Err(Refusal::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "{} or its chunk index was written while it was checked",
                    shown.display()
                ),
            )),
            Err(e) => Err(internal(e)),
        };
        // Nor did the validation read what it was meant to from another file if that moved
        // (removed is fine: it is held open).
        let moved = !against.is_some_and(|c| c.unchanged(false))
            || anchor.as_ref().is_some_and(|a| !a.holds());
        if !elsewhere.is_empty() && moved {
            return Err(Refusal::new(
                ErrorCode::Internal,
                format!(
                    "the snapshot {} was checked against changed during the check; hand it over again",
                    shown.display()
                ),
            ));
        }
        let mut check = match first.map_err(internal)? {
            Ok(check) => ChunkCheck {
                proofs_failed,
                ..check
            },
            Err(e) => {
                // An index found unusable part way (lengths that do not add up, a record
                // out of range, a read error): the whole file is hashed instead, as
                // without one, and the snapshot is not refused for the index's fault.
                tracing::warn!(path = %shown.display(), error = %e, "the chunk index handed over is unusable; hashing the whole file");
                file.verify_sha256(&index.index.header().sha256.to_hex(), shown)?;
                unwritten()?;
                return Ok(None);
            }
        };
        if let Some(why) = &check.proofs_failed {
            tracing::debug!(path = %shown.display(), error = %why, "proving chunks stopped; hashed the rest");
        }
        unwritten()?;
        // A proof holds only if the snapshot it was taken against did not move either; nor
        // did the validation read what it was meant to from another file if that moved.
        let moved =
            !against.is_some_and(Checked::holds) || anchor.as_ref().is_some_and(|a| !a.holds());
        if !elsewhere.is_empty() && moved {
            return Err(Refusal::new(
                ErrorCode::Internal,
                format!(
                    "the snapshot {} was checked against changed during the check; hand it over again",
                    shown.display()
                ),
            ));
        }
        if check.proven_chunks > 0 && moved {
            tracing::info!(path = %shown.display(), "the snapshot chunks were proven against changed while they were; hashing every chunk");
            check = file
                .tee_while(&[], &[], checker(&index.index, &[]), |r| {
                    drop(io::copy(r, &mut io::sink()))
                })
                .0
                .map_err(internal)?
                .map_err(|e| internal(io::Error::other(e)))?;
            unwritten()?;
        }
        if let Some(refused) = refusal(&check, file.size(), shown) {
            return Err(refused);
        }
        check.read_elsewhere = elsewhere.iter().map(|(s, e, _)| e - s).sum();
        let checked = Checked {
            data: file.shared(),
            dev,
            data_stamp: before.0,
            index: index.index.clone(),
            index_stamp: before.1,
            anchor,
        };
        Ok(Some((checked, check)))
    })();
    (result, answer)
}

/// [`check_pieces`] as the checking side of [`IncomingFile::tee_while`].
fn checker<'a>(
    index: &'a IndexFile,
    proven: &'a [(u64, u64)],
) -> impl FnOnce(&mut dyn Iterator<Item = (u64, Vec<u8>)>) -> Result<ChunkCheck, IndexError> + Send + 'a
{
    move |pieces| check_pieces(pieces, index, proven)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::open_incoming;
    use snaprelay_contract::chunking::{ChunkParams, IndexWriter, Indexer};
    use std::collections::HashMap;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::Mutex;

    fn params() -> ChunkParams {
        ChunkParams::new(4096, 8192, 16384).unwrap()
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A data file and its chunk index in `dir`; returns the index's chunks and sha256.
    fn write_indexed(dir: &Path, stem: &str, data: &[u8]) -> (Vec<(Digest, u64)>, String) {
        fs_write(&dir.join(format!("{stem}.bin")), data);
        let index = File::create(dir.join(format!("{stem}.chunks"))).unwrap();
        let mut indexer = Indexer::with_sink(params(), IndexWriter::new(index).unwrap());
        indexer.feed(data).unwrap();
        let (writer, size, sha256) = indexer.end().unwrap();
        writer.finish(params(), size, sha256).unwrap();
        let mut memory = Indexer::new(params());
        memory.update(data);
        (memory.finish().chunks, sha256.to_hex())
    }

    fn fs_write(path: &Path, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    struct Opened {
        file: IncomingFile,
        index: IncomingIndex,
        path: PathBuf,
    }

    fn open(dir: &Path, stem: &str, sha256: &str) -> Opened {
        let name = format!("{stem}.bin");
        let size = std::fs::metadata(dir.join(&name)).unwrap().len();
        let file = open_incoming(dir, &name, size).unwrap();
        let index_path = dir.join(format!("{stem}.chunks"));
        let index =
            IncomingIndex::check(File::open(&index_path).unwrap(), &index_path, size, sha256)
                .unwrap();
        Opened {
            file,
            index,
            path: dir.join(name),
        }
    }

    /// Extents made up per inode: what a file system with shared blocks would say.
    #[derive(Default)]
    struct Fake {
        maps: Mutex<HashMap<u64, Vec<Extent>>>,
        calls: Mutex<usize>,
    }

    impl Fake {
        fn set(&self, file: &File, extents: Vec<Extent>) {
            let ino = file.metadata().unwrap().ino();
            self.maps.lock().unwrap().insert(ino, extents);
        }
    }

    impl ExtentSource for Fake {
        fn extents(&self, file: &File, from: u64, max: usize) -> io::Result<Vec<Extent>> {
            *self.calls.lock().unwrap() += 1;
            let ino = file.metadata()?.ino();
            let maps = self.maps.lock().unwrap();
            let Some(all) = maps.get(&ino) else {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            };
            Ok(all
                .iter()
                .filter(|e| e.end() > from)
                .take(max)
                .copied()
                .collect())
        }
    }

    /// One extent per `piece` bytes, at `base` + offset (so that two files given the same
    /// `base` share every byte).
    fn mapping(size: u64, piece: u64, base: u64, flags: u32) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < size {
            let length = piece.min(size - at).div_ceil(4096) * 4096;
            out.push(Extent {
                logical: at,
                physical: base + at,
                length,
                flags,
            });
            at += length;
        }
        if let Some(last) = out.last_mut() {
            last.flags |= EXTENT_LAST;
        }
        out
    }

    /// Checks `o` against `against` with a validation that reads the whole file and then
    /// does `during` (before the check's end); returns the answer and what was read.
    fn check_during(
        o: &Opened,
        against: Option<&Checked>,
        source: &dyn ExtentSource,
        during: impl FnOnce(),
    ) -> (ChunkCheckResult, Vec<u8>) {
        let (checked, read) =
            verify_chunks_while(&o.file, &o.index, against, source, &o.path, |r| {
                let mut all = Vec::new();
                r.read_to_end(&mut all).unwrap();
                during();
                all
            });
        (checked, read.unwrap())
    }

    /// Checks `o` against `against`, returning what the validation read.
    fn check_reading(
        o: &Opened,
        against: Option<&Checked>,
        source: &dyn ExtentSource,
    ) -> (Result<(Checked, ChunkCheck), Refusal>, Vec<u8>) {
        let (checked, read) = check_during(o, against, source, || ());
        (checked.map(|c| c.expect("checked chunk by chunk")), read)
    }

    fn check(
        o: &Opened,
        against: Option<&Checked>,
        source: &dyn ExtentSource,
    ) -> Result<(Checked, ChunkCheck), Refusal> {
        let (checked, read) = check_reading(o, against, source);
        assert_eq!(read.len() as u64, o.file.size());
        checked
    }

    /// The old snapshot, checked; the new one, its copy with `changed` chunks rewritten.
    struct Pair {
        _dir: tempfile::TempDir,
        old: Opened,
        new: Opened,
        chunks: Vec<(Digest, u64)>,
        /// Of the new file's chunks, those the old one has at the same offset.
        same: Vec<bool>,
        checked: Checked,
    }

    fn pair(change_chunk: Option<usize>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = noise(300_000, 1);
        let (chunks, sha) = write_indexed(d, "old", &data);
        let old = open(d, "old", &sha);
        let (checked, first) = check(&old, None, &Fake::default()).unwrap();
        assert_eq!(
            (first.proven_chunks, first.chunks),
            (0, chunks.len() as u64)
        );
        let mut new_data = data.clone();
        if let Some(i) = change_chunk {
            let at: u64 = chunks[..i].iter().map(|c| c.1).sum();
            let len = chunks[i].1 as usize;
            new_data[at as usize..at as usize + len].copy_from_slice(&noise(len, 99));
        }
        let (new_chunks, new_sha) = write_indexed(d, "new", &new_data);
        let new = open(d, "new", &new_sha);
        let placed = |c: &[(Digest, u64)]| {
            c.iter()
                .scan(0u64, |at, c| {
                    *at += c.1;
                    Some((*at - c.1, *c))
                })
                .collect::<Vec<_>>()
        };
        let old_placed: std::collections::HashSet<_> = placed(&chunks).into_iter().collect();
        let same = placed(&new_chunks)
            .iter()
            .map(|c| old_placed.contains(c))
            .collect();
        Pair {
            _dir: dir,
            old,
            new,
            chunks: new_chunks,
            same,
            checked,
        }
    }

    #[test]
    fn without_a_checked_snapshot_every_chunk_is_hashed_and_a_damaged_one_named() {
        let p = pair(None);
        let (_, c) = check(&p.new, None, &Fake::default()).unwrap();
        assert_eq!((c.proven_chunks, c.chunks), (0, p.chunks.len() as u64));

        // One byte of chunk 3 flipped on disk after the index was written.
        let at: u64 = p.chunks[..3].iter().map(|c| c.1).sum::<u64>() + 5;
        let mut byte = [0u8];
        p.new.file.file().read_exact_at(&mut byte, at).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.new.path)
            .unwrap();
        f.write_all_at(&[byte[0] ^ 1], at).unwrap();
        let reopened = open(
            p._dir.path(),
            "new",
            &p.new.index.index().header().sha256.to_hex(),
        );
        let refused = check(&reopened, None, &Fake::default()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::ChecksumMismatch);
        assert!(refused.message.contains("chunk 3 ("), "{refused}");
        assert!(
            refused.message.contains("but the chunk index says"),
            "{refused}"
        );
    }

    #[test]
    fn chunks_mapped_to_the_checked_snapshots_bytes_are_proven_and_the_rest_hashed() {
        let p = pair(Some(4));
        let fake = Fake::default();
        let size = p.new.file.size();
        fake.set(p.old.file.file(), mapping(size, 65536, 1 << 30, 0x2000));
        // The new file shares everything but the 4 KiB blocks under chunk 4.
        let start: u64 = p.chunks[..4].iter().map(|c| c.1).sum();
        let end = start + p.chunks[4].1;
        let mut new_map = Vec::new();
        let mut at = 0;
        while at < size {
            let length = 4096.min(size - at);
            let block = at / 4096 * 4096;
            let moved = block + 4096 > start && block < end;
            new_map.push(Extent {
                logical: at,
                physical: if moved { 7 << 40 } else { 1 << 30 } + at,
                length: 4096,
                flags: if moved { 0 } else { 0x2000 },
            });
            at += length;
        }
        fake.set(p.new.file.file(), new_map);
        let (_, c) = check(&p.new, Some(&p.checked), &fake).unwrap();
        // Chunk 4 is hashed, and so are its neighbours that share a block with it.
        let provable = p
            .chunks
            .iter()
            .zip(&p.same)
            .scan(0u64, |at, (c, same)| {
                let (s, e) = (*at, *at + c.1);
                *at = e;
                Some(*same && !(s < end.div_ceil(4096) * 4096 && e > start / 4096 * 4096))
            })
            .filter(|&t| t)
            .count() as u64;
        assert!(provable > 0 && provable < p.chunks.len() as u64 - 1);
        assert_eq!(c.chunks, p.chunks.len() as u64);
        assert_eq!(c.proven_chunks, provable, "{c:?}");
        // Extents are read in batches, not once per chunk.
        assert!(
            *fake.calls.lock().unwrap() <= 8,
            "{} FIEMAP calls",
            fake.calls.lock().unwrap()
        );
    }

    #[test]
    fn a_proof_needs_plain_extents_the_same_place_the_same_offset_and_the_same_chunk() {
        let p = pair(None);
        let size = p.new.file.size();
        let shared = mapping(size, 65536, 1 << 30, 0x2000);
        let cases: Vec<(&str, Vec<Extent>, u64)> = vec![
            ("shared", shared.clone(), p.chunks.len() as u64),
            ("elsewhere on disk", mapping(size, 65536, 2 << 30, 0), 0),
            ("unwritten", mapping(size, 65536, 1 << 30, 0x800), 0),
            ("delayed allocation", mapping(size, 65536, 1 << 30, 0x4), 0),
            ("encoded", mapping(size, 65536, 1 << 30, 0x8 | 0x2000), 0),
            ("inline", mapping(size, 65536, 1 << 30, 0x200), 0),
            ("a hole", Vec::new(), 0),
        ];
        for (what, new_map, proven) in cases {
            let fake = Fake::default();
            fake.set(p.old.file.file(), shared.clone());
            fake.set(p.new.file.file(), new_map);
            let (_, c) = check(&p.new, Some(&p.checked), &fake).unwrap();
            assert_eq!(c.proven_chunks, proven, "{what}");
        }
        // A source that fails proves nothing, and the chunks are hashed.
        let (_, c) = check(&p.new, Some(&p.checked), &Fake::default()).unwrap();
        assert_eq!(c.proven_chunks, 0);
    }

    #[test]
    fn shifted_chunks_are_not_proven_even_on_shared_bytes() {
        // The new file is the old one with 100 bytes in front: every chunk after the cut
        // is the old one's, at another offset.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = noise(200_000, 3);
        let (_, sha) = write_indexed(d, "old", &data);
        let old = open(d, "old", &sha);
        let (checked, _) = check(&old, None, &Fake::default()).unwrap();
        let mut shifted = noise(100, 4);
        shifted.extend_from_slice(&data);
        let (_, new_sha) = write_indexed(d, "new", &shifted);
        let new = open(d, "new", &new_sha);
        let fake = Fake::default();
        fake.set(old.file.file(), mapping(200_000, 65536, 1 << 30, 0x2000));
        fake.set(new.file.file(), mapping(200_100, 65536, 1 << 30, 0x2000));
        let (_, c) = check(&new, Some(&checked), &fake).unwrap();
        assert_eq!(c.proven_chunks, 0, "{c:?}");
    }

    #[test]
    fn a_checked_snapshot_written_since_proves_nothing() {
        let p = pair(None);
        let fake = Fake::default();
        let size = p.new.file.size();
        fake.set(p.old.file.file(), mapping(size, 65536, 1 << 30, 0x2000));
        fake.set(p.new.file.file(), mapping(size, 65536, 1 << 30, 0x2000));
        // Rewritten in place with the same bytes: its mtime moves.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.old.path)
            .unwrap();
        let mut first = [0u8; 1];
        p.old.file.file().read_exact_at(&mut first, 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.write_all_at(&first, 0).unwrap();
        assert!(!p.checked.holds());
        let (_, c) = check(&p.new, Some(&p.checked), &fake).unwrap();
        assert_eq!(c.proven_chunks, 0);
    }

    fn shared_fake(p: &Pair) -> Fake {
        let fake = Fake::default();
        let size = p.new.file.size();
        fake.set(p.old.file.file(), mapping(size, 65536, 1 << 30, 0x2000));
        fake.set(p.new.file.file(), mapping(size, 65536, 1 << 30, 0x2000));
        fake
    }

    /// Rewrites byte 0 of `path` with what it holds: the content stays, mtime moves.
    fn touch(path: &Path) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut first = [0u8; 1];
        f.read_exact_at(&mut first, 0).unwrap();
        let before = f.metadata().unwrap().mtime_nsec();
        while f.metadata().unwrap().mtime_nsec() == before {
            f.write_all_at(&first, 0).unwrap();
        }
    }

    #[test]
    fn a_new_file_written_while_it_is_checked_is_refused() {
        let p = pair(None);
        let fake = shared_fake(&p);
        for written in [p.new.path.clone(), p.new.path.with_extension("chunks")] {
            let (checked, _) = check_during(&p.new, Some(&p.checked), &fake, || touch(&written));
            let refused = checked.unwrap_err();
            assert_eq!(
                refused.code,
                ErrorCode::ChecksumMismatch,
                "{}",
                written.display()
            );
            assert!(
                refused.message.contains("written while it was checked"),
                "{refused}"
            );
        }
    }

    /// The snapshot proven against, written during the check (whose validation read the
    /// proven ranges through it): the handover is refused as transient, and the next one
    /// proves nothing against it, reads the file through itself, and hashes every chunk.
    #[test]
    fn a_checked_snapshot_written_during_a_check_makes_it_be_handed_over_again() {
        let p = pair(None);
        let fake = shared_fake(&p);
        let (checked, _) = check_during(&p.new, Some(&p.checked), &fake, || touch(&p.old.path));
        let refused = checked.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Internal, "{refused}");
        assert!(refused.message.contains("hand it over again"), "{refused}");
        let (_, c) = check(&p.new, Some(&p.checked), &fake).unwrap();
        assert_eq!((c.proven_chunks, c.chunks), (0, p.chunks.len() as u64));
    }

    #[test]
    fn an_index_that_is_not_the_requests_or_the_files_is_refused_by_name() {
        let p = pair(None);
        let d = p._dir.path();
        let index_path = d.join("new.chunks");
        let size = p.new.file.size();
        let other = "0".repeat(64);
        let e = IncomingIndex::check(File::open(&index_path).unwrap(), &index_path, size, &other)
            .unwrap_err();
        assert!(e.to_string().contains("but the request says"), "{e}");
        assert!(e.to_string().contains("new.chunks"), "{e}");
        let e = IncomingIndex::check(
            File::open(&index_path).unwrap(),
            &index_path,
            size + 1,
            &other,
        )
        .unwrap_err();
        assert!(e.to_string().contains("differs from the data file"), "{e}");

        // Lengths that do not add up to the size, found in the pass: the whole file is
        // hashed instead, and a genuine file is not refused for its index's fault.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&index_path)
            .unwrap();
        let last = 256 + 40 * (p.chunks.len() as u64 - 1) + 32;
        f.write_all_at(&(p.chunks.last().unwrap().1 - 1).to_le_bytes(), last)
            .unwrap();
        let sha = p.new.index.index().header().sha256.to_hex();
        let reopened = open(d, "new", &sha);
        let (checked, read) = check_during(&reopened, None, &Fake::default(), || ());
        assert_eq!(read.len() as u64, size);
        assert!(checked.unwrap().is_none(), "hashed whole, no record");
        // ... and a damaged one still is.
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(&reopened.path)
            .unwrap();
        data.write_all_at(b"X", 7).unwrap();
        let reopened = open(d, "new", &sha);
        let (checked, _) = check_during(&reopened, None, &Fake::default(), || ());
        let refused = checked.unwrap_err();
        assert_eq!(refused.code, ErrorCode::ChecksumMismatch, "{refused}");
        assert!(refused.message.contains("has sha256"), "{refused}");
    }

    /// FIEMAP on this machine's temp dir, and on a reflink file system if one is given
    /// (`SNAPRELAY_TEST_REFLINK_DIR`; CI mounts an XFS image there, and
    /// `SNAPRELAY_TEST_REFLINK_REQUIRED=1` makes its absence a failure): a copy made with
    /// FICLONE shares every chunk but the one rewritten.
    #[test]
    fn fiemap_proves_the_chunks_a_reflinked_copy_shares() {
        // Wherever it runs, FIEMAP either maps a synced file or is unsupported.
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain");
        fs_write(&plain, &noise(100_000, 5));
        match Fiemap.extents(&File::open(&plain).unwrap(), 0, 16) {
            Ok(extents) => assert!(extents.iter().all(|e| e.length > 0), "{extents:?}"),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)),
                "{e}"
            ),
        }
        let Some(root) = std::env::var_os("SNAPRELAY_TEST_REFLINK_DIR") else {
            assert!(
                std::env::var("SNAPRELAY_TEST_REFLINK_REQUIRED").as_deref() != Ok("1"),
                "SNAPRELAY_TEST_REFLINK_REQUIRED=1 but SNAPRELAY_TEST_REFLINK_DIR is not set"
            );
            eprintln!(
                "SNAPRELAY_TEST_REFLINK_DIR not set: not testing FIEMAP proofs on shared blocks"
            );
            return;
        };
        let dir = tempfile::tempdir_in(root).unwrap();
        let d = dir.path();
        let data = noise(4 << 20, 6);
        let (chunks, sha) = write_indexed(d, "old", &data);
        let old = open(d, "old", &sha);
        let (checked, _) = check(&old, None, &Fiemap).unwrap();
        // The new file: a reflinked copy, then one 4 KiB block rewritten in place, 1 MiB in.
        let copy = File::create(d.join("new.bin")).unwrap();
        rustix_clone(&copy, old.file.file());
        let changed = noise(4096, 7);
        copy.write_all_at(&changed, 1 << 20).unwrap();
        copy.sync_all().unwrap();
        let mut new_data = data.clone();
        new_data[1 << 20..(1 << 20) + 4096].copy_from_slice(&changed);
        let (new_chunks, new_sha) = write_indexed(d, "new-index", &new_data);
        std::fs::rename(d.join("new-index.chunks"), d.join("new.chunks")).unwrap();
        std::fs::remove_file(d.join("new-index.bin")).unwrap();
        let new = open(d, "new", &new_sha);
        let (_, c) = check(&new, Some(&checked), &Fiemap).unwrap();
        assert_eq!(c.chunks, new_chunks.len() as u64);
        assert!(
            c.proven_chunks + 4 >= c.chunks && c.proven_chunks < c.chunks,
            "{c:?} of {} old chunks",
            chunks.len()
        );
        // The same bytes, copied instead of shared: nothing proven, all hashed.
        fs_write(&d.join("copied.bin"), &new_data);
        std::fs::copy(d.join("new.chunks"), d.join("copied.chunks")).unwrap();
        let copied = open(d, "copied", &new_sha);
        let (_, c) = check(&copied, Some(&checked), &Fiemap).unwrap();
        assert_eq!(c.proven_chunks, 0, "{c:?}");
    }

    /// FICLONE: `dst` shares all of `src`'s blocks.
    fn rustix_clone(dst: &File, src: &File) {
        use std::os::fd::AsRawFd;
        // _IOW(0x94, 9, int)
        const FICLONE: u64 = (1 << 30) | (4 << 16) | (0x94 << 8) | 9;
        // SAFETY: FICLONE takes the source fd as its argument.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
        assert_eq!(r, 0, "FICLONE: {}", io::Error::last_os_error());
    }

    /// More extents than one FIEMAP batch: the cursors read on in batches, and prove all.
    #[test]
    fn a_map_of_many_extents_is_read_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = noise(3 << 20, 8);
        let (chunks, sha) = write_indexed(d, "old", &data);
        let old = open(d, "old", &sha);
        let (checked, _) = check(&old, None, &Fake::default()).unwrap();
        std::fs::copy(d.join("old.bin"), d.join("new.bin")).unwrap();
        std::fs::copy(d.join("old.chunks"), d.join("new.chunks")).unwrap();
        let new = open(d, "new", &sha);
        let fake = Fake::default();
        // 768 extents of 4 KiB each: two files sharing every byte, cut differently.
        fake.set(old.file.file(), mapping(3 << 20, 4096, 1 << 30, 0x2000));
        fake.set(new.file.file(), mapping(3 << 20, 8192, 1 << 30, 0x2000));
        let (_, c) = check(&new, Some(&checked), &fake).unwrap();
        assert_eq!(c.proven_chunks, chunks.len() as u64, "{c:?}");
        assert!(
            *fake.calls.lock().unwrap() >= 3,
            "the old map takes two batches"
        );
    }

    /// A checked snapshot the node removed proves nothing (and is let go).
    #[test]
    fn a_removed_snapshot_proves_nothing() {
        let p = pair(None);
        let fake = shared_fake(&p);
        std::fs::remove_file(&p.old.path).unwrap();
        assert!(!p.checked.holds());
        let (_, c) = check(&p.new, Some(&p.checked), &fake).unwrap();
        assert_eq!(c.proven_chunks, 0);
    }

    /// Where blocks are shared, the validation reads them through the file whose page cache
    /// holds them (the one checked whole), along a chain of checks; an anchor that covers
    /// too little of the file is dropped, and the file is read through itself again.
    #[test]
    fn proven_ranges_are_read_through_the_snapshot_read_whole_and_unproven_ones_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = 300_000usize;
        let data = noise(size, 11);
        let (_, sha) = write_indexed(d, "a", &data);
        let a = open(d, "a", &sha);
        let (a_checked, read) = check_reading(&a, None, &Fake::default());
        let a_checked = a_checked.unwrap().0;
        assert_eq!(read, data);
        assert!(a_checked.anchor.is_none(), "read whole through itself");

        // b and c hold a's bytes; the made-up map says they share a's blocks. The files on
        // disk get a marker in their first bytes that the index does not know: what the
        // validation reads there says which file it read.
        let fake = Fake::default();
        fake.set(a.file.file(), mapping(size as u64, 65536, 1 << 30, 0x2000));
        let mut files = Vec::new();
        for name in ["b", "c"] {
            write_indexed(d, name, &data);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(format!("{name}.bin")))
                .unwrap();
            f.write_all_at(name.as_bytes(), 100_000).unwrap();
            f.sync_all().unwrap();
            let opened = open(d, name, &sha);
            fake.set(
                opened.file.file(),
                mapping(size as u64, 65536, 1 << 30, 0x2000),
            );
            files.push(opened);
        }
        let (b_checked, read) = check_reading(&files[0], Some(&a_checked), &fake);
        let (b_checked, c) = b_checked.unwrap();
        assert_eq!(c.proven_chunks, c.chunks);
        assert_eq!(
            read[100_000], data[100_000],
            "b's proven bytes were read through a"
        );
        assert!(b_checked.anchor.is_some());
        let (c_checked, read) = check_reading(&files[1], Some(&b_checked), &fake);
        let (c_checked, _) = c_checked.unwrap();
        assert_eq!(
            read[100_000], data[100_000],
            "c's through a too, b's anchor"
        );
        assert!(Arc::ptr_eq(
            &c_checked.anchor.unwrap().file,
            &a_checked.data
        ));

        // A file that shares only half of its blocks with b: the anchor covers too little,
        // and the file is read through itself.
        let mut half = data.clone();
        half[..size / 2].copy_from_slice(&noise(size / 2, 12));
        let (_, half_sha) = write_indexed(d, "h", &half);
        let h = open(d, "h", &half_sha);
        let mut map = mapping(size as u64, 65536, 1 << 30, 0x2000);
        for e in map.iter_mut().filter(|e| e.logical < size as u64 / 2) {
            e.physical += 1 << 40;
        }
        fake.set(h.file.file(), map);
        let (h_checked, read) = check_reading(&h, Some(&b_checked), &fake);
        let (h_checked, c) = h_checked.unwrap();
        assert!(c.proven_chunks > 0 && c.proven_chunks < c.chunks, "{c:?}");
        assert_eq!(read, half);
        assert!(h_checked.anchor.is_none());
    }

    /// A file that shares all but one chunk in its middle: the validation reads the shared
    /// ranges on either side through the checked snapshot and the changed chunk through the
    /// file itself. Markers written into the new file's shared ranges (which the made-up map
    /// says are the old file's bytes) show where each byte was read from.
    #[test]
    fn a_check_reads_the_changed_chunk_through_the_file_and_the_rest_elsewhere() {
        let p = pair(Some(10));
        let size = p.new.file.size();
        let fake = Fake::default();
        fake.set(p.old.file.file(), mapping(size, 4096, 1 << 30, 0x2000));
        let start: u64 = p.chunks[..10].iter().map(|c| c.1).sum();
        let end = start + p.chunks[10].1;
        let mut map = mapping(size, 4096, 1 << 30, 0x2000);
        for e in map
            .iter_mut()
            .filter(|e| e.end() > start && e.logical < end)
        {
            e.physical += 1 << 40;
        }
        fake.set(p.new.file.file(), map);
        let mut expected = vec![0u8; size as usize];
        p.new.file.file().read_exact_at(&mut expected, 0).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.new.path)
            .unwrap();
        for at in [1_000u64, size - 1_000] {
            assert!(at + 2 < start || at > end);
            f.write_all_at(b"!!", at).unwrap();
        }
        let reopened = open(
            p._dir.path(),
            "new",
            &p.new.index.index().header().sha256.to_hex(),
        );
        // (The same inode: the made-up map still applies.)
        let (checked, read) = check_reading(&reopened, Some(&p.checked), &fake);
        let (_, c) = checked.unwrap();
        assert!(
            c.proven_chunks + 6 >= c.chunks && c.proven_chunks < c.chunks,
            "{c:?}"
        );
        assert!(c.read_elsewhere > 0);
        assert_eq!(read.len(), expected.len());
        assert!(
            read == expected,
            "the bytes read are the old file's where shared and the new one's where changed"
        );
    }

    /// The anchor (not the snapshot proven against) written during a check that read
    /// through it: a transient refusal too.
    #[test]
    fn an_anchor_written_during_a_check_makes_it_be_handed_over_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = 300_000usize;
        let data = noise(size, 13);
        let (_, sha) = write_indexed(d, "a", &data);
        let a = open(d, "a", &sha);
        let a_checked = check(&a, None, &Fake::default()).unwrap().0;
        let fake = Fake::default();
        fake.set(a.file.file(), mapping(size as u64, 65536, 1 << 30, 0x2000));
        let mut opened = Vec::new();
        for name in ["b", "c"] {
            write_indexed(d, name, &data);
            let o = open(d, name, &sha);
            fake.set(o.file.file(), mapping(size as u64, 65536, 1 << 30, 0x2000));
            opened.push(o);
        }
        let b_checked = check(&opened[0], Some(&a_checked), &fake).unwrap().0;
        let (checked, _) = check_during(&opened[1], Some(&b_checked), &fake, || touch(&a.path));
        let refused = checked.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Internal, "{refused}");
        // The next check proves against b still, but reads nothing through a.
        let (c_checked, c) = check(&opened[1], Some(&b_checked), &fake).unwrap();
        assert_eq!(c.proven_chunks, c.chunks);
        assert_eq!(c.read_elsewhere, 0);
        assert!(c_checked.anchor.is_none());
    }
}
