//! Retention: `snaprelay gc` deletes old manifests and then the chunks (in a repository of
//! packs: the packs) no kept manifest references (once past the grace period), never one a
//! kept snapshot needs, and a push that races a GC still commits a complete snapshot. Each
//! flow runs on both layouts.

use crate::support;

use std::collections::HashSet;
use std::path::Path;

use rand::{RngCore, SeedableRng};
use support::{Layout, Target};

const CHUNKING: &str =
    "[chunking]\nmin_size = \"16KiB\"\navg_size = \"64KiB\"\nmax_size = \"256KiB\"\n";

/// Chunk objects with small chunks (dozens in 4 MiB), or packs as they are by default but
/// for 1 MiB packs (so that 4 MiB of new data is several of them).
fn config(layout: Layout) -> String {
    match layout {
        Layout::Chunks => format!("{}{CHUNKING}", layout.section("")),
        Layout::Packs => layout.section("pack_size = \"1MiB\"\n"),
    }
}

/// Writes snapshot `index`: 4 MiB, of which the first 3 MiB are the same in every
/// generation and the last MiB is its own. A GC that drops old generations then has
/// objects that only they use to delete (their last MiB's chunks, and packs holding only
/// those), and objects that kept generations share with them to keep.
fn write_generation(dir: &Path, index: u64) -> std::path::PathBuf {
    let mut data = vec![0u8; 4 << 20];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data[..3 << 20]);
    rand::rngs::StdRng::seed_from_u64(100 + index).fill_bytes(&mut data[3 << 20..]);
    support::write_snapshot(dir, index, 1, &data)
}

/// What GC deletes that the store holds: chunk objects, or packs.
async fn stored_objects(target: &Target) -> HashSet<String> {
    let repo = target.repo().await;
    match repo.packs() {
        None => repo
            .list_chunks()
            .await
            .unwrap()
            .keys()
            .map(|d| d.to_hex())
            .collect(),
        Some(_) => repo
            .list_packs()
            .await
            .unwrap()
            .keys()
            .map(|p| p.to_hex())
            .collect(),
    }
}

/// Every object in the store with its size and last-modified time.
async fn everything(target: &Target) -> Vec<(String, u64, String)> {
    use futures::TryStreamExt;
    let store = target.store();
    let mut all: Vec<(String, u64, String)> = store
        .backend
        .list(Some(&store.prefix))
        .map_ok(|m| (m.location.to_string(), m.size, m.last_modified.to_rfc3339()))
        .try_collect()
        .await
        .unwrap();
    all.sort();
    all
}

/// The chunks (or packs) the manifests in the store name.
async fn referenced(target: &Target) -> HashSet<String> {
    let repo = target.repo().await;
    let mut set = HashSet::new();
    for e in repo.list_manifests(None).await.unwrap() {
        set.extend(names_of(&repo, &e.id).await);
    }
    set
}

/// The chunks (or packs) manifest `id` names.
async fn names_of(
    repo: &snaprelay::repo::Repo,
    id: &snaprelay::repo::ManifestId,
) -> HashSet<String> {
    use snaprelay::repo::AnyManifest;
    match repo.read_any_manifest(id).await.unwrap() {
        AnyManifest::Chunks(m) => m.chunks.iter().map(|c| c.sha256.to_hex()).collect(),
        AnyManifest::Packs(m) => m.pack_ids().map(|p| p.to_hex()).collect(),
    }
}

