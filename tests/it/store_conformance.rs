//! One conformance suite for the repository, run against every store: `memory://`, a
//! `file://` directory, and the real S3 server (SeaweedFS) that `scripts/test.sh` starts,
//! for a repository of chunk objects and for one of packs. Each check is a behaviour the
//! rest of snaprelay relies on.

use crate::support;

use std::collections::HashSet;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use snaprelay::chunk::{ChunkParams, Digest};
use snaprelay::error::Error;
use snaprelay::fetch::{Fetcher, ReuseSource};
use snaprelay::progress::Silent;
use snaprelay::publish::Publisher;
use snaprelay::repo::{ManifestId, Repo};
use snaprelay::snapdir::Snapshot;
use snaprelay::store::{Store, StoreSettings, StoreUrl};

fn small_params() -> ChunkParams {
    ChunkParams::new(16 << 10, 64 << 10, 256 << 10).unwrap()
}

async fn suite(settings: StoreSettings) {
    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&settings).unwrap();

    // An empty prefix is not a repository; opening it says so.
    match Repo::open(store.clone(), "alpha").await {
        Err(Error::NoRepository { .. }) => {}
        other => panic!("expected NoRepository, got {other:?}"),
    }

    // First push creates repository.json; later opens read its parameters, not the caller's.
    let repo = Repo::open_or_create(store.clone(), "alpha", small_params())
        .await
        .unwrap();
    assert_eq!(repo.params(), small_params());
    let again = Repo::open_or_create(store.clone(), "alpha", ChunkParams::default())
        .await
        .unwrap();
    assert_eq!(
        again.params(),
        small_params(),
        "repository.json pins the chunking"
    );

    // Another cluster's prefix is refused.
    match Repo::open(store.clone(), "beta").await {
        Err(e @ Error::ClusterMismatch { .. }) => {
            assert_eq!(e.class().exit_code(), 2);
            assert!(e.to_string().contains("\"alpha\""), "{e}");
        }
        other => panic!("expected ClusterMismatch, got {other:?}"),
    }

    // Chunks: absent, put, present with its size, verified get, idempotent overwrite.
    let body = Bytes::from_static(b"some chunk bytes");
    let sha = Digest::of(&body);
    assert_eq!(repo.chunk_size(&sha).await.unwrap(), None);
    assert!(matches!(
        repo.get_chunk(&sha, body.len() as u64).await,
        Err(Error::ChunkMissing { .. })
    ));
    repo.put_chunk(&sha, body.clone()).await.unwrap();
    repo.put_chunk(&sha, body.clone()).await.unwrap();
    assert_eq!(
        repo.chunk_size(&sha).await.unwrap(),
        Some(body.len() as u64)
    );
    assert_eq!(repo.get_chunk(&sha, body.len() as u64).await.unwrap(), body);
    // A chunk whose bytes do not match its key is never returned.
    let liar = Digest::of(b"other bytes");
    repo.put_chunk(&liar, body.clone()).await.unwrap();
    match repo.get_chunk(&liar, body.len() as u64).await {
        Err(e @ Error::ChunkCorrupt { .. }) => assert!(e.to_string().contains(&liar.to_hex())),
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    // A stored object longer than the manifest says is refused without reading it whole.
    assert!(matches!(
        repo.get_chunk(&sha, 3).await,
        Err(Error::ChunkCorrupt { .. })
    ));
    repo.delete_chunk(&liar).await.unwrap();
    repo.delete_chunk(&liar).await.unwrap();
    assert_eq!(repo.chunk_size(&liar).await.unwrap(), None);

    // Publish three snapshots out of order; listing returns them in log-id order.
    let snaps = work.path().join("snaps");
    let base = vec![7u8; 300 << 10];
    let mut varied = base.clone();
    varied.extend_from_slice(&[1u8; 100 << 10]);
    let mut reports = Vec::new();
    for (index, term, data) in [
        (12u64, 1u64, base.clone()),
        (5, 1, vec![3u8; 1000]),
        (30, 2, varied.clone()),
    ] {
        let meta = support::write_snapshot(&snaps, index, term, &data);
        let snapshot = Snapshot::open(&meta).unwrap();
        let report = Publisher::new(&repo, 4, Some(1), &Silent)
            .publish(&snapshot)
            .await
            .unwrap();
        assert!(!report.already_published);
        assert_eq!(report.size, data.len() as u64);
        reports.push(report);
    }
    // The third snapshot shares its first 300 KiB with the first: those chunks are not sent.
    assert!(
        reports[2].bytes_transferred < varied.len() as u64,
        "{:?}",
        reports[2]
    );

    let listed: Vec<(u64, u64)> = repo
        .list_manifests(None)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.id.index, e.id.term))
        .collect();
    assert_eq!(listed, vec![(5, 1), (12, 1), (30, 2)]);
    let after: Vec<u64> = repo
        .list_manifests(Some(12))
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.index)
        .collect();
    assert_eq!(after, vec![30], "listing after 12 skips 12 and older");
    assert_eq!(repo.newest_manifest(None).await.unwrap().unwrap().index, 30);
    assert_eq!(
        repo.newest_manifest(Some(30)).await.unwrap(),
        None,
        "nothing newer than 30"
    );
    assert_eq!(repo.find_manifest(12).await.unwrap().index, 12);
    assert!(repo.manifest_for(12, 1).await.unwrap().is_some());
    assert!(repo.manifest_for(12, 2).await.unwrap().is_none());
    assert!(matches!(
        repo.find_manifest(13).await,
        Err(Error::SnapshotNotFound { index: 13 })
    ));

    // Pushing a published log id again is a no-op.
    let meta = support::write_snapshot(&snaps, 12, 1, &base);
    let report = Publisher::new(&repo, 4, Some(1), &Silent)
        .publish(&Snapshot::open(&meta).unwrap())
        .await
        .unwrap();
    assert!(report.already_published);

    // Manifests are create-only: writing the same manifest again keeps the first.
    let id = repo.find_manifest(30).await.unwrap();
    let manifest = repo.read_manifest(&id).await.unwrap();
    let mut altered = manifest.clone();
    altered.publisher.node_id = Some(99);
    assert_eq!(repo.put_manifest(&altered).await.unwrap(), id);
    assert_eq!(
        repo.read_manifest(&id).await.unwrap().publisher.node_id,
        Some(1)
    );

    // Objects under manifests/ that are not manifest names are ignored by listing.
    store
        .backend
        .put(
            &store.key("manifests/README.txt"),
            Bytes::from_static(b"hello").into(),
        )
        .await
        .unwrap();
    assert_eq!(repo.list_manifests(None).await.unwrap().len(), 3);

    // Fetch: the file arrives whole, verified, in the directory contract.
    let target = work.path().join("pulled");
    let report = Fetcher::new(&repo, 4, &Silent)
        .fetch(&manifest, &target, &[])
        .await
        .unwrap();
    assert_eq!(std::fs::read(&report.data).unwrap(), varied);
    assert_eq!(report.chunks_transferred, manifest.chunks.len() as u64);
    let pulled = Snapshot::open(&report.meta).unwrap();
    assert_eq!(pulled.envelope.log_id(), (30, 2));
    assert_eq!(pulled.envelope.raft_meta, manifest.raft_meta);
    assert!(
        support::entries(&target)
            .iter()
            .all(|n| !n.starts_with('.')),
        "{:?}",
        support::entries(&target)
    );

    // Fetching again with the pulled file as a local source downloads nothing.
    let source = ReuseSource::from_manifest(report.data.clone(), &manifest);
    let again = Fetcher::new(&repo, 4, &Silent)
        .fetch(&manifest, &target, &[source])
        .await
        .unwrap();
    assert_eq!(again.chunks_transferred, 0);
    assert_eq!(again.bytes_reused, varied.len() as u64);
    assert_eq!(std::fs::read(&again.data).unwrap(), varied);

    // Every chunk a manifest names is in the store (the publish order guarantees it).
    let listed_chunks: HashSet<String> = store
        .backend
        .list(Some(&store.key("chunks")))
        .map_ok(|m| m.location.filename().unwrap().to_owned())
        .try_collect()
        .await
        .unwrap();
    for id in repo.list_manifests(None).await.unwrap() {
        for c in repo.read_manifest(&id.id).await.unwrap().chunks {
            assert!(
                listed_chunks.contains(&c.sha256.to_hex()),
                "{} lacks {}",
                id.id,
                c.sha256
            );
        }
    }

    // A manifest whose content does not match its name is refused.
    let wrong = ManifestId {
        index: 31,
        ..id.clone()
    };
    repo.put_raw_manifest(&wrong, serde_json::to_vec(&manifest).unwrap().into())
        .await
        .unwrap();
    match repo.read_manifest(&wrong).await {
        Err(e @ Error::MisnamedManifest { .. }) => {
            assert!(e.to_string().contains("not the one its name says"), "{e}")
        }
        other => panic!("expected MisnamedManifest, got {other:?}"),
    }
}

