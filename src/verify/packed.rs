//! `verify` of a pack repository: every tree block of each selected manifest is read and
//! checked against the manifest, every chunk its blocks name is read (neighbours in one
//! ranged GET) and checked against its id, and the trailer of every pack they use is read
//! and checked. A chunk is checked once however many blocks or manifests name it.
//!
//! Memory: one block at a time, the ids of the chunks checked so far (32 bytes each), and a
//! few ranges in flight.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};

use super::{BadChunk, BadManifest, VerifyReport};
use crate::chunk::Digest;
use crate::error::{Error, Result};
use crate::manifest_v2::{Manifest, Repository};
use crate::pack::decode_blob;
use crate::pack::plan::{coalesce, Needed, RangeLimits};
use crate::pack::PackId;
use crate::progress::Progress;
use crate::repo::{ManifestId, Repo};

/// What was found wrong, by what it is about: a chunk id, a block id or a pack id.
#[derive(Default)]
struct Damage {
    bad: BTreeMap<String, (String, Vec<String>)>,
}

impl Damage {
    fn add(&mut self, what: String, reason: String, manifest: &ManifestId) {
        let entry = self.bad.entry(what).or_insert_with(|| (reason, Vec::new()));
        let name = manifest.to_string();
        if !entry.1.contains(&name) {
            entry.1.push(name);
        }
    }
}

/// The damage an error of reading or checking stored data describes, or `None` for a
/// failure to talk to the store (which stops the verify).
fn damage_of(e: &Error) -> Option<(String, String)> {
    match e {
        Error::ChunkCorrupt { sha256, reason } => Some((sha256.clone(), reason.clone())),
        Error::ChunkMissing { sha256 } => Some((sha256.clone(), "missing from the store".into())),
        Error::PackMissing { pack } => {
            Some((format!("pack {pack}"), "missing from the store".into()))
        }
        Error::PackCorrupt { pack, reason } => Some((format!("pack {pack}"), reason.clone())),
        Error::BlockCorrupt {
            block,
            pack,
            reason,
        } => Some((format!("block {block} in pack {pack}"), reason.clone())),
        _ => None,
    }
}

pub(super) async fn verify_packed(
    repo: &Repo,
    descriptor: &Repository,
    ids: &[ManifestId],
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let limits = RangeLimits::with_concurrency(concurrency);
    let started = std::time::Instant::now();
    let mut bad_manifests = Vec::new();
    let mut damage = Damage::default();
    let mut checked: HashSet<Digest> = HashSet::new();
    let mut trailers: HashMap<PackId, bool> = HashMap::new();
    let mut bytes_checked = 0u64;
    let mut manifests = Vec::new();
    for id in ids {
        match repo.read_packed_manifest(id).await {
            Ok(m) => manifests.push((id, m)),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => bad_manifests.push(BadManifest {
                manifest: id.to_string(),
                reason: e.to_string(),
            }),
        }
    }
    progress.begin(manifests.iter().map(|(_, m)| m.size).sum());
    for (id, m) in &manifests {
        for p in &m.packs {
            if trailers.contains_key(&p.id) {
                continue;
            }
            let ok = match repo.read_trailer(&p.id, p.size).await {
                Ok(_) => true,
                Err(e) => match damage_of(&e) {
                    Some((what, reason)) => {
                        damage.add(what, reason, id);
                        false
                    }
                    None => return Err(e),
                },
            };
            trailers.insert(p.id, ok);
        }
        for i in 0..m.blocks.len() {
            let block = match repo.read_block(descriptor, m, i).await {
                Ok(block) => block,
                Err(e) => match damage_of(&e) {
                    Some((what, reason)) => {
                        damage.add(what, reason, id);
                        progress.advance(m.blocks[i].bytes);
                        continue;
                    }
                    None => return Err(e),
                },
            };
            // A damaged chunk checked for an earlier manifest is damage to this one too.
            for c in &block.chunks {
                if checked.contains(&c.id) {
                    if let Some((_, used_by)) = damage.bad.get_mut(&c.id.to_hex()) {
                        if !used_by.contains(&id.to_string()) {
                            used_by.push(id.to_string());
                        }
                    }
                }
            }
            let needed: Vec<Needed<usize>> = block
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| checked.insert(c.id))
                .map(|(j, c)| Needed {
                    pack: block.packs[c.pack as usize],
                    offset: c.offset as u64,
                    stored_len: c.stored_len,
                    tag: j,
                })
                .collect();
            for (what, reason) in check_blobs(repo, m, &block, &needed, limits).await? {
                damage.add(what, reason, id);
            }
            bytes_checked += needed
                .iter()
                .map(|n| block.chunks[n.tag].plain_len as u64)
                .sum::<u64>();
            progress.advance(m.blocks[i].bytes);
        }
    }
    progress.finish();
    let bad_chunks = damage
        .bad
        .into_iter()
        .map(|(what, (reason, manifests))| BadChunk {
            sha256: what,
            reason,
            manifests,
        })
        .collect();
    Ok(VerifyReport {
        manifests_checked: ids.len() as u64,
        chunks_checked: checked.len() as u64,
        bytes_checked,
        bad_manifests,
        bad_chunks,
        elapsed: started.elapsed(),
    })
}

/// Reads the `needed` chunks of `block` and checks each; returns what is damaged.
async fn check_blobs(
    repo: &Repo,
    manifest: &Manifest,
    block: &crate::tree::Block,
    needed: &[Needed<usize>],
    limits: RangeLimits,
) -> Result<Vec<(String, String)>> {
    let sizes: HashMap<_, _> = manifest.packs.iter().map(|p| (p.id, p.size)).collect();
    let ranges = coalesce(needed, limits);
    let found: Vec<Vec<(String, String)>> = futures::stream::iter(ranges)
        .map(|r| {
            let size = sizes.get(&r.pack).copied().unwrap_or(0);
            async move {
                let bytes = match repo.read_pack(&r.pack, size, r.range.clone()).await {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        return match damage_of(&e) {
                            // Every chunk of the range is unchecked: the pack's damage says why.
                            Some(d) => Ok(vec![d]),
                            None => Err(e),
                        };
                    }
                };
                let chunks: Vec<_> = r
                    .blobs
                    .iter()
                    .map(|&(j, start, len)| {
                        (block.chunks[j], bytes.slice(start..start + len as usize))
                    })
                    .collect();
                tokio::task::spawn_blocking(move || {
                    chunks
                        .into_iter()
                        .filter_map(|(c, stored)| {
                            decode_blob(&stored, c.encoding, c.plain_len, &c.id)
                                .err()
                                .map(|reason| (c.id.to_hex(), reason))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| Error::io("verifying task", std::io::Error::other(e)))
            }
        })
        .buffer_unordered(limits.in_flight)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}
