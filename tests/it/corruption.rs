//! Damage in the store never reaches a target directory: every kind of bad chunk, pack,
//! tree block or manifest makes `pull` fail with a message naming the object and the
//! reason, exit code 1 (2 for a manifest of another cluster), and leaves the target
//! directory empty. `verify` names each bad chunk, pack or block and the manifests that use
//! it. Each case runs on a repository of chunk objects and on one of packs (the default),
//! damaged in that layout's own objects.

use crate::support;

use std::collections::HashSet;
use std::path::Path;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use snaprelay::manifest::Manifest;
use snaprelay::manifest_v2 as v2;
use snaprelay::repo::{ManifestId, Repo};
use support::{Layout, Target};

const SIZE: u64 = 3 << 20;
/// Small chunks, so that a 3 MiB snapshot has dozens of them.
const SMALL_CHUNKS: &str =
    "[chunking]\nmin_size = \"16KiB\"\navg_size = \"64KiB\"\nmax_size = \"256KiB\"\n";

/// The config of a store of `layout`: chunk objects with small chunks (dozens in 3 MiB), or
/// packs as they are by default (hundreds of 16 KiB chunks in 3 MiB).
fn config(layout: Layout) -> String {
    match layout {
        Layout::Chunks => format!("{}{SMALL_CHUNKS}", layout.section("")),
        Layout::Packs => layout.section(""),
    }
}

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

