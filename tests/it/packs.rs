//! A repository of packs (`[repository] layout = "packs"`, format 2) end to end through the
//! CLI, on a file store and on the S3 server: push, an incremental push that uploads about
//! what changed, pull into an empty directory and into one holding the previous snapshot
//! (the same bytes, little downloaded), a resumed pull, `gc` deleting exactly the packs no
//! kept manifest uses, `verify` and `pull` catching a damaged blob, and each format read
//! only as itself.

use crate::support;

use std::collections::HashSet;
use std::path::Path;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use rand::{Rng, RngCore, SeedableRng};
use support::Target;

const PACKS: &str = "[repository]\nlayout = \"packs\"\n[retention]\ngrace = \"0s\"\n";
const SIZE: usize = 8 << 20;

/// Snapshot `index`: 8 MiB of seeded random bytes with `edits` scattered 1 KiB overwrites
/// and two 3 KiB insertions per generation after the first.
fn write_generation(dir: &Path, index: u64, generations: u64) -> std::path::PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut data = vec![0u8; SIZE];
    rng.fill_bytes(&mut data);
    for g in 1..generations {
        let mut r = rand::rngs::StdRng::seed_from_u64(100 + g);
        for _ in 0..8 {
            let at = r.random_range(0..data.len() - 1024);
            r.fill_bytes(&mut data[at..at + 1024]);
        }
        for _ in 0..2 {
            let at = r.random_range(0..data.len());
            let mut insert = vec![0u8; 3072];
            r.fill_bytes(&mut insert);
            data.splice(at..at, insert);
        }
    }
    support::write_snapshot(dir, index, 1, &data)
}

/// The keys under the repository's prefix, relative to it.
async fn keys(target: &Target) -> Vec<String> {
    use futures::TryStreamExt;
    let store = target.store();
    let prefix = store.prefix.to_string();
    let mut all: Vec<String> = store
        .backend
        .list(Some(&store.prefix))
        .map_ok(|m| {
            m.location
                .to_string()
                .strip_prefix(&prefix)
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned()
        })
        .try_collect()
        .await
        .unwrap();
    all.sort();
    all
}

fn packs_of(keys: &[String]) -> HashSet<String> {
    keys.iter()
        .filter(|k| k.starts_with("packs/"))
        .cloned()
        .collect()
}

fn data_of(pulled: &serde_json::Value) -> std::path::PathBuf {
    pulled["data"].as_str().unwrap().into()
}

