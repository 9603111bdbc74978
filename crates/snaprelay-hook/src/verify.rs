//! What the node checks of a file the sidecar hands it, before the file can be staged: that
//! the node can open and read it, that it is a regular file of the envelope's size (never a
//! symlink, FIFO or device), and which inode it is, so that a file swapped in after the check
//! is noticed when it is staged.
//!
//! The file is opened relative to the incoming directory's fd with
//! `O_RDONLY|O_NOFOLLOW|O_NONBLOCK`: a symlink at the name fails (`ELOOP`), and a FIFO
//! cannot block the open. Every refusal is a [`Refusal`]: a protocol error code and a message
//! naming the file and the reason.
//!
//! Then [`IncomingFile::verify_sha256_while`] runs the application's validation on the
//! opened file and, in the same pass (1 MiB positioned reads, bounded memory, hashing on a
//! thread of its own), compares the file's sha256 with the one the sidecar claims (or, when
//! the sidecar handed over a chunk index, checks the file chunk by chunk: [`crate::chunks`]).
//! Staging
//! renames the file into the snapshot directory and checks, with [`IncomingFile::is_at`],
//! that the staged name is the inode that was hashed.
//!
//! What this cannot stop: the sidecar's user owns the file and could rewrite it in place
//! (same inode) after it was hashed. The node records the sha256 in the snapshot's envelope
//! and checks it again at startup, where a mismatch moves the snapshot aside instead of
//! loading it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::Mode;
use snaprelay_contract::ipc::ErrorCode;

/// A file refused before staging: the code the sidecar sees, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// An I/O failure of the node's own: transient (`internal`).
impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Refusal {
        Refusal::new(ErrorCode::Internal, e.to_string())
    }
}

