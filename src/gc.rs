//! Retention and garbage collection (leader side, serialized with its own publishes):
//! keep the newest `keep_last` manifests and any pinned log ids, delete the other
//! manifests, then delete chunks that no kept manifest references and that are older than
//! a grace period measured by the store's own clock.
//!
//! Order matters. Manifests go first, so a reader never sees a manifest whose chunks are
//! gone. Then the GC takes a lease (see [`crate::lease`]) and lists the manifests again, so
//! that a snapshot a publisher committed meanwhile keeps its chunks. The chunks no manifest
//! names and older than the grace period are deleted a batch at a time, each batch only
//! while no publish is in flight (it may count on an old chunk): otherwise the rest waits
//! for the next GC.
//!
//! Under `signing.require`, only manifests that verify count: one that fails the signature
//! check, or a genuine one copied under another name or from another cluster, is garbage.
//! It is not a reference, does not count towards `keep_last` and is deleted with the old
//! manifests, so an attacker who can write to the bucket can neither pin chunks nor push a
//! genuine snapshot out of retention. A GC whose configuration trusts no key refuses to
//! apply to a repository whose `repository.json` is signed: it could not tell them apart.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::lease::{self, Lease};
use crate::repo::{LeaseKind, ManifestId, Repo};
use crate::signing::Reason;

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

/// What a GC will do (dry run) or did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
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
        match repo.read_manifest(&id).await {
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
/// repository; the next GC finishes the job.
pub async fn collect(
    repo: &Repo,
    retention: &Retention,
    apply: bool,
    concurrency: usize,
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
        ..GcReport::default()
    };
    if apply {
        for id in &doomed {
            repo.delete_manifest(id).await?;
        }
    }

    let mut lease = match apply {
        true => Some(Lease::take(repo, LeaseKind::Gc, lease::DEFAULT_TTL, None).await?),
        false => None,
    };
    let result = collect_chunks(
        repo,
        retention,
        &kept,
        lease.as_mut(),
        concurrency,
        &mut report,
    )
    .await;
    if let Some(lease) = lease {
        lease.release().await;
    }
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

/// The chunk half of a GC: with `lease` (an applied GC), deletes unreferenced chunks older
/// than the grace period, a batch at a time, while no publish is in flight; without, only
/// counts them.
async fn collect_chunks(
    repo: &Repo,
    retention: &Retention,
    kept: &[ManifestId],
    lease: Option<&mut Lease>,
    concurrency: usize,
    report: &mut GcReport,
) -> Result<()> {
    if let Some(lease) = lease.as_deref() {
        // Leases of processes that died: nobody will delete them otherwise.
        for stale in lease.stale() {
            tracing::info!(lease = %stale.name, last_written = %stale.last_modified, "deleting a stale lease");
            if let Err(e) = repo.delete_lease(&stale.name).await {
                tracing::warn!(lease = %stale.name, error = %e, "could not delete a stale lease");
            }
        }
    }
    // References of every manifest that exists now (kept ones, plus any a publisher
    // committed since the first listing). Listed after the lease was written: a publish
    // that commits a manifest later either was seen (and no chunk is deleted while it
    // runs) or saw this GC's lease and waited for it before looking at any chunk.
    let survivors: Vec<ManifestId> = match lease {
        Some(_) => repo
            .list_manifests(None)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect(),
        None => kept.to_vec(),
    };
    let mut referenced: HashSet<Digest> = HashSet::new();
    let requires = repo.keyring().requires();
    for id in &survivors {
        match repo.read_manifest(id).await {
            Ok(m) => referenced.extend(m.chunks.iter().map(|c| c.sha256)),
            // Written since the first listing and not genuine: no reference (the next GC
            // deletes it).
            Err(e) if requires && refusal(&e).is_some() => {
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
    }

    let now = match lease.as_deref().and_then(Lease::store_now) {
        Some(now) => now,
        None => repo.store_now().await?,
    };
    let grace = chrono::Duration::from_std(retention.grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = now
        .checked_sub_signed(grace)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let mut doomed = Vec::new();
    for (sha, chunk) in repo.list_chunks().await? {
        if referenced.contains(&sha) {
            report.chunks_kept += 1;
        } else if chunk.last_modified > cutoff {
            report.chunks_in_grace += 1;
        } else {
            doomed.push((sha, chunk.size));
        }
    }
    let Some(lease) = lease else {
        // A dry run: what would be deleted.
        report.chunks_deleted = doomed.len() as u64;
        report.bytes_deleted = doomed.iter().map(|(_, size)| size).sum();
        return Ok(());
    };
    for (n, batch) in doomed.chunks(DELETE_BATCH).enumerate() {
        lease.check().await?;
        if !lease.holds() {
            // A publish in flight may count on any of these chunks; or this GC cannot be
            // sure a publish would see it.
            report.chunks_deferred = (doomed.len() - n * DELETE_BATCH) as u64;
            report.publishes_in_flight = lease.others().iter().map(|l| l.name.clone()).collect();
            tracing::info!(
                chunks = report.chunks_deferred,
                publishes = ?report.publishes_in_flight,
                "deleting no more chunks this time: publishes in flight, or this GC's lease is in doubt"
            );
            break;
        }
        let results: Vec<Result<()>> = futures::stream::iter(batch)
            .map(|(sha, _)| {
                let lease = &*lease;
                async move {
                    // A delete that lands after the lease lapsed could hit a chunk a
                    // publish counted on; give up on it before then.
                    match tokio::time::timeout(lease.remaining(), repo.delete_chunk(sha)).await {
                        Ok(result) => result,
                        Err(_) => Err(lease.lapsed()),
                    }
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        report.chunks_deleted += batch.len() as u64;
        report.bytes_deleted += batch.iter().map(|(_, size)| size).sum::<u64>();
    }
    Ok(())
}