async fn round_trip(target: Target) {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let leader = work.path().join("leader");
    let a = write_generation(&leader, 10, 1);
    let pushed = target.json(&["push", a.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["already_published"], false, "{pushed}");
    let after_a = keys(&target).await;
    assert!(
        after_a.iter().all(|k| !k.starts_with("chunks/")),
        "a pack repository stores no chunk objects: {after_a:?}"
    );
    let packs_a = packs_of(&after_a);
    // 8 MiB of 16 KiB chunks is ~500 chunks: one data pack, one tree pack.
    assert!(
        (2..=4).contains(&packs_a.len()),
        "packs after the first push: {packs_a:?}"
    );
    let status = target.json(&["status", "--json"]);
    assert_eq!(status["layout"], "packs", "{status}");

    let b = write_generation(&leader, 20, 2);
    let size_b = std::fs::metadata(leader.join("node-20-1.snap"))
        .unwrap()
        .len();
    let pushed = target.json(&["push", b.to_str().unwrap(), "--json"]);
    let uploaded = pushed["bytes_transferred"].as_u64().unwrap();
    assert!(
        uploaded * 20 <= size_b,
        "8 KiB overwritten and 6 KiB inserted must upload under 5% of {size_b}: {pushed}"
    );
    let after_b = keys(&target).await;
    let new_packs = packs_of(&after_b).difference(&packs_a).count();
    assert!(
        (1..=2).contains(&new_packs),
        "an incremental publish writes a data pack and a tree pack: {after_b:?}"
    );

    // Into an empty directory: every byte, verified, and the file is the leader's.
    let fresh = work.path().join("fresh");
    let pulled = target.json(&[
        "pull",
        "--index",
        "10",
        "--to",
        fresh.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        support::sha256_file(&data_of(&pulled)),
        support::sha256_file(&leader.join("node-10-1.snap"))
    );
    // Into the directory holding A: B's bytes, little downloaded.
    let pulled = target.json(&[
        "pull",
        "--to",
        fresh.to_str().unwrap(),
        "--json",
        "--verify-file",
    ]);
    assert_eq!(pulled["index"], 20);
    assert_eq!(
        support::sha256_file(&data_of(&pulled)),
        support::sha256_file(&leader.join("node-20-1.snap"))
    );
    let downloaded = pulled["bytes_transferred"].as_u64().unwrap();
    assert!(
        downloaded * 20 <= size_b,
        "an incremental pull must download under 5% of {size_b}: {pulled}"
    );
    assert!(
        pulled["bytes_reused"].as_u64().unwrap() * 10 >= size_b * 9,
        "{pulled}"
    );

    // A staging file an interrupted pull left is resumed: what it holds is not downloaded.
    let resumed = work.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let staging = resumed.join(format!(
        ".{}.partial",
        data_of(&pulled).file_name().unwrap().to_str().unwrap()
    ));
    let mut partial = std::fs::read(leader.join("node-20-1.snap")).unwrap();
    let half = partial.len() / 2;
    partial[half..].fill(0);
    std::fs::write(&staging, &partial).unwrap();
    let again = target.json(&["pull", "--to", resumed.to_str().unwrap(), "--json"]);
    assert_eq!(
        support::sha256_file(&data_of(&again)),
        support::sha256_file(&leader.join("node-20-1.snap"))
    );
    let downloaded = again["bytes_transferred"].as_u64().unwrap();
    assert!(
        downloaded <= size_b * 6 / 10,
        "a resumed pull must not download what the staging file holds: {again}"
    );
    assert!(!staging.exists());

    // GC, keeping B: the packs only A used go, B still pulls and verifies.
    let gc = target.json(&["gc", "--keep-last", "1", "--apply", "--json"]);
    assert_eq!(gc["objects"], "packs", "{gc}");
    assert_eq!(gc["manifests_deleted"].as_array().unwrap().len(), 1, "{gc}");
    let after_gc = keys(&target).await;
    let repo = target.repo().await;
    let kept = repo.find_manifest(20).await.unwrap();
    let used: HashSet<String> = repo
        .read_packed_manifest(&kept)
        .await
        .unwrap()
        .packs
        .iter()
        .map(|p| {
            let hex = p.id.to_hex();
            format!("packs/{}/{hex}", &hex[..2])
        })
        .collect();
    assert_eq!(
        packs_of(&after_gc),
        used,
        "GC keeps exactly the packs B uses"
    );
    let verified = target.json(&["verify", "--all", "--json"]);
    assert_eq!(
        verified["bad_chunks"].as_array().unwrap().len(),
        0,
        "{verified}"
    );
    let third = work.path().join("third");
    let pulled = target.json(&["pull", "--to", third.to_str().unwrap(), "--json"]);
    assert_eq!(
        support::sha256_file(&data_of(&pulled)),
        support::sha256_file(&leader.join("node-20-1.snap"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_repository_round_trips_and_moves_only_what_changed_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(Target::file(dir.path(), "packs", PACKS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_repository_round_trips_and_moves_only_what_changed_on_s3() {
    let Some(s3) = support::s3("a_pack_repository_round_trips_and_moves_only_what_changed_on_s3")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    round_trip(Target::s3(&s3, dir.path(), "packs", PACKS)).await;
}

/// One byte of a stored chunk flipped inside a data pack: `verify` names the chunk and its
/// manifest and exits 1; `pull` fails naming it and leaves nothing in the target directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_in_a_pack_is_caught_by_verify_and_pull() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = Target::file(work.path(), "packs", PACKS);
    let a = write_generation(&work.path().join("leader"), 10, 1);
    target.json(&["push", a.to_str().unwrap(), "--json"]);
    let repo = target.repo().await;
    let id = repo.find_manifest(10).await.unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    let descriptor = repo.packs().unwrap().clone();
    let block = repo.read_block(&descriptor, &manifest, 0).await.unwrap();
    let victim = block.chunks[3];
    let pack = block.packs[victim.pack as usize];
    let store = target.store();
    let hex = pack.to_hex();
    let key = store.key(&format!("packs/{}/{hex}", &hex[..2]));
    let mut bytes = store
        .backend
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[victim.offset as usize + victim.stored_len as usize / 2] ^= 0x40;
    store
        .backend
        .put(&key, Bytes::from(bytes).into())
        .await
        .unwrap();

    let out = target.run(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", support::fail_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("BAD chunk {}", victim.id)) && stdout.contains(&id.to_string()),
        "{stdout}"
    );

    let to = work.path().join("to");
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", support::fail_text(&out));
    let text = support::stderr(&out);
    assert!(text.contains(&victim.id.to_hex()), "{text}");
    assert!(
        support::entries(&to).is_empty(),
        "a failed pull leaves nothing: {:?}",
        support::entries(&to)
    );
}

/// A manifest in the other format under a pack repository's `manifests/` is refused by
/// name, never read as this format's; a repository of chunk objects stays one whatever a
/// later configuration asks new repositories to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_format_is_read_only_as_itself() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let chunks = Target::file(work.path(), "mixed", "[repository]\nlayout = \"chunks\"\n");
    let a = write_generation(&work.path().join("leader"), 10, 1);
    chunks.json(&["push", a.to_str().unwrap(), "--json"]);
    let old = chunks.repo().await;
    let id = old.find_manifest(10).await.unwrap();
    let store = chunks.store();
    let planted = store
        .backend
        .get(&store.key(&format!("manifests/{id}")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    let packs = Target::file(work.path(), "mixed", PACKS);
    let b = write_generation(&work.path().join("leader2"), 20, 1);
    packs.json(&["push", b.to_str().unwrap(), "--json"]);
    let pstore = packs.store();
    pstore
        .backend
        .put(&pstore.key(&format!("manifests/{id}")), planted.into())
        .await
        .unwrap();
    let out = packs.run(&[
        "pull",
        "--index",
        "10",
        "--to",
        work.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", support::fail_text(&out));
    let text = support::stderr(&out);
    assert!(
        text.contains(&id.to_string()) && text.contains("not a manifest"),
        "{text}"
    );

    // The chunk repository, pushed to with a configuration that asks for packs: still one
    // of chunk objects, and its manifests still read.
    let same_store_packs_config = std::fs::read_to_string(&chunks.args[1])
        .unwrap()
        .replace("layout = \"chunks\"", "layout = \"packs\"");
    let cfg = work.path().join("asks-packs.toml");
    std::fs::write(&cfg, same_store_packs_config).unwrap();
    let c = write_generation(&work.path().join("leader"), 30, 2);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "push",
            c.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::fail_text(&out));
    let all = keys(&chunks).await;
    assert!(all.iter().all(|k| !k.starts_with("packs/")), "{all:?}");
    let status = chunks.json(&["status", "--json"]);
    assert_eq!(status["layout"], "chunks", "{status}");
}
