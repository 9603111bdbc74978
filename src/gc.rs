//! Retention and garbage collection (leader side, serialized with its own publishes):
//! keep the newest `keep_last` manifests and any pinned log ids, delete the other
//! manifests, then delete chunks that no kept manifest references and that are older than
//! a grace period measured by the store's own clock.
//!
//! Order matters. Manifests go first, so a reader never sees a manifest whose chunks are
//! gone. Then the GC takes a lease (see [`crate::lease`], which has the protocol and why it
//! holds) and lists the manifests again, so that a snapshot a publisher committed meanwhile
//! keeps its chunks. The chunks no manifest names and older than the grace period are
//! deleted a batch at a time, each batch only after a check of the leases shows no publish
//! in flight (it may count on an old chunk), and only on the strength of a manifest listing
//! taken after such a check, with none in between showing a publish: a publish seen when
//! the lease was taken makes the GC list the manifests again once it is gone (its manifest
//! exists by then); a publish seen before a batch stops the deleting, and the rest waits
//! for the next GC. A GC never waits for a publish: publishes wait for GCs.
//!
//! A dry run writes nothing, not even a lease: it measures the grace period by this
//! machine's clock (the report says so), where an applied GC uses the store's.
//!
//! Under `signing.require`, only manifests that verify count: one that fails the signature
//! check, or a genuine one copied under another name or from another cluster, is garbage.
//! It is not a reference, does not count towards `keep_last` and is deleted with the old
//! manifests, so an attacker who can write to the bucket can neither pin chunks nor push a
//! genuine snapshot out of retention. A GC whose configuration trusts no key refuses to
//! apply to a repository whose `repository.json` is signed: it could not tell them apart.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use futures::StreamExt;
use serde::Serialize;

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::lease::{self, Lease};
use crate::pack::PackId;
use crate::repo::{AnyManifest, LeaseKind, ManifestId, Repo};
use crate::signing::Reason;

/// What a GC deletes: chunk objects (a repository of chunks) or packs (a repository of
/// packs, where a manifest names every pack its blocks and chunks are in). Ordered by key,
/// so that the same store state gives the same deletions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Object {
    Chunk(Digest),
    Pack(PackId),
}

/// What to keep.
#[derive(Debug, Clone)]
pub struct Retention {
    /// The newest manifests to keep (at least 1).
    pub keep_last: usize,
    /// Log ids (index, term) to keep whatever their age, e.g. a node's current snapshot.
    pub pinned: Vec<(u64, u64)>,
    /// Unreferenced chunks younger than this (by the store's clock) are kept: they may
    /// belong to a publish in flight.
    pub grace: Duration,
}

/// Whose clock a GC measured chunk ages with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// The store's: the time it gave the GC's lease (an applied GC).
    Store,
    /// This machine's (a dry run, which writes nothing to read the store's clock from).
    #[default]
    Local,
}

/// How a GC goes about it.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Deletes in flight at once.
    pub concurrency: usize,
    /// Chunks deleted between two checks of the leases: a publish that starts meanwhile
    /// waits for at most one batch.
    pub batch: usize,
    pub ttl: Duration,
}

impl GcOptions {
    pub fn new(concurrency: usize) -> GcOptions {
        GcOptions {
            concurrency: concurrency.max(1),
            batch: DELETE_BATCH,
            ttl: lease::DEFAULT_TTL,
        }
    }
}

/// What a GC will do (dry run) or did. In a repository of packs, the `chunks_*` figures
/// count packs (`objects` says which).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// What the `chunks_*` figures count: "chunks" or "packs".
    pub objects: &'static str,
    pub manifests_kept: Vec<String>,
    pub manifests_deleted: Vec<String>,
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced chunks left alone because they are younger than the grace period.
    pub chunks_in_grace: u64,
    /// Chunks that would have been deleted but were kept because publishes were in flight
    /// (`publishes_in_flight` names their leases); the next GC deletes them.
    pub chunks_deferred: u64,
    pub publishes_in_flight: Vec<String>,
    /// Manifests deleted (or, in a dry run, to be deleted) as garbage because they do not
    /// verify (also listed in `manifests_deleted`).
    pub manifests_refused: Vec<RefusedManifest>,
    pub applied: bool,
    /// Whose clock measured the grace period.
    pub clock: Clock,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::progress::as_millis")]
    pub elapsed: Duration,
}

