//! The advisory `latest` object: after each manifest it commits, the leader's sidecar
//! rewrites one small object naming it ([`write`]); followers watch it with a conditional
//! GET ([`Watch::look`]: one billed request, answered "not modified" while nothing changed)
//! and list the manifests only when it changed. It replaces a LIST per poll with a GET per
//! probe interval, and the store probe rides on that same GET.
//!
//! Advisory only: nothing it says is believed. A change means "list now", nothing more; the
//! follower still lists the manifests and verifies what it fetches. Whoever can write to the
//! bucket can rewrite it, delete it or garble it: that costs a LIST (a change) or latency (no
//! change: the slow full listing, `daemon.list_interval`, still finds every manifest).
//!
//! At the start of a publish, the publisher rewrites it once more with the same manifest and
//! a `publishing` field naming the snapshot being uploaded ([`write_publishing`]): followers
//! that stream then fetch its chunks while the upload runs (see [`crate::inprogress`]). The
//! next manifest's [`write`] drops the field again.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{GetOptions, ObjectStoreExt, PutPayload};

use crate::repo::Repo;
use crate::store::Store;

/// Bodies larger than this are not read (ours are about 150 bytes; the content is only
/// logged anyway).
const MAX_BODY: u64 = 4 << 10;

/// What the object holds (for operators and logs; followers act on its version only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latest {
    pub cluster_id: String,
    /// The newest manifest the writer committed (its id).
    pub manifest: String,
    pub written_at: DateTime<Utc>,
    /// A publish in progress, announced at its start (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publishing: Option<Publishing>,
}

/// The snapshot a publish in progress uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publishing {
    pub index: u64,
    pub term: u64,
}

/// Rewrites `latest` to name `id`: after its manifest is committed, never before (a
/// follower woken by it must find the manifest in its listing).
///
/// # Errors
/// The store refused the write. The manifest is committed all the same; followers find it
/// at their next full listing.
pub async fn write(store: &Store, cluster_id: &str, manifest: &str) -> object_store::Result<()> {
    put(store, cluster_id, manifest, None).await
}

/// Rewrites `latest` to say that the snapshot (index, term) is being published, keeping
/// the manifest it names (so a follower sees no new manifest, only the publish): one GET
/// and one PUT. Call it after the publish's in-progress object exists.
///
/// # Errors
/// The store refused the read or the write; the publish goes on, followers only learn of
/// it later.
pub async fn write_publishing(
    store: &Store,
    cluster_id: &str,
    index: u64,
    term: u64,
) -> object_store::Result<()> {
    let current = match store.backend.get(&Repo::latest_key(store)).await {
        Ok(got) if got.meta.size <= MAX_BODY => {
            serde_json::from_slice::<Latest>(&got.bytes().await?).ok()
        }
        Ok(_) | Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    let manifest = current.map(|l| l.manifest).unwrap_or_default();
    put(
        store,
        cluster_id,
        &manifest,
        Some(Publishing { index, term }),
    )
    .await
}

async fn put(
    store: &Store,
    cluster_id: &str,
    manifest: &str,
    publishing: Option<Publishing>,
) -> object_store::Result<()> {
    let body = Latest {
        cluster_id: cluster_id.to_owned(),
        manifest: manifest.to_owned(),
        written_at: Utc::now(),
        publishing,
    };
    // Serialising plain fields cannot fail.
    let bytes = serde_json::to_vec(&body).expect("serialising the latest object");
    store
        .backend
        .put(&Repo::latest_key(store), PutPayload::from(bytes))
        .await
        .map(|_| ())
}

/// The version of `latest` a follower saw last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    Absent,
    /// The store's ETag, or its timestamp and size for a store that gives none.
    Tag(String, bool),
}

/// What one look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look {
    /// The same version as last time (or "not modified").
    Unchanged,
    /// Another version, or the first look: worth a listing now. The body when it parsed.
    Changed(Option<Latest>),
}

/// A follower's view of `latest`: the version it saw last.
#[derive(Debug, Default)]
pub struct Watch {
    seen: Option<Version>,
}

