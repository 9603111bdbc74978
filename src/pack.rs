//! Packs: the immutable objects that hold every chunk and every tree block of a format-2
//! repository, and the encoding of the blobs in them. This module is pure format and codec
//! (no store I/O except through [`upload`], which streams a pack to a store it is given;
//! [`plan`] decides which ranges a reader fetches and which packs a writer re-packs);
//! [`crate::repo`] names the objects.
//!
//! A pack is its blobs, back to back from offset 0, then a trailer that lists them, then a
//! fixed footer:
//!
//! ```text
//! blob_0 | blob_1 | ... | blob_n-1 | trailer | trailer_len: u32 LE | "SRPK" | version: u8 = 1
//!
//! trailer = kind: u8 (1 data, 2 tree) | 3 zero bytes | blob_count: u32 LE
//!         | blob_count × { id: [u8; 32] | encoding: u8 | stored_len: u32 LE | plain_len: u32 LE }
//!         | sha256 of everything of the trailer before it: [u8; 32]
//! ```
//!
//! A blob's offset is the sum of the stored lengths before it, so the trailer alone says
//! where every blob is and a pack can be checked or re-indexed without any tree. A blob is
//! named by the sha256 of its plain bytes (a chunk's id; for a tree block, the block id), so
//! every blob read is verified after decoding whatever the pack's name: pack ids are 128
//! random bits, because a streamed upload must name its object before its content is known.
//!
//! Encodings: `raw` (the plain bytes) and `zstd` (one zstd frame, only when it saves at
//! least 1/16 of the bytes, so a zstd blob is never longer than its plain bytes). Code 2 is
//! reserved for `aead` (client-side encryption: nonce, ciphertext and tag as the stored
//! bytes; nothing else in the layout changes); a reader refuses a code it does not know.

pub mod plan;
pub mod upload;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chunk::Digest;

pub const MAGIC: &[u8; 4] = b"SRPK";
pub const VERSION: u8 = 1;
/// `trailer_len`, magic and version.
pub const FOOTER_LEN: u64 = 9;
/// One blob's entry in the trailer.
pub const ENTRY_LEN: usize = 41;
/// The trailer's kind, padding and count before the entries.
const TRAILER_HEAD: usize = 8;
/// A pack holds at most this many blobs (a writer starts a new pack first): it bounds what
/// a reader allocates for a trailer (2.7 MB).
pub const MAX_BLOBS: usize = 65_536;
/// The largest pack a reader accepts: blob offsets in tree blocks are 32-bit.
pub const MAX_PACK_SIZE: u64 = 1 << 32;
/// The largest plain blob: a maximum-size chunk (16 MiB, the most FastCDC allows).
pub const MAX_BLOB_LEN: u32 = 16 << 20;

/// A pack's name: 128 random bits, printed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> PackId {
        PackId(rand::random::<u128>().to_be_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}

impl FromStr for PackId {
    type Err = String;

    /// Exactly 32 lowercase hex digits: pack ids are object keys, so nothing else gets in.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            let shown: String = s.chars().take(40).collect();
            return Err(format!(
                "{shown:?} is not a pack id (32 lowercase hex digits)"
            ));
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|e| e.to_string())?;
        Ok(PackId(out))
    }
}

impl Serialize for PackId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PackId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a pack holds: chunks of snapshot data, or tree blocks. They are never mixed, so that
/// reading the tree of a snapshot never pages through its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackKind {
    Data,
    Tree,
}

impl PackKind {
    fn code(self) -> u8 {
        match self {
            PackKind::Data => 1,
            PackKind::Tree => 2,
        }
    }

    fn from_code(code: u8) -> Result<PackKind, String> {
        match code {
            1 => Ok(PackKind::Data),
            2 => Ok(PackKind::Tree),
            other => Err(format!("unknown pack kind {other}")),
        }
    }
}

/// How a blob's plain bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    Zstd,
}

impl Encoding {
    pub fn code(self) -> u8 {
        match self {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
        }
    }

    pub fn from_code(code: u8) -> Result<Encoding, String> {
        match code {
            0 => Ok(Encoding::Raw),
            1 => Ok(Encoding::Zstd),
            2 => Err(
                "blob encoding 2 (aead: client-side encryption) is not implemented by this \
                      build: upgrade snaprelay"
                    .into(),
            ),
            other => Err(format!("unknown blob encoding {other}")),
        }
    }