impl From<crate::SnapshotDirError> for Refusal {
    fn from(e: crate::SnapshotDirError) -> Refusal {
        let code = match e {
            crate::SnapshotDirError::Replaced { .. } => ErrorCode::ChecksumMismatch,
            _ => ErrorCode::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

/// A data file the node has opened in the incoming directory: regular, of the expected size,
/// readable by the node. Clones share the open file.
#[derive(Debug, Clone)]
pub struct IncomingFile {
    file: Arc<File>,
    dev: u64,
    ino: u64,
    size: u64,
}

impl PartialEq for IncomingFile {
    fn eq(&self, other: &IncomingFile) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

impl IncomingFile {
    /// The open file. Clones share its offset: read it with positioned reads
    /// (`FileExt::read_at`).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// A reader of the whole file from its start, with its own position (positioned reads
    /// on the shared open file). It ends one byte past the size the file was opened at: a
    /// file that grew shows it (a hash over one byte too many), and a writer appending to
    /// it cannot keep its reader reading.
    pub fn reader(&self) -> impl Read + '_ {
        self.reader_with(&[])
    }

    /// [`IncomingFile::reader`], taking the `elsewhere` ranges from their files.
    fn reader_with<'a>(&'a self, elsewhere: &'a [(u64, u64, &'a File)]) -> PositionedReader<'a> {
        PositionedReader {
            file: &self.file,
            offset: 0,
            end: self.size.saturating_add(1),
            elsewhere,
        }
    }

    /// The device the file is on.
    pub(crate) fn dev(&self) -> u64 {
        self.dev
    }

    /// Hashes the file in one streaming pass and compares with `expected` (64 lowercase hex
    /// digits). Blocking: run it on a blocking thread. A mismatch, or a file that is not the
    /// size it was opened with, is [`ErrorCode::ChecksumMismatch`].
    pub fn verify_sha256(&self, expected: &str, shown: &Path) -> Result<(), Refusal> {
        let actual = self.sha256();
        self.compare(actual, expected, shown)
    }

    /// Runs `read` on a reader of the file from its start and, in the same pass over the
    /// file, verifies its sha256 as [`IncomingFile::verify_sha256`] does: every byte `read`
    /// takes is also handed to a hashing thread, and what it leaves is read after it
    /// returns. So the file is read from disk once (a just-fetched GiB the page cache no
    /// longer holds costs one read, not two), and hashing runs beside `read` on another
    /// core. Blocking.
    ///
    /// `read` sees bytes before they are verified: a panic in it is caught, so that the
    /// caller still learns whether the file was the one claimed (a damaged file is
    /// reported as such, whatever `read` made of it), and gets the panic back as `read`'s
    /// result.
    pub fn verify_sha256_while<R>(
        &self,
        expected: &str,
        shown: &Path,
        read: impl FnOnce(&mut dyn Read) -> R,
    ) -> (Result<(), Refusal>, std::thread::Result<R>) {
        use sha2::{Digest, Sha256};
        let (hashed, answer) = self.tee_while(
            &[],
            &[],
            |pieces| {
                let mut hasher = Sha256::new();
                let mut total = 0u64;
                for (_, piece) in pieces {
                    hasher.update(&piece);
                    total += piece.len() as u64;
                }
                (hex(&hasher.finalize()), total)
            },
            read,
        );
        (self.compare(hashed, expected, shown), answer)
    }

    /// Runs `read` on a reader of the file from its start while `check` gets, on a thread
    /// of its own, every byte `read` takes and then what it leaves (read after it returns),
    /// in order, as `(offset, bytes)` pieces, except the bytes in the `skip` ranges
    /// (`[start, end)`, sorted, apart), which are not copied for it. The bytes of the
    /// `elsewhere` ranges are read from the file given with each, which the caller knows
    /// holds the same bytes there (its page cache may have them). `read`'s panic is caught
    /// and returned; `check`'s is an error.
    pub(crate) fn tee_while<R, H: Send>(
        &self,
        skip: &[(u64, u64)],
        elsewhere: &[(u64, u64, &File)],
        check: impl FnOnce(&mut dyn Iterator<Item = (u64, Vec<u8>)>) -> H + Send,
        read: impl FnOnce(&mut dyn Read) -> R,
    ) -> (std::io::Result<H>, std::thread::Result<R>) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
        std::thread::scope(|scope| {
            let checking = scope.spawn(move || check(&mut rx.into_iter()));
            let mut tee = TeeReader {
                inner: self.reader_with(elsewhere),
                tx,
                offset: 0,
                skip,
            };
            let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&mut tee)));
            let drained = std::io::copy(&mut tee, &mut std::io::sink());
            drop(tee);
            let checked = checking
                .join()
                .map_err(|_| std::io::Error::other("the hashing thread panicked"));
            (drained.and(checked), answer)
        })
    }

    /// The open file, shared.
    pub(crate) fn shared(&self) -> Arc<File> {
        self.file.clone()
    }

    fn compare(
        &self,
        actual: std::io::Result<(String, u64)>,
        expected: &str,
        shown: &Path,
    ) -> Result<(), Refusal> {
        let actual = actual.map_err(|e| {
            Refusal::new(
                ErrorCode::Internal,
                format!("reading {}: {e}", shown.display()),
            )
        })?;
        if actual.1 != self.size {
            return Err(Refusal::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "{} changed size while it was hashed ({} bytes, opened at {})",
                    shown.display(),
                    actual.1,
                    self.size
                ),
            ));
        }
        if actual.0 != expected {
            return Err(Refusal::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "{} has sha256 {}, but the request says {expected}",
                    shown.display(),
                    actual.0
                ),
            ));
        }
        Ok(())
    }

    /// Whether `path` (not following a symlink) is the inode this file was opened as.
    pub fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == (self.dev, self.ino))
    }

    /// sha256 (lowercase hex) and length of the file's content.
    pub fn sha256(&self) -> std::io::Result<(String, u64)> {
        sha256_of(&mut self.reader())
    }
}

