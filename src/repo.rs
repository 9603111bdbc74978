//! The repository: one cluster's snapshots under one store prefix. This is the only module
//! that knows object keys:
//!
//! ```text
//! <prefix>/repository.json          features, cluster id, incarnation, chunking (and packs')
//! <prefix>/manifests/<index:020>-<term:020>-<sha256[..16]>.json
//! <prefix>/chunks/<sha256[..2]>/<sha256>   a repository of chunk objects
//! <prefix>/packs/<id[..2]>/<id>      a repository of packs: packs of chunks or tree blocks
//! <prefix>/leases/<publish|gc>-<16 hex>.json
//! <prefix>/inprogress/<index:020>-<term:020>.json   advisory: a publish's chunks so far
//! ```
//!
//! Manifests are immutable and written last (create-only), so a manifest exists only when
//! every chunk it names does. There is no mutable "latest" pointer: the newest snapshot is
//! the greatest manifest key.
//!
//! Every byte read from a pack is checked before it is used: a trailer against its digest
//! ([`Repo::read_trailer`]), a tree block against its manifest ([`Repo::read_block`]), a
//! chunk against its id ([`crate::pack::decode_blob`]), and every response's object size
//! against what the manifest says the pack holds.
//!
//! `repository.json` and every manifest are stored as a signed envelope (see
//! [`crate::signing`]): the repository's [`Keyring`] seals what this process writes and
//! checks what it reads before the document is parsed. Under `signing.require`, a document
//! that fails the check is [`Error::Unauthenticated`], and the lookups that choose a
//! manifest (`manifest_for`, `newest_verified`) pass over it.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use chrono::Utc;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::chunk::{ChunkParams, Digest};
use crate::error::{Error, Result};
pub use crate::layout::Descriptor;
use crate::layout::Layout;
use crate::manifest::{Manifest, MAX_MANIFEST_BYTES};
use crate::manifest_v2 as v2;
use crate::pack::upload::{PackWriter, PartBudget};
use crate::pack::{PackId, PackKind, Trailer, FOOTER_LEN};
use crate::signing::{Authenticity, Keyring, OpenError, PayloadType, Refusal};
use crate::store::Store;
use crate::tree::Block;

const REPOSITORY_KEY: &str = "repository.json";
const MANIFESTS: &str = "manifests";
const CHUNKS: &str = "chunks";
const PACKS: &str = "packs";
const LEASES: &str = "leases";
/// The advisory "a manifest landed" object (see [`crate::latest`]).
const LATEST_KEY: &str = "latest";
/// Advisory objects announcing publishes in progress (see [`crate::inprogress`]).
const INPROGRESS: &str = "inprogress";
/// A lease object names its holder in a few hundred bytes.
const MAX_LEASE_BYTES: usize = 4 << 10;
/// Where `check-config` writes and deletes its scratch objects.
const PROBE_PREFIX: &str = "probe";
/// repository.json is a few hundred bytes; anything much larger is not ours.
const MAX_REPOSITORY_BYTES: u64 = 64 << 10;

/// A manifest's identity, parsed from (and printed as) its key's file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ManifestId {
    pub index: u64,
    pub term: u64,
    /// First 16 hex digits of the snapshot's sha256.
    pub sha_prefix: String,
}

impl ManifestId {
    pub fn of(m: &Manifest) -> ManifestId {
        Self::named(m.last_log_index, m.last_log_term, &m.sha256)
    }

    pub fn of_packed(m: &v2::Manifest) -> ManifestId {
        Self::named(m.last_log_index, m.last_log_term, &m.sha256)
    }

    fn named(index: u64, term: u64, sha256: &Digest) -> ManifestId {
        ManifestId {
            index,
            term,
            sha_prefix: sha256.to_hex()[..16].to_owned(),
        }
    }

    /// Parses `<index:020>-<term:020>-<sha16>.json`; `None` for anything else.
    pub fn parse(name: &str) -> Option<ManifestId> {
        let stem = name.strip_suffix(".json")?;
        let mut parts = stem.split('-');
        let (index, term, sha) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || index.len() != 20
            || term.len() != 20
            || sha.len() != 16
            || !index
                .bytes()
                .chain(term.bytes())
                .all(|b| b.is_ascii_digit())
            || !sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        Some(ManifestId {
            index: index.parse().ok()?,
            term: term.parse().ok()?,
            sha_prefix: sha.to_owned(),
        })
    }

    pub fn file_name(&self) -> String {
        format!(
            "{:020}-{:020}-{}.json",
            self.index, self.term, self.sha_prefix
        )
    }
}

impl fmt::Display for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// A chunk as the store lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub size: u64,
    /// The store's own timestamp (GC measures its grace period from it, not our clock).
    pub last_modified: chrono::DateTime<Utc>,
}

/// A pack as the store lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPack {
    pub size: u64,
    /// The store's own timestamp (GC measures its grace period from it, not our clock).
    pub last_modified: chrono::DateTime<Utc>,
}

/// A listed manifest with the store's metadata.
#[derive(Debug, Clone)]
pub struct ManifestEntry {
    pub id: ManifestId,
    pub stored_size: u64,
    /// The store's timestamp of the object (a follower's quarantine tells a replaced
    /// object from the one it refused by it).
    pub last_modified: Option<chrono::DateTime<Utc>>,
}

/// A lease object as the store lists it (see [`crate::lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEntry {
    /// The object's file name, `<kind>-<16 hex>.json`.
    pub name: String,
    pub kind: LeaseKind,
    /// When its holder last wrote it, by the store's clock.
    pub last_modified: chrono::DateTime<Utc>,
}

/// Who holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseKind {
    Publish,
    Gc,
}

impl LeaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseKind::Publish => "publish",
            LeaseKind::Gc => "gc",
        }
    }

    /// The kind of a lease object's file name, if it is one.
    pub fn of_name(name: &str) -> Option<LeaseKind> {
        let (kind, rest) = name.split_once('-')?;
        let id = rest.strip_suffix(".json")?;
        if id.len() != 16 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        match kind {
            "publish" => Some(LeaseKind::Publish),
            "gc" => Some(LeaseKind::Gc),
            _ => None,
        }
    }
}

/// A manifest of either format, as [`Repo::read_any_manifest`] reads it: what a caller that
/// does not care how the chunks are stored needs of it.
#[derive(Debug, Clone)]
pub enum AnyManifest {
    Chunks(Manifest),
    Packs(v2::Manifest),
}

impl AnyManifest {
    pub fn last_log_index(&self) -> u64 {
        match self {
            AnyManifest::Chunks(m) => m.last_log_index,
            AnyManifest::Packs(m) => m.last_log_index,
        }
    }

