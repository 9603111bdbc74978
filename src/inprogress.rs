//! The advisory in-progress object of a publish (`<prefix>/inprogress/<index>-<term>.json`):
//! while a publish uploads its chunks, the publisher rewrites one small object listing the
//! chunks already in the store ([`Announcer`]), so that followers can fetch them before the
//! manifest exists ([`crate::prefetch`]). It is deleted once the manifest is written, and
//! when the publish fails (best effort: a publisher killed mid-publish leaves it behind, and
//! followers give up on an object that stops changing, see [`STALE_AFTER`]).
//!
//! The list is a contiguous prefix of the file, in file order, as (offset, len, sha256):
//! only chunks whose PUT completed (or that the store held already) are listed, so a
//! follower's GET of a listed chunk never misses. A prefix rather than a set keeps the
//! follower's checks simple (every offset is the sum of the lengths before it: nothing can
//! overlap or reach outside the file) and costs little: uploads run in file order, so the
//! prefix trails the uploads by at most their concurrency.
//!
//! In a repository of packs, a chunk is readable once the pack it was written into is
//! complete, and the object lists finished packs instead of chunks ([`PackRuns`]): for each,
//! runs of consecutive blobs that sit at consecutive offsets of the file. A follower reads
//! the pack's trailer for the blobs' ids and lengths. At 16 KiB chunks a chunk list would be
//! megabytes per GiB, rewritten four times a second; a new snapshot's pack is one run. Only
//! chunks this publish uploads are listed (a follower holds the others, or fetches them
//! after the manifest), and the list of packs only grows at its end.
//!
//! Nothing in it is trusted ([`InProgress::parse`]): anyone who can write to the bucket can
//! forge one. A follower checks its shape against the repository's limits, checks every
//! chunk it downloads against the listed sha256, and never adopts anything because of it:
//! only the store's manifest (signed, when signing is configured) makes a snapshot
//! adoptable, and the fetch that follows verifies every chunk again against it. A forgery
//! costs at most one snapshot's size of wasted download and disk.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chunk::{ChunkParams, Digest};
use crate::pack::PackId;
use crate::repo::Repo;
use crate::tree::Location;

/// The format this build writes and reads.
pub const INPROGRESS_FORMAT: u32 = 1;
/// Chunks listed at most (the rest of a larger snapshot is fetched after its manifest):
/// about 7 MiB of JSON, and the follower's memory for the list is bounded with it.
pub const MAX_CHUNKS: usize = 65_536;
/// Bodies larger than this are refused unread (a full list is about 7 MiB).
pub const MAX_BODY: u64 = 8 << 20;
/// The publisher rewrites the object at most this often (and only when the list grew, or
/// for the heartbeat): a 1 GiB publish of 8 s costs about 30 PUTs.
pub const REWRITE_EVERY: Duration = Duration::from_millis(250);
/// The publisher rewrites the object at least this often while it runs, even when the list
/// did not grow (a slow upload), so followers can tell a live publish from a dead one.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A follower gives up on an in-progress object that has not changed for this long: its
/// publisher died (or it is a forgery that stopped).
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// One listed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
    pub sha256: Digest,
}

/// A finished pack of a publish in progress (repository of packs), and where its blobs go
/// in the file: each run `[file_offset, pack_offset, count]` is `count` consecutive blobs
/// from the one at `pack_offset` (as the pack's trailer lays them out), whose plain bytes
/// follow one another in the file from `file_offset`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackRuns {
    pub pack: PackId,
    /// The pack object's size, as its publisher finished it.
    pub size: u64,
    pub runs: Vec<(u64, u32, u32)>,
}

/// Pack entries listed at most, and runs in all (a snapshot with more is prefetched as far
/// as they reach, and fetched after its manifest for the rest).
pub const MAX_PACK_ENTRIES: usize = 16_384;
pub const MAX_RUNS: usize = 65_536;