    /// Checks a blob's lengths against its encoding.
    pub fn check_lengths(self, stored_len: u32, plain_len: u32) -> Result<(), String> {
        if plain_len == 0 || plain_len > MAX_BLOB_LEN {
            return Err(format!(
                "plain length {plain_len} is outside 1..={MAX_BLOB_LEN}"
            ));
        }
        match self {
            Encoding::Raw if stored_len != plain_len => Err(format!(
                "a raw blob of {plain_len} bytes is stored as {stored_len}"
            )),
            // zstd is only used when it saves bytes.
            Encoding::Zstd if stored_len == 0 || stored_len > plain_len => Err(format!(
                "a zstd blob of {plain_len} bytes is stored as {stored_len}"
            )),
            _ => Ok(()),
        }
    }
}

/// One blob as the trailer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: Digest,
    pub encoding: Encoding,
    pub stored_len: u32,
    pub plain_len: u32,
}

/// A pack's table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub kind: PackKind,
    pub blobs: Vec<BlobEntry>,
}

impl Trailer {
    /// Bytes the trailer and footer of a pack of `blobs` blobs take.
    pub fn encoded_len(blobs: usize) -> u64 {
        (TRAILER_HEAD + blobs * ENTRY_LEN + 32) as u64 + FOOTER_LEN
    }

    /// The trailer and footer as they end a pack.
    pub fn encode(&self) -> Vec<u8> {
        let len = TRAILER_HEAD + self.blobs.len() * ENTRY_LEN + 32;
        let mut out = Vec::with_capacity(len + FOOTER_LEN as usize);
        out.push(self.kind.code());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        for b in &self.blobs {
            out.extend_from_slice(&b.id.0);
            out.push(b.encoding.code());
            out.extend_from_slice(&b.stored_len.to_le_bytes());
            out.extend_from_slice(&b.plain_len.to_le_bytes());
        }
        let digest = Digest::of(&out);
        out.extend_from_slice(&digest.0);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out
    }

    /// Reads the footer (the last [`FOOTER_LEN`] bytes of a pack of `pack_size` bytes);
    /// returns the trailer's length.
    pub fn footer(footer: &[u8], pack_size: u64) -> Result<u64, String> {
        if pack_size < FOOTER_LEN || footer.len() != FOOTER_LEN as usize {
            return Err(format!(
                "{pack_size} bytes is too short for a pack (it ends with a {FOOTER_LEN}-byte footer)"
            ));
        }
        if pack_size > MAX_PACK_SIZE {
            return Err(format!(
                "{pack_size} bytes is larger than a pack can be ({MAX_PACK_SIZE})"
            ));
        }
        if &footer[4..8] != MAGIC {
            return Err(format!(
                "it does not end with the pack magic \"SRPK\" (found {:?})",
                String::from_utf8_lossy(&footer[4..8])
            ));
        }
        if footer[8] != VERSION {
            return Err(format!(
                "pack version {} is not supported (this build reads version {VERSION}): upgrade snaprelay",
                footer[8]
            ));
        }
        let len = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as u64;
        let min = (TRAILER_HEAD + 32) as u64;
        let max = (TRAILER_HEAD + MAX_BLOBS * ENTRY_LEN + 32) as u64;
        if len < min || len > max || len > pack_size - FOOTER_LEN {
            return Err(format!(
                "its trailer length {len} is impossible for a pack of {pack_size} bytes"
            ));
        }
        Ok(len)
    }