/// The same for a repository of packs: what publish, fetch, GC and verify rely on of each
/// store, ranged reads above all.
async fn pack_suite(settings: StoreSettings) {
    use snaprelay::fetch::PackedSource;
    use snaprelay::manifest_v2::NewRepository;
    use snaprelay::pack::PackId;

    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&settings).unwrap();
    let settings = NewRepository {
        chunking: small_params(),
        pack_size: 1 << 20,
        ..NewRepository::default()
    };
    let repo = Repo::open_or_create(store.clone(), "alpha", settings)
        .await
        .unwrap();
    assert!(repo.packs().is_some());
    assert_eq!(repo.params(), small_params());
    // Whatever a later caller asks new repositories to be, this one stays packs.
    let again = Repo::open_or_create(store.clone(), "alpha", ChunkParams::default())
        .await
        .unwrap();
    assert!(again.packs().is_some(), "repository.json pins the layout");
    assert_eq!(again.params(), small_params());

    // Raw packs: absent, put, ranged reads at either end and in the middle, of exactly the
    // bytes asked; another size than the caller's is a pack that is not the one named.
    let id = PackId::random();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let size = body.len() as u64;
    assert!(matches!(
        repo.read_pack(&id, size, 0..10).await,
        Err(Error::PackMissing { .. })
    ));
    repo.put_raw_pack(&id, Bytes::from(body.clone()))
        .await
        .unwrap();
    for range in [0..1, 0..size, 99_990..size, 40_000..60_001] {
        let got = repo.read_pack(&id, size, range.clone()).await.unwrap();
        assert_eq!(&got[..], &body[range.start as usize..range.end as usize]);
    }
    match repo.read_pack(&id, size + 1, 0..10).await {
        Err(e @ Error::PackCorrupt { .. }) => {
            assert!(e.to_string().contains("the store holds"), "{e}")
        }
        other => panic!("expected PackCorrupt, got {other:?}"),
    }
    assert!(matches!(
        repo.read_pack(&id, size, 10..size + 1).await,
        Err(Error::PackCorrupt { .. })
    ));
    // Not a pack: its trailer is refused.
    assert!(matches!(
        repo.read_trailer(&id, size).await,
        Err(Error::PackCorrupt { .. })
    ));
    // Listing names packs with their sizes, and passes over what is not a pack key.
    store
        .backend
        .put(
            &store.key("packs/README.txt"),
            Bytes::from_static(b"hello").into(),
        )
        .await
        .unwrap();
    let listed = repo.list_packs().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[&id].size, size);
    repo.delete_pack(&id).await.unwrap();
    repo.delete_pack(&id).await.unwrap();
    assert!(repo.list_packs().await.unwrap().is_empty());

    // Publish two snapshots, the second sharing all but 100 bytes of the first: it uploads
    // the chunk (or two) they changed.
    let snaps = work.path().join("snaps");
    let first = support::random_bytes(600 << 10, 1);
    let mut second = first.clone();
    second[300 << 10..(300 << 10) + 100].copy_from_slice(&[9; 100]);
    let mut reports = Vec::new();
    for (index, data) in [(10u64, &first), (20, &second)] {
        let meta = support::write_snapshot(&snaps, index, 1, data);
        let report = Publisher::new(&repo, 4, Some(1), &Silent)
            .publish(&Snapshot::open(&meta).unwrap())
            .await
            .unwrap();
        assert!(!report.already_published);
        reports.push(report);
    }
    assert!(
        (1..=2).contains(&reports[1].chunks_transferred) && reports[1].chunks_total >= 6,
        "{:?}",
        reports[1]
    );
    // Every pack a manifest names is in the store, at its size, with a trailer that reads.
    let listed = repo.list_packs().await.unwrap();
    let id = repo.find_manifest(20).await.unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    for p in &manifest.packs {
        assert_eq!(listed[&p.id].size, p.size, "{p:?}");
        let trailer = repo.read_trailer(&p.id, p.size).await.unwrap();
        assert_eq!(trailer.kind, p.kind);
    }
    // Manifests are create-only here too.
    let mut altered = manifest.clone();
    altered.publisher.node_id = Some(99);
    assert_eq!(repo.put_packed_manifest(&altered).await.unwrap(), id);
    assert_eq!(
        repo.read_packed_manifest(&id)
            .await
            .unwrap()
            .publisher
            .node_id,
        Some(1)
    );
    // The other format is refused by name.
    assert!(matches!(
        repo.read_manifest(&id).await,
        Err(Error::InvalidManifest { .. })
    ));

    // Fetch: the file arrives whole, then the second from the first as a local source,
    // downloading only the changed chunks.
    let target = work.path().join("pulled");
    let first_id = repo.find_manifest(10).await.unwrap();
    let m1 = repo.read_packed_manifest(&first_id).await.unwrap();
    let fetcher = Fetcher::new(&repo, 4, &Silent);
    let report = fetcher.fetch_packed(&m1, &target, None).await.unwrap();
    assert_eq!(std::fs::read(&report.data).unwrap(), first);
    let source = PackedSource {
        path: report.data.clone(),
        manifest: Some(m1.clone()),
    };
    let report = fetcher
        .fetch_packed(&manifest, &target, Some(&source))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&report.data).unwrap(), second);
    assert!((1..=2).contains(&report.chunks_transferred), "{report:?}");
    assert!(
        report.bytes_transferred <= 2 * (256 << 10)
            && report.bytes_reused * 2 > second.len() as u64,
        "{report:?}"
    );
    assert!(
        support::entries(&target)
            .iter()
            .all(|n| !n.starts_with('.')),
        "{:?}",
        support::entries(&target)
    );

    // GC keeping the newest deletes exactly the packs only the first used.
    let retention = gc::Retention {
        keep_last: 1,
        pinned: Vec::new(),
        grace: std::time::Duration::ZERO,
    };
    gc::collect(&repo, &retention, true, 4).await.unwrap();
    let left: HashSet<PackId> = repo.list_packs().await.unwrap().into_keys().collect();
    let used: HashSet<PackId> = manifest.pack_ids().collect();
    assert_eq!(left, used);
    let verified = snaprelay::verify::verify(&repo, &[id], 2, &Silent)
        .await
        .unwrap();
    assert!(verified.is_clean(), "{verified:?}");
}