/// A manifest GC treats as garbage, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedManifest {
    pub manifest: String,
    /// A signature failure, or `None` for a genuine manifest under another name or of
    /// another cluster.
    pub reason: Option<Reason>,
    pub detail: String,
}

/// Whether a manifest that cannot be used is garbage under `signing.require`: it failed
/// the signature check, or it is a genuine manifest that does not belong where it is.
/// (Other failures, e.g. a format this build does not know, stop the GC instead.)
fn refusal(err: &Error) -> Option<Option<Reason>> {
    match err {
        Error::Unauthenticated { refusal, .. } => Some(Some(refusal.reason)),
        Error::MisnamedManifest { .. } | Error::ClusterMismatch { .. } => Some(None),
        _ => None,
    }
}

/// Splits a listing into the manifests that count and those that are garbage (reading
/// each; only under `signing.require`, where the difference exists).
async fn authentic(
    repo: &Repo,
    listed: Vec<ManifestId>,
) -> Result<(Vec<ManifestId>, Vec<(ManifestId, RefusedManifest)>)> {
    if !repo.keyring().requires() {
        return Ok((listed, Vec::new()));
    }
    let mut genuine = Vec::with_capacity(listed.len());
    let mut refused = Vec::new();
    for id in listed {
        match repo.read_any_manifest(&id).await {
            Ok(_) => genuine.push(id),
            Err(e) => match refusal(&e) {
                Some(reason) => {
                    tracing::warn!(manifest = %id, reason = reason.map_or("misplaced", Reason::as_str), error = %e, "GC treats a manifest that does not verify as garbage");
                    let detail = e.to_string();
                    refused.push((
                        id.clone(),
                        RefusedManifest {
                            manifest: id.to_string(),
                            reason,
                            detail,
                        },
                    ));
                }
                // Kept, so that the chunk phase stops on it as before (its references
                // are unknown) unless the failure was transient.
                None if !e.is_transient() => genuine.push(id),
                None => return Err(e),
            },
        }
    }
    Ok((genuine, refused))
}

/// Plans a GC and, if `apply`, carries it out.
///
/// Errors: any failure to read a kept manifest stops the GC before a chunk is deleted (its
/// references would be unknown). Cancel safety: stopping between deletions leaves a valid
/// repository; the next GC finishes the job. (A delete cut off in flight leaves the GC's
/// lease to go stale, see [`crate::lease`].)
pub async fn collect(
    repo: &Repo,
    retention: &Retention,
    apply: bool,
    concurrency: usize,
) -> Result<GcReport> {
    collect_with(repo, retention, apply, &GcOptions::new(concurrency)).await
}

/// [`collect`] with every knob.
pub async fn collect_with(
    repo: &Repo,
    retention: &Retention,
    apply: bool,
    options: &GcOptions,
) -> Result<GcReport> {
    let started = Instant::now();
    let keyring = repo.keyring();
    if apply && !keyring.checks() {
        if let Some(signer) = repo.descriptor_authenticity().signer() {
            return Err(Error::Config(crate::config::ConfigError::invalid(
                "signing.trusted_keys",
                format!(
                    "repository.json at {} is signed (key {signer:?}), but this configuration \
                     trusts no key: GC could not tell genuine manifests from forged ones, so it \
                     deletes nothing",
                    repo.location()
                ),
            )));
        }
    }
    let listed: Vec<ManifestId> = repo
        .list_manifests(None)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    let (listed, refused) = authentic(repo, listed).await?;
    let keep_last = retention.keep_last.max(1);
    let newest: BTreeSet<ManifestId> = listed.iter().rev().take(keep_last).cloned().collect();
    let (kept, mut doomed): (Vec<ManifestId>, Vec<ManifestId>) = listed
        .into_iter()
        .partition(|id| newest.contains(id) || retention.pinned.contains(&(id.index, id.term)));
    doomed.extend(refused.iter().map(|(id, _)| id.clone()));
    doomed.sort();
    let mut report = GcReport {
        manifests_kept: kept.iter().map(ToString::to_string).collect(),
        manifests_deleted: doomed.iter().map(ToString::to_string).collect(),
        manifests_refused: refused.into_iter().map(|(_, r)| r).collect(),
        applied: apply,
        objects: match repo.packs() {
            Some(_) => "packs",
            None => "chunks",
        },
        ..GcReport::default()
    };
    if apply {
        for id in &doomed {
            repo.delete_manifest(id).await?;
        }
    }

    let result = match apply {
        true => {
            let mut lease = Lease::take(repo, LeaseKind::Gc, options.ttl, None).await?;
            let result = collect_chunks(repo, retention, &mut lease, options, &mut report).await;
            lease.release().await;
            result
        }
        false => count_chunks(repo, retention, &kept, &mut report).await,
    };
    result?;
    report.elapsed = started.elapsed();
    tracing::info!(
        applied = apply,
        manifests_deleted = report.manifests_deleted.len(),
        chunks_deleted = report.chunks_deleted,
        bytes_deleted = report.bytes_deleted,
        chunks_in_grace = report.chunks_in_grace,
        chunks_deferred = report.chunks_deferred,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "gc"
    );
    Ok(report)
}

