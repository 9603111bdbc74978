//! Streaming propagation, on real files and (with `SNAPRELAY_TEST_S3_REQUIRED`) the real S3
//! server: a streaming publish announces the chunks it stored in its in-progress object; a
//! follower's prefetch fetches them into the staging file of that snapshot's fetch while the
//! upload runs, and the fetch after the manifest finds them in place. The publisher's
//! manifest write (and, for a publisher that "dies", its deletes of the in-progress object)
//! is held at a gate the test opens ([`GateStore`]), so each scenario sees the store exactly
//! between "every chunk stored" and "manifest written". Forged in-progress objects are
//! refused, cost nothing beyond their own chunks, and never change what is adopted.

use crate::support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use snaprelay::chunk::{ChunkParams, Digest};
use snaprelay::fetch::Fetcher;
use snaprelay::inprogress::{InProgress, Span, INPROGRESS_FORMAT, MAX_BODY};
use snaprelay::metrics::Metrics;
use snaprelay::prefetch::{Ended, Prefetch, PrefetchReport};
use snaprelay::progress::Silent;
use snaprelay::publish::{PublishReport, Publisher};
use snaprelay::repo::Repo;
use snaprelay::snapdir::{self, Snapshot};
use snaprelay::store::{Store, StoreSettings, StoreUrl};
use support::cluster::{Cluster, StoreSection};
use support::gate::GateStore;
use support::http_gate::HttpGate;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "stream";

fn params() -> ChunkParams {
    ChunkParams::new(16 << 10, 64 << 10, 256 << 10).unwrap()
}

/// The S3 server's store under a fresh prefix when there is one, else a file:// store.
pub(crate) fn store(test: &str, work: &Path) -> Store {
    let settings = match support::s3(test) {
        Some(s3) => s3.settings(&support::unique("stream")),
        None => StoreSettings::for_url(
            StoreUrl::parse(&format!("file://{}", work.join("store").display())).unwrap(),
        ),
    };
    Store::open(&settings).unwrap()
}

/// The same store seen through a gate.
pub(crate) fn gated(store: &Store, gate: &GateStore) -> Store {
    Store {
        backend: Arc::new(gate.clone()),
        ..store.clone()
    }
}