#[tokio::test]
async fn conformance_of_packs_memory() {
    pack_suite(StoreSettings::for_url(StoreUrl::Memory)).await;
}

#[tokio::test]
async fn conformance_of_packs_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    pack_suite(StoreSettings::for_url(StoreUrl::parse(&url).unwrap())).await;
}

#[tokio::test]
async fn conformance_of_packs_s3() {
    let Some(s3) = support::s3("conformance_of_packs_s3") else {
        return;
    };
    pack_suite(s3.settings(&support::unique("conformance"))).await;
}

#[tokio::test]
async fn conformance_memory() {
    suite(StoreSettings::for_url(StoreUrl::Memory)).await;
}

#[tokio::test]
async fn conformance_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    suite(StoreSettings::for_url(StoreUrl::parse(&url).unwrap())).await;
}

#[tokio::test]
async fn conformance_s3() {
    let Some(s3) = support::s3("conformance_s3") else {
        return;
    };
    suite(s3.settings(&support::unique("conformance"))).await;
}

/// An unreachable S3 endpoint is reported as such (exit code 3), quickly.
#[tokio::test]
async fn unreachable_store_is_classified() {
    let mut settings = StoreSettings::for_url(StoreUrl::parse("s3://nobody-home/x").unwrap());
    // Port 9 (discard) on loopback: nothing listens there.
    settings.s3.endpoint = Some("http://127.0.0.1:9".into());
    settings.s3.allow_http = true;
    settings.s3.access_key_id = Some("k".into());
    settings.s3.secret_access_key = Some(snaprelay::config::Secret::new("s"));
    settings.max_retries = 0;
    let store = Store::open(&settings).unwrap();
    let err = Repo::open(store, "alpha").await.unwrap_err();
    assert_eq!(err.class().exit_code(), 3, "{err}");
    assert!(err.is_transient());
}