/// Chunks deleted between two looks at the leases: a publish that starts meanwhile waits
/// for at most one batch.
const DELETE_BATCH: usize = 256;

/// The chunks the manifests listed now name, reading only those not in `read` yet.
async fn referenced_by(
    repo: &Repo,
    ids: &[ManifestId],
    read: &mut HashSet<ManifestId>,
    referenced: &mut HashSet<Object>,
) -> Result<()> {
    for id in ids {
        if read.contains(id) {
            continue;
        }
        match repo.read_any_manifest(id).await {
            Ok(AnyManifest::Chunks(m)) => {
                referenced.extend(m.chunks.iter().map(|c| Object::Chunk(c.sha256)))
            }
            Ok(AnyManifest::Packs(m)) => {
                referenced.extend(m.packs.iter().map(|p| Object::Pack(p.id)))
            }
            // The store did not answer: nothing is known about the manifest yet.
            Err(e) if e.is_transient() => return Err(e),
            // Written since the first listing and not genuine: no reference (the next GC
            // deletes it).
            Err(e) if repo.keyring().requires() && refusal(&e).is_some() => {
                tracing::warn!(manifest = %id, error = %e, "GC does not count a manifest that does not verify");
            }
            Err(e) => {
                return Err(Error::InvalidManifest {
                    key: id.to_string(),
                    reason: format!(
                    "GC stopped before deleting chunks, as this manifest's chunks are unknown: {e}"
                ),
                })
            }
        }
        read.insert(id.clone());
    }
    Ok(())
}

async fn manifest_ids(repo: &Repo) -> Result<Vec<ManifestId>> {
    Ok(repo
        .list_manifests(None)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect())
}