impl Watch {
    pub fn new() -> Watch {
        Watch::default()
    }

    /// One conditional GET of `latest`. The first look counts as a change.
    ///
    /// # Errors
    /// The store did not answer, or answered with an error other than "not found" (a
    /// missing object is an answer: nobody published yet, or it was deleted).
    pub async fn look(&mut self, store: &Store) -> object_store::Result<Look> {
        let if_none_match = match &self.seen {
            Some(Version::Tag(tag, true)) => Some(tag.clone()),
            _ => None,
        };
        let got = store
            .backend
            .get_opts(
                &Repo::latest_key(store),
                GetOptions {
                    if_none_match,
                    ..GetOptions::default()
                },
            )
            .await;
        let (version, result) = match got {
            Err(object_store::Error::NotModified { .. }) => return Ok(Look::Unchanged),
            Err(object_store::Error::NotFound { .. }) => (Version::Absent, None),
            Err(e) => return Err(e),
            Ok(result) => {
                let version = match &result.meta.e_tag {
                    Some(tag) => Version::Tag(tag.clone(), true),
                    None => Version::Tag(
                        format!("{}:{}", result.meta.last_modified, result.meta.size),
                        false,
                    ),
                };
                (version, Some(result))
            }
        };
        if self.seen.as_ref() == Some(&version) {
            return Ok(Look::Unchanged);
        }
        self.seen = Some(version);
        let body = match result {
            Some(result) if result.meta.size <= MAX_BODY => {
                let bytes: Bytes = result.bytes().await?;
                serde_json::from_slice(&bytes).ok()
            }
            _ => None,
        };
        Ok(Look::Changed(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting::{CountingStore, Kind, Requests};
    use crate::store::{StoreSettings, StoreUrl};
    use std::sync::Arc;

    fn id(index: u64) -> String {
        format!("{index:020}-1-0123456789abcdef")
    }

    async fn looks_on(store: Store, requests: Requests) {
        let mut watch = Watch::new();
        assert_eq!(
            watch.look(&store).await.unwrap(),
            Look::Changed(None),
            "the first look is a change, even of nothing"
        );
        assert_eq!(watch.look(&store).await.unwrap(), Look::Unchanged);
        write(&store, "c", &id(5)).await.unwrap();
        match watch.look(&store).await.unwrap() {
            Look::Changed(Some(latest)) => assert_eq!(latest.manifest, id(5)),
            other => panic!("{other:?}"),
        }
        assert_eq!(watch.look(&store).await.unwrap(), Look::Unchanged);
        assert_eq!(watch.look(&store).await.unwrap(), Look::Unchanged);
        write(&store, "c", &id(6)).await.unwrap();
        assert!(matches!(
            watch.look(&store).await.unwrap(),
            Look::Changed(Some(_))
        ));
        // A garbled object is still a change worth a look, never an error.
        store
            .backend
            .put(&Repo::latest_key(&store), PutPayload::from("{garbage"))
            .await
            .unwrap();
        assert_eq!(watch.look(&store).await.unwrap(), Look::Changed(None));
        store
            .backend
            .delete(&Repo::latest_key(&store))
            .await
            .unwrap();
        assert_eq!(watch.look(&store).await.unwrap(), Look::Changed(None));
        assert_eq!(watch.look(&store).await.unwrap(), Look::Unchanged);
        assert_eq!(requests.count(Kind::Get), 9, "one GET per look");
        assert_eq!(requests.count(Kind::List), 0);
    }

    #[tokio::test]
    async fn a_look_is_one_get_and_changes_only_when_the_object_does() {
        let dir = tempfile::tempdir().unwrap();
        for url in [
            "memory://".to_owned(),
            format!("file://{}", dir.path().display()),
        ] {
            let opened =
                Store::open(&StoreSettings::for_url(StoreUrl::parse(&url).unwrap())).unwrap();
            let requests = Requests::new();
            let store = Store {
                backend: Arc::new(CountingStore::new(opened.backend.clone(), requests.clone())),
                ..opened
            };
            looks_on(store, requests).await;
        }
    }
}
