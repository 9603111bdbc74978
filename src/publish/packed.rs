//! The publish of a pack repository (format 2): the snapshot's chunk list (the node's index,
//! or the file cut and hashed here), the newest manifest in the store as the dedup base, the
//! chunks and blocks it lacks written into new packs ([`crate::packer`]), then the manifest.
//!
//! Everything around the data path is the chunk-object publish's: the lease is taken before
//! the store is looked at (here: before the base manifest is read), and the manifest is
//! written only while the lease is fresh. What the lease protects here is a pack: the base's
//! packs are old, and a GC elsewhere may delete one of them once no kept manifest uses it.
//! When the lease lapsed and a pack this publish counts on is gone after the re-take, the
//! snapshot is packed again without a base (every chunk uploaded into new packs, which no
//! GC deletes within its grace period), so that a manifest never names a missing pack.
//!
//! With streaming on, the publish announces the chunks it uploads as their packs are
//! finished (see [`crate::inprogress`]), so that followers fetch them before the manifest.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::Utc;

use super::{Commit, NodeIndex, NodeList, OpenSnapshot, PublishReport, Publisher, Sent};
use crate::chunk::{self, Digest};
use crate::error::{Error, Result};
use crate::inprogress::Announcer;
use crate::lease::Lease;
use crate::manifest_v2::{self as v2, Manifest};
use crate::pack::upload::{PartBudget, PARTS_IN_FLIGHT, PART_SIZE};
use crate::packer::{pack_snapshot, ChunkList, ChunkRecords};
use crate::snapdir::SnapdirError;
use snaprelay_contract::chunking::IndexFile;

