//! The store's bill ([`CountingStore`], [`Requests`]): every request the sidecar makes to
//! the object store, counted by kind, so that `/metrics`
//! (`snaprelay_store_requests_total{kind}`), the propagation benchmark and the tests read the
//! same figures an S3 invoice would show.
//!
//! What counts as one request follows S3: a GET (`get`), a ranged GET (`get_range`, one per
//! range asked for: an upper bound, since a backend may merge neighbouring ranges), a HEAD
//! (`head`), a PUT (`put`; a multipart upload is its create, each part and its completion),
//! a LIST page (`list`: one per listing started, and one more per 1000 keys after the first
//! 1000, S3's page size), a DELETE per key (`delete`), a COPY (`copy`) and a rename
//! (`rename`: a copy and a delete on S3). A request is counted when it is made, whether it
//! succeeds, fails or answers "not modified": each of those is billed.
//!
//! [`Requests::units`] weighs them as S3 prices them: a LIST, PUT or COPY costs about twelve
//! GETs (class A against class B requests), a DELETE nothing.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// Keys per LIST page (S3's `max-keys` default and maximum).
const LIST_PAGE: u64 = 1000;

/// The kinds of request, as the `kind` label of `snaprelay_store_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Get,
    GetRange,
    Head,
    Put,
    List,
    Delete,
    Copy,
    Rename,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Get,
        Kind::GetRange,
        Kind::Head,
        Kind::Put,
        Kind::List,
        Kind::Delete,
        Kind::Copy,
        Kind::Rename,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::GetRange => "get_range",
            Kind::Head => "head",
            Kind::Put => "put",
            Kind::List => "list",
            Kind::Delete => "delete",
            Kind::Copy => "copy",
            Kind::Rename => "rename",
        }
    }

    /// What one request of this kind costs, in GETs (S3's price ratio, rounded: class A
    /// requests cost 12.5 times class B ones; DELETE is free).
    pub fn units(self) -> u64 {
        match self {
            Kind::Get | Kind::GetRange | Kind::Head => 1,
            Kind::Put | Kind::List | Kind::Copy | Kind::Rename => 12,
            Kind::Delete => 0,
        }
    }

    fn slot(self) -> usize {
        Kind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("every kind is in ALL")
    }
}

/// Request counts by kind. A cheap clone: the counts are shared.
#[derive(Clone, Default)]
pub struct Requests {
    counts: Arc<[AtomicU64; 8]>,
    /// Called with each counted request (the daemon's metrics).
    observer: Option<Arc<dyn Fn(Kind, u64) + Send + Sync>>,
}

impl fmt::Debug for Requests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for kind in Kind::ALL {
            m.entry(&kind.as_str(), &self.count(kind));
        }
        m.finish()
    }
}

impl Requests {
    pub fn new() -> Requests {
        Requests::default()
    }

    /// Counts that also report every request to `observer` (kind, how many).
    pub fn observed(observer: impl Fn(Kind, u64) + Send + Sync + 'static) -> Requests {
        Requests {
            counts: Arc::default(),
            observer: Some(Arc::new(observer)),
        }
    }

    fn add(&self, kind: Kind, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[kind.slot()].fetch_add(n, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer(kind, n);
        }
    }

    /// Requests of `kind` counted so far.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[kind.slot()].load(Ordering::Relaxed)
    }

    /// All requests so far, weighed by [`Kind::units`].
    pub fn units(&self) -> u64 {
        Kind::ALL.iter().map(|k| self.count(*k) * k.units()).sum()
    }
}

/// An object store that counts every request it passes on (see the module comment).
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    requests: Requests,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>, requests: Requests) -> CountingStore {
        CountingStore { inner, requests }
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

/// Counts a listing's pages as its keys arrive: the first page when it starts, one more
/// per [`LIST_PAGE`] keys after.
fn paged(
    requests: &Requests,
    listing: BoxStream<'static, Result<ObjectMeta>>,
) -> BoxStream<'static, Result<ObjectMeta>> {
    requests.add(Kind::List, 1);
    let requests = requests.clone();
    let mut seen = 0u64;
    listing
        .inspect(move |_| {
            seen += 1;
            if seen > LIST_PAGE && seen % LIST_PAGE == 1 {
                requests.add(Kind::List, 1);
            }
        })
        .boxed()
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.requests.add(Kind::Put, 1);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.requests.add(Kind::Put, 1);
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountingUpload {
            inner: upload,
            requests: self.requests.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let kind = if options.head {
            Kind::Head
        } else if options.range.is_some() {
            Kind::GetRange
        } else {
            Kind::Get
        };
        self.requests.add(kind, 1);
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.requests.add(Kind::GetRange, ranges.len() as u64);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let requests = self.requests.clone();
        let locations = locations
            .inspect(move |l| {
                if l.is_ok() {
                    requests.add(Kind::Delete, 1);
                }
            })
            .boxed();
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        paged(&self.requests, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        paged(&self.requests, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.requests.add(Kind::List, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.requests.add(Kind::Copy, 1);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.requests.add(Kind::Rename, 1);
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts and completion are counted as PUTs.
#[derive(Debug)]
struct CountingUpload {
    inner: Box<dyn MultipartUpload>,
    requests: Requests,
}

#[async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.requests.add(Kind::Put, 1);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.requests.add(Kind::Put, 1);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.requests.add(Kind::Delete, 1);
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn every_request_is_counted_by_kind_and_weighed_as_s3_prices_it() {
        let requests = Requests::new();
        let store = CountingStore::new(Arc::new(InMemory::new()), requests.clone());
        for i in 0..1001 {
            store
                .put(&Path::from(format!("k/{i:04}")), Bytes::from("x").into())
                .await
                .unwrap();
        }
        assert_eq!(requests.count(Kind::Put), 1001);
        let listed: Vec<_> = store
            .list(Some(&Path::from("k")))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed.len(), 1001);
        assert_eq!(requests.count(Kind::List), 2, "1001 keys are two pages");
        let _ = store.list(None).boxed();
        assert_eq!(
            requests.count(Kind::List),
            3,
            "a listing is billed when started"
        );

        let key = Path::from("k/0000");
        let got = store.get(&key).await.unwrap();
        let etag = got.meta.e_tag.clone();
        store.head(&key).await.unwrap();
        store.get_range(&key, 0..1).await.unwrap();
        store.get_ranges(&key, &[0..1, 0..1]).await.unwrap();
        let not_modified = store
            .get_opts(
                &key,
                GetOptions {
                    if_none_match: etag,
                    ..GetOptions::default()
                },
            )
            .await;
        assert!(matches!(
            not_modified,
            Err(object_store::Error::NotModified { .. })
        ));
        assert!(store.get(&Path::from("missing")).await.is_err());
        assert_eq!(
            requests.count(Kind::Get),
            3,
            "answered, not modified, not found"
        );
        assert_eq!(requests.count(Kind::Head), 1);
        assert_eq!(requests.count(Kind::GetRange), 3);

        store.copy(&key, &Path::from("c")).await.unwrap();
        store.delete(&Path::from("c")).await.unwrap();
        assert_eq!(requests.count(Kind::Copy), 1);
        assert_eq!(requests.count(Kind::Delete), 1);
        assert_eq!(
            requests.units(),
            1001 * 12 + 3 * 12 + 3 + 1 + 3 + 12,
            "{requests:?}"
        );
    }
}
