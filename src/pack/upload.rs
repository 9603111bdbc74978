//! Writing a pack to a store as it is filled: blobs are appended in order, each part of the
//! object is uploaded as soon as it is full (a multipart upload), and the trailer goes last.
//! A pack smaller than one part is written with a single put instead.
//!
//! Memory: the part being filled, plus the parts in flight, which all the writers of one
//! publish share a bound on ([`PartBudget`]): a pack is never held whole. Parts are handed
//! to tasks of their own, so they go on uploading while the publisher reads and compresses.
//!
//! Cancel safety: dropping a writer stops its part uploads and aborts the multipart upload
//! in the background; nothing becomes visible under the pack's key until it is finished.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{BlobEntry, Encoding, PackId, PackKind, Trailer, MAX_BLOBS};
use crate::chunk::Digest;
use crate::error::{Error, Result};

/// The default size of one uploaded part: the least S3 allows for all parts but the last.
/// Against a loopback SeaweedFS two parts of 5 MiB in flight publish as fast as two of 8 MiB
/// (the server's CPU is the bound), and a publish holds 9 MiB less.
pub const PART_SIZE: usize = 5 << 20;
/// Parts in flight at once for one publish, all its packs together.
pub const PARTS_IN_FLIGHT: usize = 2;

/// The parts one publish may have in flight, shared by its pack writers.
#[derive(Debug, Clone)]
pub struct PartBudget {
    permits: Arc<Semaphore>,
    part_size: usize,
}

impl PartBudget {
    pub fn new(parts: usize, part_size: usize) -> PartBudget {
        PartBudget {
            permits: Arc::new(Semaphore::new(parts.max(1))),
            part_size: part_size.max(1),
        }
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }
}

/// A pack once it is in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenPack {
    pub id: PackId,
    pub kind: PackKind,
    /// The object's size, trailer included.
    pub size: u64,
    pub blobs: usize,
}

/// A pack being written.
pub struct PackWriter {
    backend: Arc<dyn ObjectStore>,
    key: Path,
    id: PackId,
    kind: PackKind,
    budget: PartBudget,
    entries: Vec<BlobEntry>,
    /// Stored bytes appended so far: the next blob's offset.
    len: u64,
    /// The part being filled.
    pending: Vec<Bytes>,
    pending_len: usize,
    upload: Option<Box<dyn MultipartUpload>>,
    parts: JoinSet<object_store::Result<()>>,
    finished: bool,
}

fn store_err<'k>(
    op: &'static str,
    key: &'k Path,
) -> impl FnOnce(object_store::Error) -> Error + 'k {
    move |source| Error::Store {
        op,
        key: key.to_string(),
        source,
    }
}

impl PackWriter {
    /// A writer for a new pack `id` at `key` (named by [`crate::repo`]).
    pub fn new(
        backend: Arc<dyn ObjectStore>,
        key: Path,
        id: PackId,
        kind: PackKind,
        budget: PartBudget,
    ) -> PackWriter {
        PackWriter {
            backend,
            key,
            id,
            kind,
            budget,
            entries: Vec::new(),
            len: 0,
            pending: Vec::new(),
            pending_len: 0,
            upload: None,
            parts: JoinSet::new(),
            finished: false,
        }
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    pub fn kind(&self) -> PackKind {
        self.kind
    }

    /// Stored bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The object's size, trailer included, if a blob of `stored_len` bytes were appended.
    pub fn size_with(&self, stored_len: usize) -> u64 {
        self.len + stored_len as u64 + Trailer::encoded_len(self.entries.len() + 1)
    }

    /// Whether another blob fits under the blob-count limit.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= MAX_BLOBS
    }

    /// Appends a blob (already encoded) and returns its offset. Waits when the publish's
    /// parts in flight are at their bound. The caller checks [`PackWriter::is_full`] first.
    pub async fn append(
        &mut self,
        id: Digest,
        encoding: Encoding,
        plain_len: u32,
        stored: Bytes,
    ) -> Result<u32> {
        debug_assert!(!self.is_full());
        let offset = self.len;
        self.entries.push(BlobEntry {
            id,
            encoding,
            stored_len: stored.len() as u32,
            plain_len,
        });
        self.len += stored.len() as u64;
        self.push(stored).await?;
        // Offsets are 32-bit (the pack size is bounded well below 4 GiB by repository.json).
        Ok(offset as u32)
    }

    /// Buffers bytes, sending every part that fills.
    async fn push(&mut self, mut bytes: Bytes) -> Result<()> {
        let part = self.budget.part_size;
        while !bytes.is_empty() {
            let room = part - self.pending_len;
            if bytes.len() < room {
                self.pending_len += bytes.len();
                self.pending.push(bytes);
                return Ok(());
            }
            self.pending.push(bytes.split_to(room));
            self.pending_len = part;
            self.send_part().await?;
        }
        Ok(())
    }

    /// Uploads the buffered part (starting the multipart upload with the first one).
    async fn send_part(&mut self) -> Result<()> {
        // Reap finished parts: their errors surface now rather than at the end.
        while let Some(done) = self.parts.try_join_next() {
            self.reaped(done)?;
        }
        if self.upload.is_none() {
            let upload = self
                .backend
                .put_multipart(&self.key)
                .await
                .map_err(store_err("put", &self.key))?;
            self.upload = Some(upload);
        }
        let permit = loop {
            // Waiting for a permit while this writer's own parts may be what holds them:
            // reap those as they finish.
            tokio::select! {
                permit = self.budget.permits.clone().acquire_owned() => {
                    break permit.expect("the semaphore is never closed");
                }
                Some(done) = self.parts.join_next(), if !self.parts.is_empty() => {
                    self.reaped(done)?;
                }
            }
        };
        let payload = PutPayload::from_iter(std::mem::take(&mut self.pending));
        self.pending_len = 0;
        let upload = self.upload.as_mut().expect("started above");
        let part = upload.put_part(payload);
        self.parts.spawn(async move {
            let result = part.await;
            drop(permit);
            result
        });
        Ok(())
    }

