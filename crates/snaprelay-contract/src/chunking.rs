//! Content-defined chunking (FastCDC 2020) and sha256 digests, shared by the node and the
//! sidecar so that both cut a file at the same places, and the chunk index: the list of a
//! snapshot's chunks and its whole-file sha256, computed by the node while it writes the
//! snapshot ([`IndexingWriter`]) and read by the sidecar's publisher, which then reads only
//! the chunks the store lacks instead of the whole file (see the README's "Chunk index").
//!
//! Index file format (`<stem>.chunks.json`, named by the envelope's `chunk_index`):
//!
//! ```json
//! { "format": 1,
//!   "chunking": { "min_size": 262144, "avg_size": 1048576, "max_size": 4194304 },
//!   "size": 5242880,
//!   "sha256": "<64 hex digits: the whole data file>",
//!   "chunks": [ ["<64 hex digits>", 1300210], ["<64 hex digits>", 3942670] ] }
//! ```
//!
//! The chunks are in file order and their lengths add up to `size`.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fastcdc::v2020::{
    cut_gear, get_gear_with_seed, logarithm2, Normalization, AVERAGE_MAX, MASKS, MAXIMUM_MAX,
    MINIMUM_MAX,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The only chunk index format this build reads and writes.
pub const INDEX_FORMAT: u32 = 1;
/// Suffix of chunk index files.
pub const INDEX_SUFFIX: &str = ".chunks.json";

/// A sha256 digest; printed and serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = String;

    /// Accepts exactly 64 lowercase hex digits: digests double as object keys, so anything
    /// else (upper case, `../`, separators) is refused here, where it enters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            let shown: String = s.chars().take(80).collect();
            return Err(format!(
                "{shown:?} is not a sha256 (64 lowercase hex digits)"
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| e.to_string())?;
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// FastCDC parameters. They are fixed per repository (in `repository.json`): changing them
/// would cut every snapshot differently and defeat deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_size: 256 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        }
    }
}

/// The smallest minimum chunk size accepted: smaller chunks make too many objects.
pub const MIN_MIN_SIZE: u64 = 4 << 10;

impl ChunkParams {
    /// Validates sizes; the error names the offending field and says why.
    pub fn new(min: u64, avg: u64, max: u64) -> Result<Self, (&'static str, String)> {
        if !(MIN_MIN_SIZE..=MINIMUM_MAX as u64).contains(&min) {
            return Err((
                "min_size",
                format!("{min} must be between {MIN_MIN_SIZE} (4KiB) and 1048576 (1MiB)"),
            ));
        }
        if avg <= min || avg > AVERAGE_MAX as u64 || !avg.is_power_of_two() {
            return Err((
                "avg_size",
                format!("{avg} must be a power of two above min_size ({min}) and at most 4MiB"),
            ));
        }
        if max <= avg || max > MAXIMUM_MAX as u64 {
            return Err((
                "max_size",
                format!("{max} must be above avg_size ({avg}) and at most 16MiB"),
            ));
        }
        Ok(ChunkParams {
            min_size: min as u32,
            avg_size: avg as u32,
            max_size: max as u32,
        })
    }

    /// Re-checks parameters that came from outside (a repository.json, a chunk index).
    pub fn validate(&self) -> Result<(), String> {
        ChunkParams::new(
            self.min_size as u64,
            self.avg_size as u64,
            self.max_size as u64,
        )
        .map(|_| ())
        .map_err(|(key, reason)| format!("chunking.{key}: {reason}"))
    }
}

/// FastCDC 2020 cut points, with the parameters derived exactly as
/// `fastcdc::v2020::StreamCDC` derives them for normalization level 1, so chunk boundaries
/// are the crate's whatever the reader or writer around it.
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl Cutter {
    /// `params` must be valid ([`ChunkParams::new`] or [`ChunkParams::validate`]).
    pub fn new(params: ChunkParams) -> Cutter {
        let bits = logarithm2(params.avg_size);
        let normalization = Normalization::Level1.bits();
        let (gear, gear_ls) = get_gear_with_seed(0);
        Cutter {
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max: params.max_size as usize,
            mask_s: MASKS[(bits + normalization) as usize],
            mask_l: MASKS[(bits - normalization) as usize],
            gear,
            gear_ls,
        }
    }

    /// The maximum chunk size: a cut is final once this many bytes are buffered.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Length of the chunk at the start of `data`, which holds at least [`Cutter::max`]
    /// bytes or the rest of the stream.
    pub fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = cut_gear(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        len
    }
}