pub(crate) fn sample(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn prefetch(
    repo: &Repo,
    id: (u64, u64),
    incoming: &Path,
    metrics: &Metrics,
) -> Prefetch {
    Prefetch {
        repo: repo.clone(),
        id,
        incoming: incoming.to_owned(),
        local: Default::default(),
        node: None,
        poll_interval: Duration::from_millis(20),
        stale_after: Duration::from_secs(10),
        concurrency: 4,
        metrics: metrics.clone(),
    }
}

pub(crate) fn staging(incoming: &Path, id: (u64, u64)) -> PathBuf {
    incoming.join(format!(".{}.partial", snapdir::file_names(id.0, id.1).0))
}

/// A streaming publish of `meta`. (Polled by the test itself, not spawned: the publish
/// future is not `Send` for every lifetime, and the test decides when it runs.)
pub(crate) fn publish(
    repo: Repo,
    meta: &Path,
    index: bool,
) -> impl Future<Output = snaprelay::error::Result<PublishReport>> {
    let snapshot = Snapshot::open(meta).unwrap();
    async move {
        Publisher::new(&repo, 4, Some(1), &Silent)
            .streaming(true)
            .use_chunk_index(index)
            .publish(&snapshot)
            .await
    }
}

/// Runs the publish until its manifest's PUT reaches the gate (every chunk is stored).
pub(crate) async fn until_gate<F: Future<Output = snaprelay::error::Result<PublishReport>>>(
    publishing: Pin<&mut F>,
    gate: &GateStore,
) {
    tokio::select! {
        _ = gate.arrived() => {}
        r = publishing => panic!("the publish ended before its manifest: {r:?}"),
    }
}

/// Waits (bounded) until the prefetch has written `bytes`.
pub(crate) async fn prefetched(metrics: &Metrics, bytes: u64) {
    let series = "snaprelay_prefetched_bytes_total";
    tokio::time::timeout(Duration::from_secs(30), async {
        while sample(metrics, series) < bytes as f64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("prefetched {} of {bytes} bytes", sample(metrics, series)));
}

/// The scenario the feature exists for, with the publisher cutting the file itself and with
/// the node's chunk index: while the manifest's PUT is held, the follower's prefetch holds
/// every byte of the snapshot in its staging file; once released, the prefetch sees the
/// publish end, and the fetch against the manifest downloads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_holds_every_chunk_before_the_manifest_and_downloads_nothing_after() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "a_follower_holds_every_chunk_before_the_manifest_and_downloads_nothing_after",
        work.path(),
    );
    let data = support::random_bytes(3 << 20, 7);
    for (index, node_index) in [(10, false), (11, true)] {
        let gate = GateStore::new(store.backend.clone(), "manifests", None);
        let leader = Repo::open_or_create(gated(&store, &gate), CLUSTER, params())
            .await
            .unwrap();
        let follower = Repo::open(store.clone(), CLUSTER).await.unwrap();
        let mut data = data.clone();
        data[0] = index as u8;
        let meta = match node_index {
            false => support::write_snapshot(&work.path().join("leader"), index, 1, &data),
            true => support::write_node_snapshot(
                &work.path().join("leader"),
                index,
                1,
                &data,
                Some(params()),
            ),
        };
        let incoming = work.path().join("incoming");
        let metrics = Metrics::new();
        let publishing = publish(leader.clone(), &meta, node_index);
        tokio::pin!(publishing);
        until_gate(publishing.as_mut(), &gate).await;
        let cancel = CancellationToken::new();
        let running =
            tokio::spawn(prefetch(&follower, (index, 1), &incoming, &metrics).run(cancel));
        prefetched(&metrics, data.len() as u64).await;
        assert!(
            follower.manifest_for(index, 1).await.unwrap().is_none(),
            "no manifest yet"
        );
        assert_eq!(std::fs::read(staging(&incoming, (index, 1))).unwrap(), data);
        // Nothing that looks like a snapshot: only the hidden staging file.
        assert!(snapdir::scan(&incoming).unwrap().snapshots.is_empty());

        gate.open();
        let published = publishing.await.unwrap();
        let report: PrefetchReport = running.await.unwrap();
        assert_eq!(report.ended, Ended::Gone, "{report:?}");
        assert_eq!(report.bytes, data.len() as u64);
        assert!(report.polls >= 2, "{report:?}");

        let id = follower.manifest_for(index, 1).await.unwrap().unwrap();
        assert_eq!(id.to_string(), published.manifest);
        let manifest = follower.read_manifest(&id).await.unwrap();
        let fetched = Fetcher::new(&follower, 4, &Silent)
            .resumable(true)
            .fetch(&manifest, &incoming, &[])
            .await
            .unwrap();
        assert_eq!(fetched.bytes_transferred, 0, "{fetched:?}");
        assert_eq!(fetched.chunks_reused, manifest.chunks.len() as u64);
        assert_eq!(std::fs::read(&fetched.data).unwrap(), data);
        std::fs::remove_dir_all(&incoming).unwrap();
    }
}