async fn retention(target: Target, layout: Layout) {
    let work = tempfile::tempdir().unwrap();
    for index in 1..=5 {
        let meta = write_generation(&work.path().join("leader"), index);
        target.json(&["push", meta.to_str().unwrap(), "--json"]);
    }
    let before = stored_objects(&target).await;
    let repo = target.repo().await;
    let oldest = names_of(&repo, &repo.find_manifest(1).await.unwrap()).await;

    // A dry run writes nothing at all (no lease, no clock probe) and deletes nothing, but
    // says what it would, by this machine's clock.
    let objects = everything(&target).await;
    let dry = target.json(&["gc", "--keep-last", "2", "--grace", "0s", "--json"]);
    assert_eq!(
        everything(&target).await,
        objects,
        "a dry run wrote to the store"
    );
    assert_eq!(dry["clock"], "local", "{dry}");
    let objects_of = match layout {
        Layout::Chunks => "chunks",
        Layout::Packs => "packs",
    };
    assert_eq!(dry["objects"], objects_of, "{dry}");
    assert_eq!(
        dry["manifests_deleted"].as_array().unwrap().len(),
        3,
        "{dry}"
    );
    assert!(dry["chunks_deleted"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(stored_objects(&target).await, before);
    assert_eq!(
        target.json(&["list", "--json"])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    // Within the grace period, unreferenced chunks stay (they may belong to a push).
    let young = target.json(&[
        "gc",
        "--apply",
        "--keep-last",
        "4",
        "--grace",
        "1h",
        "--json",
    ]);
    assert_eq!(young["manifests_deleted"].as_array().unwrap().len(), 1);
    assert_eq!(young["chunks_deleted"], 0, "{young}");
    assert!(young["chunks_in_grace"].as_u64().unwrap() > 0, "{young}");

    // Applied: two snapshots remain, complete, and the store holds exactly their chunks.
    let done = target.json(&[
        "gc",
        "--apply",
        "--keep-last",
        "2",
        "--grace",
        "0s",
        "--json",
    ]);
    assert!(done["applied"].as_bool().unwrap());
    assert_eq!(done["clock"], "store", "{done}");
    let listed = target.json(&["list", "--json"]);
    let indexes: Vec<u64> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![4, 5]);
    let verified = target.json(&["verify", "--all", "--json"]);
    assert_eq!(
        verified["bad_chunks"].as_array().unwrap().len(),
        0,
        "{verified}"
    );
    assert_eq!(
        stored_objects(&target).await,
        referenced(&target).await,
        "the store holds exactly the kept chunks"
    );
    // What the oldest snapshot shared with the kept ones stayed, what was its own went.
    let left = stored_objects(&target).await;
    assert!(left.len() < before.len());
    assert!(
        oldest.iter().any(|o| left.contains(o)) && !oldest.iter().all(|o| left.contains(o)),
        "of {oldest:?}, {left:?} is left"
    );
    for index in ["4", "5"] {
        let to = work.path().join(format!("pull-{index}"));
        target.json(&[
            "pull",
            "--index",
            index,
            "--to",
            to.to_str().unwrap(),
            "--json",
        ]);
    }
}

#[tokio::test]
async fn gc_keeps_what_retention_says_of_chunk_objects_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Chunks;
    retention(Target::file(dir.path(), "gc", &config(layout)), layout).await;
}

#[tokio::test]
async fn gc_keeps_what_retention_says_of_packs_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Packs;
    retention(Target::file(dir.path(), "gc", &config(layout)), layout).await;
}

