//! Planning over packs, pure (no I/O): which byte ranges of which packs a follower reads for
//! the blobs it needs ([`coalesce`]), and which sparse packs a publisher re-packs the live
//! chunks of ([`sparse_packs`]).
//!
//! Reads: one ranged GET per blob would be one request per 16 KiB chunk, so needed blobs of
//! one pack that sit close together are read in one range, bounded so that a few ranges in
//! flight bound the reader's memory. A gap between two needed blobs is read (and dropped)
//! when it is small: a request costs more than a few KiB of transfer.
//!
//! Re-packing: packs are never rewritten, so a pack that a snapshot uses only a little of
//! stays whole as long as any kept manifest uses it. A publisher that has a chunk's bytes at
//! hand (in the node's file) may store it again in its new pack instead of pointing into a
//! sparse one; the sparse pack then ages out with the manifests that still use it. The extra
//! upload is bounded per publish.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::PackId;

/// One blob a reader needs: where it is, and the caller's tag for it (its position in the
/// snapshot, say). Tags are handed back with the range that holds the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed<T> {
    pub pack: PackId,
    pub offset: u64,
    pub stored_len: u32,
    pub tag: T,
}

/// One ranged read, and where each needed blob is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRange<T> {
    pub pack: PackId,
    pub range: Range<u64>,
    /// `(tag, start within the range's bytes, stored length)`, in offset order. A blob needed
    /// under two tags (a chunk that repeats) is listed for both and read once.
    pub blobs: Vec<(T, usize, u32)>,
}

/// Bounds on the ranges [`coalesce`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLimits {
    /// A range grows to at most this many bytes (a single larger blob is a range alone).
    pub max_range: u64,
    /// Two needed blobs at most this far apart are read in one range, the gap included.
    pub max_gap: u64,
    /// Ranged reads a reader keeps in flight at once (not used by [`coalesce`]).
    pub in_flight: usize,
}

/// The most ranged reads in flight at once, whatever the configured concurrency: four
/// ranges keep a loopback server busy, and more only add memory.
pub const MAX_RANGES_IN_FLIGHT: usize = 4;

impl Default for RangeLimits {
    /// 4 MiB ranges, gaps of up to 64 KiB read through (four chunks' worth: cheaper than
    /// another request), [`MAX_RANGES_IN_FLIGHT`] at once. Four ranges of 4 MiB pull a GiB
    /// from a loopback SeaweedFS as fast as four of 8 MiB did (0.91× the wall time, median
    /// of six paired runs) with 16 MiB less held.
    fn default() -> Self {
        RangeLimits {
            max_range: 4 << 20,
            max_gap: 64 << 10,
            in_flight: MAX_RANGES_IN_FLIGHT,
        }
    }
}

impl RangeLimits {
    /// The default ranges, with at most `concurrency` (`download.concurrency`) in flight.
    pub fn with_concurrency(concurrency: usize) -> Self {
        RangeLimits {
            in_flight: concurrency.clamp(1, MAX_RANGES_IN_FLIGHT),
            ..RangeLimits::default()
        }
    }
}

/// Groups needed blobs into ranged reads: per pack, blobs in offset order, neighbours merged
/// while the gap and the range's length stay within `limits`. Ranges come out in the order of
/// their first blob in `needed`, so that a reader fed in file order fills the file roughly
/// front to back.
pub fn coalesce<T: Copy>(needed: &[Needed<T>], limits: RangeLimits) -> Vec<ReadRange<T>> {
    let mut by_pack: HashMap<PackId, Vec<usize>> = HashMap::new();
    for (i, n) in needed.iter().enumerate() {
        by_pack.entry(n.pack).or_default().push(i);
    }
    // (first index in `needed`, range)
    let mut out: Vec<(usize, ReadRange<T>)> = Vec::new();
    for (pack, mut idx) in by_pack {
        idx.sort_by_key(|&i| (needed[i].offset, i));
        let mut current: Option<(usize, ReadRange<T>)> = None;
        for i in idx {
            let n = &needed[i];
            let end = n.offset + n.stored_len as u64;
            if let Some((first, r)) = current.as_mut() {
                let fits = n.offset <= r.range.end + limits.max_gap
                    && end.max(r.range.end) - r.range.start <= limits.max_range;
                if fits {
                    r.range.end = r.range.end.max(end);
                    r.blobs
                        .push((n.tag, (n.offset - r.range.start) as usize, n.stored_len));
                    *first = (*first).min(i);
                    continue;
                }
                out.push(current.take().expect("just matched"));
            }
            current = Some((
                i,
                ReadRange {
                    pack,
                    range: n.offset..end,
                    blobs: vec![(n.tag, 0, n.stored_len)],
                },
            ));
        }
        out.extend(current);
    }
    out.sort_by_key(|(first, _)| *first);
    out.into_iter().map(|(_, r)| r).collect()
}

/// How a data pack is used by the snapshot being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackUse {
    pub pack: PackId,
    /// The pack object's size.
    pub size: u64,
    /// Stored bytes of it the new snapshot points at.
    pub used: u64,
}

/// A pack the new snapshot uses for less than this share of its bytes is sparse.
pub const SPARSE_SHARE: f64 = 0.5;