// ---------------------------------------------------------------------------------------
// The same flows on a store that misbehaves (support::faults): errors before and after an
// operation took effect, timeouts, latency, truncated bodies, disconnects mid-body and
// mid-listing, on every kind of operation, seeded, in a repository of chunk objects and in
// one of packs. After each run: no manifest names a missing or damaged chunk (or pack), a
// pull either fails with an error that says the store failed (never "corrupt") and leaves
// nothing at the snapshot's final names, or produces a file whose sha256 is the
// manifest's, and verify either fails the same way or reports the store as it is.

use std::sync::Arc;
use std::time::Duration;

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::ObjectStore;
use snaprelay::gc::{self, Retention};
use support::faults::{FaultyStore, Plan};
use support::Layout;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    File,
}

/// The three snapshots of a fault run: the second and third reuse most of the first.
fn fault_data(index: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let random = |seed: u64, len: usize| {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    };
    let mut data = random(1, 96 << 10);
    if index > 1 {
        data[..32 << 10].copy_from_slice(&random(index, 32 << 10));
    }
    data
}

fn store_over(backend: Arc<dyn ObjectStore>) -> Store {
    Store {
        backend,
        prefix: object_store::path::Path::default(),
        url: StoreUrl::Memory,
    }
}

/// What happened across a suite's runs, to show the faults bite.
#[derive(Debug, Default)]
struct Tally {
    faults: usize,
    failed: std::collections::BTreeMap<&'static str, usize>,
    pulled: usize,
}