    pub fn last_log_term(&self) -> u64 {
        match self {
            AnyManifest::Chunks(m) => m.last_log_term,
            AnyManifest::Packs(m) => m.last_log_term,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            AnyManifest::Chunks(m) => m.size,
            AnyManifest::Packs(m) => m.size,
        }
    }

    pub fn sha256(&self) -> &Digest {
        match self {
            AnyManifest::Chunks(m) => &m.sha256,
            AnyManifest::Packs(m) => &m.sha256,
        }
    }

    pub fn raft_meta(&self) -> &serde_json::Value {
        match self {
            AnyManifest::Chunks(m) => &m.raft_meta,
            AnyManifest::Packs(m) => &m.raft_meta,
        }
    }

    pub fn created_at(&self) -> chrono::DateTime<Utc> {
        match self {
            AnyManifest::Chunks(m) => m.created_at,
            AnyManifest::Packs(m) => m.created_at,
        }
    }

    pub fn chunks(&self) -> u64 {
        match self {
            AnyManifest::Chunks(m) => m.chunks.len() as u64,
            AnyManifest::Packs(m) => m.chunks,
        }
    }

    pub fn publisher_node(&self) -> Option<u64> {
        match self {
            AnyManifest::Chunks(m) => m.publisher.node_id,
            AnyManifest::Packs(m) => m.publisher.node_id,
        }
    }
}

/// An opened repository whose cluster id (and, with signing, `repository.json`'s signature)
/// has been checked.
#[derive(Debug, Clone)]
pub struct Repo {
    store: Store,
    descriptor: Descriptor,
    keyring: Keyring,
    /// What the signature check of `repository.json` found.
    descriptor_authenticity: Authenticity,
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

impl Repo {
    /// Opens an existing repository and checks that it belongs to `cluster_id`, without
    /// signing (nothing is checked, what is written is unsigned).
    pub async fn open(store: Store, cluster_id: &str) -> Result<Repo> {
        Self::open_with(store, cluster_id, Keyring::none()).await
    }

    /// Opens an existing repository whose documents `keyring` seals and checks.
    pub async fn open_with(store: Store, cluster_id: &str, keyring: Keyring) -> Result<Repo> {
        match Self::read_descriptor(&store, &keyring).await? {
            Some((descriptor, auth)) => Self::checked(store, descriptor, cluster_id, keyring, auth),
            None => Err(Error::NoRepository {
                location: store.url.to_string(),
            }),
        }
    }

    /// [`Repo::open_or_create_with`] without signing.
    pub async fn open_or_create(
        store: Store,
        cluster_id: &str,
        layout: impl Into<Layout>,
    ) -> Result<Repo> {
        Self::open_or_create_with(store, cluster_id, layout, Keyring::none()).await
    }

    /// Opens the repository, creating `repository.json` (signed with `keyring`'s key) if the
    /// prefix has none. Two processes racing to create it agree through the create-only
    /// write. An existing repository is opened as it is, whatever `layout` asks for.
    pub async fn open_or_create_with(
        store: Store,
        cluster_id: &str,
        layout: impl Into<Layout>,
        keyring: Keyring,
    ) -> Result<Repo> {
        if let Some((descriptor, auth)) = Self::read_descriptor(&store, &keyring).await? {
            return Self::checked(store, descriptor, cluster_id, keyring, auth);
        }
        let descriptor = layout.into().descriptor(cluster_id);
        let key = store.key(REPOSITORY_KEY);
        let body = keyring.seal(PayloadType::Repository, descriptor.to_json());
        match put_create(&store, &key, body.into()).await {
            Ok(()) => {
                tracing::info!(store = %store.url, cluster_id, incarnation = %descriptor.incarnation(), layout = descriptor.layout_name(), "created repository");
                let descriptor_authenticity = match keyring.signer() {
                    Some(s) => Authenticity::Verified(s.id()),
                    None => Authenticity::NotChecked {
                        claimed: Vec::new(),
                    },
                };
                Ok(Repo {
                    store,
                    descriptor,
                    keyring,
                    descriptor_authenticity,
                })
            }
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => Box::pin(Self::open_with(store, cluster_id, keyring)).await,
            Err(e) => Err(e),
        }
    }

    /// Where the advisory `latest` object lives (its format: [`crate::latest`]).
    pub fn latest_key(store: &Store) -> Path {
        store.key(LATEST_KEY)
    }

    /// Whether the store answers and holds a repository (probing reachability at start).
    pub async fn exists(store: &Store) -> Result<bool> {
        Ok(Self::read_descriptor(store, &Keyring::none())
            .await?
            .is_some())
    }

    /// Signs `repository.json` with `keyring`'s key, keeping the signatures of other keys
    /// that are still trusted and dropping the rest: the step of a key rotation that lets
    /// the old key go, and how a repository created before signing was configured gets its
    /// first signature. The current descriptor must verify with a trusted key, unless
    /// `trust_current` (the operator vouches for what it says: it is printed). Returns the
    /// descriptor and what its check found before.
    pub async fn sign_descriptor(
        store: &Store,
        cluster_id: &str,
        keyring: &Keyring,
        trust_current: bool,
    ) -> Result<(Descriptor, Authenticity)> {
        let key = store.key(REPOSITORY_KEY);
        let bytes = match get_limited(store, &key, MAX_REPOSITORY_BYTES).await {
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {
                return Err(Error::NoRepository {
                    location: store.url.to_string(),
                })
            }
            other => other?,
        };
        let location = store.url.to_string();
        let lax = Keyring::new(keyring.signer().cloned(), keyring.trusted().to_vec(), false);
        let opened = match lax.open(&bytes, PayloadType::Repository) {
            Ok(opened) => opened,
            Err(OpenError::Refused(refusal)) => {
                return Err(Error::Unauthenticated {
                    object: format!("repository.json at {location}"),
                    refusal,
                })
            }
            Err(OpenError::Invalid(reason)) => {
                return Err(Error::InvalidRepository { location, reason })
            }
        };
        let descriptor = parse_descriptor(&opened.payload, &location)?;
        if descriptor.cluster_id() != cluster_id {
            return Err(Error::ClusterMismatch {
                location,
                expected: cluster_id.to_owned(),
                found: descriptor.cluster_id().to_owned(),
            });
        }
        match &opened.authenticity {
            Authenticity::Verified(_) => {}
            _ if trust_current => {}
            Authenticity::Refused(refusal) => {
                return Err(Error::Unauthenticated {
                    object: format!("repository.json at {location}"),
                    refusal: refusal.clone(),
                })
            }
            Authenticity::NotChecked { .. } => {
                return Err(Error::Config(crate::config::ConfigError::invalid(
                    "signing.trusted_keys",
                    "are needed to check repository.json before signing it",
                )))
            }
        }
        let body = keyring
            .countersign(&bytes, PayloadType::Repository)
            .ok_or_else(|| {
                Error::Config(crate::config::ConfigError::invalid(
                    "signing.key_file",
                    "is required to sign repository.json",
                ))
            })?;
        store
            .backend
            .put(&key, PutPayload::from(body))
            .await
            .map_err(store_err("put", &key))?;
        tracing::info!(store = %store.url, "signed repository.json");
        Ok((descriptor, opened.authenticity))
    }