/// The sparse packs whose chunks the publisher re-packs: those the new snapshot uses for less
/// than [`SPARSE_SHARE`] of their bytes, sparsest first, as long as the bytes re-packed stay
/// within `budget` (a share of what the publish uploads anyway). A pack is taken whole or not
/// at all: re-packing part of one still leaves it in use.
pub fn sparse_packs(uses: &[PackUse], budget: u64) -> HashSet<PackId> {
    let mut sparse: Vec<&PackUse> = uses
        .iter()
        .filter(|u| u.size > 0 && (u.used as f64) < SPARSE_SHARE * u.size as f64)
        .collect();
    // Sparsest first; ties by id, so that one store state gives one choice.
    sparse.sort_by(|a, b| {
        let (ra, rb) = (a.used as f64 / a.size as f64, b.used as f64 / b.size as f64);
        ra.total_cmp(&rb).then(a.pack.cmp(&b.pack))
    });
    let mut left = budget;
    let mut chosen = HashSet::new();
    for u in sparse {
        if u.used <= left {
            left -= u.used;
            chosen.insert(u.pack);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(pack: u8, offset: u64, len: u32, tag: usize) -> Needed<usize> {
        Needed {
            pack: PackId([pack; 16]),
            offset,
            stored_len: len,
            tag,
        }
    }

    #[test]
    fn neighbours_in_a_pack_share_a_read_and_far_ones_do_not() {
        let limits = RangeLimits {
            max_range: 100_000,
            max_gap: 1000,
            ..RangeLimits::default()
        };
        let needed = [
            need(1, 0, 500, 0),
            need(1, 500, 500, 1),
            // A 900-byte gap: read through.
            need(1, 1900, 100, 2),
            // Another pack in between, in file order.
            need(2, 40_000, 10, 3),
            // A 2,000-byte gap: a new range.
            need(1, 4000, 100, 4),
        ];
        let ranges = coalesce(&needed, limits);
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        assert_eq!(ranges[0].pack, PackId([1; 16]));
        assert_eq!(ranges[0].range, 0..2000);
        assert_eq!(
            ranges[0].blobs,
            vec![(0, 0, 500), (1, 500, 500), (2, 1900, 100)]
        );
        assert_eq!(ranges[1].range, 40_000..40_010);
        assert_eq!(ranges[2].range, 4000..4100);
        assert_eq!(ranges[2].blobs, vec![(4, 0, 100)]);
        // Every needed blob is in exactly one range, at the right place.
        let mut seen: Vec<usize> = ranges
            .iter()
            .flat_map(|r| {
                r.blobs.iter().map(move |&(t, at, len)| {
                    let n = needed[t];
                    assert_eq!(
                        (r.pack, r.range.start + at as u64, len),
                        (n.pack, n.offset, n.stored_len)
                    );
                    t
                })
            })
            .collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn ranges_stay_within_the_limit_and_a_repeated_blob_is_read_once() {
        let limits = RangeLimits {
            max_range: 1000,
            max_gap: 0,
            ..RangeLimits::default()
        };
        // Ten adjacent 300-byte blobs: ranges of three (900 bytes), the last of one.
        let mut needed: Vec<_> = (0..10).map(|i| need(1, i * 300, 300, i as usize)).collect();
        // Blob 4 needed again later in the file (a chunk that repeats).
        needed.push(need(1, 1200, 300, 10));
        // A blob larger than a range is a range alone.
        needed.push(need(1, 5000, 4000, 11));
        let ranges = coalesce(&needed, limits);
        for r in &ranges {
            assert!(
                r.range.end - r.range.start <= 1000 || r.blobs.len() == 1,
                "{r:?}"
            );
        }
        let lens: Vec<u64> = ranges.iter().map(|r| r.range.end - r.range.start).collect();
        assert_eq!(lens, vec![900, 900, 900, 300, 4000]);
        assert_eq!(
            ranges[1].blobs,
            vec![(3, 0, 300), (4, 300, 300), (10, 300, 300), (5, 600, 300)]
        );
    }

    #[test]
    fn nothing_needed_reads_nothing() {
        assert!(coalesce::<usize>(&[], RangeLimits::default()).is_empty());
    }

    #[test]
    fn the_sparsest_packs_are_re_packed_within_the_budget() {
        let u = |p: u8, size: u64, used: u64| PackUse {
            pack: PackId([p; 16]),
            size,
            used,
        };
        let uses = [
            u(1, 1000, 900), // dense: kept
            u(2, 1000, 100), // 10%
            u(3, 1000, 400), // 40%
            u(4, 1000, 200), // 20%
            u(5, 1000, 500), // exactly half: not sparse
        ];
        let ids = |v: &[u8]| v.iter().map(|p| PackId([*p; 16])).collect::<HashSet<_>>();
        assert_eq!(sparse_packs(&uses, 10_000), ids(&[2, 3, 4]));
        // 100 + 200 fit, then 400 does not.
        assert_eq!(sparse_packs(&uses, 500), ids(&[2, 4]));
        // Only the sparsest fits.
        assert_eq!(sparse_packs(&uses, 150), ids(&[2]));
        assert!(sparse_packs(&uses, 0).is_empty());
    }
}
