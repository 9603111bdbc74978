//! Follower side of streaming: while a publish runs, fetch the chunks its in-progress object
//! lists ([`crate::inprogress`]) into the staging file the snapshot's fetch will use
//! ([`crate::fetch::open_staging_for`]), at their offsets, each checked against its sha256
//! before it is written. When the manifest lands, the fetch finds them in place (it checks
//! each one again against the manifest) and downloads only the rest.
//!
//! Nothing here makes anything adoptable: the staging file is hidden and only a fetch,
//! against the store's (verified) manifest, ever renames it into place. So the in-progress
//! object is judged only for the harm it could do: it is refused, with a warning naming it
//! and the reason, when it does not parse, is for another cluster or snapshot, announces a
//! size beyond the repository's limits, lists chunks out of order, overlapping or past the
//! end, rewrites chunks it listed before, or lists a chunk the store lacks or whose bytes do
//! not hash to its sha256. A refused or stale prefetch removes its staging file. What a
//! forgery can cost is bounded: one snapshot's size of downloads and disk, and a GET per
//! poll until it is refused or goes stale.
//!
//! A [`Prefetch`] polls the object (a conditional GET each `poll_interval`) until:
//! it disappears ([`Ended::Gone`]: the publish ended; its manifest is probably there, and
//! the staging file stays for the fetch), it stops changing for `stale_after`
//! ([`Ended::Stale`]: the publisher died), it is refused ([`Ended::Refused`]), or it is
//! cancelled ([`Ended::Cancelled`]: the daemon fetches a manifest now; the staging file is
//! the fetch's to keep or clean). Whichever way it ends, [`Prefetch::run`] returns only once
//! every write it started into the staging file is done: a write left on its blocking
//! thread could otherwise land over what the fetch after it wrote there.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chunk::Digest;
use crate::error::Error;
use crate::fetch::{self, NodeAccess};
use crate::inprogress::{Expect, InProgress, PackRuns, Span, MAX_BODY};
use crate::metrics::Metrics;
use crate::pack::decode_blob;
use crate::pack::plan::{coalesce, Needed, RangeLimits};
use crate::repo::{InProgressRead, Repo};

/// One prefetch: the snapshot at `id`, announced as in progress.
pub struct Prefetch {
    pub repo: Repo,
    /// (index, term) of the snapshot being published.
    pub id: (u64, u64),
    /// The node's incoming directory, where the fetch will assemble the snapshot.
    pub incoming: PathBuf,
    /// Chunks not to download: the fetch will copy them from the node's own snapshots.
    pub local: HashSet<Digest>,
    /// Who the staging file is for (its group), as for a fetch.
    pub node: Option<NodeAccess>,
    pub poll_interval: Duration,
    pub stale_after: Duration,
    pub concurrency: usize,
    pub metrics: Metrics,
}

/// Why a prefetch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The in-progress object is gone: the publish ended. The staging file stays.
    Gone,
    /// The object did not change for `stale_after`. The staging file is removed.
    Stale,
    /// The object was refused, for this reason. The staging file is removed.
    Refused(String),
    /// A chunk it lists is missing from the store or does not match its sha256 (the
    /// reason). The staging file is removed.
    BadChunk(String),
    /// The staging file could not be written (a local problem, not the object's). It is
    /// removed.
    Failed(String),
    /// Stopped from outside. The staging file stays.
    Cancelled,
}

impl Ended {
    /// Whether the staging file (and what the prefetch wrote there) is left for the fetch.
    pub fn keeps_staging(&self) -> bool {
        matches!(self, Ended::Gone | Ended::Cancelled)
    }
}

/// What a prefetch did.
#[derive(Debug, Clone)]
pub struct PrefetchReport {
    pub id: (u64, u64),
    pub ended: Ended,
    /// Chunks (and their bytes) downloaded, checked and written into the staging file.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks the object listed that the fetch will copy from a local snapshot instead.
    pub skipped: u64,
    /// Where each downloaded chunk was written in the staging file, and its digest (checked
    /// before it was written): the fetch that follows takes these without hashing each
    /// again ([`crate::fetch::Fetcher::prefetched`]).
    pub written: Vec<(u64, Digest)>,
    /// Reads of the in-progress object.
    pub polls: u64,
}