/// A snapshot's chunks and whole-file digest, as cut by the node that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndex {
    pub format: u32,
    pub chunking: ChunkParams,
    pub size: u64,
    pub sha256: Digest,
    /// `(sha256, len)` of every chunk, in file order.
    pub chunks: Vec<(Digest, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("chunk index {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chunk index {path} is not usable: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl ChunkIndex {
    /// Checks the index against itself and against the data file's size; the reason names
    /// the first field that is wrong.
    pub fn validate(&self, data_size: u64) -> Result<(), String> {
        if self.format != INDEX_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {INDEX_FORMAT})",
                self.format
            ));
        }
        self.chunking.validate()?;
        if self.size != data_size {
            return Err(format!(
                "size {} differs from the data file's {data_size} bytes",
                self.size
            ));
        }
        let mut total = 0u64;
        for (i, (_, len)) in self.chunks.iter().enumerate() {
            if *len == 0 || *len > self.chunking.max_size as u64 {
                return Err(format!(
                    "chunk {i} has length {len}, outside 1..={}",
                    self.chunking.max_size
                ));
            }
            total += len;
        }
        if total != self.size {
            return Err(format!(
                "the chunk lengths add up to {total}, not to the size {}",
                self.size
            ));
        }
        Ok(())
    }

    /// Reads and validates the index of a data file of `data_size` bytes. A symbolic link,
    /// FIFO, device or directory at `path` is refused without being read.
    pub fn read(path: &Path, data_size: u64) -> Result<ChunkIndex, IndexError> {
        let file = crate::dir::open_regular(path, false).map_err(|source| IndexError::Read {
            path: path.to_owned(),
            source,
        })?;
        ChunkIndex::read_file(file, path, data_size)
    }

    /// Reads and validates the index from `file`, a regular file already opened (e.g.
    /// through [`crate::dir::Dir::open_file`]); `path` names it in errors.
    pub fn read_file(file: File, path: &Path, data_size: u64) -> Result<ChunkIndex, IndexError> {
        let invalid = |reason: String| IndexError::Invalid {
            path: path.to_owned(),
            reason,
        };
        // About 90 bytes of JSON per chunk, chunks of at least 4 KiB, plus the header.
        let limit = 4096 + (data_size / MIN_MIN_SIZE + 1) * 128;
        let bytes = crate::dir::read_limited(file, limit).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => invalid(format!(
                "it is more than an index of a {data_size}-byte file can be ({e})"
            )),
            _ => IndexError::Read {
                path: path.to_owned(),
                source: e,
            },
        })?;
        let index: ChunkIndex =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        index.validate(data_size).map_err(invalid)?;
        Ok(index)
    }

    /// The file's contents, compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data into memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The one streaming loop that cuts a byte stream into chunks, used by every reader and