    /// Tries each operation snaprelay needs on a scratch key under the prefix: list, put,
    /// get, delete. Returns each operation with the S3 permission it needs and its outcome.
    pub async fn probe(store: &Store) -> Vec<(&'static str, &'static str, Result<()>)> {
        let key = store.key(&format!(
            "{PROBE_PREFIX}/{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        let body = Bytes::from_static(b"snaprelay probe");
        let mut out = Vec::new();
        let listed = store
            .backend
            .list_with_delimiter(Some(&store.prefix))
            .await
            .map(|_| ())
            .map_err(store_err("list", &store.prefix));
        out.push(("list", "s3:ListBucket", listed));
        let put = store
            .backend
            .put(&key, body.clone().into())
            .await
            .map(|_| ())
            .map_err(store_err("put", &key));
        let wrote = put.is_ok();
        out.push(("put", "s3:PutObject", put));
        if wrote {
            let got = match store.backend.get(&key).await {
                Ok(r) => match r.bytes().await {
                    Ok(b) if b == body => Ok(()),
                    Ok(_) => Err(Error::InvalidRepository {
                        location: key.to_string(),
                        reason: "read back different bytes than written".into(),
                    }),
                    Err(e) => Err(store_err("get", &key)(e)),
                },
                Err(e) => Err(store_err("get", &key)(e)),
            };
            out.push(("get", "s3:GetObject", got));
            let deleted = store
                .backend
                .delete(&key)
                .await
                .map_err(store_err("delete", &key));
            out.push(("delete", "s3:DeleteObject", deleted));
        }
        out
    }

    fn checked(
        store: Store,
        descriptor: Descriptor,
        cluster_id: &str,
        keyring: Keyring,
        descriptor_authenticity: Authenticity,
    ) -> Result<Repo> {
        if descriptor.cluster_id() != cluster_id {
            return Err(Error::ClusterMismatch {
                location: store.url.to_string(),
                expected: cluster_id.to_owned(),
                found: descriptor.cluster_id().to_owned(),
            });
        }
        Ok(Repo {
            store,
            descriptor,
            keyring,
            descriptor_authenticity,
        })
    }

    /// Reads `repository.json`, checking its signature before parsing it.
    async fn read_descriptor(
        store: &Store,
        keyring: &Keyring,
    ) -> Result<Option<(Descriptor, Authenticity)>> {
        let key = store.key(REPOSITORY_KEY);
        let bytes = match get_limited(store, &key, MAX_REPOSITORY_BYTES).await {
            Ok(b) => b,
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Ok(None),
            Err(e @ Error::ObjectTooLarge { .. }) => {
                return Err(Error::InvalidRepository {
                    location: store.url.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(e) => return Err(e),
        };
        let location = store.url.to_string();
        let opened = match keyring.open(&bytes, PayloadType::Repository) {
            Ok(opened) => opened,
            Err(OpenError::Refused(refusal)) => {
                return Err(Error::Unauthenticated {
                    object: format!("repository.json at {location}"),
                    refusal,
                })
            }
            Err(OpenError::Invalid(reason)) => {
                return Err(Error::InvalidRepository { location, reason })
            }
        };
        if let Authenticity::Refused(refusal) = &opened.authenticity {
            tracing::warn!(store = %location, reason = %refusal.reason, "repository.json is not authentic ({refusal}); used anyway because signing.require is off");
        }
        let descriptor = parse_descriptor(&opened.payload, &location)?;
        Ok(Some((descriptor, opened.authenticity)))
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The pack repository's descriptor, or `None` for a chunk-object repository.
    pub fn packs(&self) -> Option<&v2::Repository> {
        match &self.descriptor {
            Descriptor::Packs(d) => Some(d),
            Descriptor::Chunks(_) => None,
        }
    }

    /// What the signature check of `repository.json` found when the repository was opened.
    pub fn descriptor_authenticity(&self) -> &Authenticity {
        &self.descriptor_authenticity
    }

    /// How this repository seals and checks documents.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// `repository.json` as the store holds it now (`None` if it is gone): to notice a
    /// repository re-created under a running process.
    pub async fn current_descriptor(&self) -> Result<Option<Descriptor>> {
        Ok(Self::read_descriptor(&self.store, &self.keyring)
            .await?
            .map(|(descriptor, _)| descriptor))
    }

    pub fn incarnation(&self) -> &str {
        self.descriptor.incarnation()
    }

    pub fn params(&self) -> ChunkParams {
        self.descriptor.chunking()
    }

    pub fn cluster_id(&self) -> &str {
        self.descriptor.cluster_id()
    }

    /// The store the repository lives in (for the advisory objects outside it: `latest`).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn location(&self) -> String {
        self.store.url.to_string()
    }

    fn manifest_key(&self, id: &ManifestId) -> Path {
        self.store.key(&format!("{MANIFESTS}/{}", id.file_name()))
    }

    fn inprogress_key(&self, index: u64, term: u64) -> Path {
        self.store
            .key(&format!("{INPROGRESS}/{index:020}-{term:020}.json"))
    }

    fn lease_key(&self, name: &str) -> Path {
        self.store.key(&format!("{LEASES}/{name}"))
    }

    fn chunk_key(&self, sha: &Digest) -> Path {
        let hex = sha.to_hex();
        self.store.key(&format!("{CHUNKS}/{}/{hex}", &hex[..2]))
    }

    fn pack_key(&self, id: &PackId) -> Path {
        let hex = id.to_hex();
        self.store.key(&format!("{PACKS}/{}/{hex}", &hex[..2]))
    }

    /// Manifests with an index greater than `after` (all if `None`), oldest first. Keys under
    /// `manifests/` that are not manifest names are skipped with a warning.
    pub async fn list_manifests(&self, after: Option<u64>) -> Result<Vec<ManifestEntry>> {
        let prefix = self.store.key(MANIFESTS);
        let listing = match after {
            // Every key of index `after` starts with "<after:020>-"; '.' sorts after '-', so
            // the offset skips them and everything older, and nothing newer.
            Some(after) => self.store.backend.list_with_offset(
                Some(&prefix),
                &self.store.key(&format!("{MANIFESTS}/{after:020}.")),
            ),
            None => self.store.backend.list(Some(&prefix)),
        };
        let metas: Vec<_> = listing
            .try_collect()
            .await
            .map_err(store_err("list", &prefix))?;
        let mut entries = Vec::with_capacity(metas.len());
        for meta in metas {
            let name = meta.location.filename().unwrap_or_default();
            match ManifestId::parse(name) {
                Some(id) if after.is_none_or(|a| id.index > a) => entries.push(ManifestEntry {
                    id,
                    stored_size: meta.size,
                    last_modified: Some(meta.last_modified),
                }),
                Some(_) => {}
                None => {
                    tracing::warn!(key = %meta.location, "ignoring an object under manifests/ that is not a manifest")
                }
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }

    /// The newest manifest with an index greater than `after`, if any.
    pub async fn newest_manifest(&self, after: Option<u64>) -> Result<Option<ManifestId>> {
        Ok(self.list_manifests(after).await?.pop().map(|e| e.id))
    }

    /// The manifest at `index` (the greatest key if several were published for it).
    pub async fn find_manifest(&self, index: u64) -> Result<ManifestId> {
        let after = index.checked_sub(1);
        self.list_manifests(after)
            .await?
            .into_iter()
            .filter(|e| e.id.index == index)
            .map(|e| e.id)
            .next_back()
            .ok_or(Error::SnapshotNotFound { index })
    }

    /// The manifest for exactly this log id, if one was published. Under `signing.require`
    /// only a manifest that reads back valid and verified counts: one an attacker planted
    /// under the same log id must not make a publisher believe its snapshot is in the store.
    pub async fn manifest_for(&self, index: u64, term: u64) -> Result<Option<ManifestId>> {
        let mut candidates: Vec<ManifestId> = self
            .list_manifests(index.checked_sub(1))
            .await?
            .into_iter()
            .filter(|e| e.id.index == index && e.id.term == term)
            .map(|e| e.id)
            .collect();
        if !self.keyring.requires() {
            return Ok(candidates.pop());
        }
        while let Some(id) = candidates.pop() {
            match self.check_manifest(&id).await {
                Ok(()) => return Ok(Some(id)),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::debug!(manifest = %id, error = %e, "not counting a manifest"),
            }
        }
        Ok(None)
    }

    /// The newest manifest with an index greater than `after` whose signature verifies
    /// (under `signing.require`; otherwise simply the newest), and the refused ones newer
    /// than it, newest first. Only signatures are checked here, not the manifests' content.
    pub async fn newest_verified(
        &self,
        after: Option<u64>,
    ) -> Result<(Option<ManifestId>, Vec<(ManifestId, Refusal)>)> {
        let mut listed = self.list_manifests(after).await?;
        if !self.keyring.requires() {
            return Ok((listed.pop().map(|e| e.id), Vec::new()));
        }
        let mut refused = Vec::new();
        while let Some(entry) = listed.pop() {
            let key = self.manifest_key(&entry.id);
            let bytes = get_limited(&self.store, &key, MAX_MANIFEST_BYTES).await;
            let bytes = match bytes {
                Ok(bytes) => bytes,
                Err(e @ Error::ObjectTooLarge { .. }) => {
                    tracing::debug!(manifest = %entry.id, error = %e, "passing over a manifest");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.keyring.open(&bytes, PayloadType::Manifest) {
                Ok(_) => return Ok((Some(entry.id), refused)),
                Err(OpenError::Refused(r)) => refused.push((entry.id, r)),
                // `requires()` makes every failure a refusal.
                Err(OpenError::Invalid(_)) => {}
            }
        }
        Ok((None, refused))
    }

    /// Reads and validates a manifest: size limit, signature (before anything else is
    /// looked at), JSON, format, cluster id, consistency with its key and with the
    /// repository's chunking parameters.
    pub async fn read_manifest(&self, id: &ManifestId) -> Result<Manifest> {
        self.read_manifest_checked(id).await.map(|(m, _)| m)
    }

    /// [`Repo::read_manifest`], also saying what the signature check found.
    pub async fn read_manifest_checked(&self, id: &ManifestId) -> Result<(Manifest, Authenticity)> {
        let (key, payload, authenticity) = self.open_manifest(id).await?;
        let invalid = |reason: String| Error::InvalidManifest {
            key: key.to_string(),
            reason,
        };
        let Descriptor::Chunks(descriptor) = &self.descriptor else {
            return Err(invalid(
                "the repository stores packs: its manifests are read as format 2".into(),
            ));
        };
        let manifest: Manifest = serde_json::from_slice(&payload)
            .map_err(|e| invalid(format!("not a manifest: {e}")))?;
        self.check_names(&key, id, &manifest.cluster_id, ManifestId::of(&manifest))?;
        manifest.validate(&descriptor.chunking).map_err(invalid)?;
        Ok((manifest, authenticity))
    }

    /// Reads and validates a format-2 manifest of a pack repository, as
    /// [`Repo::read_manifest`] does one of chunk objects; it must also be of this
    /// incarnation of the repository (one copied from an earlier incarnation names packs
    /// that may not exist here).
    pub async fn read_packed_manifest(&self, id: &ManifestId) -> Result<v2::Manifest> {
        self.read_packed_manifest_checked(id).await.map(|(m, _)| m)
    }

    /// [`Repo::read_packed_manifest`], also saying what the signature check found.
    pub async fn read_packed_manifest_checked(
        &self,
        id: &ManifestId,
    ) -> Result<(v2::Manifest, Authenticity)> {
        let (key, payload, authenticity) = self.open_manifest(id).await?;
        let invalid = |reason: String| Error::InvalidManifest {
            key: key.to_string(),
            reason,
        };
        let Descriptor::Packs(descriptor) = &self.descriptor else {
            return Err(invalid(
                "the repository stores chunk objects: its manifests are read as format 1".into(),
            ));
        };
        let manifest: v2::Manifest = serde_json::from_slice(&payload)
            .map_err(|e| invalid(format!("not a manifest: {e}")))?;
        self.check_names(
            &key,
            id,
            &manifest.cluster_id,
            ManifestId::of_packed(&manifest),
        )?;
        if manifest.incarnation != descriptor.incarnation {
            return Err(invalid(format!(
                "it belongs to incarnation {} of the repository, not to this one ({})",
                manifest.incarnation, descriptor.incarnation
            )));
        }
        manifest.validate(descriptor).map_err(invalid)?;
        Ok((manifest, authenticity))
    }

    /// Reads and validates a manifest in the repository's format (see
    /// [`Repo::read_manifest`] and [`Repo::read_packed_manifest`]).
    pub async fn read_any_manifest(&self, id: &ManifestId) -> Result<AnyManifest> {
        self.read_any_manifest_checked(id).await.map(|(m, _)| m)
    }

    /// [`Repo::read_any_manifest`], also saying what the signature check found.
    pub async fn read_any_manifest_checked(
        &self,
        id: &ManifestId,
    ) -> Result<(AnyManifest, Authenticity)> {
        match &self.descriptor {
            Descriptor::Chunks(_) => self
                .read_manifest_checked(id)
                .await
                .map(|(m, a)| (AnyManifest::Chunks(m), a)),
            Descriptor::Packs(_) => self
                .read_packed_manifest_checked(id)
                .await
                .map(|(m, a)| (AnyManifest::Packs(m), a)),
        }
    }

    /// Whether the manifest `id` reads back valid (and, under `signing.require`, verified),
    /// in whichever format the repository uses.
    async fn check_manifest(&self, id: &ManifestId) -> Result<()> {
        self.read_any_manifest(id).await.map(drop)
    }

    /// Reads a manifest object and checks its envelope's signature, before anything of it
    /// is parsed. Returns its key and payload.
    async fn open_manifest(&self, id: &ManifestId) -> Result<(Path, Vec<u8>, Authenticity)> {
        let key = self.manifest_key(id);
        let bytes = get_limited(&self.store, &key, MAX_MANIFEST_BYTES).await?;
        let opened = match self.keyring.open(&bytes, PayloadType::Manifest) {
            Ok(opened) => opened,
            Err(OpenError::Refused(refusal)) => {
                return Err(Error::Unauthenticated {
                    object: format!("manifest {key}"),
                    refusal,
                })
            }
            Err(OpenError::Invalid(reason)) => {
                return Err(Error::InvalidManifest {
                    key: key.to_string(),
                    reason: format!("not a manifest: {reason}"),
                })
            }
        };
        if let Authenticity::Refused(refusal) = &opened.authenticity {
            tracing::warn!(manifest = %id, reason = %refusal.reason, "manifest is not authentic ({refusal}); used anyway because signing.require is off");
        }
        Ok((key, opened.payload, opened.authenticity))
    }

    /// A manifest must be this cluster's and stored under its own name.
    fn check_names(
        &self,
        key: &Path,
        id: &ManifestId,
        cluster_id: &str,
        named: ManifestId,
    ) -> Result<()> {
        if cluster_id != self.descriptor.cluster_id() {
            return Err(Error::ClusterMismatch {
                location: key.to_string(),
                expected: self.descriptor.cluster_id().to_owned(),
                found: cluster_id.to_owned(),
            });
        }
        if named != *id {
            // A distinct error: a genuine manifest copied under another name (a replay) is
            // garbage to GC, while an invalid one stops it.
            return Err(Error::MisnamedManifest {
                key: key.to_string(),
                found: format!(
                    "index {}, term {}, sha256 {}…",
                    named.index, named.term, named.sha_prefix
                ),
            });
        }
        Ok(())
    }

    /// Commits a manifest, sealed in its envelope (signed when this node has a key).
    /// Create-only: an existing manifest of the same name is the same snapshot (same log id
    /// and content hash) and is left untouched; when signatures are checked, it is replaced
    /// unless it verifies, so a forgery planted under a predictable name cannot stand in for
    /// the real one.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<ManifestId> {
        let payload = serde_json::to_vec(manifest).expect("Manifest serializes");
        self.put_sealed_manifest(ManifestId::of(manifest), payload)
            .await
    }

    /// [`Repo::put_manifest`] for a format-2 manifest of a pack repository.
    pub async fn put_packed_manifest(&self, manifest: &v2::Manifest) -> Result<ManifestId> {
        let payload = serde_json::to_vec(manifest).expect("Manifest serializes");
        self.put_sealed_manifest(ManifestId::of_packed(manifest), payload)
            .await
    }

    async fn put_sealed_manifest(&self, id: ManifestId, payload: Vec<u8>) -> Result<ManifestId> {
        let key = self.manifest_key(&id);
        let body = Bytes::from(self.keyring.seal(PayloadType::Manifest, payload));
        match put_create(&self.store, &key, body.clone()).await {
            Ok(()) => Ok(id),
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) if !self.keyring.checks() => Ok(id),
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => {
                let existing = match self.open_manifest(&id).await {
                    Ok((_, _, Authenticity::Verified(_))) => match self.check_manifest(&id).await {
                        Ok(()) => return Ok(id),
                        Err(e) => Err(e),
                    },
                    Ok((_, _, auth)) => Ok(auth),
                    Err(e) => Err(e),
                };
                let found = match existing {
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => e.to_string(),
                    Ok(auth) => auth.status().to_owned(),
                };
                tracing::warn!(manifest = %id, %found, "replacing a manifest of the same name that does not verify");
                self.store
                    .backend
                    .put(&key, PutPayload::from_bytes(body))
                    .await
                    .map(|_| id)
                    .map_err(store_err("put", &key))
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a manifest (GC and tests).
    pub async fn delete_manifest(&self, id: &ManifestId) -> Result<()> {
        delete_if_present(&self.store, &self.manifest_key(id)).await
    }

    /// Every chunk in the store with its stored size: one listing instead of a `head` per
    /// chunk (a listing page names a thousand chunks). Objects under `chunks/` that are not
    /// chunk keys are skipped.
    pub async fn list_chunks(&self) -> Result<std::collections::HashMap<Digest, StoredChunk>> {
        let prefix = self.store.key(CHUNKS);
        let mut stream = self.store.backend.list(Some(&prefix));
        let mut chunks = std::collections::HashMap::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(store_err("list", &prefix))?
        {
            let parsed = meta
                .location
                .filename()
                .and_then(|name| name.parse::<Digest>().ok())
                .filter(|d| self.chunk_key(d) == meta.location);
            match parsed {
                Some(d) => {
                    chunks.insert(
                        d,
                        StoredChunk {
                            size: meta.size,
                            last_modified: meta.last_modified,
                        },
                    );
                }
                None => {
                    tracing::debug!(key = %meta.location, "ignoring an object under chunks/ that is not a chunk")
                }
            }
        }
        Ok(chunks)
    }

    /// Every pack in the store with its size and the store's timestamp: one listing (a page
    /// names a thousand packs). Objects under `packs/` that are not pack keys (a local
    /// store's staging files of an unfinished upload, say) are skipped.
    pub async fn list_packs(&self) -> Result<std::collections::HashMap<PackId, StoredPack>> {
        let prefix = self.store.key(PACKS);
        let mut stream = self.store.backend.list(Some(&prefix));
        let mut packs = std::collections::HashMap::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(store_err("list", &prefix))?
        {
            let parsed = meta
                .location
                .filename()
                .and_then(|name| name.parse::<PackId>().ok())
                .filter(|id| self.pack_key(id) == meta.location);
            match parsed {
                Some(id) => {
                    packs.insert(
                        id,
                        StoredPack {
                            size: meta.size,
                            last_modified: meta.last_modified,
                        },
                    );
                }
                None => {
                    tracing::debug!(key = %meta.location, "ignoring an object under packs/ that is not a pack")
                }
            }
        }
        Ok(packs)
    }

    /// A writer for a new pack (see [`crate::pack::upload`]); nothing is visible in the
    /// store until it is finished.
    pub fn new_pack(&self, kind: PackKind, budget: PartBudget) -> PackWriter {
        let id = PackId::random();
        PackWriter::new(
            self.store.backend.clone(),
            self.pack_key(&id),
            id,
            kind,
            budget,
        )
    }

    /// Bytes `range` of pack `id`, which the caller's manifest (or listing) says is `size`
    /// bytes long. A pack of another size is corrupt (it is not the one named); a body that
    /// ends early is the connection's fault, an error to retry.
    pub async fn read_pack(&self, id: &PackId, size: u64, range: Range<u64>) -> Result<Bytes> {
        let key = self.pack_key(id);
        if range.start >= range.end || range.end > size {
            return Err(Error::PackCorrupt {
                pack: id.to_hex(),
                reason: format!("bytes {range:?} are not within its {size} bytes"),
            });
        }
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let result = match self.store.backend.get_opts(&key, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::PackMissing { pack: id.to_hex() })
            }
            Err(e) => return Err(store_err("get", &key)(e)),
        };
        if result.meta.size != size {
            return Err(Error::PackCorrupt {
                pack: id.to_hex(),
                reason: format!(
                    "the store holds {} bytes under its name, the manifest says {size}",
                    result.meta.size
                ),
            });
        }
        let wanted = range.end - range.start;
        let bytes = result.bytes().await.map_err(store_err("get", &key))?;
        if bytes.len() as u64 != wanted {
            return Err(store_err("get", &key)(object_store::Error::Generic {
                store: "snaprelay",
                source: format!(
                    "the response to a request for {wanted} bytes held {}",
                    bytes.len()
                )
                .into(),
            }));
        }
        Ok(bytes)
    }

    /// A pack's trailer, checked (its digest, and that its blobs fill the pack), for a pack
    /// of `size` bytes. One ranged read of the pack's last 64 KiB usually covers it.
    pub async fn read_trailer(&self, id: &PackId, size: u64) -> Result<Trailer> {
        let corrupt = |reason: String| Error::PackCorrupt {
            pack: id.to_hex(),
            reason,
        };
        if size < FOOTER_LEN {
            return Err(corrupt(Trailer::footer(&[], size).unwrap_err()));
        }
        let tail_len = size.min(64 << 10);
        let tail = self.read_pack(id, size, size - tail_len..size).await?;
        let footer = &tail[tail.len() - FOOTER_LEN as usize..];
        let trailer_len = Trailer::footer(footer, size).map_err(corrupt)?;
        let start = size - FOOTER_LEN - trailer_len;
        let trailer = match start >= size - tail_len {
            true => {
                tail.slice((start - (size - tail_len)) as usize..tail.len() - FOOTER_LEN as usize)
            }
            false => self.read_pack(id, size, start..size - FOOTER_LEN).await?,
        };
        Trailer::decode(&trailer, size).map_err(corrupt)
    }

    /// Block `index` of `manifest` (validated), read from its tree pack and checked against
    /// the manifest: its id, its logical id, its totals, the packs it uses, and the tree
    /// rule (every block but the last ends where the rule ends one).
    pub async fn read_block(
        &self,
        descriptor: &crate::manifest_v2::Repository,
        manifest: &crate::manifest_v2::Manifest,
        index: usize,
    ) -> Result<Block> {
        let b = &manifest.blocks[index];
        let pack = &manifest.packs[b.pack as usize];
        let stored = self
            .read_pack(
                &pack.id,
                pack.size,
                b.offset as u64..b.offset as u64 + b.stored_len as u64,
            )
            .await?;
        checked_block(descriptor, manifest, index, &stored)
    }

    /// Deletes a pack (GC and tests). Missing is fine.
    pub async fn delete_pack(&self, id: &PackId) -> Result<()> {
        delete_if_present(&self.store, &self.pack_key(id)).await
    }

    /// Writes raw bytes where a pack lives: for tests that plant damage.
    #[doc(hidden)]
    pub async fn put_raw_pack(&self, id: &PackId, body: Bytes) -> Result<()> {
        put_raw(&self.store, &self.pack_key(id), body).await
    }

    /// Writes (or rewrites) the lease object `name`; `body` says who holds it.
    pub async fn put_lease(&self, name: &str, body: Bytes) -> Result<()> {
        debug_assert!(LeaseKind::of_name(name).is_some() && body.len() <= MAX_LEASE_BYTES);
        let key = self.lease_key(name);
        self.store
            .backend
            .put(&key, PutPayload::from_bytes(body))
            .await
            .map(|_| ())
            .map_err(store_err("put", &key))
    }

    /// Every lease object, live or stale. Other objects under `leases/` are skipped.
    pub async fn list_leases(&self) -> Result<Vec<LeaseEntry>> {
        let prefix = self.store.key(LEASES);
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .backend
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err("list", &prefix))?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?.to_owned();
                let kind = LeaseKind::of_name(&name)
                    .filter(|_| self.lease_key(&name) == meta.location);
                if kind.is_none() {
                    tracing::debug!(key = %meta.location, "ignoring an object under leases/ that is not a lease");
                }
                Some(LeaseEntry {
                    name,
                    kind: kind?,
                    last_modified: meta.last_modified,
                })
            })
            .collect())
    }

    /// Reads a lease object's body (what its holder wrote about itself), for messages.
    pub async fn read_lease(&self, name: &str) -> Result<Bytes> {
        let key = self.lease_key(name);
        get_limited(&self.store, &key, MAX_LEASE_BYTES as u64).await
    }

    /// Deletes a lease object. Missing is fine.
    pub async fn delete_lease(&self, name: &str) -> Result<()> {
        delete_if_present(&self.store, &self.lease_key(name)).await
    }

    /// Whether the chunk exists, and its stored size.
    pub async fn chunk_size(&self, sha: &Digest) -> Result<Option<u64>> {
        let key = self.chunk_key(sha);
        match self.store.backend.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("head", &key)(e)),
        }
    }

    /// Uploads a chunk. Chunks are content-addressed, so an overwrite writes the same bytes.
    pub async fn put_chunk(&self, sha: &Digest, data: Bytes) -> Result<()> {
        let key = self.chunk_key(sha);
        self.store
            .backend
            .put(&key, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(store_err("put", &key))
    }

    /// Downloads a chunk and verifies its length and sha256 (hashing on a blocking thread).
    /// Never returns bytes that do not hash to `sha`.
    pub async fn get_chunk(&self, sha: &Digest, expected_len: u64) -> Result<Bytes> {
        let key = self.chunk_key(sha);
        let corrupt = |reason: String| Error::ChunkCorrupt {
            sha256: sha.to_hex(),
            reason,
        };
        let bytes = match get_limited(&self.store, &key, expected_len).await {
            Ok(bytes) => bytes,
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {
                return Err(Error::ChunkMissing {
                    sha256: sha.to_hex(),
                })
            }
            Err(Error::ObjectTooLarge { size, limit, .. }) => {
                return Err(corrupt(format!(
                    "stored object is {size} bytes, the manifest says {limit}"
                )))
            }
            Err(e) => return Err(e),
        };
        if bytes.len() as u64 != expected_len {
            return Err(corrupt(format!(
                "stored object is {} bytes, the manifest says {expected_len}",
                bytes.len()
            )));
        }
        let (actual, bytes) = tokio::task::spawn_blocking(move || (Digest::of(&bytes), bytes))
            .await
            .map_err(|e| Error::io("hashing task", std::io::Error::other(e)))?;
        if actual != *sha {
            return Err(corrupt(format!("its content hashes to {actual}")));
        }
        Ok(bytes)
    }

    /// Deletes a chunk (GC and tests). Missing is fine.
    pub async fn delete_chunk(&self, sha: &Digest) -> Result<()> {
        delete_if_present(&self.store, &self.chunk_key(sha)).await
    }

    /// Writes (or rewrites) the advisory in-progress object of the publish of (index, term).
    pub async fn put_inprogress(&self, index: u64, term: u64, body: Bytes) -> Result<()> {
        put_raw(&self.store, &self.inprogress_key(index, term), body).await
    }

    /// Deletes the in-progress object of (index, term); one already gone is fine.
    pub async fn delete_inprogress(&self, index: u64, term: u64) -> Result<()> {
        delete_if_present(&self.store, &self.inprogress_key(index, term)).await
    }

    /// One conditional GET of the in-progress object of (index, term): "not modified" while
    /// its version is still `seen` (the ETag of an earlier read), its body otherwise. A
    /// body over `limit` bytes is refused without being read ([`Error::ObjectTooLarge`]).
    pub async fn read_inprogress(
        &self,
        index: u64,
        term: u64,
        seen: Option<&str>,
        limit: u64,
    ) -> Result<InProgressRead> {
        let key = self.inprogress_key(index, term);
        let options = object_store::GetOptions {
            if_none_match: seen.map(str::to_owned),
            ..Default::default()
        };
        let result = match self.store.backend.get_opts(&key, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotModified { .. }) => return Ok(InProgressRead::NotModified),
            Err(object_store::Error::NotFound { .. }) => return Ok(InProgressRead::Missing),
            Err(e) => return Err(store_err("get", &key)(e)),
        };
        let e_tag = result.meta.e_tag.clone();
        let size = result.meta.size;
        if size > limit {
            return Err(Error::ObjectTooLarge {
                key: key.to_string(),
                size,
                limit,
            });
        }
        let bytes = result.bytes().await.map_err(store_err("get", &key))?;
        if bytes.len() as u64 > limit {
            return Err(Error::ObjectTooLarge {
                key: key.to_string(),
                size: bytes.len() as u64,
                limit,
            });
        }
        Ok(InProgressRead::Body { bytes, e_tag })
    }

    /// The in-progress object's key, for messages.
    pub fn inprogress_location(&self, index: u64, term: u64) -> String {
        self.inprogress_key(index, term).to_string()
    }

    /// Writes raw bytes where a manifest or chunk lives: for tests that plant damage.
    #[doc(hidden)]
    pub async fn put_raw_manifest(&self, id: &ManifestId, body: Bytes) -> Result<()> {
        put_raw(&self.store, &self.manifest_key(id), body).await
    }
}

/// What a read of an in-progress object found.
#[derive(Debug)]
pub enum InProgressRead {
    /// The same version as the ETag given.
    NotModified,
    /// No such object (the publish ended, or never announced itself).
    Missing,
    /// Its body, and its ETag when the store gives one.
    Body { bytes: Bytes, e_tag: Option<String> },
}

/// Deletes `key`; one already gone is fine.
async fn delete_if_present(store: &Store, key: &Path) -> Result<()> {
    match store.backend.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_err("delete", key)(e)),
    }
}

/// Overwrites `key` with `body` (tests that plant damage).
async fn put_raw(store: &Store, key: &Path, body: Bytes) -> Result<()> {
    store
        .backend
        .put(key, body.into())
        .await
        .map(|_| ())
        .map_err(store_err("put", key))
}

async fn put_create(store: &Store, key: &Path, body: Bytes) -> Result<()> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match store.backend.put_opts(key, body.clone().into(), opts).await {
        Ok(_) => Ok(()),
        // A store without conditional writes still gets the object; the design does not
        // depend on create-only semantics (keys are content-derived), it only prefers them.
        Err(object_store::Error::NotImplemented { .. }) => store
            .backend
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(store_err("put", key)),
        Err(e) => Err(store_err("put", key)(e)),
    }
}