impl Publisher<'_> {
    pub(super) async fn publish_packed(
        &self,
        descriptor: &v2::Repository,
        snapshot: &OpenSnapshot,
        node_index: Option<NodeIndex>,
        lease: &mut Lease,
        started: Instant,
    ) -> Result<PublishReport> {
        let env = &snapshot.envelope;
        let (index, term) = env.log_id();
        if let Some(id) = self.repo.manifest_for(index, term).await? {
            return Ok(PublishReport::already_published(
                env,
                &id,
                Sent::default(),
                started,
            ));
        }
        self.progress.begin(env.size);
        let used_index = node_index.is_some();
        let index_path = snapshot.chunk_index_path().filter(|_| used_index);
        let listed = match &index_path {
            Some(path) => ChunkList::Index(path),
            None => ChunkList::Cut,
        };
        // The chunk list stays on disk (the node's index, or the cut's scratch index), read
        // a block at a time.
        let (chunks, sha256): (Box<dyn ChunkRecords>, Digest) = match node_index {
            Some(node) => match node.list {
                NodeList::File(file) => (Box::new(file), node.sha256),
                NodeList::Whole { index, .. } => (Box::new(index.chunks), node.sha256),
            },
            None => {
                let (file, sha256) = self.cut(snapshot).await?;
                (Box::new(file), sha256)
            }
        };
        let sent = Sent::default();
        let mut base = self.base_manifest().await?;
        let announcer = self.announce(index, term, env.size).await;
        let result = self
            .pack_and_commit(
                descriptor,
                snapshot,
                (&*chunks, sha256, listed),
                &mut base,
                &sent,
                lease,
                announcer.as_ref(),
            )
            .await;
        // After the manifest (or the failure): nothing is in progress any more.
        if let Some(announcer) = announcer {
            announcer.end().await;
        }
        let (manifest, id, stats) = result?;
        self.progress.finish();
        let summary = (manifest.size, &manifest.sha256, manifest.chunks);
        let report = PublishReport::committed(env, summary, &id, used_index, sent, started);
        tracing::debug!(
            index,
            term,
            bytes = report.size,
            chunks = report.chunks_total,
            chunks_uploaded = report.chunks_transferred,
            stored_uploaded = report.bytes_transferred,
            blocks_reused = stats.blocks_reused,
            blocks_written = stats.blocks_written,
            packs_written = stats.packs_written,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "published"
        );
        Ok(report)
    }

    /// Packs the snapshot onto `base` and commits its manifest; packs it again without a
    /// base when a pack the first manifest named vanished during a lapse of the lease (the
    /// retry announces nothing: its list would start over).
    #[allow(clippy::too_many_arguments)]
    async fn pack_and_commit(
        &self,
        descriptor: &v2::Repository,
        snapshot: &OpenSnapshot,
        (chunks, sha256, listed): (&dyn ChunkRecords, Digest, ChunkList<'_>),
        base: &mut Option<Manifest>,
        sent: &Sent,
        lease: &mut Lease,
        mut announcer: Option<&Announcer>,
    ) -> Result<(Manifest, crate::repo::ManifestId, crate::packer::PackStats)> {
        let env = &snapshot.envelope;
        let (index, term) = env.log_id();
        loop {
            let budget = PartBudget::new(PARTS_IN_FLIGHT, PART_SIZE);
            let name = snapshot.data_path.display().to_string();
            let packed = pack_snapshot(
                self.repo,
                descriptor,
                base.as_ref(),
                snapshot.data.clone(),
                &name,
                chunks,
                listed,
                budget,
                announcer,
            )
            .await?;
            sent.chunks
                .fetch_add(packed.stats.chunks_uploaded, Ordering::Relaxed);
            sent.bytes
                .fetch_add(packed.stats.stored_uploaded, Ordering::Relaxed);
            if packed.size != env.size {
                return Err(Error::Snapdir(SnapdirError::SizeMismatch {
                    meta: snapshot.meta_path.clone(),
                    data: snapshot.data_path.clone(),
                    expected: env.size,
                    actual: packed.size,
                }));
            }
            let manifest = Manifest {
                format: v2::MANIFEST_FORMAT,
                cluster_id: descriptor.cluster_id.clone(),
                incarnation: descriptor.incarnation.clone(),
                last_log_index: index,
                last_log_term: term,
                raft_meta: env.raft_meta.clone(),
                size: packed.size,
                sha256,
                chunks: packed.chunks,
                packs: packed.packs,
                blocks: packed.blocks,
                created_at: Utc::now(),
                publisher: v2::Publisher {
                    node_id: self.node_id,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                },
            };
            let committed = self
                .commit(snapshot, Commit::Packs(&manifest), lease)
                .await?;
            match committed {
                Some(id) => return Ok((manifest, id, packed.stats)),
                None if base.take().is_some() => announcer = None,
                // Packed without a base, every pack is this publish's own and young.
                None => return Err(lease.lapsed()),
            }
        }
    }

    /// The newest manifest in the store that reads back valid (and verified, under
    /// `signing.require`): what the snapshot is packed onto. A newest manifest that does not
    /// read back is passed over with a warning (the publish then uploads more, never less).
    async fn base_manifest(&self) -> Result<Option<Manifest>> {
        let (newest, _) = self.repo.newest_verified(None).await?;
        let Some(id) = newest else {
            return Ok(None);
        };
        match self.repo.read_packed_manifest(&id).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(manifest = %id, error = %e, "not packing onto the newest manifest, which does not read back; uploading every chunk");
                Ok(None)
            }
        }
    }

    /// Without the node's index: the file is read once, in order, cut with the repository's
    /// parameters and hashed; the chunk list goes to a scratch file, which packing reads.
    async fn cut(&self, snapshot: &OpenSnapshot) -> Result<(IndexFile, Digest)> {
        let file = snapshot.data.clone();
        let params = self.repo.params();
        let path = snapshot.data_path.clone();
        let index = tokio::task::spawn_blocking(move || {
            chunk::advise_sequential(&file, true);
            chunk::index_to_scratch(chunk::ReadAt::new(file, 0), params)
        })
        .await
        .map_err(|e| Error::io("chunking task", io::Error::other(e)))?
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let header = *index.header();
        if header.size != snapshot.envelope.size {
            return Err(Error::Snapdir(SnapdirError::SizeMismatch {
                meta: snapshot.meta_path.clone(),
                data: snapshot.data_path.clone(),
                expected: snapshot.envelope.size,
                actual: header.size,
            }));
        }
        Ok((index, header.sha256))
    }
}