/// The object's body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InProgress {
    pub format: u32,
    pub cluster_id: String,
    pub index: u64,
    pub term: u64,
    /// The whole file's size.
    pub size: u64,
    pub written_at: DateTime<Utc>,
    /// The chunks in the store so far: a prefix of the file, in order (chunk objects).
    pub chunks: Vec<Span>,
    /// The finished packs so far (repository of packs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<PackRuns>,
}

/// What a follower expects of the object it reads.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub cluster_id: &'a str,
    pub index: u64,
    pub term: u64,
    pub params: ChunkParams,
    /// A repository of packs: packs are listed, not chunks.
    pub packs: bool,
}

impl InProgress {
    /// The largest snapshot an in-progress object may announce: [`MAX_CHUNKS`] chunks of
    /// the repository's largest size.
    pub fn max_size(params: &ChunkParams) -> u64 {
        MAX_CHUNKS as u64 * params.max_size as u64
    }

    /// Parses and checks a body read from the store. The error says what is wrong, for a
    /// warning naming the object.
    pub fn parse(body: &[u8], expect: &Expect) -> Result<InProgress, String> {
        if body.len() as u64 > MAX_BODY {
            return Err(format!("it is {} bytes, more than {MAX_BODY}", body.len()));
        }
        let parsed: InProgress = serde_json::from_slice(body)
            .map_err(|e| format!("it is not an in-progress object: {e}"))?;
        parsed.check(expect)?;
        Ok(parsed)
    }

    fn check(&self, expect: &Expect) -> Result<(), String> {
        if self.format != INPROGRESS_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads format {INPROGRESS_FORMAT})",
                self.format
            ));
        }
        if self.cluster_id != expect.cluster_id {
            return Err(format!(
                "it is for cluster {:?}, this sidecar follows {:?}",
                self.cluster_id, expect.cluster_id
            ));
        }
        if (self.index, self.term) != (expect.index, expect.term) {
            return Err(format!(
                "it says snapshot {} (term {}), its name says {} (term {})",
                self.index, self.term, expect.index, expect.term
            ));
        }
        let max_size = Self::max_size(&expect.params);
        if self.size == 0 || self.size > max_size {
            return Err(format!(
                "its size {} is outside 1..={max_size} (the repository's chunking allows at most {MAX_CHUNKS} chunks of {} bytes)",
                self.size, expect.params.max_size
            ));
        }
        if self.chunks.len() > MAX_CHUNKS {
            return Err(format!(
                "it lists {} chunks, more than {MAX_CHUNKS}",
                self.chunks.len()
            ));
        }
        match (expect.packs, self.chunks.is_empty(), self.packs.is_empty()) {
            (true, false, _) => {
                return Err("it lists chunks, in a repository of packs".into());
            }
            (false, _, false) => {
                return Err("it lists packs, in a repository of chunk objects".into());
            }
            _ => {}
        }
        if self.packs.len() > MAX_PACK_ENTRIES {
            return Err(format!(
                "it lists {} packs, more than {MAX_PACK_ENTRIES}",
                self.packs.len()
            ));
        }
        let mut runs = 0usize;
        for (i, p) in self.packs.iter().enumerate() {
            if p.size < crate::pack::FOOTER_LEN || p.size > crate::pack::MAX_PACK_SIZE {
                return Err(format!(
                    "pack {i} ({}) has size {}, impossible",
                    p.pack, p.size
                ));
            }
            runs += p.runs.len();
            if p.runs.is_empty() || runs > MAX_RUNS {
                return Err(format!(
                    "pack {i} ({}) lists {} runs (at most {MAX_RUNS} in all, at least one each)",
                    p.pack,
                    p.runs.len()
                ));
            }
            for &(file_offset, pack_offset, count) in &p.runs {
                if file_offset >= self.size
                    || pack_offset as u64 >= p.size
                    || count == 0
                    || count as usize > crate::pack::MAX_BLOBS
                {
                    return Err(format!(
                        "pack {i} ({}) has a run of {count} blobs from pack offset {pack_offset} to file offset {file_offset}: impossible in a file of {} bytes",
                        p.pack, self.size
                    ));
                }
            }
        }
        let max_len = expect.params.max_size as u64;
        let mut end = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset != end {
                return Err(format!(
                    "chunk {i} ({}) is at offset {}, not {end}: the list must be the file's chunks in order, without gaps or overlaps",
                    c.sha256, c.offset
                ));
            }
            if c.len == 0 || c.len > max_len {
                return Err(format!(
                    "chunk {i} ({}) has length {}, outside 1..={max_len}",
                    c.sha256, c.len
                ));
            }
            end = match c.offset.checked_add(c.len) {
                Some(end) if end <= self.size => end,
                _ => {
                    return Err(format!(
                        "chunk {i} ({}) ends past the file's size {}",
                        c.sha256, self.size
                    ))
                }
            };
        }
        Ok(())
    }
}

