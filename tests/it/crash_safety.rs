//! A `push` killed with SIGKILL in the middle of a large snapshot leaves no visible snapshot
//! (the manifest is the commit point). Of chunk objects, the next push completes it,
//! uploading only the chunks that had not made it into the store. Of packs, the packs the
//! killed push finished are garbage no manifest names: the next push publishes the
//! snapshot whole, and GC deletes them once the killed push's lease is gone, never before.

use crate::support;

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use snaprelay::chunk::ChunkParams;
use support::http_gate::HttpGate;
use support::{Layout, Target};

/// The repository the chunk-object cases create.
fn chunks() -> String {
    Layout::Chunks.section("")
}

async fn stored_chunks(target: &Target) -> u64 {
    let store = target.store();
    store
        .backend
        .list(Some(&store.key("chunks")))
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .unwrap()
}

/// The snapshot the push is killed in: written plainly (the sidecar cuts it), or by the
/// node's `SnapshotDir` with a chunk index (the sidecar reads only missing chunks).
async fn killed_push_resumes(target: Target, size: u64, indexed: bool) {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let leader = work.path().join("leader");
    let meta = if indexed {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; size as usize];
        rand::rngs::StdRng::seed_from_u64(99).fill_bytes(&mut data);
        support::write_node_snapshot(&leader, 500, 4, &data, Some(ChunkParams::default()))
    } else {
        support::write_random_snapshot(&leader, 500, 4, size, 99)
    };
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let data_path = meta.with_file_name(envelope["data"].as_str().unwrap());
    let expected_chunks = size / (1 << 20);

    let mut child = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .args(&target.args)
        .args(["push", meta.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a tenth of the chunks are in, so that the kill lands mid-upload.
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Some(status) = child.try_wait().unwrap() {
            panic!("push finished ({status}) before it could be killed; use a larger snapshot");
        }
        if stored_chunks(&target).await >= expected_chunks / 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "push made no progress"
        );
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");

    // Nothing is visible as a snapshot.
    let repo = target.repo().await;
    assert!(repo.list_manifests(None).await.unwrap().is_empty());
    let listed = target.json(&["list", "--json"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 0);
    let to = work.path().join("follower");
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
    assert!(support::stderr(&out).contains("holds no snapshot"));
    assert!(support::entries(&to).is_empty());

    // The second push sends exactly the chunks that are not there yet.
    let already = stored_chunks(&target).await;
    let pushed = target.json(&["push", meta.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["chunk_index"], indexed, "{pushed}");
    let total = pushed["chunks_total"].as_u64().unwrap();
    let sent = pushed["chunks_transferred"].as_u64().unwrap();
    assert!(
        already > 0 && already < total,
        "{already} of {total} chunks were stored before the kill"
    );
    // Exactly, but for the uploads the killed push had in flight: the server may still
    // complete a request whose body it received after the client died, between the count
    // above and the second push's look. There are at most `upload.concurrency` (8) of them.
    assert!(
        sent <= total - already && sent + IN_FLIGHT >= total - already,
        "{already} of {total} stored before the second push, which sent {sent}: {pushed}"
    );

    let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert_eq!(
        support::sha256_file(std::path::Path::new(pulled["data"].as_str().unwrap())),
        support::sha256_file(&data_path)
    );
}

/// The killed push's uploads that may land after it died (the default `upload.concurrency`).
const IN_FLIGHT: u64 = 8;

#[tokio::test]
async fn killed_push_on_file_store_leaves_no_manifest_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    killed_push_resumes(
        Target::file(dir.path(), "crash", &chunks()),
        768 << 20,
        false,
    )
    .await;
}

#[tokio::test]
async fn killed_push_on_s3_leaves_no_manifest_and_resumes() {
    let Some(s3) = support::s3("killed_push_on_s3_leaves_no_manifest_and_resumes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    killed_push_resumes(
        Target::s3(&s3, dir.path(), "crash", &chunks()),
        512 << 20,
        false,
    )
    .await;
}

#[tokio::test]
async fn killed_indexed_push_on_s3_leaves_no_manifest_and_resumes() {
    let Some(s3) = support::s3("killed_indexed_push_on_s3_leaves_no_manifest_and_resumes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    killed_push_resumes(
        Target::s3(&s3, dir.path(), "crash", &chunks()),
        512 << 20,
        true,
    )
    .await;
}

/// Data packs the killed pack push finishes before it is killed: it is held at the next
/// one's PUT (packs of 1 MiB are one PUT each, written one after the other).
const PACKS_BEFORE_THE_KILL: usize = 4;

/// A push into a pack repository through a gate that lets [`PACKS_BEFORE_THE_KILL`] pack
/// PUTs through and holds the next, killed there: exactly those packs are in the store, and
/// no manifest. The next push (straight to the store) publishes the snapshot; a GC while
/// the killed push's lease is in the store defers those packs, and once it is gone (as its
/// TTL would make it) deletes exactly them.
async fn killed_pack_push(s3: &support::S3, indexed: bool) {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gate = HttpGate::start_after(&s3.endpoint, "packs", PACKS_BEFORE_THE_KILL).await;
    let prefix = support::unique("crash");
    let section = Layout::Packs.section("pack_size = \"1MiB\"\n[retention]\ngrace = \"0s\"\n");
    // The killed push reaches the store through the gate, everything after it directly.
    let direct = s3.config_file(work.path(), &prefix, "crash", &section);
    let target = Target {
        args: vec!["--config".into(), direct.display().to_string()],
        settings: s3.settings(&prefix),
        cluster: "crash".into(),
    };
    let gated = std::fs::read_to_string(&direct)
        .unwrap()
        .replace(&s3.endpoint, &gate.endpoint());
    let gated_config = work.path().join("gated.toml");
    std::fs::write(&gated_config, gated).unwrap();
    let leader = work.path().join("leader");
    let data = support::random_bytes(16 << 20, 99);
    let meta = match indexed {
        true => support::write_node_snapshot(&leader, 500, 4, &data, Some(ChunkParams::PACKED)),
        false => support::write_snapshot(&leader, 500, 4, &data),
    };
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let data_path = meta.with_file_name(envelope["data"].as_str().unwrap());

    let mut child = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&gated_config)
        .args(["push", meta.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), gate.arrived())
        .await
        .expect("the push reaches its next pack's PUT");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");

    // Nothing is visible as a snapshot; what the push finished is in the store.
    let repo = target.repo().await;
    assert!(repo.list_manifests(None).await.unwrap().is_empty());
    let listed = target.json(&["list", "--json"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 0);
    let to = work.path().join("follower");
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
    assert!(support::stderr(&out).contains("holds no snapshot"));
    assert!(support::entries(&to).is_empty());
    let orphans: HashSet<_> = repo.list_packs().await.unwrap().into_keys().collect();
    assert_eq!(orphans.len(), PACKS_BEFORE_THE_KILL, "{orphans:?}");
    let killed_lease = repo.list_leases().await.unwrap();
    assert_eq!(killed_lease.len(), 1, "{killed_lease:?}");

    let pushed = target.json(&["push", meta.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["chunk_index"], indexed, "{pushed}");
    let manifest = repo
        .read_packed_manifest(&repo.find_manifest(500).await.unwrap())
        .await
        .unwrap();
    let used: HashSet<_> = manifest.pack_ids().collect();
    assert!(used.is_disjoint(&orphans), "{used:?} {orphans:?}");
    let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert_eq!(
        support::sha256_file(std::path::Path::new(pulled["data"].as_str().unwrap())),
        support::sha256_file(&data_path)
    );

    // The killed push may still be running for all a GC can tell: its packs stay.
    let deferred = target.json(&["gc", "--apply", "--json"]);
    assert_eq!(
        deferred["chunks_deferred"].as_u64(),
        Some(PACKS_BEFORE_THE_KILL as u64),
        "{deferred}"
    );
    assert_eq!(
        deferred["publishes_in_flight"],
        serde_json::json!([killed_lease[0].name])
    );
    let all = |repo: &snaprelay::repo::Repo| {
        let repo = repo.clone();
        async move {
            repo.list_packs()
                .await
                .unwrap()
                .into_keys()
                .collect::<HashSet<_>>()
        }
    };
    assert_eq!(all(&repo).await, &used | &orphans);
    repo.delete_lease(&killed_lease[0].name).await.unwrap();
    let collected = target.json(&["gc", "--apply", "--json"]);
    assert_eq!(
        collected["chunks_deleted"].as_u64(),
        Some(PACKS_BEFORE_THE_KILL as u64),
        "{collected}"
    );
    assert_eq!(all(&repo).await, used);
    let verified = target.json(&["verify", "--json"]);
    assert_eq!(verified["bad_chunks"], serde_json::json!([]), "{verified}");
}

#[tokio::test]
async fn killed_push_of_packs_on_s3_leaves_no_manifest_and_its_packs_are_collected() {
    let Some(s3) =
        support::s3("killed_push_of_packs_on_s3_leaves_no_manifest_and_its_packs_are_collected")
    else {
        return;
    };
    killed_pack_push(&s3, false).await;
}

#[tokio::test]
async fn killed_indexed_push_of_packs_on_s3_leaves_no_manifest_and_its_packs_are_collected() {
    let Some(s3) = support::s3(
        "killed_indexed_push_of_packs_on_s3_leaves_no_manifest_and_its_packs_are_collected",
    ) else {
        return;
    };
    killed_pack_push(&s3, true).await;
}