/// The fetch after a prefetch takes the chunks the prefetch wrote without hashing each
/// again (`Fetcher::prefetched`): the whole file's sha256 covers them. One damaged in the
/// staging file since is caught by that whole-file check, and the file is assembled again
/// with every chunk checked; without the prefetch's list the fetch checks each chunk in
/// place and downloads only the damaged one. With the list, nothing else is looked for in
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_chunks_are_not_hashed_again_and_a_damaged_one_is_still_caught() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "prefetched_chunks_are_not_hashed_again_and_a_damaged_one_is_still_caught",
        work.path(),
    );
    let data = support::random_bytes(2 << 20, 11);
    let leader = Repo::open_or_create(store.clone(), CLUSTER, params())
        .await
        .unwrap();
    let meta = support::write_snapshot(&work.path().join("leader"), 20, 1, &data);
    publish(leader, &meta, false).await.unwrap();
    let follower = Repo::open(store.clone(), CLUSTER).await.unwrap();
    let id = follower.manifest_for(20, 1).await.unwrap().unwrap();
    let manifest = follower.read_manifest(&id).await.unwrap();
    let written: Vec<(u64, Digest)> = manifest.offsets().map(|(o, c)| (o, c.sha256)).collect();
    let (damaged_at, damaged) = manifest.offsets().nth(3).map(|(o, c)| (o, c.len)).unwrap();

    // (damage one chunk, what the prefetch reports it wrote, bytes the fetch downloads)
    for (damage, trust, downloaded) in [
        (false, Some(written.clone()), 0),
        (true, Some(written.clone()), data.len() as u64),
        (true, None, damaged),
        // Only what the prefetch wrote is looked for in place (a prefetch that left every
        // chunk to local copies wrote nothing: the file holds nothing worth a pass).
        (false, Some(Vec::new()), data.len() as u64),
    ] {
        let incoming = work.path().join("incoming");
        // What a prefetch leaves: every chunk at its offset, perhaps one damaged since.
        let (file, locked) =
            snaprelay::fetch::open_staging_for(&incoming, (20, 1), data.len() as u64, None)
                .unwrap();
        let mut staged = data.clone();
        if damage {
            staged[damaged_at as usize + 5] ^= 0x40;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &staged, 0).unwrap();
        drop((file, locked));
        let fetcher = Fetcher::new(&follower, 4, &Silent).resumable(true);
        let fetcher = match &trust {
            Some(written) => fetcher.prefetched(written.clone()),
            None => fetcher,
        };
        let fetched = fetcher.fetch(&manifest, &incoming, &[]).await.unwrap();
        assert_eq!(
            fetched.bytes_transferred,
            downloaded,
            "damage {damage}, prefetched {:?}: {fetched:?}",
            trust.map(|t| t.len())
        );
        assert_eq!(std::fs::read(&fetched.data).unwrap(), data);
        std::fs::remove_dir_all(&incoming).unwrap();
    }
}

/// A publisher killed after storing every chunk, before its manifest: its in-progress
/// object stays (its deletes never happen). The follower prefetches it, then gives up once
/// it stops changing, removing its staging file; the next publish and its fetch work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_dies_mid_publish_is_given_up_on_and_the_next_publish_works() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "a_publisher_that_dies_mid_publish_is_given_up_on_and_the_next_publish_works",
        work.path(),
    );
    let gate = GateStore::new(store.backend.clone(), "manifests", Some("inprogress"));
    let leader = Repo::open_or_create(gated(&store, &gate), CLUSTER, params())
        .await
        .unwrap();
    let follower = Repo::open(store.clone(), CLUSTER).await.unwrap();
    let data = support::random_bytes(1 << 20, 8);
    let meta = support::write_snapshot(&work.path().join("leader"), 20, 1, &data);
    let incoming = work.path().join("incoming");
    let metrics = Metrics::new();
    let publishing = Box::pin(publish(leader, &meta, false));
    let mut publishing = publishing;
    until_gate(publishing.as_mut(), &gate).await;
    let mut p = prefetch(&follower, (20, 1), &incoming, &metrics);
    p.stale_after = Duration::from_millis(700);
    let running = tokio::spawn(p.run(CancellationToken::new()));
    prefetched(&metrics, data.len() as u64).await;
    // The publisher dies: its manifest never lands, its in-progress object stays.
    drop(publishing);

    let report = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the prefetch gives up within its bound")
        .unwrap();
    assert_eq!(report.ended, Ended::Stale, "{report:?}");
    assert!(!staging(&incoming, (20, 1)).exists());
    assert_eq!(
        sample(
            &metrics,
            "snaprelay_inprogress_refused_total{reason=\"stale\"}"
        ),
        1.0
    );
    assert!(follower.manifest_for(20, 1).await.unwrap().is_none());

    // The next publish, by a live leader.
    let leader = Repo::open(store.clone(), CLUSTER).await.unwrap();
    let next = support::random_bytes(1 << 20, 9);
    let meta = support::write_snapshot(&work.path().join("leader"), 21, 1, &next);
    publish(leader, &meta, false).await.unwrap();
    let id = follower.manifest_for(21, 1).await.unwrap().unwrap();
    let manifest = follower.read_manifest(&id).await.unwrap();
    let fetched = Fetcher::new(&follower, 4, &Silent)
        .resumable(true)
        .fetch(&manifest, &incoming, &[])
        .await
        .unwrap();
    assert_eq!(std::fs::read(&fetched.data).unwrap(), next);
}

