//! Damage in the store never reaches a target directory: every kind of bad chunk or manifest
//! makes `pull` fail with a message naming the object and the reason, exit code 1 (2 for a
//! manifest of another cluster), and leaves the target directory empty. `verify` names each
//! bad chunk and the manifests that use it.

use crate::support;

use std::path::Path;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use snaprelay::manifest::Manifest;
use snaprelay::repo::{ManifestId, Repo};
use support::Target;

const SIZE: u64 = 3 << 20;
/// Small chunks, so that a 3 MiB snapshot has dozens of them.
const SMALL_CHUNKS: &str =
    "[chunking]\nmin_size = \"16KiB\"\navg_size = \"64KiB\"\nmax_size = \"256KiB\"\n";

/// A store holding one good snapshot (index 10), and its manifest.
async fn published(target: &Target, work: &Path) -> (Repo, Manifest) {
    let meta = support::write_random_snapshot(&work.join("leader"), 10, 1, SIZE, 7);
    target.json(&["push", meta.to_str().unwrap(), "--json"]);
    let repo = target.repo().await;
    let id = repo.find_manifest(10).await.unwrap();
    let manifest = repo.read_manifest(&id).await.unwrap();
    assert!(
        manifest.chunks.len() >= 3,
        "want several chunks, got {}",
        manifest.chunks.len()
    );
    (repo, manifest)
}

/// Runs `pull` into a fresh directory and checks that it failed with `code`, said `needles`,
/// and left nothing behind.
fn pull_fails(target: &Target, work: &Path, code: i32, needles: &[&str]) {
    let to = work.join(support::unique("to"));
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    let stderr = support::stderr(&out);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        support::entries(&to),
        Vec::<String>::new(),
        "pull left files behind"
    );
}

/// Writes `manifest` (possibly inconsistent) under the name its log id gives.
async fn plant_manifest(repo: &Repo, manifest: &Manifest, body: Vec<u8>) -> ManifestId {
    let id = ManifestId::of(manifest);
    repo.put_raw_manifest(&id, Bytes::from(body)).await.unwrap();
    id
}

