//! Retention and garbage collection (leader side, serialized with its own publishes):
//! keep the newest `keep_last` manifests and any pinned log ids, delete the other
//! manifests, then delete chunks that no kept manifest references and that are older than
//! a grace period measured by the store's own clock.
//!
//! Order matters. Manifests go first, so a reader never sees a manifest whose chunks are
//! gone. Before deleting chunks the manifests are listed again, so that a snapshot a
//! concurrent publisher committed meanwhile keeps its chunks; the grace period protects
//! chunks of publishes still in flight, and the publisher itself re-checks its chunks just
//! before committing (see `publish`).

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::repo::{ManifestId, Repo};

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
    pub applied: bool,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::publish::as_millis")]
    pub elapsed: Duration,
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
    let listed: Vec<ManifestId> = repo
        .list_manifests(None)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    let keep_last = retention.keep_last.max(1);
    let newest: BTreeSet<ManifestId> = listed.iter().rev().take(keep_last).cloned().collect();
    let (kept, doomed): (Vec<ManifestId>, Vec<ManifestId>) = listed
        .into_iter()
        .partition(|id| newest.contains(id) || retention.pinned.contains(&(id.index, id.term)));
    let mut report = GcReport {
        manifests_kept: kept.iter().map(ToString::to_string).collect(),
        manifests_deleted: doomed.iter().map(ToString::to_string).collect(),
        applied: apply,
        ..GcReport::default()
    };
    if apply {
        for id in &doomed {
            repo.delete_manifest(id).await?;
        }
    }

    // References of every manifest that exists now (kept ones, plus any a concurrent
    // publisher committed since the first listing).
    let survivors: Vec<ManifestId> = if apply {
        repo.list_manifests(None)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect()
    } else {
        kept.clone()
    };
    let mut referenced: HashSet<Digest> = HashSet::new();
    for id in &survivors {
        match repo.read_manifest(id).await {
            Ok(m) => referenced.extend(m.chunks.iter().map(|c| c.sha256)),
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

    let now = repo.store_now().await?;
    let grace = chrono::Duration::from_std(retention.grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = now
        .checked_sub_signed(grace)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let mut deletable = Vec::new();
    for (sha, chunk) in repo.list_chunks().await? {
        if referenced.contains(&sha) {
            report.chunks_kept += 1;
        } else if chunk.last_modified > cutoff {
            report.chunks_in_grace += 1;
        } else {
            report.chunks_deleted += 1;
            report.bytes_deleted += chunk.size;
            deletable.push(sha);
        }
    }
    if apply {
        let results: Vec<Result<()>> = futures::stream::iter(deletable.iter())
            .map(|sha| repo.delete_chunk(sha))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        applied = apply,
        manifests_deleted = report.manifests_deleted.len(),
        chunks_deleted = report.chunks_deleted,
        bytes_deleted = report.bytes_deleted,
        chunks_in_grace = report.chunks_in_grace,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "gc"
    );
    Ok(report)
}