/// Sorts the listed chunks into kept (named by a manifest), in grace (younger than the
/// grace period by `now`) and doomed.
async fn sort_chunks(
    repo: &Repo,
    retention: &Retention,
    referenced: &HashSet<Object>,
    now: DateTime<Utc>,
    report: &mut GcReport,
) -> Result<Vec<(Object, u64)>> {
    let grace = chrono::Duration::from_std(retention.grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = now
        .checked_sub_signed(grace)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let stored: Vec<(Object, u64, DateTime<Utc>)> = match repo.packs() {
        None => repo
            .list_chunks()
            .await?
            .into_iter()
            .map(|(sha, c)| (Object::Chunk(sha), c.size, c.last_modified))
            .collect(),
        Some(_) => repo
            .list_packs()
            .await?
            .into_iter()
            .map(|(id, p)| (Object::Pack(id), p.size, p.last_modified))
            .collect(),
    };
    let mut doomed = Vec::new();
    for (object, size, last_modified) in stored {
        if referenced.contains(&object) {
            report.chunks_kept += 1;
        } else if last_modified > cutoff {
            report.chunks_in_grace += 1;
        } else {
            doomed.push((object, size));
        }
    }
    // In key order, not the listing map's: the same store state gives the same deletions.
    doomed.sort_unstable();
    Ok(doomed)
}

/// A dry run's chunk half: what would be deleted, measured by the local clock. Reads only.
async fn count_chunks(
    repo: &Repo,
    retention: &Retention,
    kept: &[ManifestId],
    report: &mut GcReport,
) -> Result<()> {
    let mut referenced = HashSet::new();
    referenced_by(repo, kept, &mut HashSet::new(), &mut referenced).await?;
    report.clock = Clock::Local;
    let doomed = sort_chunks(repo, retention, &referenced, Utc::now(), report).await?;
    report.chunks_deleted = doomed.len() as u64;
    report.bytes_deleted = doomed.iter().map(|(_, size)| size).sum();
    Ok(())
}

/// The chunk half of an applied GC: deletes unreferenced chunks older than the grace
/// period, a batch at a time, as the lease protocol allows.
async fn collect_chunks(
    repo: &Repo,
    retention: &Retention,
    lease: &mut Lease,
    options: &GcOptions,
    report: &mut GcReport,
) -> Result<()> {
    // Leases of processes that died: nobody will delete them otherwise. (A stale lease's
    // holder knows it is not fresh, and never relies on that name again.)
    for stale in lease.stale() {
        tracing::info!(lease = %stale.name, last_written = %stale.last_modified, "deleting a stale lease");
        if let Err(e) = repo.delete_lease(&stale.name).await {
            tracing::warn!(lease = %stale.name, error = %e, "could not delete a stale lease");
        }
    }
    // The check the manifest listing in use was taken after, and the first check of the
    // run of checks since that saw no publish (`None`: the last one saw one).
    let taken = lease.seen().clone();
    let mut listed_after = taken.seq;
    let mut clear_since = taken.clear().then_some(taken.seq);
    // References of every manifest that exists now (kept ones, plus any a publisher
    // committed since the first listing).
    let mut read = HashSet::new();
    let mut referenced = HashSet::new();
    referenced_by(repo, &manifest_ids(repo).await?, &mut read, &mut referenced).await?;
    let now = match taken.store_now {
        Some(now) => {
            report.clock = Clock::Store;
            now
        }
        // This check could not judge the store, so nothing is deleted below.
        None => Utc::now(),
    };
    let mut doomed = sort_chunks(repo, retention, &referenced, now, report).await?;

    let mut done = 0;
    while done < doomed.len() {
        let seen = lease.check().await?.clone();
        if !seen.clear() || !lease.fresh() {
            // A publish in flight may count on any of these chunks; or this GC cannot be
            // sure a publish would see it.
            report.chunks_deferred = (doomed.len() - done) as u64;
            report.publishes_in_flight = seen.others.iter().map(|l| l.name.clone()).collect();
            tracing::info!(
                chunks = report.chunks_deferred,
                publishes = ?report.publishes_in_flight,
                "deleting no more chunks this time: publishes in flight, or this GC's lease is in doubt"
            );
            break;
        }
        let since = *clear_since.get_or_insert(seen.seq);
        if since > listed_after {
            // A publish was in flight when the manifests were listed, and has ended since
            // (its lease is gone, after its manifest was written): list them again.
            listed_after = seen.seq;
            referenced_by(repo, &manifest_ids(repo).await?, &mut read, &mut referenced).await?;
            let before = doomed.len() - done;
            let rest: Vec<(Object, u64)> = doomed
                .split_off(done)
                .into_iter()
                .filter(|(object, _)| !referenced.contains(object))
                .collect();
            report.chunks_kept += (before - rest.len()) as u64;
            doomed.extend(rest);
            tracing::info!(
                now_referenced = before - (doomed.len() - done),
                "a publish ended while this GC listed the manifests; listed them again"
            );
            // Check once more: the batch's deadline counts from a check after the listing.
            continue;
        }
        let batch = &doomed[done..(done + options.batch.max(1)).min(doomed.len())];
        delete_batch(repo, lease, batch, seen.deadline, options.concurrency).await?;
        done += batch.len();
        report.chunks_deleted += batch.len() as u64;
        report.bytes_deleted += batch.iter().map(|(_, size)| size).sum::<u64>();
    }
    Ok(())
}

/// Deletes `batch`, each delete sent before `deadline` (half a TTL after the check that
/// allowed it) and cut off there: a delete that lands later could hit a chunk a publish
/// that started since counts on.
async fn delete_batch(
    repo: &Repo,
    lease: &Lease,
    batch: &[(Object, u64)],
    deadline: tokio::time::Instant,
    concurrency: usize,
) -> Result<()> {
    let results: Vec<Result<()>> = futures::stream::iter(batch.iter().map(|(object, _)| *object))
        .map(|object| {
            let guard = lease.guard();
            async move {
                // `timeout_at` polls the request once even after the deadline.
                if tokio::time::Instant::now() >= deadline {
                    guard.done(); // nothing was sent
                    return Err(lease.lapsed());
                }
                let delete = async {
                    match object {
                        Object::Chunk(sha) => repo.delete_chunk(&sha).await,
                        Object::Pack(id) => repo.delete_pack(&id).await,
                    }
                };
                match tokio::time::timeout_at(deadline, delete).await {
                    Ok(Ok(())) => {
                        guard.done();
                        Ok(())
                    }
                    // Failed or cut off: it may still land; the guard, dropped, says so.
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(lease.lapsed()),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(())
}
