//! Streaming propagation in a repository of packs, on real files and (with
//! `SNAPRELAY_TEST_S3_REQUIRED`) the real S3 server: the publisher announces every chunk it
//! uploads, with where its blob is, once its pack is finished; a follower's prefetch reads
//! those blobs (neighbours in one ranged GET), checks each against its id and writes it into
//! the staging file; the fetch after the manifest leaves them in place and reads only the
//! rest. The publisher's manifest PUT is held at a gate the test opens, so each scenario
//! sees the store exactly between "every pack stored" and "manifest written". Forged
//! in-progress objects are refused and never change what is adopted.

use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use snaprelay::chunk::{ChunkParams, Digest};
use snaprelay::fetch::{self, Fetcher};
use snaprelay::inprogress::{InProgress, PackRuns, Span, INPROGRESS_FORMAT};
use snaprelay::manifest_v2::NewRepository;
use snaprelay::metrics::Metrics;
use snaprelay::prefetch::{Ended, PrefetchReport};
use snaprelay::progress::Silent;
use snaprelay::publish::Publisher;
use snaprelay::repo::Repo;
use snaprelay::snapdir::{self, Snapshot};
use support::gate::GateStore;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "stream-packs";

/// Packs of 1 MiB, so that a few MiB of snapshot make several packs, finished one by one.
fn settings() -> NewRepository {
    NewRepository {
        pack_size: 1 << 20,
        ..NewRepository::default()
    }
}

// The streaming tests' harness: stores, the gate, a prefetch and a streaming publish.
use crate::streaming::{gated, prefetch, prefetched, publish, sample, staging, store, until_gate};

/// A new snapshot (cut by the publisher, and from the node's chunk index): while the
/// manifest's PUT is held, the follower's staging file holds every byte; after it, the
/// fetch reads nothing from data packs. Then an incremental snapshot onto it: the prefetch
/// takes only the chunks the publish uploaded, and the fetch, with the previous snapshot
/// as its local source, still reads nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_follower_holds_every_new_chunk_before_the_manifest_and_reads_nothing_after() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "a_pack_follower_holds_every_new_chunk_before_the_manifest_and_reads_nothing_after",
        work.path(),
    );
    let node = work.path().join("node");
    let mut previous: Option<(PathBuf, Vec<u8>)> = None;
    for (index, node_index, edit) in [(10u64, false, false), (11, true, false), (12, true, true)] {
        let gate = GateStore::new(store.backend.clone(), "manifests", None);
        let leader = Repo::open_or_create(gated(&store, &gate), CLUSTER, settings())
            .await
            .unwrap();
        assert!(leader.packs().is_some());
        let follower = Repo::open(store.clone(), CLUSTER).await.unwrap();
        // New snapshots are new bytes; an edit changes the previous one.
        let mut data = match (&previous, edit) {
            (Some((_, prev)), true) => prev.clone(),
            _ => support::random_bytes(4 << 20, index),
        };
        if edit {
            // Three scattered 2 KiB overwrites.
            for k in 1..=3 {
                let at = k * data.len() / 4;
                data[at..at + 2048].copy_from_slice(&support::random_bytes(2048, 30 + k as u64));
            }
        }
        let meta = match node_index {
            false => support::write_snapshot(&work.path().join("leader"), index, 1, &data),
            true => support::write_node_snapshot(
                &work.path().join("leader"),
                index,
                1,
                &data,
                Some(ChunkParams::PACKED),
            ),
        };
        let incoming = work.path().join("incoming");
        let metrics = Metrics::new();
        let publishing = publish(leader.clone(), &meta, node_index);
        tokio::pin!(publishing);
        until_gate(publishing.as_mut(), &gate).await;
        let running = tokio::spawn(
            prefetch(&follower, (index, 1), &incoming, &metrics).run(CancellationToken::new()),
        );
        let expect_prefetched = if edit { 6 << 10 } else { data.len() as u64 };
        prefetched(&metrics, expect_prefetched).await;
        assert!(follower.manifest_for(index, 1).await.unwrap().is_none());
        if !edit {
            assert_eq!(std::fs::read(staging(&incoming, (index, 1))).unwrap(), data);
        }
        assert!(snapdir::scan(&incoming).unwrap().snapshots.is_empty());

        gate.open();
        let published = publishing.await.unwrap();
        let report: PrefetchReport = running.await.unwrap();
        assert_eq!(report.ended, Ended::Gone, "{report:?}");
        if edit {
            // Only the uploaded chunks: a few, around the three edits.
            assert!(
                report.bytes >= 6 << 10 && report.bytes <= 12 * 65536,
                "{report:?}"
            );
            assert!(
                report.bytes <= published.bytes_transferred.max(1) * 2,
                "{report:?} {published:?}"
            );
        } else {
            assert_eq!(report.bytes, data.len() as u64, "{report:?}");
        }

        let id = follower.manifest_for(index, 1).await.unwrap().unwrap();
        let manifest = follower.read_packed_manifest(&id).await.unwrap();
        // The node's current snapshot: the previous one.
        std::fs::create_dir_all(&node).unwrap();
        let source = fetch::packed_source(&follower, &[&node]).await.unwrap();
        let fetched = Fetcher::new(&follower, 4, &Silent)
            .resumable(true)
            .prefetched(report.written.clone())
            .fetch_packed(&manifest, &incoming, source.as_ref())
            .await
            .unwrap();
        assert_eq!(fetched.bytes_transferred, 0, "{fetched:?}");
        assert_eq!(std::fs::read(&fetched.data).unwrap(), data);
        // The follower's node adopts it: it becomes the local source of the next one.
        let _ = std::fs::remove_dir_all(&node);
        std::fs::create_dir_all(&node).unwrap();
        std::fs::rename(&fetched.data, node.join(fetched.data.file_name().unwrap())).unwrap();
        std::fs::rename(&fetched.meta, node.join(fetched.meta.file_name().unwrap())).unwrap();
        std::fs::remove_dir_all(&incoming).unwrap();
        previous = Some((node.clone(), data));
    }
}

