//! `push` then `pull` through the real binary gives back the same bytes, in the snapshot
//! directory layout, for edge sizes on every store (and of chunk objects besides packs) and
//! for a 1 GiB file streamed from disk.

use crate::support;

use std::path::Path;

use support::Target;

fn round_trip(target: &Target, work: &Path, size: u64, seed: u64) {
    let meta = support::write_random_snapshot(&work.join("leader"), 40 + seed, 3, size, seed);
    let pushed = target.json(&["push", meta.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["size"], size);
    assert_eq!(pushed["index"], 40 + seed);
    let to = work.join(format!("follower-{seed}"));
    let pulled = target.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert_eq!(pulled["size"], size);
    assert_eq!(pulled["chunks_total"], pushed["chunks_total"]);
    assert_eq!(pulled["sha256"], pushed["sha256"]);
    for key in [
        "index",
        "size",
        "chunks_total",
        "chunks_transferred",
        "bytes_transferred",
        "elapsed_ms",
    ] {
        assert!(pulled.get(key).is_some(), "pull --json lacks {key}");
        assert!(pushed.get(key).is_some(), "push --json lacks {key}");
    }
    let data = Path::new(pulled["data"].as_str().unwrap());
    let source = meta.with_file_name(format!("node-{}-3.snap", 40 + seed));
    assert_eq!(support::sha256_file(data), support::sha256_file(&source));
    assert_eq!(std::fs::metadata(data).unwrap().len(), size);
    // The pulled envelope carries the leader's raft meta verbatim.
    let leader: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let follower: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled["meta"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(follower["raft_meta"], leader["raft_meta"]);
    assert_eq!(follower["size"], size);
    // Nothing hidden or partial is left behind.
    assert_eq!(
        support::entries(&to).len(),
        2,
        "{:?}",
        support::entries(&to)
    );
}

fn edge_sizes(target: &Target, work: &Path) {
    // 0 bytes, 1 byte, a file smaller than the minimum chunk (4 KiB in packs, 256 KiB of
    // chunk objects), and one of a few chunks in packs.
    let sizes = [(0u64, 0u64), (1, 1), (2, 3000), (3, 100_000)];
    for (seed, size) in sizes {
        round_trip(target, work, size, seed);
    }
    let listed = target.json(&["list", "--json"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), sizes.len());
    let verified = target.json(&["verify", "--all", "--json"]);
    assert_eq!(verified["manifests_checked"], sizes.len());
    assert_eq!(verified["bad_chunks"].as_array().unwrap().len(), 0);
}

#[test]
fn edge_sizes_round_trip_on_file_store() {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "rt", "");
    edge_sizes(&target, work.path());
}

#[test]
fn edge_sizes_of_chunk_objects_round_trip_on_file_store() {
    let work = tempfile::tempdir().unwrap();
    let target = Target::file(work.path(), "rt", &support::Layout::Chunks.section(""));
    edge_sizes(&target, work.path());
}

#[test]
fn edge_sizes_round_trip_on_s3() {
    let Some(s3) = support::s3("edge_sizes_round_trip_on_s3") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let target = Target::s3(&s3, work.path(), "rt", "");
    edge_sizes(&target, work.path());
}

/// Peak RSS of a command in KiB, from GNU time, when it is installed.
fn peak_rss_kib(target: &Target, args: &[&str]) -> Option<u64> {
    let time = Path::new("/usr/bin/time");
    if !time.exists() {
        eprintln!("/usr/bin/time is missing (apt-get install time); not measuring memory");
        return None;
    }
    let out = std::process::Command::new(time)
        .arg("-f")
        .arg("PEAK_RSS_KIB=%M")
        .arg(env!("CARGO_BIN_EXE_snaprelay"))
        .args(&target.args)
        .args(args)
        .output()
        .unwrap();
    let stderr = support::stderr(&out);
    assert!(out.status.success(), "{args:?}: {stderr}");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("PEAK_RSS_KIB="))
        .map(|v| v.trim().parse().unwrap())
}

/// A 1 GiB snapshot goes through push and pull with memory bounded by chunk size ×
/// concurrency: the processes never hold the file (peak RSS well under its size).
#[test]
fn one_gib_round_trip_streams_from_disk() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = Target::file(work.path(), "big", "");
    let size = 1u64 << 30;
    let meta = support::write_random_snapshot(&work.path().join("leader"), 1000, 7, size, 42);
    let push_rss = peak_rss_kib(&target, &["push", meta.to_str().unwrap()]);
    let to = work.path().join("follower");
    let pull_rss = peak_rss_kib(&target, &["pull", "--to", to.to_str().unwrap()]);
    let data = to.join("snapshot-00000000000000001000-00000000000000000007.bin");
    assert_eq!(
        support::sha256_file(&data),
        support::sha256_file(&meta.with_file_name("node-1000-7.snap"))
    );
    for (what, rss) in [("push", push_rss), ("pull", pull_rss)] {
        if let Some(kib) = rss {
            eprintln!("{what} of 1 GiB: peak RSS {} MiB", kib / 1024);
            assert!(
                kib < 128 * 1024,
                "{what} of 1 GiB peaked at {} MiB",
                kib / 1024
            );
        }
    }
}