/// One seeded run; returns what broke, if anything.
async fn fault_run(kind: Backend, layout: Layout, seed: u64, tally: &mut Tally) -> Vec<String> {
    let work = tempfile::tempdir().unwrap();
    let plain: Arc<dyn ObjectStore> = match kind {
        Backend::Memory => Arc::new(InMemory::new()),
        Backend::File => {
            let root = work.path().join("store");
            std::fs::create_dir_all(&root).unwrap();
            Arc::new(LocalFileSystem::new_with_prefix(&root).unwrap())
        }
    };
    let params = small_params();
    let snaps = work.path().join("snaps");
    let metas: Vec<_> = (1..=3)
        .map(|i| support::write_snapshot(&snaps, i, 1, &fault_data(i)))
        .collect();
    let repo = match layout {
        Layout::Chunks => Repo::open_or_create(store_over(plain.clone()), "alpha", params).await,
        Layout::Packs => {
            // Packs of a MiB (the least), so that three snapshots of 96 KiB are a few.
            let settings = snaprelay::manifest_v2::NewRepository {
                chunking: params,
                pack_size: 1 << 20,
                ..Default::default()
            };
            Repo::open_or_create(store_over(plain.clone()), "alpha", settings).await
        }
    }
    .unwrap();
    Publisher::new(&repo, 2, Some(1), &Silent)
        .publish(&Snapshot::open(&metas[0]).unwrap())
        .await
        .unwrap();

    let faulty = FaultyStore::new(
        plain.clone(),
        Plan {
            seed,
            rate: 0.2,
            max_faults: 8,
            // Real time (the publish and pull pipelines have blocking threads waiting on
            // the async side, which a paused clock cannot advance past): short.
            timeout: Duration::from_millis(200),
            max_latency: Duration::from_millis(50),
        },
    );
    let mut broke = Vec::new();
    let mut failed = Vec::new();
    let mut expect_transient = |broke: &mut Vec<String>, what: &'static str, e: &Error| {
        failed.push(what);
        if !e.is_transient() || e.to_string().is_empty() {
            broke.push(format!("{what} failed with a non-transient error: {e}"));
        }
    };
    let frepo = match Repo::open(store_over(Arc::new(faulty.clone())), "alpha").await {
        Ok(r) => r,
        Err(e) => {
            expect_transient(&mut broke, "opening", &e);
            Repo::open(store_over(Arc::new(faulty.clone())), "alpha")
                .await
                .unwrap_or_else(|_| repo.clone())
        }
    };

    // A publish, then a publish racing the most aggressive GC.
    let publish = |i: usize| {
        let frepo = frepo.clone();
        let meta = metas[i].clone();
        async move {
            Publisher::new(&frepo, 2, Some(1), &Silent)
                .publish(&Snapshot::open(&meta).unwrap())
                .await
        }
    };
    if let Err(e) = publish(1).await {
        expect_transient(&mut broke, "a publish", &e);
    }
    let retention = Retention {
        keep_last: 1,
        pinned: Vec::new(),
        grace: Duration::ZERO,
    };
    let (published, collected) = tokio::join!(publish(2), gc::collect(&frepo, &retention, true, 2));
    if let Err(e) = published {
        expect_transient(&mut broke, "a publish racing a GC", &e);
    }
    if let Err(e) = collected {
        expect_transient(&mut broke, "a GC", &e);
    }

    // A pull into an empty directory.
    let target = work.path().join("pulled");
    let pulled = async {
        let id = frepo
            .newest_manifest(None)
            .await?
            .ok_or(Error::NoSnapshots)?;
        let fetcher = Fetcher::new(&frepo, 2, &Silent);
        let (manifest, report) = match frepo.read_any_manifest(&id).await? {
            snaprelay::repo::AnyManifest::Chunks(m) => {
                let report = fetcher.fetch(&m, &target, &[]).await?;
                (snaprelay::repo::AnyManifest::Chunks(m), report)
            }
            snaprelay::repo::AnyManifest::Packs(m) => {
                let report = fetcher.fetch_packed(&m, &target, None).await?;
                (snaprelay::repo::AnyManifest::Packs(m), report)
            }
        };
        Ok::<_, Error>((manifest, report))
    }
    .await;
    match pulled {
        Ok((manifest, report)) => {
            tally.pulled += 1;
            let sha = support::sha256_file(&report.data);
            if sha != manifest.sha256().to_hex() {
                broke.push(format!("pulled {} hashes to {sha}", report.data.display()));
            }
            if std::fs::read(&report.data).unwrap() != fault_data(manifest.last_log_index()) {
                broke.push("the pulled file is not the published snapshot".into());
            }
        }
        Err(e) => {
            expect_transient(&mut broke, "a pull", &e);
            let finals: Vec<String> = support::entries(&target)
                .into_iter()
                .filter(|n| !n.starts_with('.'))
                .collect();
            if !finals.is_empty() {
                broke.push(format!("a failed pull left {finals:?} in the target"));
            }
        }
    }

    // Verify through the faults: an error, or the truth.
    let ids: Vec<ManifestId> = repo
        .list_manifests(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    match snaprelay::verify::verify(&frepo, &ids, 2, &Silent).await {
        Ok(report) if report.is_clean() => {}
        Ok(report) => broke.push(format!(
            "verify reported damage that is not there: {report:?}"
        )),
        Err(e) => expect_transient(&mut broke, "verify", &e),
    }

    for what in failed {
        *tally.failed.entry(what).or_default() += 1;
    }
    tally.faults += faulty.log().len();
    // The store itself: every manifest complete, every chunk intact.
    let truth = snaprelay::verify::verify(&repo, &ids, 2, &Silent)
        .await
        .unwrap();
    if !truth.is_clean() {
        broke.push(format!("the store is damaged: {truth:?}"));
    }
    if !broke.is_empty() {
        broke.push(format!("faults injected: {:?}", faulty.log()));
    }
    broke
}

