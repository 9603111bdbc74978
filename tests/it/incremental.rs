//! Successive snapshots of a slowly changing state share most chunks: a snapshot that
//! differs from the previous one by about 1% of its bytes (scattered overwrites, plus
//! insertions that shift every later offset) uploads at most 3% of its bytes, and a pull into
//! a directory that holds the previous snapshot downloads at most 3%.

use crate::support;

use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};
use support::Target;

const SIZE: u64 = 256 << 20;
/// Chunk sizes suited to a 256 MiB snapshot (the defaults suit GiB-sized ones).
const CHUNKING: &str =
    "[chunking]\nmin_size = \"64KiB\"\navg_size = \"256KiB\"\nmax_size = \"1MiB\"\n";

/// Writes the next snapshot: the previous one's bytes with 6 overwrites and 2 insertions
/// spread over the file, 1% of its size in all.
fn write_changed(dir: &Path, previous: &Path) -> std::path::PathBuf {
    let old = std::fs::read(previous).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let edit = (SIZE / 100 / 8) as usize;
    let mut new = old.clone();
    // Work from the end so that earlier positions stay valid after insertions.
    for i in (0..8usize).rev() {
        let at = (old.len() / 8) * i + rng.random_range(0..old.len() / 16);
        let mut patch = vec![0u8; edit];
        rng.fill_bytes(&mut patch);
        if i % 4 == 1 {
            new.splice(at..at, patch);
        } else {
            new[at..at + edit].copy_from_slice(&patch);
        }
    }
    support::write_snapshot(dir, 201, 3, &new)
}

fn incremental(target: Target) {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let leader = work.path().join("leader");
    let first = support::write_random_snapshot(&leader, 200, 3, SIZE, 11);
    let pushed = target.json(&["push", first.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["bytes_transferred"], SIZE);
    let follower = work.path().join("follower");
    target.json(&["pull", "--to", follower.to_str().unwrap(), "--json"]);

    let second = write_changed(&leader, &leader.join("node-200-3.snap"));
    let size2 = std::fs::metadata(leader.join("node-201-3.snap"))
        .unwrap()
        .len();
    let pushed = target.json(&["push", second.to_str().unwrap(), "--json"]);
    let uploaded = pushed["bytes_transferred"].as_u64().unwrap();
    eprintln!(
        "incremental push uploaded {uploaded} of {size2} bytes ({:.2}%)",
        100.0 * uploaded as f64 / size2 as f64
    );
    assert!(
        uploaded * 100 <= size2 * 3,
        "uploaded {uploaded} of {size2} bytes"
    );
    assert!(
        uploaded >= size2 / 100,
        "uploaded less than what changed: {pushed}"
    );

    let pulled = target.json(&["pull", "--to", follower.to_str().unwrap(), "--json"]);
    let downloaded = pulled["bytes_transferred"].as_u64().unwrap();
    eprintln!(
        "incremental pull downloaded {downloaded} of {size2} bytes ({:.2}%)",
        100.0 * downloaded as f64 / size2 as f64
    );
    assert!(
        downloaded * 100 <= size2 * 3,
        "downloaded {downloaded} of {size2} bytes"
    );
    assert_eq!(pulled["index"], 201);
    assert_eq!(
        support::sha256_file(Path::new(pulled["data"].as_str().unwrap())),
        support::sha256_file(&leader.join("node-201-3.snap"))
    );

    // A directory holding a snapshot the store has no manifest for (one the node built
    // itself) is reused too: snaprelay cuts the local file again to find its chunks.
    let own = work.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::copy(leader.join("node-200-3.snap"), own.join("local.bin")).unwrap();
    std::fs::write(
        own.join("local.meta.json"),
        serde_json::json!({"format": 1, "last_log_index": 150, "last_log_term": 2,
                           "data": "local.bin", "size": SIZE,
                           "raft_meta": {"last_log_id": {"leader_id": {"term": 2, "node_id": 1}, "index": 150}}})
        .to_string(),
    )
    .unwrap();
    let pulled = target.json(&["pull", "--to", own.to_str().unwrap(), "--json"]);
    let downloaded = pulled["bytes_transferred"].as_u64().unwrap();
    assert!(
        downloaded * 100 <= size2 * 3,
        "downloaded {downloaded} of {size2} bytes"
    );
}

#[test]
fn one_percent_change_moves_at_most_three_percent_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    incremental(Target::file(dir.path(), "inc", CHUNKING));
}

#[test]
fn one_percent_change_of_chunk_objects_moves_at_most_three_percent_on_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}{CHUNKING}", support::Layout::Chunks.section(""));
    incremental(Target::file(dir.path(), "inc", &config));
}

#[test]
fn one_percent_change_moves_at_most_three_percent_on_s3() {
    let Some(s3) = support::s3("one_percent_change_moves_at_most_three_percent_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    incremental(Target::s3(&s3, dir.path(), "inc", CHUNKING));
}