async fn flipped_byte(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let chunk = &manifest.chunks[1];
    let store = target.store();
    let hex = chunk.sha256.to_hex();
    let key = store.key(&format!("chunks/{}/{hex}", &hex[..2]));
    let mut bytes = store
        .backend
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[1000] ^= 0x01;
    repo.put_chunk(&chunk.sha256, bytes.into()).await.unwrap();
    pull_fails(target, work, 1, &[&hex, "corrupt", "hashes to"]);

    // verify names the chunk and the manifest that uses it, and exits 1.
    let out = target.run(&["verify", "--all"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        support::stderr(&out)
    );
    let id = ManifestId::of(&manifest).to_string();
    assert!(
        stdout.contains(&format!("BAD chunk {hex}")) && stdout.contains(&id),
        "{stdout}"
    );
    let out = target.run(&["verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["bad_chunks"][0]["sha256"], hex);
    assert_eq!(report["bad_chunks"][0]["manifests"][0], id);
}

async fn truncated_chunk(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let chunk = &manifest.chunks[0];
    let store = target.store();
    let hex = chunk.sha256.to_hex();
    let key = store.key(&format!("chunks/{}/{hex}", &hex[..2]));
    let bytes = store
        .backend
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    repo.put_chunk(&chunk.sha256, bytes.slice(..bytes.len() - 1))
        .await
        .unwrap();
    pull_fails(target, work, 1, &[&hex, "bytes, the manifest says"]);
}

async fn missing_chunk(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let chunk = manifest.chunks.last().unwrap();
    repo.delete_chunk(&chunk.sha256).await.unwrap();
    pull_fails(target, work, 1, &[&chunk.sha256.to_hex(), "missing"]);
    let out = target.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing from the store"));
}

async fn manifest_not_json(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 11;
    let id = plant_manifest(&repo, &newer, b"this is { not json".to_vec()).await;
    pull_fails(target, work, 1, &[&id.to_string(), "not a manifest"]);
}

async fn chunk_key_with_dot_dot(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 12;
    let json = serde_json::to_string(&newer)
        .unwrap()
        .replace(&newer.chunks[0].sha256.to_hex(), "../../../../etc/passwd");
    let id = plant_manifest(&repo, &newer, json.into_bytes()).await;
    pull_fails(target, work, 1, &[&id.to_string(), "not a sha256"]);
}

async fn size_of_one_pib(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 13;
    newer.size = 1 << 50;
    let id = plant_manifest(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await;
    pull_fails(
        target,
        work,
        1,
        &[
            &id.to_string(),
            "1125899906842624",
            "sum of its chunk lengths",
        ],
    );
}

async fn manifest_of_another_cluster(target: &Target, work: &Path) {
    let (repo, manifest) = published(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 14;
    newer.cluster_id = "intruder".into();
    plant_manifest(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await;
    pull_fails(target, work, 2, &["\"intruder\"", "refusing"]);
}

/// The whole suite against one kind of store; each case gets a fresh prefix.
async fn all_cases(make: impl Fn(&Path) -> Target) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    flipped_byte(&make(w), w).await;
    truncated_chunk(&make(w), w).await;
    missing_chunk(&make(w), w).await;
    manifest_not_json(&make(w), w).await;
    chunk_key_with_dot_dot(&make(w), w).await;
    size_of_one_pib(&make(w), w).await;
    manifest_of_another_cluster(&make(w), w).await;
}

#[tokio::test]
async fn damage_is_refused_on_file_store() {
    all_cases(|w| Target::file(w, "dmg", SMALL_CHUNKS)).await;
}

#[tokio::test]
async fn damage_is_refused_on_s3() {
    let Some(s3) = support::s3("damage_is_refused_on_s3") else {
        return;
    };
    all_cases(|w| Target::s3(&s3, w, "dmg", SMALL_CHUNKS)).await;
}

/// A pull whose target already holds a snapshot leaves it untouched when the new one is bad.
#[tokio::test]
async fn failed_pull_keeps_existing_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "keep", SMALL_CHUNKS);
    let (repo, manifest) = published(&target, work.path()).await;
    let to = work.path().join("to");
    target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    let before = support::entries(&to);
    let hash = support::sha256_file(&to.join(&before[0]));
    let mut newer = manifest.clone();
    newer.last_log_index = 20;
    newer.chunks[0].len += 1;
    plant_manifest(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await;
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
    assert_eq!(support::entries(&to), before);
    assert_eq!(support::sha256_file(&to.join(&before[0])), hash);
}

/// Bad command lines and configs are usage errors (exit 2) that name the problem.
#[test]
fn usage_errors_exit_2() {
    let work = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_snaprelay");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let out = run(&["pull"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--store", "ftp://x", "--cluster-id", "a", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        support::stderr(&out).contains("store.url"),
        "{}",
        support::stderr(&out)
    );
    let cfg = work.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[upload]\nconcurrency = 100\n",
    )
    .unwrap();
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "check-config",
        "--no-probe",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(support::stderr(&out).contains("upload.concurrency: must be between 1 and 64"));
    let out = run(&["--store", "memory://", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(support::stderr(&out).contains("cluster_id"));
    // A push of a meta file that is not an envelope is a data error naming the file.
    let meta = work.path().join("x.meta.json");
    std::fs::write(&meta, "{").unwrap();
    let store = format!("file://{}", work.path().join("s").display());
    let out = run(&[
        "--store",
        &store,
        "--cluster-id",
        "a",
        "push",
        meta.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(support::stderr(&out).contains("x.meta.json"));
    // check-config never prints secrets.
    std::fs::write(
        &cfg,
        "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt/p\"\naccess_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"wJalrXUtnFEMI-hunter2\"\n",
    )
    .unwrap();
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "check-config",
        "--no-probe",
    ]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("hunter2") && text.contains("********"),
        "{text}"
    );
}

/// A local copy that was damaged on disk is never passed on: the whole-file check catches
/// it, and the fetch is redone checking every local chunk, downloading the damaged one.
#[tokio::test]
async fn damaged_local_copy_is_not_passed_on() {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "local", SMALL_CHUNKS);
    let leader = work.path().join("leader");
    let mut data = vec![0u8; SIZE as usize];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3),
        &mut data,
    );
    let first = support::write_snapshot(&leader, 10, 1, &data);
    target.json(&["push", first.to_str().unwrap(), "--json"]);
    let to = work.path().join("to");
    let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);

    // The next snapshot changes only its first bytes; the rest is shared.
    data[..1000].fill(7);
    let second = support::write_snapshot(&leader, 11, 1, &data);
    target.json(&["push", second.to_str().unwrap(), "--json"]);
    // Damage the follower's copy of the first snapshot in the middle.
    let local = std::path::PathBuf::from(pulled["data"].as_str().unwrap());
    let mut bytes = std::fs::read(&local).unwrap();
    bytes[SIZE as usize / 2] ^= 0xff;
    std::fs::write(&local, &bytes).unwrap();

    let out = target.run(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    assert!(
        support::stderr(&out).contains("copied from a local snapshot or prefetched was damaged"),
        "{}",
        support::stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data_path = std::path::Path::new(report["data"].as_str().unwrap());
    assert_eq!(std::fs::read(data_path).unwrap(), data);
    assert!(report["chunks_reused"].as_u64().unwrap() > 0);
}
