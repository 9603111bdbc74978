//! Content-defined chunking (FastCDC 2020) and sha256 digests, streaming: a file of any size
//! is read once, in order, holding at most one maximum-size chunk beyond the chunker's own
//! buffer. Successive snapshots of a slowly changing state share most of their chunks, which
//! is what makes incremental pushes and pulls cheap.

use std::io::Read;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
pub use snaprelay_contract::chunking::{ChunkParams, Digest, StreamCutter, MIN_MIN_SIZE};

/// Tells the kernel how `file` will be read: front to back once (`sequential`, which
/// doubles its readahead; on a cold page cache that cut the system time of a 1 GiB push to
/// SeaweedFS from 1.9 s to 1.5 s), or in scattered pieces (the default readahead, which a
/// doubled window would only waste). The hint is advisory and applies to the open file, so
/// it is set before each phase of reading.
pub fn advise_sequential(file: &std::fs::File, sequential: bool) {
    use std::os::fd::AsRawFd;
    let advice = match sequential {
        true => libc::POSIX_FADV_SEQUENTIAL,
        false => libc::POSIX_FADV_NORMAL,
    };
    // SAFETY: an advisory call on a descriptor that `file` keeps open; it reads no memory.
    // Its result is ignored: without the hint the reads are only slower.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
}

/// Reads a file shared by several readers from a position of its own (`pread`), so that no
/// reader moves another's position.
pub struct ReadAt<F> {
    file: F,
    pos: u64,
}

impl<F: std::ops::Deref<Target = std::fs::File>> ReadAt<F> {
    pub fn new(file: F, pos: u64) -> ReadAt<F> {
        ReadAt { file, pos }
    }
}

impl<F: std::ops::Deref<Target = std::fs::File>> Read for ReadAt<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Starts the disk writing a file's pages as they are written, front to back, a step at a
/// time, so the final fsync finds little left to do instead of the whole file: the disk
/// works while the network does. Without it a 1 GiB pull spent its last 0.5 s in fsync, as
/// the kernel writes nothing back on its own until far more is dirty. It only starts
/// writeback (`SYNC_FILE_RANGE_WRITE`): durability still comes from the caller's fsync.
pub struct WriteBehind {
    /// Bytes from the start of the file already handed to writeback.
    started: u64,
}

impl WriteBehind {
    /// How much written data to gather before starting its writeback.
    const STEP: u64 = 8 << 20;

    pub fn new() -> WriteBehind {
        WriteBehind { started: 0 }
    }