/// Forged in-progress objects in a repository of packs, each refused with its reason: the
/// prefetch stops, its staging file goes, the refusal is counted. What a forgery whose
/// blobs are real but not the snapshot's leaves in the staging file is never adopted: the
/// fetch against the manifest (with no prefetch list to trust) replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pack_inprogress_objects_are_refused_and_never_change_what_is_adopted() {
    let work = tempfile::tempdir().unwrap();
    let store = store(
        "forged_pack_inprogress_objects_are_refused_and_never_change_what_is_adopted",
        work.path(),
    );
    let repo = Repo::open_or_create(store.clone(), CLUSTER, settings())
        .await
        .unwrap();
    // A real snapshot, whose blobs a forger points at.
    let real = support::random_bytes(1 << 20, 21);
    let meta = support::write_snapshot(&work.path().join("leader"), 29, 1, &real);
    Publisher::new(&repo, 4, Some(1), &Silent)
        .publish(&Snapshot::open(&meta).unwrap())
        .await
        .unwrap();
    let id = repo.manifest_for(29, 1).await.unwrap().unwrap();
    let m = repo.read_packed_manifest(&id).await.unwrap();
    let data = m
        .packs
        .iter()
        .find(|p| p.kind == snaprelay::pack::PackKind::Data)
        .unwrap();
    let trailer = repo.read_trailer(&data.id, data.size).await.unwrap();
    let blobs = trailer.blobs.len() as u32;
    let size = 1u64 << 20;
    let object = |chunks: Vec<Span>, packs: Vec<PackRuns>| InProgress {
        format: INPROGRESS_FORMAT,
        cluster_id: CLUSTER.into(),
        index: 30,
        term: 1,
        size,
        written_at: chrono::Utc::now(),
        chunks,
        packs,
    };
    let runs = |runs: Vec<(u64, u32, u32)>| PackRuns {
        pack: data.id,
        size: data.size,
        runs,
    };
    let cases: Vec<(&str, InProgress, &str, &str)> = vec![
        (
            "chunks listed in a repository of packs",
            object(
                vec![Span {
                    offset: 0,
                    len: 100,
                    sha256: Digest::of(b"x"),
                }],
                vec![],
            ),
            "it lists chunks, in a repository of packs",
            "invalid",
        ),
        (
            "a pack of another size",
            object(
                vec![],
                vec![PackRuns {
                    size: data.size + 1,
                    ..runs(vec![(0, 0, 1)])
                }],
            ),
            "pack",
            "chunk_mismatch",
        ),
        (
            "a pack that does not exist",
            object(
                vec![],
                vec![PackRuns {
                    pack: snaprelay::pack::PackId::random(),
                    ..runs(vec![(0, 0, 1)])
                }],
            ),
            "pack",
            "chunk_mismatch",
        ),
        (
            "a run that does not start at a blob",
            object(vec![], vec![runs(vec![(0, 1, 1)])]),
            "has no blob at offset 1",
            "invalid",
        ),
        (
            "a run past the pack's blobs",
            object(vec![], vec![runs(vec![(0, 0, blobs + 1)])]),
            "a run names blob",
            "invalid",
        ),
        (
            "a run past the file's end",
            object(vec![], vec![runs(vec![(size - 10, 0, 1)])]),
            "reaches past the file's size",
            "invalid",
        ),
        (
            "more bytes than the file",
            object(
                vec![],
                vec![runs(vec![(0, 0, blobs)]), runs(vec![(0, 0, blobs)])],
            ),
            "more bytes than the file's size",
            "invalid",
        ),
    ];
    let incoming = work.path().join("incoming");
    for (what, forged, reason, label) in cases {
        let metrics = Metrics::new();
        repo.put_inprogress(30, 1, Bytes::from(serde_json::to_vec(&forged).unwrap()))
            .await
            .unwrap();
        let report = tokio::time::timeout(
            Duration::from_secs(30),
            prefetch(&repo, (30, 1), &incoming, &metrics).run(CancellationToken::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the prefetch did not end"));
        match &report.ended {
            Ended::Refused(r) | Ended::BadChunk(r) => {
                assert!(r.contains(reason), "{what}: {r}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(
            sample(
                &metrics,
                &format!("snaprelay_inprogress_refused_total{{reason=\"{label}\"}}")
            ),
            1.0,
            "{what}"
        );
        assert!(!staging(&incoming, (30, 1)).exists(), "{what}");
    }

    // Real blobs, listed at offsets of snapshot 30 that hold other bytes: prefetched, then
    // replaced by the fetch against the real manifest (which does not trust the staging
    // file it did not write).
    let metrics = Metrics::new();
    let forged = object(vec![], vec![runs(vec![(0, 0, 1)])]);
    repo.put_inprogress(30, 1, Bytes::from(serde_json::to_vec(&forged).unwrap()))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(prefetch(&repo, (30, 1), &incoming, &metrics).run(cancel.clone()));
    prefetched(&metrics, trailer.blobs[0].plain_len as u64).await;
    repo.delete_inprogress(30, 1).await.unwrap();
    let report = running.await.unwrap();
    assert_eq!(report.ended, Ended::Gone, "{report:?}");
    let next = support::random_bytes(1 << 20, 22);
    let meta = support::write_snapshot(&work.path().join("leader"), 30, 1, &next);
    Publisher::new(&repo, 4, Some(1), &Silent)
        .publish(&Snapshot::open(&meta).unwrap())
        .await
        .unwrap();
    let id = repo.manifest_for(30, 1).await.unwrap().unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    let fetched = Fetcher::new(&repo, 4, &Silent)
        .resumable(true)
        .fetch_packed(&manifest, &incoming, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&fetched.data).unwrap(), next);
}