/// The chunk-object cases against one kind of store; each case gets a fresh prefix.
async fn chunk_cases(make: impl Fn(&Path) -> Target) {
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

/// A pack store holding one good snapshot (index 10): its manifest and its first block.
async fn published_packs(
    target: &Target,
    work: &Path,
) -> (Repo, v2::Manifest, snaprelay::tree::Block) {
    let meta = support::write_random_snapshot(&work.join("leader"), 10, 1, SIZE, 7);
    target.json(&["push", meta.to_str().unwrap(), "--json"]);
    let repo = target.repo().await;
    let id = repo.find_manifest(10).await.unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    let block = repo
        .read_block(repo.packs().unwrap(), &manifest, 0)
        .await
        .unwrap();
    assert!(
        block.chunks.len() >= 3,
        "want several chunks, got {}",
        block.chunks.len()
    );
    (repo, manifest, block)
}

/// `verify` exits 1 and names `what` (a chunk id, "pack <id>" or "block <id> in pack
/// <id>") as bad, used by manifest 10; its JSON says the same.
fn verify_names(target: &Target, what: &str, manifest: &v2::Manifest) {
    let out = target.run(&["verify", "--all"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        support::stderr(&out)
    );
    let id = ManifestId::of_packed(manifest).to_string();
    assert!(
        stdout.contains(&format!("BAD chunk {what}: ")) && stdout.contains(&id),
        "{stdout}"
    );
    let out = target.run(&["verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = report["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["sha256"], what, "{report}");
    assert_eq!(bad[0]["manifests"], serde_json::json!([id]), "{report}");
}

/// Replaces the stored bytes of pack `id` by what `damage` makes of them.
async fn damage_pack(
    repo: &Repo,
    target: &Target,
    id: &snaprelay::pack::PackId,
    damage: impl FnOnce(&mut Vec<u8>),
) {
    let mut bytes = support::pack_bytes(&target.store(), id).await;
    damage(&mut bytes);
    repo.put_raw_pack(id, bytes.into()).await.unwrap();
}

/// The tree pack (the pack block 0 is in) of a validated manifest.
fn tree_pack(manifest: &v2::Manifest) -> snaprelay::pack::PackId {
    manifest.packs[manifest.blocks[0].pack as usize].id
}

/// One byte flipped in the middle of a chunk's blob inside a data pack.
async fn flipped_blob(target: &Target, work: &Path) {
    let (repo, manifest, block) = published_packs(target, work).await;
    let victim = block.chunks[1];
    let pack = block.packs[victim.pack as usize];
    damage_pack(&repo, target, &pack, |b| {
        b[victim.offset as usize + victim.stored_len as usize / 2] ^= 0x01
    })
    .await;
    let hex = victim.id.to_hex();
    pull_fails(target, work, 1, &[&hex, "corrupt", "hashes to"]);
    verify_names(target, &hex, &manifest);
}

/// A data pack one byte short, or one byte long: not the pack the manifest names.
async fn pack_of_the_wrong_size(target: &Target, work: &Path, grown: bool) {
    let (repo, manifest, block) = published_packs(target, work).await;
    let pack = block.packs[0];
    damage_pack(&repo, target, &pack, |b| match grown {
        true => b.push(0),
        false => drop(b.pop()),
    })
    .await;
    let size = manifest.packs.iter().find(|p| p.id == pack).unwrap().size;
    let stored = if grown { size + 1 } else { size - 1 };
    let hex = pack.to_hex();
    pull_fails(
        target,
        work,
        1,
        &[
            &format!("pack {hex} is corrupt"),
            &format!("the store holds {stored} bytes under its name, the manifest says {size}"),
        ],
    );
    verify_names(target, &format!("pack {hex}"), &manifest);
}

/// A data pack, or the tree pack, deleted.
async fn missing_pack(target: &Target, work: &Path, tree: bool) {
    let (repo, manifest, block) = published_packs(target, work).await;
    let pack = match tree {
        true => tree_pack(&manifest),
        false => block.packs[0],
    };
    repo.delete_pack(&pack).await.unwrap();
    let hex = pack.to_hex();
    pull_fails(
        target,
        work,
        1,
        &[&format!("pack {hex} is missing from the store")],
    );
    verify_names(target, &format!("pack {hex}"), &manifest);
}

/// One byte of the first tree block flipped inside the tree pack.
async fn damaged_block(target: &Target, work: &Path) {
    let (repo, manifest, _) = published_packs(target, work).await;
    let b = &manifest.blocks[0];
    let pack = tree_pack(&manifest);
    damage_pack(&repo, target, &pack, |bytes| {
        bytes[b.offset as usize + b.stored_len as usize / 2] ^= 0x01
    })
    .await;
    pull_fails(
        target,
        work,
        1,
        &[&format!("tree block {} (in pack {pack}) is corrupt", b.id)],
    );
    verify_names(target, &format!("block {} in pack {pack}", b.id), &manifest);
}

/// One byte of a data pack's trailer flipped: a pull never reads trailers (every blob it
/// reads is checked against its id, every block against the manifest), so it still gets
/// the leader's bytes; `verify`, which checks trailers, names the pack.
async fn damaged_trailer(target: &Target, work: &Path) {
    let (repo, manifest, block) = published_packs(target, work).await;
    let pack = block.packs[0];
    damage_pack(&repo, target, &pack, |b| {
        // The last byte of the trailer's last entry, before its sha256 and the footer.
        let at = b.len() - snaprelay::pack::FOOTER_LEN as usize - 33;
        b[at] ^= 0x01
    })
    .await;
    let to = work.join(support::unique("to"));
    let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert_eq!(
        support::sha256_file(Path::new(pulled["data"].as_str().unwrap())),
        support::sha256_file(&work.join("leader").join("node-10-1.snap"))
    );
    verify_names(target, &format!("pack {pack}"), &manifest);
}

/// Writes format-2 `manifest` (possibly inconsistent) under the name its log id gives.
async fn plant_packed(repo: &Repo, manifest: &v2::Manifest, body: Vec<u8>) -> ManifestId {
    let id = ManifestId::of_packed(manifest);
    repo.put_raw_manifest(&id, Bytes::from(body)).await.unwrap();
    id
}

async fn packed_manifest_not_json(target: &Target, work: &Path) {
    let (repo, manifest, _) = published_packs(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 11;
    let id = plant_packed(&repo, &newer, b"this is { not json".to_vec()).await;
    pull_fails(target, work, 1, &[&id.to_string(), "not a manifest"]);
}

/// A pack id, or a block id, that is a path: refused as it is parsed.
async fn pack_and_block_ids_with_dot_dot(target: &Target, work: &Path) {
    let (repo, manifest, _) = published_packs(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 12;
    let json = serde_json::to_string(&newer)
        .unwrap()
        .replace(&manifest.packs[0].id.to_hex(), "../../../../etc/passwd");
    let id = plant_packed(&repo, &newer, json.into_bytes()).await;
    pull_fails(target, work, 1, &[&id.to_string(), "not a pack id"]);
    repo.delete_manifest(&id).await.unwrap();
    newer.last_log_index = 13;
    let json = serde_json::to_string(&newer)
        .unwrap()
        .replace(&manifest.blocks[0].id.to_hex(), "../../../../etc/passwd");
    let id = plant_packed(&repo, &newer, json.into_bytes()).await;
    pull_fails(target, work, 1, &[&id.to_string(), "not a sha256"]);
}

async fn packed_size_of_one_pib(target: &Target, work: &Path) {
    let (repo, manifest, _) = published_packs(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 14;
    newer.size = 1 << 50;
    let id = plant_packed(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await;
    pull_fails(
        target,
        work,
        1,
        &[
            &id.to_string(),
            "1125899906842624",
            "sum of its blocks' bytes",
        ],
    );
}

async fn packed_manifest_of_another_cluster(target: &Target, work: &Path) {
    let (repo, manifest, _) = published_packs(target, work).await;
    let mut newer = manifest.clone();
    newer.last_log_index = 15;
    newer.cluster_id = "intruder".into();
    plant_packed(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await;
    pull_fails(target, work, 2, &["\"intruder\"", "refusing"]);
}

/// The pack cases against one kind of store; each case gets a fresh prefix.
async fn pack_cases(make: impl Fn(&Path) -> Target) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    flipped_blob(&make(w), w).await;
    pack_of_the_wrong_size(&make(w), w, false).await;
    pack_of_the_wrong_size(&make(w), w, true).await;
    missing_pack(&make(w), w, false).await;
    missing_pack(&make(w), w, true).await;
    damaged_block(&make(w), w).await;
    damaged_trailer(&make(w), w).await;
    packed_manifest_not_json(&make(w), w).await;
    pack_and_block_ids_with_dot_dot(&make(w), w).await;
    packed_size_of_one_pib(&make(w), w).await;
    packed_manifest_of_another_cluster(&make(w), w).await;
}

#[tokio::test]
async fn damaged_chunk_objects_are_refused_on_file_store() {
    chunk_cases(|w| Target::file(w, "dmg", &config(Layout::Chunks))).await;
}

#[tokio::test]
async fn damaged_chunk_objects_are_refused_on_s3() {
    let Some(s3) = support::s3("damaged_chunk_objects_are_refused_on_s3") else {
        return;
    };
    chunk_cases(|w| Target::s3(&s3, w, "dmg", &config(Layout::Chunks))).await;
}

#[tokio::test]
async fn damaged_packs_are_refused_on_file_store() {
    pack_cases(|w| Target::file(w, "dmg", &config(Layout::Packs))).await;
}

#[tokio::test]
async fn damaged_packs_are_refused_on_s3() {
    let Some(s3) = support::s3("damaged_packs_are_refused_on_s3") else {
        return;
    };
    pack_cases(|w| Target::s3(&s3, w, "dmg", &config(Layout::Packs))).await;
}

/// A pull whose target already holds a snapshot leaves it untouched when the new one is
/// bad: a chunk one byte longer than it is, or (packs) a block holding a byte more than it
/// does.
async fn failed_pull_keeps_existing_snapshot(layout: Layout) {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "keep", &config(layout));
    let to = work.path().join("to");
    let planted = match layout {
        Layout::Chunks => {
            let (repo, manifest) = published(&target, work.path()).await;
            target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
            let mut newer = manifest.clone();
            newer.last_log_index = 20;
            newer.chunks[0].len += 1;
            plant_manifest(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await
        }
        Layout::Packs => {
            let (repo, manifest, _) = published_packs(&target, work.path()).await;
            target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
            let mut newer = manifest.clone();
            newer.last_log_index = 20;
            newer.blocks[0].bytes += 1;
            newer.size += 1;
            plant_packed(&repo, &newer, serde_json::to_vec(&newer).unwrap()).await
        }
    };
    let before = support::entries(&to);
    let hash = support::sha256_file(&to.join(&before[0]));
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
    assert!(
        support::stderr(&out).contains(&planted.index.to_string()),
        "{}",
        support::stderr(&out)
    );
    assert_eq!(support::entries(&to), before);
    assert_eq!(support::sha256_file(&to.join(&before[0])), hash);
}

#[tokio::test]
async fn failed_pull_keeps_existing_snapshot_of_chunk_objects() {
    failed_pull_keeps_existing_snapshot(Layout::Chunks).await;
}

#[tokio::test]
async fn failed_pull_keeps_existing_snapshot_of_packs() {
    failed_pull_keeps_existing_snapshot(Layout::Packs).await;
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

/// A local copy that was damaged on disk is never passed on. Of chunk objects, local
/// chunks are taken unhashed; the whole-file check catches the damage, and the fetch is
/// redone checking every local chunk, downloading the damaged one. Of packs, every local
/// chunk is hashed before it is taken: the damaged one is downloaded at once, with the
/// chunks that changed, and nothing else.
async fn damaged_local_copy_is_not_passed_on(layout: Layout) {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "local", &config(layout));
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
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data_path = std::path::Path::new(report["data"].as_str().unwrap());
    assert_eq!(std::fs::read(data_path).unwrap(), data);
    assert!(report["chunks_reused"].as_u64().unwrap() > 0);
    match layout {
        Layout::Chunks => assert!(
            support::stderr(&out)
                .contains("copied from a local snapshot or prefetched was damaged"),
            "{}",
            support::stderr(&out)
        ),
        Layout::Packs => {
            let repo = target.repo().await;
            let chunks = |index| {
                let repo = repo.clone();
                async move {
                    let m = repo
                        .read_packed_manifest(&repo.find_manifest(index).await.unwrap())
                        .await
                        .unwrap();
                    let mut ids = Vec::new();
                    for i in 0..m.blocks.len() {
                        let block = repo.read_block(repo.packs().unwrap(), &m, i).await.unwrap();
                        ids.extend(block.chunks.iter().map(|c| c.id));
                    }
                    ids
                }
            };
            let old: HashSet<_> = chunks(10).await.into_iter().collect();
            let changed = chunks(11).await.iter().filter(|c| !old.contains(c)).count() as u64;
            assert_eq!(
                report["chunks_transferred"].as_u64(),
                Some(changed + 1),
                "the {changed} changed chunks and the damaged one: {report}"
            );
        }
    }
}

#[tokio::test]
async fn damaged_local_copy_of_chunk_objects_is_not_passed_on() {
    damaged_local_copy_is_not_passed_on(Layout::Chunks).await;
}

#[tokio::test]
async fn damaged_local_copy_of_packs_is_not_passed_on() {
    damaged_local_copy_is_not_passed_on(Layout::Packs).await;
}
