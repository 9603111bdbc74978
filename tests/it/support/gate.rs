//! A store that holds chosen operations at a gate the test controls: PUTs to keys containing
//! a given part (say "manifests"), or GETs of keys containing one
//! ([`GateStore::holding_gets`]), wait until the test opens the gate, and the test learns
//! when one arrived; DELETEs of keys containing another part can be held forever (as if the
//! process had died before it got there). Everything else passes straight through.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::{watch, Notify};

struct Rules {
    hold_put: &'static str,
    hold_get: Option<&'static str>,
    hold_delete: Option<&'static str>,
    arrived: Notify,
    open: watch::Sender<bool>,
}

#[derive(Clone)]
pub struct GateStore {
    inner: Arc<dyn ObjectStore>,
    rules: Arc<Rules>,
}

impl GateStore {
    /// Holds PUTs to keys containing `hold_put` until [`GateStore::open`]; with
    /// `hold_delete`, DELETEs of keys containing it never complete.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        hold_put: &'static str,
        hold_delete: Option<&'static str>,
    ) -> GateStore {
        GateStore::with(inner, hold_put, None, hold_delete)
    }

    /// Holds GETs (whole or ranged) of keys containing `part` until [`GateStore::open`],
    /// and nothing else (no key part is empty).
    pub fn holding_gets(inner: Arc<dyn ObjectStore>, part: &'static str) -> GateStore {
        GateStore::with(inner, "", Some(part), None)
    }

    fn with(
        inner: Arc<dyn ObjectStore>,
        hold_put: &'static str,
        hold_get: Option<&'static str>,
        hold_delete: Option<&'static str>,
    ) -> GateStore {
        GateStore {
            inner,
            rules: Arc::new(Rules {
                hold_put,
                hold_get,
                hold_delete,
                arrived: Notify::new(),
                open: watch::channel(false).0,
            }),
        }
    }

    /// Waits until a held operation reached the gate.
    pub async fn arrived(&self) {
        self.rules.arrived.notified().await
    }

    /// Lets every held operation (and every later one) through.
    pub fn open(&self) {
        self.rules.open.send_replace(true);
    }

    fn held(key: &Path, part: &str) -> bool {
        key.parts().any(|p| p.as_ref() == part)
    }

    /// Waits at the gate if `key` is held, telling the test it arrived if the gate is
    /// shut.
    async fn pass(&self, key: &Path, part: &str) {
        if Self::held(key, part) {
            let mut open = self.rules.open.subscribe();
            if !*open.borrow() {
                self.rules.arrived.notify_one();
            }
            let _ = open.wait_for(|open| *open).await;
        }
    }
}

impl fmt::Debug for GateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GateStore({})", self.inner)
    }
}

impl fmt::Display for GateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GateStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for GateStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.pass(location, self.rules.hold_put).await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if let Some(part) = self.rules.hold_get {
            self.pass(location, part).await;
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if let Some(part) = self.rules.hold_get {
            self.pass(location, part).await;
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = self.inner.clone();
        let hold = self.rules.hold_delete;
        locations
            .then(move |location| {
                let inner = inner.clone();
                async move {
                    let location = location?;
                    if hold.is_some_and(|part| Self::held(&location, part)) {
                        std::future::pending::<()>().await;
                    }
                    inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