/// What an announcer lists. Chunk objects: the file's chunks as far as they are known
/// (`plan`, in file order), which digests the store holds, and how far the prefix of stored
/// chunks reaches. Packs: the runs planned into each pack not finished yet, and the entries
/// of finished packs, in the order they were finished (only ever appended to).
#[derive(Debug, Default)]
struct Listing {
    plan: Vec<Span>,
    stored: HashSet<Digest>,
    frontier: usize,
    open: HashMap<PackId, Vec<Run>>,
    finished: HashMap<PackId, u64>,
    /// Runs planned into packs already finished (a chunk the snapshot repeats): listed as a
    /// further entry of their pack at the next write.
    late: Vec<(PackId, Run)>,
    packs: Vec<PackRuns>,
    runs: usize,
}

/// A run being planned: where it starts and where the next blob would have to be to
/// extend it.
#[derive(Debug, Clone, Copy)]
struct Run {
    file_offset: u64,
    pack_offset: u32,
    count: u32,
    file_end: u64,
    pack_end: u32,
}

impl Run {
    fn start(file_offset: u64, len: u64, at: &Location) -> Run {
        Run {
            file_offset,
            pack_offset: at.offset,
            count: 1,
            file_end: file_offset + len,
            pack_end: at.offset + at.stored_len,
        }
    }

    /// Extends the run with the blob at `at`, placed at `file_offset`, if it follows on.
    fn extend(&mut self, file_offset: u64, len: u64, at: &Location) -> bool {
        if file_offset != self.file_end || at.offset != self.pack_end {
            return false;
        }
        self.count += 1;
        self.file_end += len;
        self.pack_end += at.stored_len;
        true
    }
}

impl Listing {
    /// Moves the frontier over every planned chunk now in the store.
    fn advance(&mut self) -> bool {
        let before = self.frontier;
        while self.frontier < self.plan.len().min(MAX_CHUNKS)
            && self.stored.contains(&self.plan[self.frontier].sha256)
        {
            self.frontier += 1;
        }
        self.frontier != before
    }

    /// One planned blob (repository of packs). Runs beyond [`MAX_RUNS`] are not listed.
    fn plan_blob(&mut self, file_offset: u64, len: u64, at: &Location) -> bool {
        if self.finished.contains_key(&at.pack) {
            if let Some((pack, run)) = self.late.last_mut() {
                if *pack == at.pack && run.extend(file_offset, len, at) {
                    return false;
                }
            }
            if self.runs < MAX_RUNS {
                self.runs += 1;
                self.late.push((at.pack, Run::start(file_offset, len, at)));
            }
            return true;
        }
        let runs = self.open.entry(at.pack).or_default();
        if runs
            .last_mut()
            .is_some_and(|r| r.extend(file_offset, len, at))
        {
            return false;
        }
        if self.runs < MAX_RUNS {
            self.runs += 1;
            runs.push(Run::start(file_offset, len, at));
        }
        false
    }

    fn entry(pack: PackId, size: u64, runs: impl IntoIterator<Item = Run>) -> PackRuns {
        PackRuns {
            pack,
            size,
            runs: runs
                .into_iter()
                .map(|r| (r.file_offset, r.pack_offset, r.count))
                .collect(),
        }
    }

