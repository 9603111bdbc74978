//! Finding chunks of an earlier file near where they sit in a new one, in bounded memory.
//!
//! A publish looks for the new snapshot's changed chunks among the chunks of the previous
//! snapshot's blocks that did not match; a follower looks for them in the local snapshots it
//! holds. Holding all of those chunk ids at once would cost memory in proportion to the
//! snapshot (60 MB at 16 GiB when every block changed, as 5,000 scattered updates do), so a
//! [`Window`] holds only the earlier file's blocks around the position that corresponds to
//! the one being built: the new position plus the current offset between the two files,
//! which every block that matched and every chunk found moves along. An edit shifts what
//! follows it by the bytes it inserts or removes; as long as that stays within the window's
//! span (256 MiB by default), nothing is missed, and anything further away is only stored
//! again, never wrong.
//!
//! The window does the bookkeeping (which of the earlier blocks to load, which to drop);
//! its owner loads them, from the store or from a local file.

use std::collections::{HashMap, VecDeque};

use crate::chunk::Digest;

/// How far ahead of and behind the corresponding position the window reaches by default.
pub const SPAN: u64 = 256 << 20;
/// How far ahead of a block's end a candidate must be loaded before the block is looked
/// up (loads further ahead may still be in flight).
const NEEDED_AHEAD: u64 = 8 << 20;

/// Earlier blocks held around a moving position, and their chunks.
#[derive(Debug)]
pub struct Window<V> {
    /// The candidates' byte ranges in the earlier file, in order.
    ranges: Vec<(u64, u64)>,
    /// Candidates `..requested` have been handed out to load.
    requested: usize,
    /// Chunk id → (candidate holding it, its position in the earlier file, value). The
    /// position is `None` for an id more than one loaded candidate holds (a zero page,
    /// say): it is found, but says nothing about where the new file is in the earlier one.
    map: HashMap<Digest, (u32, Option<u64>, V)>,
    /// Loaded candidates, in order, with the ids they put in the map.
    loaded: VecDeque<(u32, Vec<Digest>)>,
    /// Earlier position minus new position, as last seen.
    delta: i64,
    span: u64,
}