    fn reaped(
        &self,
        done: std::result::Result<object_store::Result<()>, tokio::task::JoinError>,
    ) -> Result<()> {
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(store_err("put", &self.key)(e)),
            Err(e) => Err(Error::io(
                format!("uploading a part of {}", self.key),
                std::io::Error::other(e),
            )),
        }
    }

    /// Appends the trailer, sends what is left and completes the object. On an error the
    /// multipart upload is aborted (best effort).
    pub async fn finish(mut self) -> Result<WrittenPack> {
        let trailer = Trailer {
            kind: self.kind,
            blobs: std::mem::take(&mut self.entries),
        };
        let blobs = trailer.blobs.len();
        let tail = Bytes::from(trailer.encode());
        let size = self.len + tail.len() as u64;
        let result = self.complete(tail).await;
        self.finished = true;
        if result.is_err() {
            self.parts.shutdown().await;
            if let Some(mut upload) = self.upload.take() {
                let _ = upload.abort().await;
            }
        }
        result?;
        Ok(WrittenPack {
            id: self.id,
            kind: self.kind,
            size,
            blobs,
        })
    }

    async fn complete(&mut self, tail: Bytes) -> Result<()> {
        if self.upload.is_none() && self.pending_len + tail.len() <= self.budget.part_size {
            // One request for a small pack (most incremental publishes, every tree pack).
            self.pending.push(tail);
            let payload = PutPayload::from_iter(std::mem::take(&mut self.pending));
            self.pending_len = 0;
            let _permit = self
                .budget
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            self.backend
                .put(&self.key, payload)
                .await
                .map_err(store_err("put", &self.key))?;
            return Ok(());
        }
        self.push(tail).await?;
        if self.pending_len > 0 {
            self.send_part().await?;
        }
        while let Some(done) = self.parts.join_next().await {
            self.reaped(done)?;
        }
        let upload = self.upload.as_mut().expect("a part was sent");
        upload
            .complete()
            .await
            .map_err(store_err("put", &self.key))?;
        Ok(())
    }
}

impl Drop for PackWriter {
    /// Dropped unfinished (the publish was cancelled or failed): stop the parts and abort
    /// the multipart upload in the background, so that the store does not keep its parts.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.parts.abort_all();
        if let (Some(mut upload), Ok(runtime)) =
            (self.upload.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    async fn write(blobs: &[Vec<u8>], part: usize) -> (Vec<u8>, WrittenPack) {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let key = Path::from("packs/x");
        let mut w = PackWriter::new(
            store.clone(),
            key.clone(),
            PackId([7; 16]),
            PackKind::Data,
            PartBudget::new(2, part),
        );
        for (i, b) in blobs.iter().enumerate() {
            let offset = w
                .append(
                    Digest::of(b),
                    Encoding::Raw,
                    b.len() as u32,
                    b.clone().into(),
                )
                .await
                .unwrap();
            let before: usize = blobs[..i].iter().map(Vec::len).sum();
            assert_eq!(offset as usize, before);
        }
        let written = w.finish().await.unwrap();
        let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
        (bytes.to_vec(), written)
    }

    #[tokio::test]
    async fn a_pack_streams_in_parts_and_reads_back() {
        let blobs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1000 + i as usize * 37]).collect();
        for part in [64usize, 1000, 4096, 1 << 20] {
            let (bytes, written) = write(&blobs, part).await;
            assert_eq!(written.size, bytes.len() as u64, "part {part}");
            assert_eq!(written.blobs, blobs.len());
            let footer = &bytes[bytes.len() - 9..];
            let tlen = Trailer::footer(footer, bytes.len() as u64).unwrap() as usize;
            let trailer = Trailer::decode(
                &bytes[bytes.len() - 9 - tlen..bytes.len() - 9],
                bytes.len() as u64,
            )
            .unwrap();
            for ((offset, entry), blob) in trailer.offsets().zip(&blobs) {
                let o = offset as usize;
                assert_eq!(&bytes[o..o + entry.stored_len as usize], &blob[..]);
                assert_eq!(entry.id, Digest::of(blob));
            }
        }
        let (bytes, written) = write(&[], 1 << 20).await;
        assert_eq!(written.blobs, 0);
        assert_eq!(bytes.len(), 8 + 32 + 9);
    }

    /// Nothing appears under the key until the pack is finished, and a dropped writer
    /// leaves nothing behind.
    #[tokio::test]
    async fn an_unfinished_pack_is_invisible() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let key = Path::from("packs/y");
        let mut w = PackWriter::new(
            store.clone(),
            key.clone(),
            PackId([8; 16]),
            PackKind::Data,
            PartBudget::new(1, 100),
        );
        for i in 0..10u8 {
            let b = vec![i; 250];
            w.append(Digest::of(&b), Encoding::Raw, 250, b.into())
                .await
                .unwrap();
        }
        assert!(store.head(&key).await.is_err());
        drop(w);
        tokio::task::yield_now().await;
        assert!(store.head(&key).await.is_err());
    }
}