    /// A pack is finished: its runs become listable.
    fn finish(&mut self, pack: PackId, size: u64) -> bool {
        self.finished.insert(pack, size);
        match self.open.remove(&pack) {
            Some(runs) if !runs.is_empty() && self.packs.len() < MAX_PACK_ENTRIES => {
                self.packs.push(Self::entry(pack, size, runs));
                true
            }
            _ => false,
        }
    }

    /// The finished packs to list now, the late runs sealed into entries of their own.
    fn listed_packs(&mut self) -> Vec<PackRuns> {
        let late = std::mem::take(&mut self.late);
        let mut i = 0;
        while i < late.len() && self.packs.len() < MAX_PACK_ENTRIES {
            let pack = late[i].0;
            let mut j = i;
            while j < late.len() && late[j].0 == pack {
                j += 1;
            }
            let size = self.finished[&pack];
            self.packs
                .push(Self::entry(pack, size, late[i..j].iter().map(|(_, r)| *r)));
            i = j;
        }
        self.packs.clone()
    }
}

/// Publisher side: keeps a publish's in-progress object up to date from a task of its own,
/// at most every [`REWRITE_EVERY`] and at least every [`HEARTBEAT`], and deletes it when
/// the publish ends ([`Announcer::end`], or when dropped: a cancelled publish). Every
/// failure is only logged: the object is advisory, and a publish never fails because of it.
pub struct Announcer {
    repo: Repo,
    index: u64,
    term: u64,
    listing: Arc<Mutex<Listing>>,
    grew: Arc<Notify>,
    cancel: CancellationToken,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Announcer {
    /// Writes the first (empty) version of the object, then keeps it up to date. `None`
    /// when the store refused the first write (said in a warning): the publish goes on
    /// without streaming.
    pub async fn start(repo: &Repo, index: u64, term: u64, size: u64) -> Option<Announcer> {
        let listing = Arc::new(Mutex::new(Listing::default()));
        let first = body(repo, index, term, size, &[], &[]);
        if let Err(e) = repo.put_inprogress(index, term, first).await {
            tracing::warn!(index, term, error = %e, "cannot write the in-progress object; followers fetch this snapshot after its manifest");
            return None;
        }
        let grew = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let writer = tokio::spawn(write_loop(
            repo.clone(),
            (index, term, size),
            listing.clone(),
            grew.clone(),
            cancel.clone(),
        ));
        Some(Announcer {
            repo: repo.clone(),
            index,
            term,
            listing,
            grew,
            cancel,
            writer: Some(writer),
        })
    }

    /// More of the file's chunks, in file order, after those planned so far (stored or not).
    pub fn plan(&self, chunks: impl IntoIterator<Item = Span>) {
        let mut listing = self.lock();
        listing.plan.extend(chunks);
        if listing.advance() {
            self.grew.notify_one();
        }
    }

    /// Repository of packs: the snapshot holds, at `file_offset`, the `len` bytes of a chunk
    /// this publish uploaded into the blob at `at` (called in file order; readable once its
    /// pack is finished).
    pub fn plan_blob(&self, file_offset: u64, len: u64, at: &Location) {
        if self.lock().plan_blob(file_offset, len, at) {
            self.grew.notify_one();
        }
    }

    /// Repository of packs: this pack is complete in the store, `size` bytes.
    pub fn pack_finished(&self, pack: PackId, size: u64) {
        if self.lock().finish(pack, size) {
            self.grew.notify_one();
        }
    }

    /// These chunks are in the store now.
    pub fn stored(&self, digests: impl IntoIterator<Item = Digest>) {
        let mut listing = self.lock();
        listing.stored.extend(digests);
        if listing.advance() {
            self.grew.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Listing> {
        self.listing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops the rewrites (waiting for one in flight, so that none lands after the delete)
    /// and deletes the object.
    pub async fn end(mut self) {
        self.cancel.cancel();
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
        if let Err(e) = self.repo.delete_inprogress(self.index, self.term).await {
            tracing::warn!(index = self.index, term = self.term, error = %e, "cannot delete the in-progress object; followers ignore it once it is stale");
        }
    }
}

impl Drop for Announcer {
    /// A publish dropped before [`Announcer::end`] (cancelled) still deletes its object,
    /// from a task of its own, after the writer stopped.
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        self.cancel.cancel();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let repo = self.repo.clone();
        let (index, term) = (self.index, self.term);
        runtime.spawn(async move {
            let _ = writer.await;
            let _ = repo.delete_inprogress(index, term).await;
        });
    }
}

fn body(
    repo: &Repo,
    index: u64,
    term: u64,
    size: u64,
    chunks: &[Span],
    packs: &[PackRuns],
) -> Bytes {
    let object = InProgress {
        format: INPROGRESS_FORMAT,
        cluster_id: repo.cluster_id().to_owned(),
        index,
        term,
        size,
        written_at: Utc::now(),
        chunks: chunks.to_vec(),
        packs: packs.to_vec(),
    };
    // Plain numbers, strings and digests: serialising cannot fail.
    serde_json::to_vec(&object)
        .expect("serialising an in-progress object")
        .into()
}

async fn write_loop(
    repo: Repo,
    (index, term, size): (u64, u64, u64),
    listing: Arc<Mutex<Listing>>,
    grew: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut written = 0usize;
    let mut last = Instant::now();
    let mut failed = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = grew.notified() => {}
            _ = tokio::time::sleep_until(last + HEARTBEAT) => {}
        }
        // The rate bound: a burst of completions makes one rewrite.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(last + REWRITE_EVERY) => {}
        }
        let (chunks, packs): (Vec<Span>, Vec<PackRuns>) = {
            let mut listing = listing.lock().unwrap_or_else(|p| p.into_inner());
            (
                listing.plan[..listing.frontier].to_vec(),
                listing.listed_packs(),
            )
        };
        let listed = chunks.len() + packs.len();
        if listed == written && last.elapsed() < HEARTBEAT {
            continue;
        }
        // Not raced against `cancel`: `end` waits for this write, so none lands after the
        // object's deletion.
        match repo
            .put_inprogress(index, term, body(&repo, index, term, size, &chunks, &packs))
            .await
        {
            Ok(()) => {
                written = listed;
                failed = false;
            }
            Err(e) if !failed => {
                failed = true;
                tracing::warn!(index, term, error = %e, "cannot rewrite the in-progress object; retrying with the next chunks");
            }
            Err(e) => {
                tracing::debug!(index, term, error = %e, "still cannot rewrite the in-progress object")
            }
        }
        last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChunkParams {
        ChunkParams::new(4096, 8192, 16384).unwrap()
    }

    fn expect() -> Expect<'static> {
        Expect {
            cluster_id: "c",
            index: 7,
            term: 2,
            params: params(),
            packs: false,
        }
    }