fn parse_descriptor(payload: &[u8], location: &str) -> Result<Descriptor> {
    let invalid = |reason: String| Error::InvalidRepository {
        location: location.to_owned(),
        reason,
    };
    // Format and features first, so that a newer build's repository is refused by name.
    Descriptor::parse(payload).map_err(invalid)
}

/// Reads a whole object of at most `limit` bytes. A larger object is refused after a `head`
/// (and again if the body grows past the limit), so a hostile store cannot make us allocate.
async fn get_limited(store: &Store, key: &Path, limit: u64) -> Result<Bytes> {
    let result = store
        .backend
        .get(key)
        .await
        .map_err(store_err("get", key))?;
    let size = result.meta.size;
    let too_large = |size: u64| Error::ObjectTooLarge {
        key: key.to_string(),
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let expected = result.range.end - result.range.start;
    let bytes = result.bytes().await.map_err(store_err("get", key))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    // A body that ends early is the connection's fault, not the object's: an error to
    // retry, never a "corrupt chunk" or "invalid manifest".
    if (bytes.len() as u64) < expected {
        return Err(store_err("get", key)(object_store::Error::Generic {
            store: "snaprelay",
            source: format!(
                "the response ended after {} of {expected} bytes",
                bytes.len()
            )
            .into(),
        }));
    }
    Ok(bytes)
}

/// Block `index` of `manifest` (validated against `descriptor`) from its stored bytes,
/// decoded and checked against the manifest; damage is the block's and its pack's fault.
pub fn checked_block(
    descriptor: &crate::manifest_v2::Repository,
    manifest: &crate::manifest_v2::Manifest,
    index: usize,
    stored: &[u8],
) -> Result<Block> {
    let b = &manifest.blocks[index];
    manifest
        .decode_block(descriptor, index, stored)
        .map_err(|reason| Error::BlockCorrupt {
            block: b.id.to_hex(),
            pack: manifest.packs[b.pack as usize].id.to_hex(),
            reason,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        let id = ManifestId {
            index: 42,
            term: 3,
            sha_prefix: "0123456789abcdef".into(),
        };
        let name = id.file_name();
        assert_eq!(
            name,
            "00000000000000000042-00000000000000000003-0123456789abcdef.json"
        );
        assert_eq!(ManifestId::parse(&name), Some(id));
        for bad in [
            "x.json",
            "00000000000000000042-00000000000000000003-0123456789abcdef",
            "00000000000000000042-00000000000000000003-0123456789ABCDEF.json",
            "0000000000000000042-00000000000000000003-0123456789abcdef.json",
            "00000000000000000042-00000000000000000003-0123456789abcdef-x.json",
            "99999999999999999999-00000000000000000003-0123456789abcdef.json",
        ] {
            assert_eq!(ManifestId::parse(bad), None, "{bad}");
        }
        // Key order is log-id order.
        let a =
            ManifestId::parse("00000000000000000009-00000000000000000005-0000000000000000.json")
                .unwrap();
        let b =
            ManifestId::parse("00000000000000000010-00000000000000000001-0000000000000000.json")
                .unwrap();
        assert!(a < b && a.file_name() < b.file_name());
    }
    /// A format-2 snapshot's packs, written through [`Repo::new_pack`] and read back: the
    /// trailer, a block checked against its manifest, its chunks; and each kind of damage
    /// reported as the pack's or the block's fault, never returned as data.
    #[tokio::test]
    async fn packs_read_back_checked() {
        use crate::manifest_v2::{self as v2, BlockRef, PackRef};
        use crate::pack::{decode_blob, Encoder, Encoding};
        use crate::store::{StoreSettings, StoreUrl};
        use crate::tree::{BlockBuilder, Location};

        let store = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        let repo = Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap();
        let descriptor = v2::Repository::new("c", v2::NewRepository::default());
        let budget = PartBudget::new(2, 1 << 20);

        // Three chunks (one compressible) in a data pack.
        let chunks: Vec<Vec<u8>> = vec![
            vec![7; 5000],
            (0..6000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            b"tail".to_vec(),
        ];
        let mut data = repo.new_pack(PackKind::Data, budget.clone());
        let mut encoder = Encoder::new(descriptor.compression());
        let mut builder = BlockBuilder::default();
        for c in &chunks {
            let (stored, encoding) = encoder.encode(Bytes::from(c.clone()));
            let stored_len = stored.len() as u32;
            let offset = data
                .append(Digest::of(c), encoding, c.len() as u32, stored)
                .await
                .unwrap();
            let at = Location {
                pack: data.id(),
                offset,
                stored_len,
                encoding,
            };
            builder.push(Digest::of(c), c.len() as u32, at);
        }
        let data = data.finish().await.unwrap();
        let block = builder.finish();
        assert_eq!(
            block.chunks[0].encoding,
            Encoding::Zstd,
            "a run of one byte compresses"
        );

        // The block in a tree pack, and the manifest naming both.
        let plain = Bytes::from(block.encode());
        let mut tree = repo.new_pack(PackKind::Tree, budget);
        let block_len = plain.len() as u32;
        let offset = tree
            .append(Digest::of(&plain), Encoding::Raw, block_len, plain.clone())
            .await
            .unwrap();
        let tree = tree.finish().await.unwrap();
        let used: u64 = block.chunks.iter().map(|c| c.stored_len as u64).sum();
        let manifest = v2::Manifest {
            format: v2::MANIFEST_FORMAT,
            cluster_id: "c".into(),
            incarnation: descriptor.incarnation.clone(),
            last_log_index: 1,
            last_log_term: 1,
            raft_meta: serde_json::json!({}),
            size: chunks.iter().map(|c| c.len() as u64).sum(),
            sha256: Digest::of(&chunks.concat()),
            chunks: 3,
            packs: vec![
                PackRef {
                    id: data.id,
                    kind: PackKind::Data,
                    size: data.size,
                    used,
                },
                PackRef {
                    id: tree.id,
                    kind: PackKind::Tree,
                    size: tree.size,
                    used: block_len as u64,
                },
            ],
            blocks: vec![BlockRef {
                id: Digest::of(&plain),
                logical: block.logical_id(),
                pack: 1,
                offset,
                stored_len: block_len,
                encoding: Encoding::Raw,
                chunks: 3,
                bytes: 11_004,
                uses: vec![(0, used)],
            }],
            created_at: Utc::now(),
            publisher: v2::Publisher {
                node_id: None,
                version: "test".into(),
            },
        };
        manifest.validate(&descriptor).unwrap();

        let trailer = repo.read_trailer(&data.id, data.size).await.unwrap();
        assert_eq!(trailer.blobs.len(), 3);
        let read = repo.read_block(&descriptor, &manifest, 0).await.unwrap();
        assert_eq!(read, block);
        let mut assembled = Vec::new();
        for (i, c) in read.chunks.iter().enumerate() {
            let at = read.location(i);
            let stored = repo
                .read_pack(
                    &at.pack,
                    data.size,
                    at.offset as u64..(at.offset + at.stored_len) as u64,
                )
                .await
                .unwrap();
            assembled
                .extend_from_slice(&decode_blob(&stored, c.encoding, c.plain_len, &c.id).unwrap());
        }
        assert_eq!(assembled, chunks.concat());
        let listed = repo.list_packs().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[&data.id].size, data.size);

        // A pack of another size than the manifest says is not the one named.
        let e = repo
            .read_pack(&data.id, data.size + 1, 0..10)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PackCorrupt { .. }), "{e}");
        // A flipped byte in the block: its id no longer matches.
        let body = repo
            .store
            .backend
            .get(&repo.pack_key(&tree.id))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut damaged = body.to_vec();
        damaged[offset as usize + 20] ^= 1;
        repo.put_raw_pack(&tree.id, damaged.clone().into())
            .await
            .unwrap();
        let e = repo
            .read_block(&descriptor, &manifest, 0)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::BlockCorrupt { .. }), "{e}");
        // A flipped byte in the trailer: its digest no longer matches.
        let last = damaged.len() - 20;
        damaged[last] ^= 1;
        repo.put_raw_pack(&tree.id, damaged.into()).await.unwrap();
        let e = repo.read_trailer(&tree.id, tree.size).await.unwrap_err();
        assert!(matches!(e, Error::PackCorrupt { .. }), "{e}");
        // A pack that is gone.
        repo.delete_pack(&data.id).await.unwrap();
        let e = repo.read_trailer(&data.id, data.size).await.unwrap_err();
        assert!(matches!(e, Error::PackMissing { .. }), "{e}");
        assert_eq!(repo.list_packs().await.unwrap().len(), 1);
    }
}