#[tokio::test]
async fn gc_keeps_what_retention_says_of_chunk_objects_on_s3() {
    let Some(s3) = support::s3("gc_keeps_what_retention_says_of_chunk_objects_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Chunks;
    retention(Target::s3(&s3, dir.path(), "gc", &config(layout)), layout).await;
}

#[tokio::test]
async fn gc_keeps_what_retention_says_of_packs_on_s3() {
    let Some(s3) = support::s3("gc_keeps_what_retention_says_of_packs_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Packs;
    retention(Target::s3(&s3, dir.path(), "gc", &config(layout)), layout).await;
}

/// The most aggressive GC (keep 1, no grace) running while pushes reuse old chunks (or
/// packs): every manifest that exists afterwards is complete.
async fn push_racing_gc_still_commits_complete_snapshots(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::file(dir.path(), "race", &config(layout));
    let leader = dir.path().join("leader");
    target.json(&[
        "push",
        write_generation(&leader, 1).to_str().unwrap(),
        "--json",
    ]);
    for index in 2..=8 {
        let meta = write_generation(&leader, index);
        // Both run at once: the GC deletes chunks the push found present and reuses.
        let push = target.spawn(&["push", meta.to_str().unwrap(), "--json"]);
        let gc = target.spawn(&["gc", "--apply", "--keep-last", "1", "--grace", "0s"]);
        let (push, gc) = (push.wait_with_output(), gc.wait_with_output());
        let (push, gc) = (push.unwrap(), gc.unwrap());
        assert!(push.status.success(), "{}", support::stderr(&push));
        if support::stderr(&push).contains("vanished") {
            eprintln!(
                "round {index}: the GC deleted chunks the push reused; the push re-sent them"
            );
        }
        assert!(gc.status.success(), "{}", support::stderr(&gc));
        // Races that GC won show up as re-sent chunks, never as a broken snapshot.
        let verified = target.json(&["verify", "--all", "--json"]);
        assert_eq!(
            verified["bad_chunks"].as_array().unwrap().len(),
            0,
            "round {index}: {verified}"
        );
        let to = dir.path().join(format!("pull-{index}"));
        let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
        assert!(pulled["index"].as_u64().unwrap() >= index - 1);
    }
}

#[tokio::test]
async fn push_racing_gc_still_commits_complete_snapshots_of_chunk_objects() {
    push_racing_gc_still_commits_complete_snapshots(Layout::Chunks).await;
}

#[tokio::test]
async fn push_racing_gc_still_commits_complete_snapshots_of_packs() {
    push_racing_gc_still_commits_complete_snapshots(Layout::Packs).await;
}

/// A GC that finds a publish in flight (its lease) deletes old manifests but no chunk, as
/// the publish may count on any of them; the next GC deletes them.
async fn deferral(target: Target) {
    use snaprelay::lease::{Lease, DEFAULT_TTL};
    use snaprelay::repo::LeaseKind;

    let work = tempfile::tempdir().unwrap();
    for index in 1..=3 {
        let meta = write_generation(&work.path().join("leader"), index);
        target.json(&["push", meta.to_str().unwrap(), "--json"]);
    }
    let before = stored_objects(&target).await;
    let repo = target.repo().await;
    let publish = Lease::take(&repo, LeaseKind::Publish, DEFAULT_TTL, Some(7))
        .await
        .unwrap();
    let gc = [
        "gc",
        "--apply",
        "--keep-last",
        "1",
        "--grace",
        "0s",
        "--json",
    ];
    let deferred = target.json(&gc);
    assert_eq!(deferred["manifests_deleted"].as_array().unwrap().len(), 2);
    assert_eq!(deferred["chunks_deleted"], 0, "{deferred}");
    let held = deferred["chunks_deferred"].as_u64().unwrap();
    assert!(held > 0, "{deferred}");
    assert_eq!(
        deferred["publishes_in_flight"],
        serde_json::json!([publish_name(&repo).await])
    );
    assert_eq!(stored_objects(&target).await, before);

    publish.release().await;
    assert!(repo.list_leases().await.unwrap().is_empty());
    let collected = target.json(&gc);
    assert_eq!(
        collected["chunks_deleted"].as_u64(),
        Some(held),
        "{collected}"
    );
    assert_eq!(stored_objects(&target).await, referenced(&target).await);
    assert!(repo.list_leases().await.unwrap().is_empty());
}

async fn publish_name(repo: &snaprelay::repo::Repo) -> String {
    let leases = repo.list_leases().await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    leases[0].name.clone()
}

#[tokio::test]
async fn gc_defers_chunks_while_a_publish_is_in_flight_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    deferral(Target::file(dir.path(), "defer", &config(Layout::Chunks))).await;
}

#[tokio::test]
async fn gc_defers_packs_while_a_publish_is_in_flight_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    deferral(Target::file(dir.path(), "defer", &config(Layout::Packs))).await;
}

#[tokio::test]
async fn gc_defers_chunks_while_a_publish_is_in_flight_on_s3() {
    let Some(s3) = support::s3("gc_defers_chunks_while_a_publish_is_in_flight_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    deferral(Target::s3(
        &s3,
        dir.path(),
        "defer",
        &config(Layout::Chunks),
    ))
    .await;
}

#[tokio::test]
async fn gc_defers_packs_while_a_publish_is_in_flight_on_s3() {
    let Some(s3) = support::s3("gc_defers_packs_while_a_publish_is_in_flight_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    deferral(Target::s3(&s3, dir.path(), "defer", &config(Layout::Packs))).await;
}

/// A push that starts while a GC holds its lease waits for that GC before it looks at the
/// store, then publishes as usual.
#[tokio::test]
async fn push_waits_for_a_gc_in_progress() {
    use snaprelay::lease::{Lease, DEFAULT_TTL};
    use snaprelay::repo::LeaseKind;

    let dir = tempfile::tempdir().unwrap();
    let target = Target::file(dir.path(), "wait", &config(Layout::Packs));
    let leader = dir.path().join("leader");
    target.json(&[
        "push",
        write_generation(&leader, 1).to_str().unwrap(),
        "--json",
    ]);
    let repo = target.repo().await;
    let gc = Lease::take(&repo, LeaseKind::Gc, DEFAULT_TTL, None)
        .await
        .unwrap();
    let meta = write_generation(&leader, 2);
    let mut push = target.spawn(&["push", meta.to_str().unwrap(), "--json"]);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        push.try_wait().unwrap().is_none(),
        "the push went ahead while a GC held its lease"
    );
    assert_eq!(repo.list_manifests(None).await.unwrap().len(), 1);
    gc.release().await;
    let out = push.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", support::stderr(&out));
    assert!(
        support::stderr(&out).contains("waiting for a GC in progress"),
        "{}",
        support::stderr(&out)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pushed["index"], 2);
    assert!(repo.list_leases().await.unwrap().is_empty());
}