/// The state of a running prefetch.
struct Progress {
    /// The staging file, once the object told the size.
    file: Option<Arc<File>>,
    /// The incoming directory, locked against other fetches while `file` is written
    /// ([`crate::fetch::open_staging_for`]); released when the prefetch returns.
    locked: Option<snaprelay_contract::dir::Dir>,
    size: Option<u64>,
    /// The listed prefix handled so far (downloaded or left to a local copy).
    handled: Vec<Span>,
    /// The listed packs handled so far (repository of packs).
    handled_packs: Vec<PackRuns>,
    report: PrefetchReport,
    /// Held by every write into the staging file while it runs on a blocking thread: a
    /// cancelled poll drops its futures, not the threads, so [`Prefetch::run`] takes every
    /// permit back before it returns, and no write of this prefetch lands in the staging
    /// file after that (where the fetch, which knows only what the report lists, is writing).
    writes: Arc<tokio::sync::Semaphore>,
}

/// Writes into the staging file at most in flight at once (more than any concurrency).
const WRITES_IN_FLIGHT: u32 = 1024;

/// A permit of `writes` for one write, to move into its blocking task.
async fn write_permit(
    writes: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, Stopped> {
    writes.clone().acquire_owned().await.map_err(|_| {
        Stopped::Transient(Error::io(
            "writing the staging file",
            std::io::Error::other("the prefetch ended"),
        ))
    })
}

/// Why a batch of downloads stopped early.
enum Stopped {
    /// The store did not answer: try again at the next poll.
    Transient(Error),
    /// A listed chunk is missing or does not match its digest.
    Refused(String),
}

impl Prefetch {
    /// Runs until the object is gone, stale or refused, or `cancel` fires. Cancel safety:
    /// only the hidden staging file is left, holding verified chunks.
    pub async fn run(self, cancel: CancellationToken) -> PrefetchReport {
        let (index, term) = self.id;
        let location = self.repo.inprogress_location(index, term);
        let mut state = Progress {
            file: None,
            locked: None,
            size: None,
            handled: Vec::new(),
            handled_packs: Vec::new(),
            report: PrefetchReport {
                id: self.id,
                ended: Ended::Cancelled,
                chunks: 0,
                bytes: 0,
                skipped: 0,
                polls: 0,
                written: Vec::new(),
            },
            writes: Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT as usize)),
        };
        let ended = tokio::select! {
            _ = cancel.cancelled() => Ended::Cancelled,
            ended = self.poll(&mut state, &location) => ended,
        };
        // Writes a cancelled poll left running finish first (the semaphore is never closed).
        #[cfg(test)]
        pause::reached(pause::Point::Draining);
        let _drained = state.writes.acquire_many(WRITES_IN_FLIGHT).await;
        match &ended {
            Ended::Gone | Ended::Cancelled => {}
            Ended::Stale => {
                tracing::info!(object = %location, stale_after_ms = self.stale_after.as_millis() as u64, "the publish in progress stopped changing; giving up prefetching it");
                self.metrics.inprogress_refused("stale");
                self.discard(&state);
            }
            Ended::Refused(reason) | Ended::BadChunk(reason) => {
                tracing::warn!(object = %location, reason, "in-progress object refused; not prefetching that snapshot");
                let label = match ended {
                    Ended::BadChunk(_) => "chunk_mismatch",
                    _ => "invalid",
                };
                self.metrics.inprogress_refused(label);
                self.discard(&state);
            }
            Ended::Failed(error) => {
                tracing::warn!(object = %location, error, "cannot prefetch into the incoming directory");
                self.discard(&state);
            }
        }
        state.report.ended = ended;
        tracing::debug!(
            index,
            term,
            chunks = state.report.chunks,
            bytes = state.report.bytes,
            polls = state.report.polls,
            ended = ?state.report.ended,
            "prefetch ended"
        );
        state.report
    }

    /// Removes the staging file, if this prefetch holds it: one it never opened (another
    /// fetch held the directory) is not its own to remove.
    fn discard(&self, state: &Progress) {
        if state.locked.is_none() {
            return;
        }
        if let Err(e) = fetch::discard_staging(&self.incoming, self.id) {
            tracing::warn!(dir = %self.incoming.display(), error = %e, "cannot remove a prefetch's staging file");
        }
    }

    async fn poll(&self, state: &mut Progress, location: &str) -> Ended {
        let (index, term) = self.id;
        let expect = Expect {
            cluster_id: self.repo.cluster_id(),
            index,
            term,
            params: self.repo.params(),
            packs: self.repo.packs().is_some(),
        };
        let mut seen: Option<String> = None;
        // A store without ETags: the last body, to tell a change.
        let mut last_body: Option<bytes::Bytes> = None;
        let mut changed_at = Instant::now();
        let mut first = true;
        loop {
            if !first {
                tokio::time::sleep(self.poll_interval).await;
            }
            first = false;
            state.report.polls += 1;
            let read = self
                .repo
                .read_inprogress(index, term, seen.as_deref(), MAX_BODY)
                .await;
            let (bytes, e_tag) = match read {
                Ok(InProgressRead::Body { bytes, e_tag }) => (bytes, e_tag),
                Ok(InProgressRead::Missing) => return Ended::Gone,
                Ok(InProgressRead::NotModified) => {
                    if changed_at.elapsed() >= self.stale_after {
                        return Ended::Stale;
                    }
                    continue;
                }
                Err(Error::ObjectTooLarge { size, limit, .. }) => {
                    return Ended::Refused(format!("it is {size} bytes, more than {limit}"))
                }
                Err(e) => {
                    tracing::debug!(object = location, error = %e, "cannot read the in-progress object");
                    if changed_at.elapsed() >= self.stale_after {
                        return Ended::Stale;
                    }
                    continue;
                }
            };
            if e_tag.is_none() && last_body.as_ref() == Some(&bytes) {
                if changed_at.elapsed() >= self.stale_after {
                    return Ended::Stale;
                }
                continue;
            }
            changed_at = Instant::now();
            seen = e_tag;
            let object = match InProgress::parse(&bytes, &expect) {
                Ok(object) => object,
                Err(reason) => return Ended::Refused(reason),
            };
            last_body = seen.is_none().then_some(bytes);
            if let Err(ended) = self.take(state, object).await {
                return ended;
            }
        }
    }

    /// Repository of packs: for each newly listed pack, reads its trailer (checked against
    /// its digest) for the ids and lengths of the blobs the runs name, reads those blobs
    /// (neighbours in one ranged GET), checks each against its id and writes it where its
    /// run puts it. The entries are handled (and their list may only grow) once all of them
    /// are written; a store that stops answering leaves them to the next poll.
    async fn take_packed(
        &self,
        state: &mut Progress,
        file: &Arc<File>,
        size: u64,
        new: &[PackRuns],
    ) -> Result<(), Ended> {
        for entry in new {
            let trailer = match self.repo.read_trailer(&entry.pack, entry.size).await {
                Ok(trailer) => trailer,
                Err(e @ (Error::PackMissing { .. } | Error::PackCorrupt { .. })) => {
                    return Err(Ended::BadChunk(format!("pack {}: {e}", entry.pack)))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a prefetch read failed; retrying at the next poll");
                    return Ok(());
                }
            };
            // Where each blob starts in the pack: they are laid out one after another.
            let mut starts = Vec::with_capacity(trailer.blobs.len());
            let mut at = 0u64;
            for b in &trailer.blobs {
                starts.push(at);
                at += b.stored_len as u64;
            }
            // (file offset, blob) of every blob the runs name.
            let mut wanted: Vec<(u64, usize)> = Vec::new();
            for &(file_offset, pack_offset, count) in &entry.runs {
                let Ok(first) = starts.binary_search(&(pack_offset as u64)) else {
                    return Err(Ended::Refused(format!(
                        "pack {} has no blob at offset {pack_offset}",
                        entry.pack
                    )));
                };
                let mut to = file_offset;
                for i in first..first + count as usize {
                    let Some(b) = trailer.blobs.get(i) else {
                        return Err(Ended::Refused(format!(
                            "pack {} has {} blobs, a run names blob {i}",
                            entry.pack,
                            trailer.blobs.len()
                        )));
                    };
                    if to + b.plain_len as u64 > size {
                        return Err(Ended::Refused(format!(
                            "a run of pack {} reaches past the file's size {size}",
                            entry.pack
                        )));
                    }
                    if !self.local.contains(&b.id) {
                        wanted.push((to, i));
                    }
                    to += b.plain_len as u64;
                }
            }
            let listed: u64 = wanted
                .iter()
                .map(|&(_, i)| trailer.blobs[i].plain_len as u64)
                .sum();
            if state.report.bytes + listed > size {
                return Err(Ended::Refused(format!(
                    "it lists more bytes than the file's size {size}"
                )));
            }
            let needed: Vec<Needed<usize>> = wanted
                .iter()
                .enumerate()
                .map(|(k, &(_, i))| Needed {
                    pack: entry.pack,
                    offset: starts[i],
                    stored_len: trailer.blobs[i].stored_len,
                    tag: k,
                })
                .collect();
            let limits = RangeLimits::with_concurrency(self.concurrency);
            let ranges = coalesce(&needed, limits);
            let trailer = &trailer;
            let wanted = &wanted;
            let writes = state.writes.clone();
            let reads = futures::stream::iter(ranges)
                .map(|r| {
                    let file = file.clone();
                    let writes = writes.clone();
                    async move {
                        let bytes = match self
                            .repo
                            .read_pack(&r.pack, entry.size, r.range.clone())
                            .await
                        {
                            Ok(bytes) => bytes,
                            Err(e @ (Error::PackMissing { .. } | Error::PackCorrupt { .. })) => {
                                return Err(Stopped::Refused(format!("pack {}: {e}", r.pack)))
                            }
                            Err(e) => return Err(Stopped::Transient(e)),
                        };
                        let blobs: Vec<(u64, crate::pack::BlobEntry, bytes::Bytes)> = r
                            .blobs
                            .iter()
                            .map(|&(k, start, len)| {
                                let (to, i) = wanted[k];
                                (
                                    to,
                                    trailer.blobs[i],
                                    bytes.slice(start..start + len as usize),
                                )
                            })
                            .collect();
                        let permit = write_permit(&writes).await?;
                        tokio::task::spawn_blocking(move || {
                            let _permit = permit;
                            #[cfg(test)]
                            pause::reached(pause::Point::Write);
                            let mut written = Vec::with_capacity(blobs.len());
                            let mut pieces = Vec::with_capacity(blobs.len());
                            for (to, b, stored) in blobs {
                                let plain = decode_blob(&stored, b.encoding, b.plain_len, &b.id)
                                    .map_err(|reason| {
                                        Stopped::Refused(format!(
                                            "chunk {} for offset {to}: {reason}",
                                            b.id
                                        ))
                                    })?;
                                pieces.push((to, plain));
                                written.push((to, b.id, b.plain_len as u64));
                            }
                            crate::chunk::write_pieces_at(&file, &pieces).map_err(|e| {
                                Stopped::Transient(Error::io("writing the staging file", e))
                            })?;
                            Ok(written)
                        })
                        .await
                        .map_err(|e| {
                            Stopped::Transient(Error::io("writing task", std::io::Error::other(e)))
                        })?
                    }
                })
                .buffer_unordered(limits.in_flight);
            futures::pin_mut!(reads);
            let mut complete = true;
            while let Some(done) = reads.next().await {
                match done {
                    Ok(written) => {
                        for (to, id, len) in written {
                            state.report.written.push((to, id));
                            state.report.chunks += 1;
                            state.report.bytes += len;
                            self.metrics.prefetched(len);
                        }
                    }
                    Err(Stopped::Refused(reason)) => return Err(Ended::BadChunk(reason)),
                    Err(Stopped::Transient(e)) => {
                        tracing::debug!(error = %e, "a prefetch download failed; retrying at the next poll");
                        complete = false;
                    }
                }
            }
            if !complete {
                return Ok(());
            }
            state.handled_packs.push(entry.clone());
        }
        Ok(())
    }

    /// Downloads what `object` lists beyond what was handled before.
    async fn take(&self, state: &mut Progress, object: InProgress) -> Result<(), Ended> {
        if state.size.is_some_and(|size| size != object.size) {
            return Err(Ended::Refused(format!(
                "its size changed from {} to {}",
                state.size.unwrap_or_default(),
                object.size
            )));
        }
        let handled = state.handled.len();
        if object.chunks.len() < handled || object.chunks[..handled] != state.handled[..] {
            return Err(Ended::Refused(
                "it no longer lists the chunks it listed before".into(),
            ));
        }
        let file = match &state.file {
            Some(file) => file.clone(),
            None => {
                let (dir, id, size, node) =
                    (self.incoming.clone(), self.id, object.size, self.node);
                // Under a write permit like every write: a cancelled prefetch returns only
                // once this thread is done and what it opened is closed (a tuple drops its
                // fields in order: the directory and its lock before the permit).
                let permit = write_permit(&state.writes)
                    .await
                    .map_err(|_| Ended::Failed("the prefetch ended".into()))?;
                let opened = tokio::task::spawn_blocking(move || {
                    let opened = fetch::open_staging_for(&dir, id, size, node);
                    #[cfg(test)]
                    pause::reached(pause::Point::Open);
                    (opened, permit)
                })
                .await
                .map(|(opened, _permit)| opened);
                let file = match opened {
                    Ok(Ok((file, locked))) => {
                        state.locked = Some(locked);
                        Arc::new(file)
                    }
                    // Nothing to prefetch into; the fetch will say why again.
                    Ok(Err(e)) => return Err(Ended::Failed(e.to_string())),
                    Err(e) => return Err(Ended::Failed(e.to_string())),
                };
                state.size = Some(object.size);
                state.file = Some(file.clone());
                file
            }
        };
        if self.repo.packs().is_some() {
            let handled = state.handled_packs.len();
            if object.packs.len() < handled || object.packs[..handled] != state.handled_packs[..] {
                return Err(Ended::Refused(
                    "it no longer lists the packs it listed before".into(),
                ));
            }
            let new = object.packs[handled..].to_vec();
            return self.take_packed(state, &file, object.size, &new).await;
        }
        let new = &object.chunks[handled..];
        let writes = state.writes.clone();
        let downloads = futures::stream::iter(new.iter().copied())
            .map(|span| {
                let file = file.clone();
                let writes = writes.clone();
                async move {
                    if self.local.contains(&span.sha256) {
                        return Ok((span, false));
                    }
                    let bytes = match self.repo.get_chunk(&span.sha256, span.len).await {
                        Ok(bytes) => bytes,
                        Err(e @ (Error::ChunkCorrupt { .. } | Error::ChunkMissing { .. })) => {
                            return Err(Stopped::Refused(format!(
                                "chunk {} at offset {}: {e}",
                                span.sha256, span.offset
                            )))
                        }
                        Err(e) => return Err(Stopped::Transient(e)),
                    };
                    // Checked by get_chunk: these bytes hash to span.sha256.
                    let permit = write_permit(&writes).await?;
                    tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        #[cfg(test)]
                        pause::reached(pause::Point::Write);
                        file.write_all_at(&bytes, span.offset)
                    })
                    .await
                    .map_err(|e| {
                        Stopped::Transient(Error::io("writing task", std::io::Error::other(e)))
                    })?
                    .map_err(|e| Stopped::Transient(Error::io("writing the staging file", e)))?;
                    Ok((span, true))
                }
            })
            .buffered(self.concurrency.max(1));
        futures::pin_mut!(downloads);
        while let Some(done) = downloads.next().await {
            match done {
                Ok((span, downloaded)) => {
                    state.handled.push(span);
                    if downloaded {
                        state.report.written.push((span.offset, span.sha256));
                        state.report.chunks += 1;
                        state.report.bytes += span.len;
                        self.metrics.prefetched(span.len);
                    } else {
                        state.report.skipped += 1;
                    }
                }
                Err(Stopped::Refused(reason)) => return Err(Ended::BadChunk(reason)),
                Err(Stopped::Transient(e)) => {
                    // What was written stays; the rest is tried again at the next poll.
                    tracing::debug!(error = %e, "a prefetch download failed; retrying at the next poll");
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Named points a test can hold a prefetch at (test builds only): a write into the staging
/// file on its blocking thread, and [`Prefetch::run`] about to wait for such writes.
#[cfg(test)]
pub(crate) mod pause {
    use std::sync::mpsc::{Receiver, Sender};
    use std::sync::Mutex;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Point {
        Write,
        /// The staging file is open (and the directory locked), on its blocking thread.
        Open,
        Draining,
    }

    /// An armed point: whom to tell it was reached, and what to wait on then (`Write`,
    /// `Open`).
    type Armed = (Point, Sender<()>, Option<Receiver<()>>);

    /// Armed points: each says it was reached, then (for `Write`) waits to be let go.
    static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

    /// Arms `point` once: returns a receiver told when it is reached, and a sender that lets
    /// it go on (dropping it does too).
    pub fn arm(point: Point) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        ARMED.lock().unwrap().push((point, reached_tx, Some(go_rx)));
        (reached_rx, go_tx)
    }

    pub fn reached(point: Point) {
        let taken = {
            let mut armed = ARMED.lock().unwrap();
            armed
                .iter()
                .position(|(p, _, _)| *p == point)
                .map(|i| armed.remove(i))
        };
        if let Some((_, reached, go)) = taken {
            let _ = reached.send(());
            if let Some(go) = go.filter(|_| point != Point::Draining) {
                let _ = go.recv();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkParams;
    use crate::inprogress::INPROGRESS_FORMAT;
    use crate::store::{Store, StoreSettings, StoreUrl};

    /// A prefetch cancelled while one of its writes is still on its blocking thread returns
    /// only once that write is done: nothing it wrote can land in the staging file after
    /// the fetch that follows has begun.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_prefetch_returns_only_after_its_writes() {
        let _serial = SERIAL.lock().await;
        let (prefetch, _incoming) = prefetch_of_four_chunks().await;
        let (write_reached, let_write_go) = pause::arm(pause::Point::Write);
        let (draining, _) = pause::arm(pause::Point::Draining);
        let cancel = CancellationToken::new();
        let mut running = tokio::spawn(prefetch.run(cancel.clone()));
        // A write is on its blocking thread, held; the daemon stops the prefetch then.
        tokio::task::spawn_blocking(move || write_reached.recv().unwrap())
            .await
            .unwrap();
        cancel.cancel();
        let draining = tokio::task::spawn_blocking(move || draining.recv());
        let returned_first = tokio::select! {
            _ = &mut running => true,
            _ = draining => false,
        };
        assert!(
            !returned_first,
            "the prefetch returned with a write still running"
        );
        assert!(!running.is_finished());
        drop(let_write_go);
        let report = running.await.unwrap();
        assert_eq!(report.ended, Ended::Cancelled);
    }

    /// The staging file is opened (and the incoming directory locked) on a blocking thread
    /// too: a prefetch stopped meanwhile returns only once that thread is done and what it
    /// opened is closed, so the fetch the daemon starts next finds the directory free.
    /// Before, the thread kept the lock past the prefetch's return, and the daemon's own
    /// fetch was refused as if another process were fetching.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_prefetch_returns_only_after_its_open_and_leaves_the_directory_free() {
        let _serial = SERIAL.lock().await;
        let (prefetch, incoming) = prefetch_of_four_chunks().await;
        let (open_reached, let_open_go) = pause::arm(pause::Point::Open);
        let (draining, _) = pause::arm(pause::Point::Draining);
        let cancel = CancellationToken::new();
        let running = tokio::spawn(prefetch.run(cancel.clone()));
        tokio::task::spawn_blocking(move || open_reached.recv().unwrap())
            .await
            .unwrap();
        cancel.cancel();
        tokio::task::spawn_blocking(move || draining.recv().unwrap())
            .await
            .unwrap();
        // What the daemon does next: wait for the prefetch, then fetch into the directory.
        let dir = incoming.path().to_owned();
        let next = tokio::spawn(async move {
            let report = running.await.unwrap();
            let fetch = fetch::open_staging_for(&dir, (7, 1), 4 * 65536, None).map(|_| ());
            (report, fetch)
        });
        drop(let_open_go);
        let (report, fetch) = next.await.unwrap();
        assert_eq!(report.ended, Ended::Cancelled);
        fetch.expect("the directory is free once the prefetch returned");
    }

    /// The pause points are global: the tests that arm them run one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A prefetch of a publish in progress listing four 64 KiB chunks, into a fresh
    /// incoming directory (returned to keep it).
    async fn prefetch_of_four_chunks() -> (Prefetch, tempfile::TempDir) {
        let store = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        let repo = Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap();
        let data = crate::chunk::test_data::random(4 * 65536, 5);
        let mut chunks = Vec::new();
        for i in 0..4u64 {
            let bytes = &data[(i * 65536) as usize..((i + 1) * 65536) as usize];
            let sha256 = Digest::of(bytes);
            repo.put_chunk(&sha256, bytes::Bytes::copy_from_slice(bytes))
                .await
                .unwrap();
            chunks.push(Span {
                offset: i * 65536,
                len: 65536,
                sha256,
            });
        }
        let object = InProgress {
            format: INPROGRESS_FORMAT,
            cluster_id: "c".into(),
            index: 7,
            term: 1,
            size: data.len() as u64,
            written_at: chrono::Utc::now(),
            chunks,
            packs: Vec::new(),
        };
        repo.put_inprogress(7, 1, serde_json::to_vec(&object).unwrap().into())
            .await
            .unwrap();
        let incoming = tempfile::tempdir().unwrap();
        let prefetch = Prefetch {
            repo: repo.clone(),
            id: (7, 1),
            incoming: incoming.path().to_owned(),
            local: HashSet::new(),
            node: None,
            poll_interval: Duration::from_millis(20),
            stale_after: Duration::from_secs(60),
            concurrency: 1,
            metrics: Metrics::new(),
        };
        (prefetch, incoming)
    }
}