async fn fault_suite(kind: Backend, layout: Layout, seeds: std::ops::Range<u64>) {
    let mut failed = Vec::new();
    let mut tally = Tally::default();
    let runs = seeds.end - seeds.start;
    for seed in seeds {
        let broke = fault_run(kind, layout, seed, &mut tally).await;
        if !broke.is_empty() {
            failed.push(format!("seed {seed}: {}", broke.join("; ")));
        }
    }
    eprintln!("{kind:?} {layout:?}: {runs} fault runs, {tally:?}");
    assert!(
        tally.faults > runs as usize && tally.pulled > 0 && !tally.failed.is_empty(),
        "the faults did not bite: {tally:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {runs} fault runs on {kind:?} {layout:?} broke an invariant:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[tokio::test]
async fn flows_keep_their_invariants_under_store_faults_memory() {
    fault_suite(Backend::Memory, Layout::Chunks, 0..60).await;
}

#[tokio::test]
async fn flows_keep_their_invariants_under_store_faults_file() {
    fault_suite(Backend::File, Layout::Chunks, 1000..1030).await;
}

#[tokio::test]
async fn flows_of_packs_keep_their_invariants_under_store_faults_memory() {
    fault_suite(Backend::Memory, Layout::Packs, 0..60).await;
}

#[tokio::test]
async fn flows_of_packs_keep_their_invariants_under_store_faults_file() {
    fault_suite(Backend::File, Layout::Packs, 1000..1030).await;
}
