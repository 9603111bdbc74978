//! The node's chunk check on a file system with shared blocks (XFS with reflinks, mounted by
//! scripts/test.sh as root and named by `SNAPRELAY_TEST_REFLINK_DIR`; with
//! `SNAPRELAY_TEST_REFLINK_REQUIRED=1` its absence fails the test): real kv nodes and
//! sidecars, the follower's second snapshot adopted with the chunks it shares with the
//! first proven rather than hashed, and a snapshot written since proving nothing. (The
//! rules of a proof, each refused case among them, are the hook's unit tests, against a
//! made-up extent map and against FIEMAP on the same file system.)

use crate::marks::snapshot;
use crate::support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use support::cluster::{Cluster, StoreSection};

fn reflink_dir() -> Option<PathBuf> {
    match std::env::var_os("SNAPRELAY_TEST_REFLINK_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var("SNAPRELAY_TEST_REFLINK_REQUIRED").as_deref() != Ok("1"),
                "SNAPRELAY_TEST_REFLINK_REQUIRED=1 but SNAPRELAY_TEST_REFLINK_DIR is not set"
            );
            eprintln!("skipped: SNAPRELAY_TEST_REFLINK_DIR names no reflink file system");
            None
        }
    }
}

/// `(chunks, proven_chunks, bytes read through an earlier snapshot)` of the node's chunk
/// check of snapshot `(index, term)`, from its log.
fn checked(c: &Cluster, node: u64, (index, term): (u64, u64)) -> (u64, u64, u64) {
    let log = std::fs::read_to_string(&c.node(node).log).unwrap();
    let line = log
        .lines()
        .find(|l| {
            l.contains("checked the leader's snapshot chunk by chunk")
                && l.contains(&format!("snapshot={term}-{index}"))
        })
        .unwrap_or_else(|| panic!("no chunk check of {term}-{index} in the node's log:\n{log}"));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name} in {line}"));
        line[at + name.len() + 2..]
            .split(|ch: char| !ch.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    (
        field("chunks"),
        field("proven_chunks"),
        field("read_through_earlier"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_followers_next_snapshot_proves_the_chunks_it_shares_with_its_last() {
    let Some(root) = reflink_dir() else {
        return;
    };
    let store_dir = tempfile::tempdir_in(&root).unwrap();
    let store = match support::s3("chunk-proofs") {
        Some(s3) => StoreSection::s3(&s3, &support::unique("chunk-proofs")),
        None => StoreSection::file(&store_dir.path().join("store")),
    };
    let mut c =
        Cluster::start_nodes_in(&root, 2, store, &["--snapshot-policy-logs", "1000000"]).await;
    let leader = c.leader(1).await.expect("a leader");
    let follower = 3 - leader;
    for id in 1..=2 {
        c.start_sidecar(id);
    }
    // About 2 MiB of state; three-digit log indexes throughout, so that the header line
    // keeps its length and the entries their offsets.
    c.write_random_keys("a", 200, 10_000, 1).await;
    let first = snapshot(&c, leader, follower, None).await;
    let (chunks, proven, elsewhere) = checked(&c, follower, first);
    assert!(chunks > 50, "{chunks} chunks");
    assert_eq!((proven, elsewhere), (0, 0), "nothing to prove against yet");

    // A few keys added at the end: the entries before them are where they were.
    c.write_random_keys("z", 3, 10_000, 2).await;
    let second = snapshot(&c, leader, follower, Some(first)).await;
    let (chunks, proven, elsewhere) = checked(&c, follower, second);
    assert!(
        proven > 0 && proven + 2 < chunks,
        "{proven} of {chunks} chunks proven"
    );
    assert!(
        proven * 10 > chunks * 8,
        "{proven} of {chunks} chunks proven"
    );
    // The proven ranges were read through the first snapshot, which was read whole.
    assert!(
        elsewhere > 1 << 20,
        "{elsewhere} bytes read through the first snapshot"
    );

    // The follower's current snapshot written since the node checked it (its mtime
    // moves), and its mark put right again, as the sidecar's user could: the sidecar still
    // copies it unread and shares its blocks, but the node no longer proves against it,
    // hashes every chunk, and adopts.
    let (name, _) = snaprelay_contract::snapdir::file_names(second.0, second.1);
    let current = c.node(follower).snapshot_dir().join(name);
    let f = File::options()
        .read(true)
        .write(true)
        .open(&current)
        .unwrap();
    let mut mark = vec![0u8; 256];
    let n = rustix::fs::fgetxattr(&f, snaprelay::verified::XATTR, &mut mark[..])
        .expect("the sidecar marked the adopted file");
    let mark = String::from_utf8(mark[..n].to_vec()).unwrap();
    let before = f.metadata().unwrap().modified().unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, 0).unwrap();
    while f.metadata().unwrap().modified().unwrap() == before {
        f.write_all_at(&byte, 0).unwrap();
    }
    f.sync_all().unwrap();
    let stat = rustix::fs::fstat(&f).unwrap();
    let mut fields: Vec<String> = mark.split(' ').map(str::to_owned).collect();
    *fields.last_mut().unwrap() = format!("{}.{:09}", stat.st_mtime, stat.st_mtime_nsec);
    rustix::fs::fsetxattr(
        &f,
        snaprelay::verified::XATTR,
        fields.join(" ").as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    c.write_random_keys("zz", 3, 10_000, 3).await;
    let third = snapshot(&c, leader, follower, Some(second)).await;
    let (chunks, proven, elsewhere) = checked(&c, follower, third);
    assert!(chunks > 50);
    assert_eq!(
        (proven, elsewhere),
        (0, 0),
        "proven against a snapshot written since its check"
    );
    c.stop_sidecar(1);
    c.stop_sidecar(2);
}

/// What a sidecar hands a node beside the file: the manifest's chunk list as a chunk index
/// the envelope names, equal to the file cut again, with the manifest's size and sha256;
/// `pull` writes none; and releasing the handed-over files removes it with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_file_comes_with_the_manifests_chunk_index() {
    use snaprelay::fetch::{self, Fetcher, NodeAccess};
    use snaprelay::manifest_v2::NewRepository;
    use snaprelay::progress::Silent;
    use snaprelay::repo::Repo;
    use snaprelay_contract::chunking::{IndexFile, Indexer};

    let work = tempfile::tempdir().unwrap();
    let store = crate::streaming::store("handed-over-index", work.path());
    let repo = Repo::open_or_create(store, "proofs", NewRepository::default())
        .await
        .unwrap();
    let data = support::random_bytes(5 << 20, 21);
    let meta = support::write_snapshot(&work.path().join("leader"), 4, 1, &data);
    crate::streaming::publish(repo.clone(), &meta, false)
        .await
        .unwrap();
    let id = repo.manifest_for(4, 1).await.unwrap().unwrap();
    let manifest = repo.read_packed_manifest(&id).await.unwrap();
    let me = NodeAccess {
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    };

    let incoming = work.path().join("incoming");
    let report = Fetcher::new(&repo, 4, &Silent)
        .hand_over_to(me)
        .fetch_packed(&manifest, &incoming, None)
        .await
        .unwrap();
    let index_path = report.chunk_index.clone().expect("a chunk index");
    let envelope = snaprelay_contract::snapdir::Snapshot::open(&report.meta)
        .unwrap()
        .envelope;
    assert_eq!(
        envelope.chunk_index.as_deref(),
        index_path.file_name().and_then(|n| n.to_str())
    );
    let index = IndexFile::open(&index_path, data.len() as u64).unwrap();
    let written = index.read_all().unwrap();
    let mut cut = Indexer::new(repo.params());
    cut.update(&data);
    let cut = cut.finish();
    assert_eq!(written, cut);
    assert_eq!(written.sha256, manifest.sha256);
    assert_eq!(written.chunks.len() as u64, manifest.chunks);

    fetch::release(&report, false).unwrap();
    let left: Vec<_> = std::fs::read_dir(&incoming)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A pull: the snapshot as the node wrote it, no index.
    let target = work.path().join("pulled");
    let pulled = Fetcher::new(&repo, 4, &Silent)
        .fetch_packed(&manifest, &target, None)
        .await
        .unwrap();
    assert_eq!(pulled.chunk_index, None);
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 2);
}