/// sha256 (lowercase hex) and length of everything `input` yields, in 1 MiB pieces.
pub fn sha256_of(input: &mut dyn Read) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `inner` and sends a copy of every piece read, with its offset, to a checking
/// thread, less the parts in `skip`. A checking thread that is gone (it cannot be, short of a
/// panic, reported when it is joined) only stops the copies.
struct TeeReader<'s, R> {
    inner: R,
    tx: std::sync::mpsc::SyncSender<(u64, Vec<u8>)>,
    /// The file offset of the next byte read.
    offset: u64,
    /// Ranges not sent; those wholly behind `offset` are dropped as reading passes them.
    skip: &'s [(u64, u64)],
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // At most 1 MiB a call: a caller reading to the end asks for its whole spare
        // capacity, and each piece is copied for the checking thread (4 in flight).
        let limit = buf.len().min(1 << 20);
        let n = self.inner.read(&mut buf[..limit])?;
        let (start, end) = (self.offset, self.offset + n as u64);
        let mut at = start;
        while at < end {
            while self.skip.first().is_some_and(|r| r.1 <= at) {
                self.skip = &self.skip[1..];
            }
            let (send_to, next) = match self.skip.first() {
                Some(&(s, e)) if s <= at => (at, e.min(end)),
                Some(&(s, _)) => (s.min(end), s.min(end)),
                None => (end, end),
            };
            if send_to > at {
                let piece = &buf[(at - start) as usize..(send_to - start) as usize];
                let _ = self.tx.send((at, piece.to_vec()));
            }
            at = next.max(send_to);
        }
        self.offset = end;
        Ok(n)
    }
}

struct PositionedReader<'a> {
    file: &'a File,
    offset: u64,
    /// Where the reader ends, whatever the file's length by then.
    end: u64,
    /// Ranges `[start, end)` read from another file that holds the same bytes there
    /// (sorted, apart); those wholly behind `offset` are dropped as reading passes them.
    elsewhere: &'a [(u64, u64, &'a File)],
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        while self.elsewhere.first().is_some_and(|r| r.1 <= self.offset) {
            self.elsewhere = &self.elsewhere[1..];
        }
        let (file, limit) = match self.elsewhere.first() {
            Some(&(start, end, other)) if start <= self.offset => (other, end - self.offset),
            Some(&(start, _, _)) => (self.file, start - self.offset),
            None => (self.file, u64::MAX),
        };
        let room = self.end.saturating_sub(self.offset).min(limit);
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = file.read_at(&mut buf[..len], self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Opens `name` inside `dir` for reading, as the node: no symlink, no blocking, a regular
/// file of `size` bytes. A file the node cannot open is refused with [`ErrorCode::Unreadable`]
/// and a message saying what the deployment must fix.
pub fn open_incoming(dir: &Path, name: &str, size: u64) -> Result<IncomingFile, Refusal> {
    let (file, meta) = open_in(dir, name)?;
    if meta.size() != size {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "path {} is {} bytes, but the envelope says {size}",
                dir.join(name).display(),
                meta.size()
            ),
        ));
    }
    Ok(IncomingFile {
        file: Arc::new(file),
        dev: meta.dev(),
        ino: meta.ino(),
        size,
    })
}

/// Opens `name` inside `dir` for reading as [`open_incoming`] does (no symlink, no
/// blocking, a regular file), whatever its size.
pub(crate) fn open_in(dir: &Path, name: &str) -> Result<(File, std::fs::Metadata), Refusal> {
    let path = dir.join(name);
    let shown = path.display();
    let dir_fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        Refusal::new(
            ErrorCode::Internal,
            format!(
                "opening the incoming directory {}: {}",
                dir.display(),
                e.desc()
            ),
        )
    })?;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(&dir_fd, name, flags, Mode::empty()).map_err(|e| match e {
        Errno::EACCES | Errno::EPERM => Refusal::new(
            ErrorCode::Unreadable,
            format!(
                "the node cannot read {shown} ({}): the incoming directory must be setgid to \
                 the node's group (mode 2770) so that files the sidecar writes there are \
                 group-readable by the node",
                e.desc()
            ),
        ),
        Errno::ELOOP => Refusal::new(
            ErrorCode::BadRequest,
            format!("path {shown} is a symbolic link, not a regular file"),
        ),
        Errno::ENOENT => Refusal::new(ErrorCode::BadRequest, format!("path {shown}: no such file")),
        e => Refusal::new(ErrorCode::BadRequest, format!("path {shown}: {}", e.desc())),
    })?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("inspecting {shown}: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("path {shown} is not a regular file"),
        ));
    }
    Ok((file, meta))
}