    /// Parses and checks a trailer of a pack of `pack_size` bytes: its digest, kind, count,
    /// every entry, and that the blobs exactly fill the pack before the trailer.
    pub fn decode(bytes: &[u8], pack_size: u64) -> Result<Trailer, String> {
        if bytes.len() < TRAILER_HEAD + 32 {
            return Err(format!("its trailer is {} bytes, too short", bytes.len()));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Digest::of(body).0 != digest {
            return Err("its trailer does not match the trailer's sha256 (damaged)".into());
        }
        let kind = PackKind::from_code(body[0])?;
        if body[1..4] != [0; 3] {
            return Err("reserved trailer bytes are not zero".into());
        }
        let count = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
        if count > MAX_BLOBS {
            return Err(format!("it lists {count} blobs, more than {MAX_BLOBS}"));
        }
        if body.len() != TRAILER_HEAD + count * ENTRY_LEN {
            return Err(format!(
                "its trailer lists {count} blobs but is {} bytes long",
                bytes.len()
            ));
        }
        let mut blobs = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for (i, e) in body[TRAILER_HEAD..].chunks_exact(ENTRY_LEN).enumerate() {
            let entry = BlobEntry {
                id: Digest(e[..32].try_into().expect("32 bytes")),
                encoding: Encoding::from_code(e[32]).map_err(|r| format!("blob {i}: {r}"))?,
                stored_len: u32::from_le_bytes(e[33..37].try_into().expect("4 bytes")),
                plain_len: u32::from_le_bytes(e[37..41].try_into().expect("4 bytes")),
            };
            entry
                .encoding
                .check_lengths(entry.stored_len, entry.plain_len)
                .map_err(|r| format!("blob {i} ({}): {r}", entry.id))?;
            total += entry.stored_len as u64;
            blobs.push(entry);
        }
        let data = pack_size - FOOTER_LEN - bytes.len() as u64;
        if total != data {
            return Err(format!(
                "its blobs add up to {total} bytes, but {data} bytes precede the trailer"
            ));
        }
        Ok(Trailer { kind, blobs })
    }

    /// Each blob's offset in the pack, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &BlobEntry)> {
        self.blobs.iter().scan(0u64, |at, b| {
            let offset = *at;
            *at += b.stored_len as u64;
            Some((offset, b))
        })
    }
}

/// Decodes a blob's stored bytes and checks them against its id: never returns bytes that
/// do not hash to `id`. Allocates at most `plain_len` (checked against [`MAX_BLOB_LEN`]).
pub fn decode_blob(
    stored: &[u8],
    encoding: Encoding,
    plain_len: u32,
    id: &Digest,
) -> Result<bytes::Bytes, String> {
    if stored.len() > u32::MAX as usize {
        return Err(format!("{} stored bytes is not a blob", stored.len()));
    }
    encoding.check_lengths(stored.len() as u32, plain_len)?;
    let plain: bytes::Bytes = match encoding {
        Encoding::Raw => bytes::Bytes::copy_from_slice(stored),
        Encoding::Zstd => {
            // A decompression context per thread: making one per blob cost more than the
            // decompression itself (a quarter of a pull's CPU at 16 KiB chunks).
            thread_local! {
                static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            let out = DECOMPRESSOR
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    let d = match cell.as_mut() {
                        Some(d) => d,
                        None => cell.insert(zstd::bulk::Decompressor::new()?),
                    };
                    d.decompress(stored, plain_len as usize)
                })
                .map_err(|e| format!("its zstd frame does not decode: {e}"))?;
            if out.len() != plain_len as usize {
                return Err(format!(
                    "its zstd frame decodes to {} bytes, not {plain_len}",
                    out.len()
                ));
            }
            out.into()
        }
    };
    check_id(&plain, id)?;
    Ok(plain)
}

/// [`decode_blob`] for a raw blob already in a shared buffer: checks without copying.
pub fn check_id(plain: &[u8], id: &Digest) -> Result<(), String> {
    let actual = Digest::of(plain);
    if actual != *id {
        return Err(format!("its content hashes to {actual}"));
    }
    Ok(())
}

/// How blobs are compressed when they are written (from `repository.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

/// Order-0 entropy (bits per byte) above which a chunk is stored raw without trying zstd:
/// random bytes measure about 7.95 on the sample below, 16 KiB chunks of the benchmark's
/// binary key-value dump (48% after zstd) about 6.0 and of the kv example's JSON state 4.9. Skipping the attempt is
/// what keeps random data from costing the publisher seconds of CPU per GiB.
const INCOMPRESSIBLE_BITS: f64 = 7.8;
/// Bytes sampled for the entropy estimate: 16 runs of 256 spread over the chunk.
const SAMPLE_RUNS: usize = 16;
const SAMPLE_RUN: usize = 256;