/// writer on both sides (the node's [`Indexer`], the sidecar's file splitter), so that chunk
/// boundaries never depend on how the stream arrived. It buffers at most two maximum-size
/// chunks: bytes go into [`StreamCutter::spare`], and every chunk that is final — a whole
/// maximum-size window is buffered behind its start, or the stream has ended — is cut.
pub struct StreamCutter {
    cutter: Cutter,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl StreamCutter {
    /// `params` must be valid ([`ChunkParams::new`] or [`ChunkParams::validate`]).
    pub fn new(params: ChunkParams) -> StreamCutter {
        let cutter = Cutter::new(params);
        StreamCutter {
            buf: vec![0u8; 2 * cutter.max()],
            cutter,
            start: 0,
            end: 0,
        }
    }

    /// The free end of the buffer, after moving what is still uncut to its front. Write
    /// into it, then call [`StreamCutter::filled`]. Never empty after [`StreamCutter::cut`].
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into [`StreamCutter::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Hands every final chunk to `emit`, in order; with `eof`, all that is left. An
    /// `emit` error stops the cut and is returned (the chunk counts as cut).
    pub fn cut<E>(
        &mut self,
        eof: bool,
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while self.end - self.start >= self.cutter.max() || (eof && self.end > self.start) {
            let len = self.cutter.cut(&self.buf[self.start..self.end]);
            let chunk = self.start..self.start + len;
            self.start += len;
            emit(&self.buf[chunk])?;
        }
        Ok(())
    }
}

/// Builds a [`ChunkIndex`] from a stream fed in pieces of any size, through the
/// [`StreamCutter`] the sidecar's reader uses too, so it cuts exactly where that reader cuts.
///
/// Everything runs on the caller's thread: a node's snapshot build gets slower, but the
/// index never takes a second core from the node (a helper thread for the chunks' sha256
/// saved only 0.1 s per GiB of wall time on two cores).
pub struct Indexer {
    params: ChunkParams,
    stream: StreamCutter,
    whole: Sha256,
    size: u64,
    chunks: Vec<(Digest, u64)>,
}

impl Indexer {
    /// `params` must be valid ([`ChunkParams::new`]).
    pub fn new(params: ChunkParams) -> Indexer {
        Indexer {
            params,
            stream: StreamCutter::new(params),
            whole: Sha256::new(),
            size: 0,
            chunks: Vec::new(),
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let spare = self.stream.spare();
            let take = data.len().min(spare.len());
            spare[..take].copy_from_slice(&data[..take]);
            self.stream.filled(take);
            data = &data[take..];
            self.cut(false);
        }
    }

    fn cut(&mut self, eof: bool) {
        let chunks = &mut self.chunks;
        let _ = self.stream.cut(eof, |chunk| {
            chunks.push((Digest::of(chunk), chunk.len() as u64));
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// The index of everything fed.
    pub fn finish(mut self) -> ChunkIndex {
        self.cut(true);
        ChunkIndex {
            format: INDEX_FORMAT,
            chunking: self.params,
            size: self.size,
            sha256: Digest(self.whole.finalize().into()),
            chunks: self.chunks,
        }
    }
}

/// A writer that indexes everything written through it: wrap the snapshot file with it and
/// the index comes for free with the write, from the very bytes the node produced.
pub struct IndexingWriter<W> {
    inner: W,
    indexer: Indexer,
}

impl<W: Write> IndexingWriter<W> {
    pub fn new(inner: W, params: ChunkParams) -> Self {
        IndexingWriter {
            inner,
            indexer: Indexer::new(params),
        }
    }

    /// The wrapped writer and the index of what was written through it.
    pub fn finish(self) -> (W, ChunkIndex) {
        (self.inner, self.indexer.finish())
    }
}

impl<W: Write> Write for IndexingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.indexer.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ChunkParams {
        ChunkParams::new(4096, 16384, 65536).unwrap()
    }

    /// Deterministic, incompressible test bytes (xorshift), without a rand dependency.
    fn random(len: usize, seed: u64) -> Vec<u8> {
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

    #[test]
    fn digest_hex_round_trip_and_rejects_keys() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        for bad in [
            "",
            "../../etc/passwd",
            &d.to_hex().to_uppercase(),
            &format!("{}/", &d.to_hex()[..63]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    /// The index cuts exactly where fastcdc's own streaming chunker does, whatever the sizes
    /// of the writes, so the node's index always names the chunks the sidecar would cut.
    #[test]
    fn index_matches_fastcdc_whatever_the_write_sizes() {
        for (len, seed) in [(0usize, 1u64), (1, 5), (5000, 2), (70_000, 3), (3 << 20, 4)] {
            let data = random(len, seed);
            for p in [
                small(),
                ChunkParams::new(64 << 10, 256 << 10, 1 << 20).unwrap(),
            ] {
                let expected: Vec<(Digest, u64)> =
                    fastcdc::v2020::StreamCDC::new(&data[..], p.min_size, p.avg_size, p.max_size)
                        .map(|c| c.unwrap())
                        .map(|c| (Digest::of(&c.data), c.length as u64))
                        .collect();
                for write_size in [1, 1000, 8192, 65536, 1 << 20, usize::MAX] {
                    if write_size == 1 && len > 70_000 {
                        continue;
                    }
                    let mut w = IndexingWriter::new(Vec::new(), p);
                    for piece in data.chunks(write_size.min(data.len().max(1))) {
                        w.write_all(piece).unwrap();
                    }
                    let (written, index) = w.finish();
                    assert_eq!(written, data);
                    assert_eq!(index.chunks, expected, "len {len} writes of {write_size}");
                    assert_eq!(index.size, len as u64);
                    assert_eq!(index.sha256, Digest::of(&data));
                    index.validate(len as u64).unwrap();
                }
            }
        }
    }

    /// Cut points recorded from fastcdc 3.2.1 (FastCDC 2020, normalization level 1, seed 0).
    /// Chunk keys are content hashes of these cuts: if a fastcdc upgrade (or a change to the
    /// derivation in [`Cutter::new`]) moved a single cut, every snapshot would be cut
    /// differently and deduplication against existing repositories would silently stop —
    /// fastcdc 4.0.0 did exactly that for non-power-of-two averages. The comparison with
    /// fastcdc's own `StreamCDC` above cannot notice such a change; these vectors do.
    #[test]
    fn cut_points_match_the_recorded_golden_vectors() {
        fn lens(data: &[u8], params: ChunkParams) -> Vec<u64> {
            let mut indexer = Indexer::new(params);
            indexer.update(data);
            indexer.finish().chunks.iter().map(|c| c.1).collect()
        }
        let default = lens(&random(8 << 20, 11), ChunkParams::default());
        assert_eq!(
            default,
            [1163598, 1319225, 1508207, 409462, 2196507, 396248, 1299616, 95745]
        );
        let small = lens(&random(1 << 20, 12), small());
        assert_eq!(
            small,
            [
                10873, 21222, 19444, 17950, 4272, 11124, 54022, 20835, 20657, 18713, 40614, 35023,
                34450, 17367, 24945, 17388, 18334, 18131, 10284, 20263, 19909, 13794, 12200, 23901,
                20420, 13207, 18435, 17848, 18633, 9994, 4611, 19002, 47767, 17960, 8518, 18848,
                6527, 12038, 23284, 14672, 25843, 27245, 18761, 11748, 7824, 34946, 20547, 10315,
                25128, 8562, 20045, 44695, 15438
            ]
        );
        // Structured, low-entropy data (a key-value dump), 162 cuts: pinned by a digest of
        // the list of lengths.
        let text: Vec<u8> = (0..600_000u32)
            .flat_map(|i| {
                let key = i.wrapping_mul(2654435761) % 1000003;
                format!("key{key:08} value {}\n", i % 97).into_bytes()
            })
            .collect();
        let text = lens(&text, ChunkParams::new(16384, 65536, 262144).unwrap());
        assert_eq!(text.len(), 162);
        assert_eq!(
            Digest::of(format!("{text:?}").as_bytes()).to_hex(),
            "9a1a44342ee44277ae149bd50320307d466f22b97d9fc8d4aa1d74b542eb74cc"
        );
    }

    #[test]
    fn index_file_round_trip_and_bad_indexes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(200_000, 9);
        let mut indexer = Indexer::new(small());
        indexer.update(&data);
        let index = indexer.finish();
        let path = dir.path().join("s.chunks.json");
        std::fs::write(&path, index.to_json()).unwrap();
        assert_eq!(ChunkIndex::read(&path, data.len() as u64).unwrap(), index);

        let err = ChunkIndex::read(&path, 5).unwrap_err().to_string();
        assert!(
            err.contains("s.chunks.json") && err.contains("differs from the data file"),
            "{err}"
        );
        let mut bad = index.clone();
        let extra = bad.chunking.max_size as u64 + 1 - bad.chunks[0].1;
        bad.chunks[0].1 += extra;
        bad.size += extra;
        let err = bad.validate(bad.size).unwrap_err();
        assert!(err.contains("chunk 0 has length"), "{err}");
        let mut bad = index.clone();
        bad.chunks.pop();
        assert!(bad.validate(bad.size).unwrap_err().contains("add up to"));
        let mut bad = index.clone();
        bad.format = 7;
        assert!(bad.validate(bad.size).unwrap_err().contains("format 7"));
        std::fs::write(&path, b"{\"format\":1").unwrap();
        let err = ChunkIndex::read(&path, 1).unwrap_err().to_string();
        assert!(err.contains("not usable"), "{err}");
        std::fs::write(&path, vec![b' '; 10_000]).unwrap();
        let err = ChunkIndex::read(&path, 1).unwrap_err().to_string();
        assert!(err.contains("more than an index"), "{err}");
        let err = ChunkIndex::read(&dir.path().join("none"), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn params_are_validated() {
        assert_eq!(
            ChunkParams::new(100, 16384, 65536).unwrap_err().0,
            "min_size"
        );
        assert_eq!(
            ChunkParams::new(4096, 4096, 65536).unwrap_err().0,
            "avg_size"
        );
        assert_eq!(
            ChunkParams::new(4096, 10000, 65536).unwrap_err().0,
            "avg_size"
        );
        assert_eq!(
            ChunkParams::new(4096, 16384, 16384).unwrap_err().0,
            "max_size"
        );
        assert_eq!(
            ChunkParams::new(4096, 16384, 64 << 20).unwrap_err().0,
            "max_size"
        );
        ChunkParams::default().validate().unwrap();
    }
}