fn forged(size: u64, chunks: Vec<Span>) -> InProgress {
    InProgress {
        format: INPROGRESS_FORMAT,
        cluster_id: CLUSTER.into(),
        index: 30,
        term: 1,
        size,
        written_at: chrono::Utc::now(),
        chunks,
        packs: Vec::new(),
    }
}

fn json(o: &InProgress) -> Bytes {
    serde_json::to_vec(o).unwrap().into()
}

/// Forged in-progress objects, each refused with a warning naming the reason: the
/// prefetch stops, its staging file is removed, the refusal is counted, and the node's own
/// files in the incoming directory are untouched. Then a forgery whose chunks are real
/// (uploaded by the forger) but are not the snapshot's: it is prefetched, and the fetch
/// against the real manifest replaces every forged byte, so what is adopted is exactly what
/// the manifest describes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_inprogress_objects_are_refused_and_never_change_what_is_adopted() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "forged_inprogress_objects_are_refused_and_never_change_what_is_adopted",
        work.path(),
    );
    let repo = Repo::open_or_create(store.clone(), CLUSTER, params())
        .await
        .unwrap();
    let incoming = work.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::write(incoming.join("the-nodes-own-file"), b"mine").unwrap();
    let id = (30, 1);

    let good = support::random_bytes(64 << 10, 30);
    let good_sha = Digest::of(&good);
    repo.put_chunk(&good_sha, good.clone().into())
        .await
        .unwrap();
    let liar = Digest::of(b"what the forger claims");
    repo.put_chunk(&liar, good.clone().into()).await.unwrap();
    let absent = Digest::of(b"never stored");
    let span = |offset, len, sha256| Span {
        offset,
        len,
        sha256,
    };
    let mut other_cluster = forged(1 << 20, vec![]);
    other_cluster.cluster_id = "someone-else".into();
    let cases: Vec<(&str, Bytes, &str, &str)> = vec![
        (
            "garbage",
            Bytes::from_static(b"{not json"),
            "not an in-progress object",
            "invalid",
        ),
        (
            "other cluster",
            json(&other_cluster),
            "cluster \"someone-else\"",
            "invalid",
        ),
        (
            "too large a snapshot",
            json(&forged(u64::MAX, vec![])),
            "is outside 1..=",
            "invalid",
        ),
        (
            "overlapping chunks",
            json(&forged(
                1 << 20,
                vec![span(0, 65536, good_sha), span(100, 65536, good_sha)],
            )),
            "without gaps or overlaps",
            "invalid",
        ),
        (
            "past the end",
            json(&forged(1000, vec![span(0, 65536, good_sha)])),
            "ends past the file's size 1000",
            "invalid",
        ),
        (
            "a chunk that does not match its digest",
            json(&forged(
                1 << 20,
                vec![span(0, 65536, good_sha), span(65536, 65536, liar)],
            )),
            "hashes to",
            "chunk_mismatch",
        ),
        (
            "a chunk the store lacks",
            json(&forged(1 << 20, vec![span(0, 65536, absent)])),
            "missing",
            "chunk_mismatch",
        ),
        (
            "a huge body",
            Bytes::from(vec![b' '; MAX_BODY as usize + 1]),
            "more than",
            "invalid",
        ),
    ];
    for (n, (what, body, reason, label)) in cases.into_iter().enumerate() {
        let metrics = Metrics::new();
        repo.put_inprogress(id.0, id.1, body).await.unwrap();
        let report = tokio::time::timeout(
            Duration::from_secs(30),
            prefetch(&repo, id, &incoming, &metrics).run(CancellationToken::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("case {n} ({what}) hung"));
        match &report.ended {
            Ended::Refused(r) | Ended::BadChunk(r) => {
                assert!(r.contains(reason), "case {n} ({what}): {r}")
            }
            other => panic!("case {n} ({what}): {other:?}"),
        }
        let series = format!("snaprelay_inprogress_refused_total{{reason=\"{label}\"}}");
        assert_eq!(sample(&metrics, &series), 1.0, "case {n} ({what})");
        assert!(!staging(&incoming, id).exists(), "case {n} ({what})");
        assert_eq!(
            std::fs::read(incoming.join("the-nodes-own-file")).unwrap(),
            b"mine"
        );
        assert!(snapdir::scan(&incoming).unwrap().snapshots.is_empty());
    }

    // Real chunks, but not the snapshot's: prefetched, then replaced by the fetch.
    let real = support::random_bytes(256 << 10, 31);
    let fake = support::random_bytes(256 << 10, 32);
    let fake_chunks: Vec<Span> = (0..4u64)
        .map(|i| {
            let bytes = &fake[(i * 65536) as usize..((i + 1) * 65536) as usize];
            span(i * 65536, 65536, Digest::of(bytes))
        })
        .collect();
    for c in &fake_chunks {
        let o = c.offset as usize;
        repo.put_chunk(&c.sha256, Bytes::copy_from_slice(&fake[o..o + 65536]))
            .await
            .unwrap();
    }
    repo.put_inprogress(id.0, id.1, json(&forged(real.len() as u64, fake_chunks)))
        .await
        .unwrap();
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(prefetch(&repo, id, &incoming, &metrics).run(cancel.clone()));
    prefetched(&metrics, fake.len() as u64).await;
    assert_eq!(std::fs::read(staging(&incoming, id)).unwrap(), fake);
    // The real publish of the same log id lands; the daemon stops its prefetch before it
    // fetches the manifest, and the forged bytes are still in the staging file then.
    cancel.cancel();
    assert_eq!(running.await.unwrap().ended, Ended::Cancelled);
    let meta = support::write_snapshot(&work.path().join("leader"), id.0, id.1, &real);
    publish(repo.clone(), &meta, false).await.unwrap();
    let manifest_id = repo.manifest_for(id.0, id.1).await.unwrap().unwrap();
    let manifest = repo.read_manifest(&manifest_id).await.unwrap();
    let fetched = Fetcher::new(&repo, 4, &Silent)
        .resumable(true)
        .fetch(&manifest, &incoming, &[])
        .await
        .unwrap();
    assert_eq!(std::fs::read(&fetched.data).unwrap(), real);
    assert_eq!(fetched.bytes_transferred, real.len() as u64, "{fetched:?}");
    assert_eq!(
        std::fs::read(incoming.join("the-nodes-own-file")).unwrap(),
        b"mine"
    );
}

