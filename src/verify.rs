//! Re-reads what the store holds and checks it: every selected manifest parses and is
//! consistent, and every chunk it names exists with the right length and sha256. A damaged
//! chunk is reported once, with every manifest that uses it. A repository of packs is
//! verified by [`packed`]: its blocks, chunks and pack trailers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{ManifestId, Repo};

mod packed;

/// Something stored that is damaged. In a repository of packs, `sha256` names a chunk by
/// its id, or "pack <id>" or "block <id> in pack <id>".
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub sha256: String,
    pub reason: String,
    pub manifests: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BadManifest {
    pub manifest: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub manifests_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub bad_manifests: Vec<BadManifest>,
    pub bad_chunks: Vec<BadChunk>,
    #[serde(rename = "elapsed_ms", serialize_with = "crate::progress::as_millis")]
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_manifests.is_empty() && self.bad_chunks.is_empty()
    }
}

/// Verifies the given manifests and all their chunks. Damage is collected in the report;
/// only a failure to talk to the store is an `Err`.
pub async fn verify(
    repo: &Repo,
    ids: &[ManifestId],
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    if let Some(descriptor) = repo.packs() {
        return packed::verify_packed(repo, descriptor, ids, concurrency, progress).await;
    }
    let started = Instant::now();
    let mut bad_manifests = Vec::new();
    // chunk → (length, manifests using it)
    let mut chunks: BTreeMap<Digest, (u64, Vec<String>)> = BTreeMap::new();
    for id in ids {
        match repo.read_manifest(id).await {
            Ok(m) => {
                for c in &m.chunks {
                    let entry = chunks
                        .entry(c.sha256)
                        .or_insert_with(|| (c.len, Vec::new()));
                    if entry.1.last() != Some(&id.to_string()) {
                        entry.1.push(id.to_string());
                    }
                }
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => bad_manifests.push(BadManifest {
                manifest: id.to_string(),
                reason: e.to_string(),
            }),
        }
    }
    progress.begin(chunks.values().map(|(len, _)| len).sum());
    let results: Vec<(Digest, Result<()>)> = futures::stream::iter(chunks.iter())
        .map(|(sha, (len, _))| async move {
            let outcome = check_chunk(repo, *sha, *len).await;
            progress.advance(*len);
            (*sha, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    progress.finish();
    let mut bad_chunks = Vec::new();
    for (sha, outcome) in results {
        match outcome {
            Ok(()) => {}
            Err(e @ (Error::ChunkMissing { .. } | Error::ChunkCorrupt { .. })) => {
                let reason = match e {
                    Error::ChunkCorrupt { reason, .. } => reason,
                    _ => "missing from the store".to_owned(),
                };
                bad_chunks.push(BadChunk {
                    sha256: sha.to_hex(),
                    reason,
                    manifests: chunks[&sha].1.clone(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    bad_chunks.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    Ok(VerifyReport {
        manifests_checked: ids.len() as u64,
        chunks_checked: chunks.len() as u64,
        bytes_checked: chunks.values().map(|(len, _)| len).sum(),
        bad_manifests,
        bad_chunks,
        elapsed: started.elapsed(),
    })
}

async fn check_chunk(repo: &Repo, sha: Digest, len: u64) -> Result<()> {
    repo.get_chunk(&sha, len).await.map(|_| ())
}