/// The file name of `path` inside `dir` (`path` canonical, directly inside `dir`).
pub(crate) fn name_in(path: &Path, dir: &Path) -> Option<String> {
    (path.parent() == Some(dir))
        .then(|| path.file_name()?.to_str().map(str::to_owned))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Read;

    #[test]
    fn regular_file_of_the_right_size_opens() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.bin"), b"abc").unwrap();
        let file = open_incoming(dir.path(), "a.bin", 3).unwrap();
        assert!(file.is_at(&dir.path().join("a.bin")));
        fs::rename(dir.path().join("a.bin"), dir.path().join("b.bin")).unwrap();
        assert!(
            file.is_at(&dir.path().join("b.bin")),
            "a rename keeps the inode"
        );
        fs::write(dir.path().join("a.bin"), b"abc").unwrap();
        assert!(
            !file.is_at(&dir.path().join("a.bin")),
            "another file at the name"
        );
    }

    #[test]
    fn sha256_is_checked_in_one_pass_over_the_opened_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.bin"), b"abc").unwrap();
        let file = open_incoming(dir.path(), "a.bin", 3).unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let shown = dir.path().join("a.bin");
        file.verify_sha256(abc, &shown).unwrap();
        let err = file.verify_sha256(&"0".repeat(64), &shown).unwrap_err();
        assert_eq!(err.code, ErrorCode::ChecksumMismatch);
        assert!(
            err.message.contains(abc) && err.message.contains("a.bin"),
            "{err}"
        );
        // The reader starts at 0 every time, whatever was read before.
        let mut text = String::new();
        file.reader().read_to_string(&mut text).unwrap();
        assert_eq!(text, "abc");
        // Grown after it was opened: refused, not hashed as if complete.
        fs::write(dir.path().join("a.bin"), b"abcd").unwrap();
        let err = file.verify_sha256(abc, &shown).unwrap_err();
        assert!(err.message.contains("changed size"), "{err}");
    }

    /// The checking side gets exactly the bytes outside the skipped ranges, each at its
    /// offset, however the reader splits its reads, and the reader still gets every byte.
    #[test]
    fn the_tee_leaves_out_exactly_the_skipped_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("a.bin"), &data).unwrap();
        let file = open_incoming(dir.path(), "a.bin", data.len() as u64).unwrap();
        let skips: [&[(u64, u64)]; 4] = [
            &[],
            &[(0, 3_000_000)],
            &[(0, 10), (1_048_570, 1_048_590), (2_999_999, 3_000_000)],
            &[(5, 7), (7_000, 2_000_000)],
        ];
        for skip in skips {
            for step in [1usize, 4093, 1 << 20, 3 << 20] {
                let (got, read) = file.tee_while(
                    skip,
                    &[],
                    |pieces| pieces.collect::<Vec<_>>(),
                    |r| {
                        let mut all = Vec::new();
                        let mut buf = vec![0u8; step];
                        loop {
                            let n = r.read(&mut buf).unwrap();
                            if n == 0 || all.len() > 64 << 10 && step == 1 {
                                break;
                            }
                            all.extend_from_slice(&buf[..n]);
                        }
                        all.len()
                    },
                );
                let read = read.unwrap();
                assert!(read == data.len() || step == 1, "{read}");
                let mut expected = Vec::new();
                let mut at = 0u64;
                for &(s, e) in skip.iter().chain([(3_000_000, 3_000_000)].iter()) {
                    if s > at {
                        expected.push((at, s));
                    }
                    at = e;
                }
                let got = got.unwrap();
                let mut covered: Vec<(u64, u64)> = Vec::new();
                for (offset, bytes) in &got {
                    assert_eq!(
                        &bytes[..],
                        &data[*offset as usize..*offset as usize + bytes.len()]
                    );
                    let end = offset + bytes.len() as u64;
                    match covered.last_mut() {
                        Some(last) if last.1 == *offset => last.1 = end,
                        _ => covered.push((*offset, end)),
                    }
                }
                assert_eq!(covered, expected, "skip {skip:?}, reads of {step}");
            }
        }
    }

    /// The reader takes the `elsewhere` ranges from their file and the rest from its own,
    /// however it splits its reads; the checking side gets the file's own bytes outside
    /// `skip`.
    #[test]
    fn the_reader_takes_the_elsewhere_ranges_from_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let own: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let other: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8 + 100).collect();
        fs::write(dir.path().join("own.bin"), &own).unwrap();
        fs::write(dir.path().join("other.bin"), &other).unwrap();
        let file = open_incoming(dir.path(), "own.bin", own.len() as u64).unwrap();
        let other_file = fs::File::open(dir.path().join("other.bin")).unwrap();
        let ranges = [(0u64, 10u64), (4_000, 150_000), (299_990, 300_000)];
        let elsewhere: Vec<(u64, u64, &fs::File)> =
            ranges.iter().map(|&(s, e)| (s, e, &other_file)).collect();
        let mut expected = own.clone();
        for (s, e) in ranges {
            expected[s as usize..e as usize].copy_from_slice(&other[s as usize..e as usize]);
        }
        for step in [3usize, 4093, 1 << 20] {
            let (got, read) = file.tee_while(
                &ranges,
                &elsewhere,
                |pieces| pieces.map(|(_, b)| b.len()).sum::<usize>(),
                |r| {
                    let mut all = Vec::new();
                    let mut buf = vec![0u8; step];
                    loop {
                        let n = r.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        all.extend_from_slice(&buf[..n]);
                    }
                    all
                },
            );
            assert!(read.unwrap() == expected, "reads of {step}");
            let skipped: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            assert_eq!(got.unwrap() as u64, own.len() as u64 - skipped);
        }
    }

    #[test]
    fn one_pass_hashes_the_whole_file_however_much_the_reader_takes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("a.bin"), &data).unwrap();
        let file = open_incoming(dir.path(), "a.bin", data.len() as u64).unwrap();
        let shown = dir.path().join("a.bin");
        let (right, _) = sha256_of(&mut &data[..]).unwrap();
        // Reads nothing, one byte, everything: the hash covers the whole file each time.
        for take in [0usize, 1, data.len()] {
            let (hashed, got) = file.verify_sha256_while(&right, &shown, |r| {
                let mut head = Vec::new();
                r.take(take as u64).read_to_end(&mut head).unwrap();
                head
            });
            hashed.unwrap();
            assert_eq!(
                got.unwrap(),
                data[..take],
                "the reader saw the file from its start"
            );
        }
        let (hashed, _) = file.verify_sha256_while(&"0".repeat(64), &shown, |_| ());
        let err = hashed.unwrap_err();
        assert_eq!(err.code, ErrorCode::ChecksumMismatch);
        assert!(err.message.contains(&right), "{err}");
        // Grown after it was opened: the one pass sees it too.
        fs::write(&shown, [&data[..], b"more"].concat()).unwrap();
        let (hashed, _) = file.verify_sha256_while(&right, &shown, |_| ());
        assert!(hashed.unwrap_err().message.contains("changed size"));
    }

    /// Whatever way the validation reads (tiny reads, vectored reads, stopping early) and
    /// whatever the file's writer does in place meanwhile, the sha256 verified is the one
    /// of the bytes the validation saw followed by the rest of the file: the check never
    /// accepts a file whose bytes the validation saw differ from the ones hashed.
    #[test]
    fn the_bytes_hashed_are_the_bytes_the_validation_read_however_it_reads() {
        use proptest::prelude::*;
        use std::io::{IoSliceMut, Write};
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let shown = dir.path().join("a.bin");
        let config = ProptestConfig {
            cases: 48,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(
            size in 0usize..300_000,
            reads in proptest::collection::vec((1usize..70_000, any::<bool>()), 0..12),
            rewrite_after in proptest::option::of(0usize..12),
            rewrite_at in any::<proptest::sample::Index>(),
        )| {
            let original: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            fs::write(&shown, &original).unwrap();
            let file = open_incoming(dir.path(), "a.bin", size as u64).unwrap();
            let (right, _) = sha256_of(&mut &original[..]).unwrap();
            let (hashed, seen) = file.verify_sha256_while(&right, &shown, |r| {
                let mut seen = Vec::new();
                for (i, &(len, vectored)) in reads.iter().enumerate() {
                    if rewrite_after == Some(i) && size > 0 {
                        // Another writer flips one byte in place, same size.
                        let at = rewrite_at.index(size) as u64;
                        let w = fs::OpenOptions::new().read(true).write(true).open(&shown).unwrap();
                        let mut b = [0u8];
                        w.read_exact_at(&mut b, at).unwrap();
                        w.write_all_at(&[b[0] ^ 0xff], at).unwrap();
                        w.sync_data().unwrap();
                    }
                    let mut buf = vec![0u8; len];
                    let n = if vectored {
                        let (a, b) = buf.split_at_mut(len / 2);
                        r.read_vectored(&mut [IoSliceMut::new(a), IoSliceMut::new(b)]).unwrap()
                    } else {
                        r.read(&mut buf).unwrap()
                    };
                    seen.write_all(&buf[..n]).unwrap();
                }
                seen
            });
            let seen = seen.unwrap();
            // What was there after the validation returned, from where it stopped.
            let now = fs::read(&shown).unwrap();
            let whole = [&seen[..], &now[seen.len().min(now.len())..]].concat();
            prop_assert_eq!(hashed.is_ok(), whole == original, "{:?}", hashed);
        });
    }

    /// A panic in the validation neither hangs nor leaks the hashing thread, and the file
    /// is still hashed: the caller gets the mismatch, and the panic as the result.
    #[test]
    fn a_validation_that_panics_does_not_hang_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 5 << 20];
        fs::write(dir.path().join("a.bin"), &data).unwrap();
        let file = open_incoming(dir.path(), "a.bin", data.len() as u64).unwrap();
        let shown = dir.path().join("a.bin");
        for before_panic in [0usize, 1, 3 << 20] {
            let (hashed, answer): (_, std::thread::Result<()>) =
                file.verify_sha256_while(&"0".repeat(64), &shown, |r| {
                    let mut head = Vec::new();
                    r.take(before_panic as u64).read_to_end(&mut head).unwrap();
                    panic!("the application's decoder fails on these bytes");
                });
            assert_eq!(hashed.unwrap_err().code, ErrorCode::ChecksumMismatch);
            assert!(answer.is_err());
        }
    }

    /// The sidecar's user owns the handed-over file and can append to it while the node
    /// checks it. The validation (which may hold what it reads: the kv example's check
    /// reads the file into memory) must be given no more than the size the file was opened
    /// at (plus one byte, which shows that it grew): otherwise an appender keeps the check
    /// reading, and its memory growing, for as long as it keeps appending.
    #[test]
    fn a_file_that_grows_while_it_is_checked_gives_the_validation_no_more_than_its_size() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let shown = dir.path().join("a.bin");
        let data = vec![b' '; 1 << 20];
        fs::write(&shown, &data).unwrap();
        let file = open_incoming(dir.path(), "a.bin", data.len() as u64).unwrap();
        let mut appender = fs::OpenOptions::new().append(true).open(&shown).unwrap();
        // The appender keeps ahead of the reader (driven from inside the validation, so the
        // interleaving is the same every run); the validation stops at 8 MiB on its own.
        let (hashed, taken) = file.verify_sha256_while(&"0".repeat(64), &shown, |r| {
            let mut buf = vec![0u8; 64 << 10];
            let mut taken = 0u64;
            while taken < 8 << 20 {
                appender.write_all(&buf).unwrap();
                match r.read(&mut buf).unwrap() {
                    0 => break,
                    n => taken += n as u64,
                }
            }
            taken
        });
        let taken = taken.unwrap();
        assert!(
            taken <= data.len() as u64 + 1,
            "the validation was given {taken} bytes of a file opened at {}",
            data.len()
        );
        let err = hashed.unwrap_err();
        assert_eq!(err.code, ErrorCode::ChecksumMismatch);
        assert!(err.message.contains("changed size"), "{err}");
    }

    #[test]
    fn symlinks_fifos_directories_and_wrong_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"abc").unwrap();
        let incoming = dir.path().join("in");
        fs::create_dir(&incoming).unwrap();
        std::os::unix::fs::symlink(&outside, incoming.join("link.bin")).unwrap();
        nix::unistd::mkfifo(&incoming.join("fifo.bin"), Mode::from_bits_truncate(0o600)).unwrap();
        fs::create_dir(incoming.join("dir.bin")).unwrap();
        fs::write(incoming.join("short.bin"), b"ab").unwrap();
        let cases = [
            ("link.bin", "symbolic link"),
            ("fifo.bin", "not a regular file"),
            ("dir.bin", "not a regular file"),
            ("short.bin", "is 2 bytes, but the envelope says 3"),
            ("missing.bin", "no such file"),
        ];
        for (name, expected) in cases {
            let err = open_incoming(&incoming, name, 3).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{name}");
            assert!(err.message.contains(expected), "{name}: {err}");
            assert!(err.message.contains(name), "{name}: {err}");
        }
    }
}