/// Streaming off: a publish writes no in-progress object and leaves `latest` to the
/// caller, as before streaming existed; a follower's prefetch of it finds nothing and ends
/// at once without creating a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_streaming_a_publish_announces_nothing() {
    let work = tempfile::tempdir().unwrap();
    let store = store("without_streaming_a_publish_announces_nothing", work.path());
    let gate = GateStore::new(store.backend.clone(), "manifests", None);
    let repo = Repo::open_or_create(gated(&store, &gate), CLUSTER, params())
        .await
        .unwrap();
    let data = support::random_bytes(512 << 10, 40);
    let meta = Snapshot::open(&support::write_snapshot(
        &work.path().join("leader"),
        40,
        1,
        &data,
    ))
    .unwrap();
    let publishing = async {
        Publisher::new(&repo, 4, Some(1), &Silent)
            .use_chunk_index(false)
            .publish(&meta)
            .await
    };
    tokio::pin!(publishing);
    until_gate(publishing.as_mut(), &gate).await;
    let follower = Repo::open(store.clone(), CLUSTER).await.unwrap();
    let incoming = work.path().join("incoming");
    let metrics = Metrics::new();
    let report = prefetch(&follower, (40, 1), &incoming, &metrics)
        .run(CancellationToken::new())
        .await;
    assert_eq!(report.ended, Ended::Gone);
    assert_eq!(report.polls, 1);
    assert!(!incoming.exists());
    let latest = store
        .backend
        .get(&Repo::latest_key(&store))
        .await
        .map(|_| ());
    assert!(latest.is_err(), "the publisher wrote latest");
    gate.open();
    publishing.await.unwrap();
}