/// Estimates a buffer's order-0 entropy in bits per byte from a sample spread over it.
pub fn sampled_entropy(data: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    if data.len() <= SAMPLE_RUNS * SAMPLE_RUN {
        for &b in data {
            counts[b as usize] += 1;
        }
        n = data.len() as u32;
    } else {
        let step = (data.len() - SAMPLE_RUN) / (SAMPLE_RUNS - 1);
        for r in 0..SAMPLE_RUNS {
            for &b in &data[r * step..r * step + SAMPLE_RUN] {
                counts[b as usize] += 1;
            }
        }
        n += (SAMPLE_RUNS * SAMPLE_RUN) as u32;
    }
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Compresses blobs on one thread (a zstd context is reused from blob to blob).
pub struct Encoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Where frames are compressed, then copied out at their size: a frame kept in a
    /// buffer of the plain length would hold twice its bytes in every part in flight.
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(compression: Compression) -> Encoder {
        let zstd = match compression {
            // An invalid level cannot get here: repository.json's is validated.
            Compression::Zstd { level } => zstd::bulk::Compressor::new(level).ok(),
            Compression::None => None,
        };
        Encoder {
            zstd,
            scratch: Vec::new(),
        }
    }

    /// The stored form of `plain`: zstd when the repository compresses, the data does not
    /// look incompressible, and the frame saves at least 1/16; otherwise the bytes as they
    /// are (no copy).
    pub fn encode(&mut self, plain: bytes::Bytes) -> (bytes::Bytes, Encoding) {
        let Some(zstd) = self.zstd.as_mut() else {
            return (plain, Encoding::Raw);
        };
        if plain.len() < 64 || sampled_entropy(&plain) > INCOMPRESSIBLE_BITS {
            return (plain, Encoding::Raw);
        }
        let limit = plain.len() - plain.len() / 16;
        self.scratch.clear();
        self.scratch.reserve(limit);
        // A frame that does not fit in 15/16 of the plain length does not pay.
        match zstd.compress_to_buffer(&plain[..], &mut self.scratch) {
            Ok(n) if n < limit => (
                bytes::Bytes::copy_from_slice(&self.scratch[..n]),
                Encoding::Zstd,
            ),
            _ => (plain, Encoding::Raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::test_data::random;

    fn pack_of(blobs: &[(Vec<u8>, Encoding, u32, Digest)]) -> Vec<u8> {
        let mut pack = Vec::new();
        let mut entries = Vec::new();
        for (stored, encoding, plain_len, id) in blobs {
            pack.extend_from_slice(stored);
            entries.push(BlobEntry {
                id: *id,
                encoding: *encoding,
                stored_len: stored.len() as u32,
                plain_len: *plain_len,
            });
        }
        pack.extend(
            Trailer {
                kind: PackKind::Data,
                blobs: entries,
            }
            .encode(),
        );
        pack
    }

    fn read(pack: &[u8]) -> Result<Trailer, String> {
        let size = pack.len() as u64;
        let footer = &pack[pack.len().saturating_sub(9)..];
        let len = Trailer::footer(footer, size)?;
        let start = pack.len() - 9 - len as usize;
        Trailer::decode(&pack[start..pack.len() - 9], size)
    }

    fn sample_pack() -> (Vec<u8>, Vec<Vec<u8>>) {
        let plain = vec![random(5000, 1), b"abc".repeat(3000), random(1, 2)];
        let mut enc = Encoder::new(Compression::Zstd { level: 3 });
        let blobs: Vec<_> = plain
            .iter()
            .map(|p| {
                let (stored, e) = enc.encode(bytes::Bytes::from(p.clone()));
                (stored.to_vec(), e, p.len() as u32, Digest::of(p))
            })
            .collect();
        assert_eq!(blobs[0].1, Encoding::Raw, "random bytes are stored raw");
        assert_eq!(blobs[1].1, Encoding::Zstd, "repetitive text is compressed");
        assert!(blobs[1].0.len() < 200);
        assert_eq!(blobs[2].1, Encoding::Raw);
        (pack_of(&blobs), plain)
    }

    #[test]
    fn pack_round_trip_and_blob_decoding() {
        let (pack, plain) = sample_pack();
        let trailer = read(&pack).unwrap();
        assert_eq!(trailer.kind, PackKind::Data);
        assert_eq!(trailer.blobs.len(), 3);
        for ((offset, b), p) in trailer.offsets().zip(&plain) {
            let stored = &pack[offset as usize..offset as usize + b.stored_len as usize];
            let got = decode_blob(stored, b.encoding, b.plain_len, &b.id).unwrap();
            assert_eq!(&got[..], &p[..]);
        }
        // An empty pack is valid too (nothing but a trailer).
        let empty = Trailer {
            kind: PackKind::Tree,
            blobs: vec![],
        }
        .encode();
        assert_eq!(read(&empty).unwrap().blobs, vec![]);
    }

    /// The exact bytes of a small pack's trailer and footer, so that a change of layout is
    /// a deliberate one (docs/format.md describes these bytes).
    #[test]
    fn trailer_layout_is_pinned() {
        let t = Trailer {
            kind: PackKind::Tree,
            blobs: vec![BlobEntry {
                id: Digest([0xab; 32]),
                encoding: Encoding::Zstd,
                stored_len: 0x0102,
                plain_len: 0x0304,
            }],
        };
        let bytes = t.encode();
        assert_eq!(bytes.len(), 8 + 41 + 32 + 9);
        assert_eq!(&bytes[..8], &[2, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&bytes[8..40], &[0xab; 32]);
        assert_eq!(&bytes[40..49], &[1, 2, 1, 0, 0, 4, 3, 0, 0]);
        assert_eq!(&bytes[49..81], &Digest::of(&bytes[..49]).0);
        assert_eq!(&bytes[81..], &[81, 0, 0, 0, b'S', b'R', b'P', b'K', 1]);
    }

    #[test]
    fn damaged_packs_are_refused_with_a_reason() {
        let (pack, _) = sample_pack();
        let n = pack.len();
        let refuse = |p: &[u8], needle: &str| {
            let e = read(p).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        refuse(&pack[..5], "too short");
        refuse(&pack[..n - 1], "magic");
        let mut p = pack.clone();
        p[n - 1] = 9;
        refuse(&p, "version 9");
        let mut p = pack.clone();
        p[n - 9..n - 5].copy_from_slice(&u32::MAX.to_le_bytes());
        refuse(&p, "impossible");
        let mut p = pack.clone();
        p[n - 9..n - 5].copy_from_slice(&(n as u32).to_le_bytes());
        refuse(&p, "impossible");
        // A flipped trailer byte fails the trailer's digest.
        let mut p = pack.clone();
        p[n - 30] ^= 1;
        refuse(&p, "sha256");
        // Blobs that do not fill the space before the trailer (a truncated or padded pack).
        let mut p = pack.clone();
        p.insert(0, 0);
        refuse(&p, "add up to");
        refuse(&pack[1..], "add up to");

        // Entries that contradict themselves, with a valid digest: a writer's bug.
        let bad = |entry: BlobEntry, needle: &str| {
            let t = Trailer {
                kind: PackKind::Data,
                blobs: vec![entry],
            };
            let mut p = vec![0u8; entry.stored_len as usize];
            p.extend(t.encode());
            refuse(&p, needle);
        };
        let ok = BlobEntry {
            id: Digest([1; 32]),
            encoding: Encoding::Raw,
            stored_len: 10,
            plain_len: 10,
        };
        bad(
            BlobEntry {
                plain_len: 11,
                ..ok
            },
            "stored as 10",
        );
        bad(
            BlobEntry {
                encoding: Encoding::Zstd,
                plain_len: 5,
                ..ok
            },
            "zstd blob of 5",
        );
        bad(
            BlobEntry {
                stored_len: 0,
                plain_len: 0,
                ..ok
            },
            "outside",
        );
        // Unknown kinds and encodings are named.
        let mut t = Trailer {
            kind: PackKind::Data,
            blobs: vec![ok],
        }
        .encode();
        t[8 + 32] = 2;
        let len = t.len();
        let digest = Digest::of(&t[..len - 41]);
        t[len - 41..len - 9].copy_from_slice(&digest.0);
        let mut p = vec![0u8; 10];
        p.extend(&t);
        refuse(&p, "aead");
        let mut t2 = t.clone();
        t2[0] = 7;
        let digest = Digest::of(&t2[..len - 41]);
        t2[len - 41..len - 9].copy_from_slice(&digest.0);
        let mut p = vec![0u8; 10];
        p.extend(&t2);
        refuse(&p, "kind 7");
        // A count larger than the limit is refused before anything is allocated for it.
        let mut t3 = t.clone();
        t3[4..8].copy_from_slice(&(MAX_BLOBS as u32 + 1).to_le_bytes());
        let digest = Digest::of(&t3[..len - 41]);
        t3[len - 41..len - 9].copy_from_slice(&digest.0);
        let mut p = vec![0u8; 10];
        p.extend(&t3);
        refuse(&p, "more than");
        let mut t4 = t.clone();
        t4[4..8].copy_from_slice(&2u32.to_le_bytes());
        let digest = Digest::of(&t4[..len - 41]);
        t4[len - 41..len - 9].copy_from_slice(&digest.0);
        let mut p = vec![0u8; 10];
        p.extend(&t4);
        refuse(&p, "lists 2 blobs");
    }

    #[test]
    fn blobs_that_do_not_match_their_id_are_never_returned() {
        let plain = b"hello world ".repeat(100);
        let id = Digest::of(&plain);
        let (stored, enc) =
            Encoder::new(Compression::Zstd { level: 3 }).encode(plain.clone().into());
        assert_eq!(enc, Encoding::Zstd);
        assert_eq!(
            &decode_blob(&stored, enc, plain.len() as u32, &id).unwrap()[..],
            &plain[..]
        );
        let e = decode_blob(&stored, enc, plain.len() as u32, &Digest([0; 32])).unwrap_err();
        assert!(e.contains("hashes to"), "{e}");
        // A frame that decodes to more than the entry says is refused, without allocating
        // more than the entry's plain length.
        let e = decode_blob(&stored, enc, plain.len() as u32 - 1, &id).unwrap_err();
        assert!(e.contains("decode"), "{e}");
        let e = decode_blob(&stored[..stored.len() - 3], enc, plain.len() as u32, &id).unwrap_err();
        assert!(e.contains("decode"), "{e}");
        let e = decode_blob(b"not zstd", Encoding::Zstd, 100, &id).unwrap_err();
        assert!(e.contains("decode"), "{e}");
        let e = decode_blob(&plain, Encoding::Raw, plain.len() as u32 + 1, &id).unwrap_err();
        assert!(e.contains("stored as"), "{e}");
        let e = decode_blob(b"x", Encoding::Raw, MAX_BLOB_LEN + 1, &id).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn compression_skips_incompressible_data_and_keeps_what_does_not_pay() {
        let random = random(16 << 10, 3);
        assert!(sampled_entropy(&random) > INCOMPRESSIBLE_BITS);
        let text = b"{\"user/000000012345\":\"sess:0123456789abcdef\"},".repeat(400);
        assert!(sampled_entropy(&text) < 6.0);
        let mut enc = Encoder::new(Compression::Zstd { level: 3 });
        let (stored, e) = enc.encode(random.clone().into());
        assert_eq!((e, stored.len()), (Encoding::Raw, random.len()));
        let (_, e) = enc.encode(text.into());
        assert_eq!(e, Encoding::Zstd);
        // Low entropy but nothing to gain: stored raw.
        let mut half = random.clone();
        for b in half.iter_mut().step_by(2) {
            *b &= 0x0f;
        }
        let _ = enc.encode(half.into());
        let mut off = Encoder::new(Compression::None);
        assert_eq!(
            off.encode(
                b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                    .to_vec()
                    .into()
            )
            .1,
            Encoding::Raw
        );
    }

    #[test]
    fn pack_ids_are_keys_and_nothing_else() {
        let id = PackId::random();
        assert_eq!(id.to_hex().parse::<PackId>().unwrap(), id);
        assert_ne!(PackId::random(), id);
        for bad in [
            "",
            "../../../etc/passwd",
            &id.to_hex().to_uppercase(),
            &id.to_hex()[..31],
            &format!("{}0", id.to_hex()),
        ] {
            assert!(bad.parse::<PackId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<PackId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PackId>("\"zz\"").is_err());
    }
}