    /// Records that `file` holds its final bytes up to `end` (ends only grow).
    pub fn written_to(&mut self, file: &std::fs::File, end: u64) {
        while end.saturating_sub(self.started) >= Self::STEP {
            start_writeback(file, self.started, Self::STEP);
            self.started += Self::STEP;
        }
    }
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a hint on a descriptor that `file` keeps open; it reads no memory. A failure
    // only means the final fsync does all the writing, as it would without the hint.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

/// One chunk cut from a stream, not yet hashed.
pub struct RawChunk {
    pub offset: u64,
    pub data: Bytes,
}

/// Cuts `reader` into chunks and hands each to `sink` in order; returns the stream's size.
/// Blocking: run it on a blocking thread. A `sink` error stops the cut and is returned.
///
/// Reads straight into the [`StreamCutter`]'s buffer (the same loop the node's index uses),
/// so each byte is read once and copied once, into its chunk. `params` must have been
/// validated ([`ChunkParams::new`]).
pub fn split<R: Read>(
    mut reader: R,
    params: ChunkParams,
    mut sink: impl FnMut(RawChunk) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut stream = StreamCutter::new(params);
    let mut offset = 0u64;
    let mut eof = false;
    loop {
        stream.cut(eof, |chunk| {
            let at = offset;
            offset += chunk.len() as u64;
            sink(RawChunk {
                offset: at,
                data: Bytes::copy_from_slice(chunk),
            })
        })?;
        if eof {
            return Ok(offset);
        }
        // Fill the buffer (a short read is not the end of the stream).
        loop {
            let spare = stream.spare();
            if spare.is_empty() {
                break;
            }
            match reader.read(spare) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => stream.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The sha256 of a whole file, computed on a thread of its own from the pieces fed to it in
/// order. sha256 is sequential, so this is the one pass that cannot be spread over cores;
/// giving it its own thread overlaps it with cutting, chunk hashing and I/O instead of
/// adding to them.
pub struct WholeFileHasher {
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<Digest>,
}

impl WholeFileHasher {
    pub fn spawn() -> std::io::Result<WholeFileHasher> {
        // A few chunks of slack keep both sides busy; the bound keeps memory flat.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(4);
        let thread = std::thread::Builder::new()
            .name("whole-file-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for piece in rx {
                    h.update(&piece);
                }
                Digest(h.finalize().into())
            })?;
        Ok(WholeFileHasher { tx, thread })
    }

    /// Feeds the next piece of the file (blocks while the hasher is behind).
    pub fn feed(&self, piece: Bytes) {
        // The receiver lives until `finish`, so a send cannot fail while `self` exists.
        let _ = self.tx.send(piece);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        drop(self.tx);
        // The thread only hashes; it cannot panic short of memory exhaustion.
        self.thread
            .join()
            .expect("whole-file hasher thread panicked")
    }
}

/// Writes `pieces` (each `(file offset, bytes)`) into `file`, merging pieces that follow
/// one another in the file into one vectored write (`pwritev`) of at most 1024 pieces:
/// fewer system calls, and no partly written page to zero and fill twice where a chunk ends
/// mid-page. Blocking.
pub fn write_pieces_at(file: &std::fs::File, pieces: &[(u64, Bytes)]) -> std::io::Result<()> {
    const MAX_PIECES: usize = 1024;
    let mut i = 0;
    while i < pieces.len() {
        let start = pieces[i].0;
        let mut end = start;
        let mut j = i;
        while j < pieces.len() && j - i < MAX_PIECES && pieces[j].0 == end {
            end += pieces[j].1.len() as u64;
            j += 1;
        }
        write_vectored_at(file, &pieces[i..j], start)?;
        i = j;
    }
    Ok(())
}

/// Writes the pieces' bytes one after another from `offset`, all of them (blocking).
fn write_vectored_at(
    file: &std::fs::File,
    pieces: &[(u64, Bytes)],
    mut offset: u64,
) -> std::io::Result<()> {
    // Where the next write starts: a piece, and how much of it is already written.
    let (mut first, mut skip) = (0usize, 0usize);
    loop {
        // Skip empty pieces, which a zero-length write would otherwise never consume.
        while first < pieces.len() && pieces[first].1.len() == skip {
            first += 1;
            skip = 0;
        }
        if first == pieces.len() {
            return Ok(());
        }
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&pieces[first].1[skip..])
            .chain(pieces[first + 1..].iter().map(|(_, b)| &b[..]))
            .map(std::io::IoSlice::new)
            .collect();
        let n = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        let mut left = n;
        while left > 0 {
            let rest = pieces[first].1.len() - skip;
            if left >= rest {
                left -= rest;
                first += 1;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
    }
}

/// The sha256 of everything `file` holds, read from its start at explicit offsets (blocking).
pub fn sha256_of(file: &std::fs::File) -> std::io::Result<Digest> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return Ok(Digest(h.finalize().into())),
            Ok(n) => {
                h.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A chunk's place in a file, as found by [`index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub sha256: Digest,
    pub offset: u64,
    pub len: u64,
}

/// Cuts and hashes a whole stream, keeping only the chunk list (for reusing a local file
/// whose manifest is not known). Blocking.
pub fn index<R: Read>(reader: R, params: ChunkParams) -> std::io::Result<Vec<ChunkSpan>> {
    let mut spans = Vec::new();
    split(reader, params, |c| {
        spans.push(ChunkSpan {
            sha256: Digest::of(&c.data),
            offset: c.offset,
            len: c.data.len() as u64,
        });
        Ok(())
    })?;
    Ok(spans)
}

/// A file with no name, for data only this process needs for a while (the chunk list of a
/// snapshot cut here, say): created unlinked in the temp directory (`O_TMPFILE`, or
/// created and unlinked at once where that is not supported), so that nothing is left
/// behind whatever happens to the process.
pub fn scratch_file() -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let dir = std::env::temp_dir();
    let flags = OFlags::RDWR | OFlags::CLOEXEC;
    match rustix::fs::openat(
        rustix::fs::CWD,
        &dir,
        flags | OFlags::TMPFILE,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => Ok(std::fs::File::from(fd)),
        Err(_) => {
            let path = dir.join(format!(
                ".snaprelay-scratch-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let fd = rustix::fs::openat(
                rustix::fs::CWD,
                &path,
                flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )?;
            let _ = std::fs::remove_file(&path);
            Ok(std::fs::File::from(fd))
        }
    }
}

/// Cuts and hashes a whole stream into an index file of its own (in [`scratch_file`]),
/// streaming: the chunk list of a local snapshot nobody indexed. Blocking.
pub fn index_to_scratch<R: Read>(
    reader: R,
    params: ChunkParams,
) -> std::io::Result<snaprelay_contract::chunking::IndexFile> {
    use snaprelay_contract::chunking::{IndexFile, IndexWriter, Indexer};
    let mut indexer = Indexer::with_sink(params, IndexWriter::new(scratch_file()?)?);
    let mut reader = reader;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        indexer.feed(&buf[..n])?;
    }
    let (writer, size, sha256) = indexer.end()?;
    let file = writer.finish(params, size, sha256)?;
    IndexFile::from_file(file, std::path::Path::new("(scratch index)"), size)
        .map_err(std::io::Error::other)
}

/// Data for the unit tests of the modules that cut, pack and assemble files.
#[cfg(test)]
pub(crate) mod test_data {
    use std::fs::File;
    use std::sync::Arc;

    use rand::{RngCore, SeedableRng};

    /// `len` bytes of seeded random data.
    pub fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// An unlinked scratch file holding `data`.
    pub fn file_of(data: &[u8]) -> Arc<File> {
        let mut f = super::scratch_file().unwrap();
        std::io::Write::write_all(&mut f, data).unwrap();
        Arc::new(f)
    }

    /// Format-2 repository settings with small tree blocks and 1 MiB packs, so that a few
    /// MiB make dozens of blocks and several packs.
    pub fn small_tree_settings() -> crate::manifest_v2::NewRepository {
        crate::manifest_v2::NewRepository {
            tree: crate::tree::TreeParams {
                min_chunks: 4,
                max_chunks: 32,
                boundary_bits: 3,
            },
            pack_size: 1 << 20,
            ..crate::manifest_v2::NewRepository::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::random;
    use super::*;

    fn small() -> ChunkParams {
        ChunkParams::new(4096, 16384, 65536).unwrap()
    }

    /// Pieces in and out of order, empty ones, and more than one vectored write's worth
    /// in a row: each lands where it says.
    #[test]
    fn pieces_are_written_where_they_say() {
        let data = random(3 << 20, 9);
        let mut pieces = Vec::new();
        let mut at = 0usize;
        let mut k = 0u64;
        while at < data.len() {
            let len = ((k * 7919) % 3000) as usize;
            let len = len.min(data.len() - at);
            pieces.push((at as u64, Bytes::copy_from_slice(&data[at..at + len])));
            at += len;
            k += 1;
        }
        assert!(pieces.len() > 2048);
        // A few out of order and one written twice.
        pieces.swap(10, 500);
        pieces.push(pieces[7].clone());
        let file = test_data::file_of(b"");
        write_pieces_at(&file, &pieces).unwrap();
        let mut back = vec![0u8; data.len()];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data);
        write_pieces_at(&file, &[]).unwrap();
        write_pieces_at(&file, &[(5, Bytes::new())]).unwrap();
    }

    #[test]
    fn chunks_cover_the_stream_within_bounds() {
        let data = random(1 << 20, 1);
        let p = small();
        let mut chunks = Vec::new();
        let hasher = WholeFileHasher::spawn().unwrap();
        let size = split(&data[..], p, |c| {
            hasher.feed(c.data.clone());
            chunks.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(hasher.finish(), Digest::of(&data));
        let mut offset = 0;
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.offset, offset);
            assert!(c.data.len() <= p.max_size as usize);
            if i + 1 < chunks.len() {
                assert!(c.data.len() >= p.min_size as usize);
            }
            assert_eq!(
                &data[offset as usize..offset as usize + c.data.len()],
                &c.data[..]
            );
            offset += c.data.len() as u64;
        }
        assert_eq!(offset, data.len() as u64);
        assert!(
            chunks.len() > 20,
            "expected many chunks, got {}",
            chunks.len()
        );
    }

    /// The file splitter cuts exactly where the node's index cuts, whatever the read sizes:
    /// both go through the one `StreamCutter` (whose cuts the contract crate pins against
    /// fastcdc and against golden vectors), and a reader that returns short reads must not
    /// move a boundary.
    #[test]
    fn split_cuts_where_the_nodes_index_cuts_whatever_the_read_sizes() {
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = out.len().min(self.1).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for (len, seed) in [(0usize, 1u64), (5000, 2), (70_000, 3), (3 << 20, 4)] {
            let data = random(len, seed);
            for p in [
                small(),
                ChunkParams::new(64 << 10, 256 << 10, 1 << 20).unwrap(),
            ] {
                let mut indexer = snaprelay_contract::chunking::Indexer::new(p);
                indexer.update(&data);
                let expected: Vec<(Digest, u64)> = indexer.finish().chunks;
                for read_size in [1000, 65536, usize::MAX] {
                    let mut got = Vec::new();
                    let size = split(Dribble(&data, read_size), p, |c| {
                        got.push((Digest::of(&c.data), c.data.len() as u64));
                        Ok(())
                    })
                    .unwrap();
                    assert_eq!(size, len as u64);
                    assert_eq!(got, expected, "len {len} read {read_size}");
                }
            }
        }
    }

    #[test]
    fn empty_and_tiny_streams() {
        let size = split(&b""[..], small(), |_| panic!("no chunk expected")).unwrap();
        assert_eq!(size, 0);
        assert_eq!(WholeFileHasher::spawn().unwrap().finish(), Digest::of(b""));
        let spans = index(&b"x"[..], small()).unwrap();
        assert_eq!(
            spans,
            vec![ChunkSpan {
                sha256: Digest::of(b"x"),
                offset: 0,
                len: 1
            }]
        );
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let a = random(2 << 20, 2);
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, random(100, 3));
        let ia = index(&a[..], small()).unwrap();
        let ib = index(&b[..], small()).unwrap();
        let known: std::collections::HashSet<_> = ia.iter().map(|s| s.sha256).collect();
        let new_bytes: u64 = ib
            .iter()
            .filter(|s| !known.contains(&s.sha256))
            .map(|s| s.len)
            .sum();
        assert!(
            new_bytes < 4 * 65536,
            "an insertion of 100 bytes changed {new_bytes} bytes of chunks"
        );
    }
    #[test]
    fn a_scratch_index_lists_what_index_lists() {
        let data = random(2 << 20, 4);
        let spans = index(&data[..], small()).unwrap();
        let scratch = index_to_scratch(&data[..], small())
            .unwrap()
            .read_all()
            .unwrap();
        let listed: Vec<_> = spans.iter().map(|s| (s.sha256, s.len)).collect();
        assert_eq!(scratch.chunks, listed);
        assert_eq!(scratch.size, data.len() as u64);
        assert_eq!(scratch.sha256, Digest::of(&data));
    }
}