/// The newest snapshot's size in `dir` (a node's snapshot directory).
fn newest_size(dir: &Path) -> u64 {
    snapdir::scan(dir)
        .unwrap()
        .snapshots
        .last()
        .expect("a snapshot")
        .envelope
        .size
}

/// The hidden staging files in a node's incoming directory.
fn staging_files(incoming: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(incoming)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts three `kv-node`s with their sidecars, the leader's reaching the S3 server through
/// a gate that holds its manifest PUTs, every follower probing `latest` every 200 ms; the
/// repository is created as `layout` ("chunks" or "packs").
async fn gated_cluster(
    s3: &support::S3,
    prefix: &str,
    gate: &HttpGate,
    daemon: &str,
    layout: &str,
) -> (Cluster, u64, Vec<u64>) {
    let mut c = Cluster::start_nodes(
        3,
        StoreSection::s3(s3, prefix),
        &["--snapshot-policy-logs", "1000000"],
    )
    .await;
    let leader = c.leader(1).await.expect("a leader");
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    c.sidecar_store.insert(
        leader,
        StoreSection(format!(
            "[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n",
            s3.url(prefix),
            gate.endpoint()
        )),
    );
    c.sidecar_daemon = format!("store_probe_interval = \"200ms\"\n{daemon}");
    for id in 1..=3 {
        c.sidecar_config
            .insert(id, format!("[repository]\nlayout = \"{layout}\"\n"));
        c.start_sidecar(id);
    }
    (c, leader, followers)
}

fn log_id(v: &serde_json::Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

/// The same, with real `kv-node` and `snaprelay run` processes, in a repository of chunk
/// objects and in one of packs: while the leader's manifest PUT is held, both followers'
/// sidecars (learning of the publish from `latest`) prefetch the whole snapshot into their
/// staging files, and no node adopts anything; once it is released, both adopt with
/// nothing downloaded after the manifest.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_prefetch_a_publish_whose_manifest_is_held_and_download_nothing_after() {
    for layout in ["chunks", "packs"] {
        sidecars_prefetch_a_held_publish(layout).await;
    }
}

async fn sidecars_prefetch_a_held_publish(layout: &str) {
    let Some(s3) = support::s3(
        "sidecars_prefetch_a_publish_whose_manifest_is_held_and_download_nothing_after",
    ) else {
        return;
    };
    let gate = HttpGate::start(&s3.endpoint, "manifests").await;
    let prefix = support::unique("stream");
    let (c, leader, followers) = gated_cluster(&s3, &prefix, &gate, "", layout).await;
    c.write_keys("a", 40, 100 << 10).await;
    c.post(leader, "/snapshot", serde_json::json!({})).await;
    tokio::time::timeout(Duration::from_secs(60), gate.arrived())
        .await
        .expect("the leader's manifest PUT reaches the gate");
    let snapshot = log_id(&c.metrics(leader).await["snapshot"]).expect("the leader's snapshot");
    let size = newest_size(&c.node(leader).snapshot_dir());
    for &f in &followers {
        c.wait_for(
            &format!("node {f}'s sidecar to prefetch the whole snapshot"),
            Duration::from_secs(30),
            || async {
                let bytes = c
                    .sidecar_metric(f, "snaprelay_prefetched_bytes_total")
                    .await?;
                (bytes >= size as f64).then_some(())
            },
        )
        .await;
        let m = c.metrics(f).await;
        assert_eq!(
            log_id(&m["snapshot"]),
            None,
            "node {f} adopted before the manifest"
        );
        let staged = staging_files(Path::new(m["incoming_dir"].as_str().unwrap()));
        assert_eq!(staged.len(), 1, "{staged:?}");
        assert_eq!(std::fs::metadata(&staged[0]).unwrap().len(), size);
    }
    gate.open();
    for &f in &followers {
        c.wait_for(
            &format!("node {f} to adopt {snapshot:?}"),
            Duration::from_secs(60),
            || async { (log_id(&c.metrics(f).await["snapshot"]) == Some(snapshot)).then_some(()) },
        )
        .await;
        // Every byte came from the prefetch: the fetch downloaded nothing.
        assert_eq!(
            c.sidecar_metric(f, "snaprelay_fetch_bytes_total").await,
            Some(0.0)
        );
        assert_eq!(
            c.sidecar_metric(f, "snaprelay_prefetched_bytes_total")
                .await,
            Some(size as f64)
        );
    }
    let repo = Repo::open(Store::open(&s3.settings(&prefix)).unwrap(), "e2e")
        .await
        .unwrap();
    assert_eq!(repo.descriptor().layout_name(), layout);
}

/// Streaming off (`daemon.streaming = false` everywhere), in a repository of packs: the
/// publish announces nothing, so while its manifest is held nothing is in progress in the
/// store and nothing is prefetched; after it, the followers download the whole snapshot
/// (every data pack's bytes), as before streaming.
#[tokio::test(flavor = "multi_thread")]
async fn with_streaming_off_sidecars_fetch_only_after_the_manifest() {
    let Some(s3) = support::s3("with_streaming_off_sidecars_fetch_only_after_the_manifest") else {
        return;
    };
    let gate = HttpGate::start(&s3.endpoint, "manifests").await;
    let prefix = support::unique("stream");
    let (c, leader, followers) =
        gated_cluster(&s3, &prefix, &gate, "streaming = false\n", "packs").await;
    c.write_keys("a", 20, 100 << 10).await;
    c.post(leader, "/snapshot", serde_json::json!({})).await;
    tokio::time::timeout(Duration::from_secs(60), gate.arrived())
        .await
        .expect("the leader's manifest PUT reaches the gate");
    let snapshot = log_id(&c.metrics(leader).await["snapshot"]).expect("the leader's snapshot");
    let size = newest_size(&c.node(leader).snapshot_dir());
    // Every chunk is in the store now, and no in-progress object is.
    let store = Store::open(&s3.settings(&prefix)).unwrap();
    let repo = Repo::open(store, "e2e").await.unwrap();
    let read = repo
        .read_inprogress(snapshot.1, snapshot.0, None, MAX_BODY)
        .await
        .unwrap();
    assert!(
        matches!(read, snaprelay::repo::InProgressRead::Missing),
        "{read:?}"
    );
    gate.open();
    for &f in &followers {
        c.wait_for(
            &format!("node {f} to adopt {snapshot:?}"),
            Duration::from_secs(60),
            || async { (log_id(&c.metrics(f).await["snapshot"]) == Some(snapshot)).then_some(()) },
        )
        .await;
        assert_eq!(
            c.sidecar_metric(f, "snaprelay_prefetched_bytes_total")
                .await,
            Some(0.0)
        );
        // Every stored byte of the snapshot's chunks (compressed: less than its size).
        let fetched = c
            .sidecar_metric(f, "snaprelay_fetch_bytes_total")
            .await
            .unwrap_or(0.0);
        assert!(
            fetched > 0.0 && fetched <= size as f64,
            "node {f} fetched {fetched} of {size}"
        );
    }
    let id = repo
        .manifest_for(snapshot.1, snapshot.0)
        .await
        .unwrap()
        .unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    let stored: u64 = manifest
        .packs
        .iter()
        .filter(|p| p.kind == snaprelay::pack::PackKind::Data)
        .map(|p| p.size)
        .sum();
    // The ranged reads cover every distinct chunk of the snapshot, each read once.
    for &f in &followers {
        let fetched = c.sidecar_metric(f, "snaprelay_fetch_bytes_total").await;
        assert!(
            fetched.is_some_and(|b| b > 0.0 && b <= stored as f64),
            "node {f} fetched {fetched:?}, the data packs hold {stored}"
        );
    }
}