    fn span(offset: u64, len: u64, seed: u8) -> Span {
        Span {
            offset,
            len,
            sha256: Digest::of(&[seed]),
        }
    }

    fn object(size: u64, chunks: Vec<Span>) -> InProgress {
        InProgress {
            format: INPROGRESS_FORMAT,
            cluster_id: "c".into(),
            index: 7,
            term: 2,
            size,
            written_at: Utc::now(),
            chunks,
            packs: Vec::new(),
        }
    }

    fn parse(o: &InProgress) -> Result<InProgress, String> {
        InProgress::parse(&serde_json::to_vec(o).unwrap(), &expect())
    }

    #[test]
    fn a_contiguous_prefix_within_the_file_parses() {
        let o = object(30000, vec![span(0, 10000, 1), span(10000, 16384, 2)]);
        assert_eq!(parse(&o).unwrap(), o);
        assert!(parse(&object(30000, vec![])).is_ok());
    }

    #[test]
    fn forged_shapes_are_refused_with_the_reason() {
        let refused = |o: InProgress, words: &str| {
            let e = parse(&o).unwrap_err();
            assert!(e.contains(words), "{e}");
        };
        refused(object(30000, vec![span(1, 100, 1)]), "offset 1, not 0");
        refused(
            object(30000, vec![span(0, 100, 1), span(50, 100, 2)]),
            "without gaps or overlaps",
        );
        refused(
            object(30000, vec![span(0, 100, 1), span(200, 100, 2)]),
            "without gaps or overlaps",
        );
        refused(object(30000, vec![span(0, 16385, 1)]), "outside 1..=16384");
        refused(object(30000, vec![span(0, 0, 1)]), "outside 1..=16384");
        refused(
            object(100, vec![span(0, 200, 1)]),
            "ends past the file's size 100",
        );
        refused(object(0, vec![]), "size 0 is outside");
        refused(object(u64::MAX, vec![]), "is outside 1..=");
        let mut other = object(100, vec![]);
        other.cluster_id = "other".into();
        refused(other, "cluster \"other\"");
        let mut moved = object(100, vec![]);
        moved.index = 8;
        refused(moved, "its name says 7");
        let mut newer = object(100, vec![]);
        newer.format = 9;
        refused(newer, "format 9");
        let many = (0..MAX_CHUNKS as u64 + 1)
            .map(|i| span(i * 4096, 4096, 1))
            .collect();
        refused(object(u64::MAX / 2, many), "is outside");
        let many = (0..MAX_CHUNKS as u64 + 1)
            .map(|i| span(i * 4096, 4096, 1))
            .collect();
        refused(
            object(InProgress::max_size(&params()), many),
            "more than 65536",
        );
        for garbage in [&b"{garbage"[..], b"", b"[]", b"{\"format\":1}"] {
            let e = InProgress::parse(garbage, &expect()).unwrap_err();
            assert!(e.starts_with("it is not an in-progress object"), "{e}");
        }
        let huge = vec![b' '; MAX_BODY as usize + 1];
        assert!(InProgress::parse(&huge, &expect())
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn the_listing_is_the_prefix_of_stored_chunks_duplicates_included() {
        let mut l = Listing::default();
        let (a, b, c) = (span(0, 10, 1), span(10, 10, 2), span(20, 10, 1));
        l.plan.extend([a, b, c]);
        assert!(!l.advance());
        l.stored.insert(b.sha256);
        assert!(!l.advance(), "b is not at the front");
        l.stored.insert(a.sha256);
        assert!(l.advance());
        // c repeats a's bytes: stored once, listed at both offsets.
        assert_eq!(l.frontier, 3);
    }

    #[test]
    fn pack_runs_merge_consecutive_blobs_and_only_grow() {
        let (p1, p2) = (PackId([1; 16]), PackId([2; 16]));
        let loc = |pack, offset, stored_len| Location {
            pack,
            offset,
            stored_len,
            encoding: crate::pack::Encoding::Raw,
        };
        let mut l = Listing::default();
        // Three blobs of p1 at consecutive file offsets: one run; then p1 rotates to p2.
        l.plan_blob(0, 100, &loc(p1, 0, 100));
        l.plan_blob(100, 50, &loc(p1, 100, 50));
        l.plan_blob(150, 70, &loc(p1, 150, 60));
        // A gap in the file (a chunk the publish did not upload): a new run.
        l.plan_blob(300, 10, &loc(p1, 210, 10));
        assert!(
            l.listed_packs().is_empty(),
            "nothing before its pack is finished"
        );
        assert!(l.finish(p1, 500));
        l.plan_blob(310, 40, &loc(p2, 0, 40));
        // A repeat of p1's first blob, after p1 was listed: a further entry of p1.
        l.plan_blob(350, 100, &loc(p1, 0, 100));
        let first = l.listed_packs();
        assert_eq!(
            first,
            vec![
                PackRuns {
                    pack: p1,
                    size: 500,
                    runs: vec![(0, 0, 3), (300, 210, 1)]
                },
                PackRuns {
                    pack: p1,
                    size: 500,
                    runs: vec![(350, 0, 1)]
                },
            ]
        );
        assert!(l.finish(p2, 90));
        let second = l.listed_packs();
        assert_eq!(second[..2], first[..], "the list only grows at its end");
        assert_eq!(second[2].runs, vec![(310, 0, 1)]);
    }
}
