//! The chunk index a node writes beside its snapshot (`SnapshotDir::write` in the hook
//! library): the publisher reads only the chunks the store lacks, checks each against the
//! index, and publishes what the node wrote; an index it cannot trust is ignored (the file
//! is cut as usual), and a data file that contradicts its index is refused. On packs (the
//! default), and the index push also on chunk objects.

use crate::support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::{RngCore, SeedableRng};
use snaprelay::chunk::ChunkParams;
use support::Target;

const SIZE: usize = 24 << 20;
const CHUNKING: &str =
    "[chunking]\nmin_size = \"64KiB\"\navg_size = \"256KiB\"\nmax_size = \"1MiB\"\n";

fn params() -> ChunkParams {
    ChunkParams::new(64 << 10, 256 << 10, 1 << 20).unwrap()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// `old` with four scattered overwrites and one insertion, about 1% of the bytes.
fn changed(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let edit = old.len() / 500;
    for (i, at) in [3usize, 7, 11, 15].iter().enumerate() {
        let at = old.len() / 16 * at;
        new[at..at + edit].copy_from_slice(&random(edit, 40 + i as u64));
    }
    let at = old.len() / 2;
    new.splice(at..at, random(edit, 50));
    new
}

fn data_path(meta: &Path) -> std::path::PathBuf {
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    meta.with_file_name(envelope["data"].as_str().unwrap())
}

/// Overwrites `len` bytes at `at` of a committed data file, then sets its mtime back to
/// what it was, as silent damage on disk would.
fn damage_in_place(path: &Path, at: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0xA5; len], at).unwrap();
    f.set_modified(modified).unwrap();
}

fn indexed_push(target: Target) {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = work.path().join("node");
    let first = random(SIZE, 1);
    let meta = support::write_node_snapshot(&node, 100, 2, &first, Some(params()));
    let pushed = target.json(&["push", meta.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["chunk_index"], true, "{pushed}");
    assert_eq!(pushed["bytes_transferred"], SIZE);

    // The node's index and the sidecar's own cut agree exactly: the same data pushed as a
    // plain snapshot (no index) is recognised as fully present.
    let plain = support::write_snapshot(&work.path().join("plain"), 101, 2, &first);
    let again = target.json(&["push", plain.to_str().unwrap(), "--json"]);
    assert_eq!(again["chunk_index"], false);
    assert_eq!(again["bytes_transferred"], 0, "{again}");
    assert_eq!(again["sha256"], pushed["sha256"]);

    // The next snapshot changes 1%. After the node indexed it, bytes of a chunk the store
    // already holds are damaged on disk: the publisher never reads that chunk, so what it
    // publishes is what the node wrote.
    let second = changed(&first);
    let meta = support::write_node_snapshot(&node, 200, 2, &second, Some(params()));
    damage_in_place(&data_path(&meta), 1000, 4096);
    let pushed = target.json(&["push", meta.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["chunk_index"], true, "{pushed}");
    let uploaded = pushed["bytes_transferred"].as_u64().unwrap();
    // Five edits touch about ten of the ~100 chunks of this small file.
    assert!(
        uploaded * 5 <= second.len() as u64 && uploaded > 0,
        "uploaded {uploaded} of {} bytes",
        second.len()
    );
    let follower = work.path().join("follower");
    let pulled = target.json(&["pull", "--to", follower.to_str().unwrap(), "--json"]);
    assert_eq!(pulled["index"], 200);
    assert!(
        std::fs::read(pulled["data"].as_str().unwrap()).unwrap() == second,
        "the follower gets the node's bytes"
    );

    // Damage in a chunk that has to be uploaded is caught against the index: exit 1, the
    // reason names both files, and no manifest appears.
    let third = changed(&second);
    let meta = support::write_node_snapshot(&node, 300, 2, &third, Some(params()));
    damage_in_place(&data_path(&meta), (third.len() / 2) as u64, 16);
    let out = target.run(&["push", meta.to_str().unwrap()]);
    let err = support::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not match its chunk index") && err.contains(".chunks"),
        "{err}"
    );
    let listed = target.json(&["list", "--json"]);
    assert!(!listed.to_string().contains("\"index\":300"), "{listed}");
}

#[test]
fn indexed_push_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    indexed_push(Target::file(dir.path(), "idx", CHUNKING));
}

#[test]
fn indexed_push_of_chunk_objects_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}{CHUNKING}", support::Layout::Chunks.section(""));
    indexed_push(Target::file(dir.path(), "idx", &config));
}

#[test]
fn indexed_push_on_s3() {
    let Some(s3) = support::s3("indexed_push_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    indexed_push(Target::s3(&s3, dir.path(), "idx", CHUNKING));
}

/// An index the publisher cannot trust or use is ignored with a warning naming the reason,
/// and the snapshot is published from the file itself.
#[test]
fn unusable_indexes_fall_back_to_cutting_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::file(dir.path(), "idx", CHUNKING);
    let node = dir.path().join("node");
    let mut index = 10;
    let mut push = |data: &[u8], chunking: Option<ChunkParams>, spoil: &dyn Fn(&Path)| {
        index += 1;
        let meta = support::write_node_snapshot(&node, index, 2, data, chunking);
        spoil(&meta);
        let out = target.run(&["push", meta.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", support::stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (report, support::stderr(&out))
    };
    let index_of = |meta: &Path| {
        meta.with_file_name(
            meta.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .replace(".meta.json", ".chunks"),
        )
    };

    // Cut with other parameters than the repository's.
    let (report, err) = push(&random(3 << 20, 2), Some(ChunkParams::default()), &|_| {});
    assert_eq!(report["chunk_index"], false);
    assert!(err.contains("repository cuts with"), "{err}");

    // Not an index (the start of a format-1 JSON index, say).
    let (report, err) = push(&random(3 << 20, 3), Some(params()), &|meta| {
        std::fs::write(index_of(meta), b"{\"format\": 1").unwrap();
    });
    assert_eq!(report["chunk_index"], false);
    assert!(
        err.contains(".chunks") && err.contains("not usable"),
        "{err}"
    );

    // The data file was rewritten after the index (the contract says it never is).
    let (report, err) = push(&random(3 << 20, 4), Some(params()), &|meta| {
        let data = data_path(meta);
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
    });
    assert_eq!(report["chunk_index"], false);
    assert!(err.contains("modified after its chunk index"), "{err}");

    // `--no-chunk-index` cuts the file even when the index is fine.
    let meta = support::write_node_snapshot(&node, 50, 2, &random(1 << 20, 5), Some(params()));
    let report = target.json(&["push", meta.to_str().unwrap(), "--json", "--no-chunk-index"]);
    assert_eq!(report["chunk_index"], false);

    // Every one of them is a correct snapshot: verify re-reads all four and finds nothing.
    let verified = target.json(&["verify", "--all", "--json"]);
    assert_eq!(verified["manifests_checked"], 4, "{verified}");
    assert_eq!(
        verified["bad_manifests"],
        serde_json::json!([]),
        "{verified}"
    );
    assert_eq!(verified["bad_chunks"], serde_json::json!([]), "{verified}");
}