impl<V> Window<V> {
    /// A window over candidates with these byte ranges in the earlier file (in file order).
    pub fn new(ranges: Vec<(u64, u64)>, span: u64) -> Window<V> {
        Window {
            ranges,
            requested: 0,
            map: HashMap::new(),
            loaded: VecDeque::new(),
            delta: 0,
            span,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Records that new position `new` holds what earlier position `old` held.
    pub fn anchor(&mut self, new: u64, old: u64) {
        self.delta = old as i64 - new as i64;
    }

    fn aligned(&self, new: u64) -> u64 {
        (new as i64 + self.delta).max(0) as u64
    }

    /// The candidates to load now so that the window reaches a span ahead of new position
    /// `end`, in order. Each is handed out once.
    pub fn to_request(&mut self, end: u64) -> std::ops::Range<usize> {
        let limit = self.aligned(end).saturating_add(self.span);
        let first = self.requested;
        while self.requested < self.ranges.len() && self.ranges[self.requested].0 <= limit {
            self.requested += 1;
        }
        first..self.requested
    }

    /// Whether candidate `c` may hold chunks of the new block ending at `end`, so that its
    /// load must be in before the block is looked up.
    pub fn needed(&self, c: usize, end: u64) -> bool {
        // Never further than the window reaches: what it has not asked for cannot be due.
        let ahead = NEEDED_AHEAD.min(self.span);
        self.ranges[c].0 < self.aligned(end).saturating_add(ahead)
    }

    /// Adds a loaded candidate's chunks (each with its position in the earlier file).
    pub fn insert(&mut self, c: usize, chunks: Vec<(Digest, u64, V)>) {
        let mut ids = Vec::with_capacity(chunks.len());
        for (id, at, value) in chunks {
            // A later candidate takes the id over (so that evicting the earlier one keeps
            // it); an id held twice no longer tells a position.
            let at = match self.map.get(&id) {
                Some((owner, _, _)) if *owner != c as u32 => None,
                _ => Some(at),
            };
            self.map.insert(id, (c as u32, at, value));
            ids.push(id);
        }
        self.loaded.push_back((c as u32, ids));
    }

    /// Drops the loaded candidates that end more than a span behind new position `start`.
    pub fn evict(&mut self, start: u64) {
        let floor = self.aligned(start).saturating_sub(self.span);
        while let Some((c, _)) = self.loaded.front() {
            if self.ranges[*c as usize].1 >= floor {
                break;
            }
            let (c, ids) = self.loaded.pop_front().expect("just looked");
            for id in ids {
                // Only if no later candidate took the id over.
                if self.map.get(&id).is_some_and(|(owner, _, _)| *owner == c) {
                    self.map.remove(&id);
                }
            }
        }
    }

    /// The chunk `id` at new position `new`, if the window holds it; a hit re-aligns the
    /// window.
    pub fn find(&mut self, id: &Digest, new: u64) -> Option<&V> {
        if let Some(old) = self.map.get(id)?.1 {
            self.anchor(new, old);
        }
        self.map.get(id).map(|(_, _, v)| v)
    }

    /// The chunk `id`, if the window holds it (without re-aligning the window).
    pub fn get(&self, id: &Digest) -> Option<&V> {
        self.map.get(id).map(|(_, _, v)| v)
    }

    /// Chunks held now (for tests and reports).
    pub fn held(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    /// Candidates of 10 chunks of 100 bytes each; chunk i sits at 100 * i.
    fn load(w: &mut Window<u64>, c: usize) {
        let chunks = (c as u64 * 10..c as u64 * 10 + 10)
            .map(|i| (id(i), 100 * i, i))
            .collect();
        w.insert(c, chunks);
    }

    fn window(n: usize, span: u64) -> Window<u64> {
        Window::new(
            (0..n as u64).map(|c| (c * 1000, c * 1000 + 1000)).collect(),
            span,
        )
    }

    #[test]
    fn the_window_follows_the_position_and_forgets_what_is_far_behind() {
        let mut w = window(100, 5000);
        let first = w.to_request(1000);
        assert_eq!(first, 0..7, "a span ahead of the block's end");
        for c in first {
            load(&mut w, c);
        }
        assert_eq!(w.find(&id(3), 300), Some(&3));
        assert!(w.find(&id(95), 300).is_none(), "not loaded yet");
        // Further on: more is handed out, once, and what is far behind is dropped.
        let next = w.to_request(50_000);
        assert_eq!(next, 7..56);
        for c in next {
            load(&mut w, c);
        }
        w.evict(49_000);
        assert!(w.find(&id(3), 49_000).is_none(), "dropped");
        assert_eq!(w.find(&id(480), 48_000), Some(&480));
        // A span behind to a span ahead (ten candidates), and the two the edges cut.
        assert!(w.held() <= 130, "{}", w.held());
        assert_eq!(w.to_request(50_000), 56..56);
    }

    /// An insertion early in the file shifts the rest; a hit moves the window with it.
    #[test]
    fn a_hit_realigns_the_window() {
        let mut w = window(100, 3000);
        for c in w.to_request(0) {
            load(&mut w, c);
        }
        // The new file has 40,000 bytes more in front: chunk 200 (old 20,000) is at 60,000.
        assert!(w.find(&id(200), 60_000).is_none());
        w.anchor(60_000, 20_000);
        for c in w.to_request(61_000) {
            load(&mut w, c);
        }
        w.evict(60_000);
        assert_eq!(w.find(&id(205), 60_500), Some(&205));
        assert!(w.needed(22, 61_000) && !w.needed(40, 61_000));
    }

    /// A chunk that many earlier blocks hold (a zero page) is found, but does not pull the
    /// window to wherever its last copy was loaded: the blocks that correspond stay.
    #[test]
    fn a_chunk_held_by_many_candidates_does_not_move_the_window() {
        let z = id(u64::MAX);
        let mut w: Window<u64> = window(100, 5000);
        let load = |w: &mut Window<u64>, r: std::ops::Range<usize>| {
            for c in r {
                let c = c as u64;
                w.insert(
                    c as usize,
                    vec![(id(c), c * 1000, c), (z, c * 1000 + 500, 1000 + c)],
                );
            }
        };
        for pos in [0u64, 1000, 2000] {
            let r = w.to_request(pos + 1000);
            load(&mut w, r);
            w.evict(pos);
            assert!(w.find(&id(pos / 1000), pos).is_some());
            assert!(
                w.find(&z, pos + 500).is_some(),
                "a shared chunk is still found"
            );
        }
        let r = w.to_request(4000);
        load(&mut w, r);
        w.evict(3000);
        assert!(
            w.find(&id(3), 3000).is_some(),
            "the corresponding candidate was dropped"
        );
    }

    #[test]
    fn an_id_in_two_candidates_survives_the_first_ones_eviction() {
        let mut w = window(10, 1000);
        w.insert(0, vec![(id(1), 0, 1)]);
        w.insert(5, vec![(id(1), 5000, 2)]);
        w.evict(4000);
        assert_eq!(w.find(&id(1), 5000), Some(&2));
    }
}
