//! The mark a pack fetch leaves on the file it commits (`user.snaprelay.verified`), on real
//! files and (with `SNAPRELAY_TEST_S3_REQUIRED`) the real S3 server: the next fetch copies a
//! marked local snapshot's bytes without reading them; a file written since (its
//! modification time moved) is checked byte by byte; and a mark that lies (the bytes changed
//! and the modification time was put back) is caught by the whole-file check, which removes
//! the mark and assembles the file again from checked bytes only.

use crate::support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use snaprelay::fetch::{self, FetchReport, Fetcher};
use snaprelay::manifest_v2::{Manifest, NewRepository};
use snaprelay::progress::Silent;
use snaprelay::repo::Repo;
use snaprelay::verified;

const CLUSTER: &str = "marks";

async fn manifest(repo: &Repo, index: u64) -> Manifest {
    let id = repo.manifest_for(index, 1).await.unwrap().unwrap();
    repo.read_packed_manifest(&id).await.unwrap()
}

/// Fetches snapshot `index` into `dir`, reusing `dir`'s newest snapshot.
async fn fetch(repo: &Repo, index: u64, dir: &Path, verify: bool) -> FetchReport {
    let m = manifest(repo, index).await;
    let source = fetch::packed_source(repo, &[dir]).await.unwrap();
    Fetcher::new(repo, 4, &Silent)
        .verify_file(verify)
        .fetch_packed(&m, dir, source.as_ref())
        .await
        .unwrap()
}

fn remove(report: &FetchReport) {
    std::fs::remove_file(&report.data).unwrap();
    std::fs::remove_file(&report.meta).unwrap();
}

/// Overwrites one byte of `path` in place (`b ^ 0x55`); with `keep_mtime`, puts its
/// modification time back afterwards, as only its owner could.
fn tamper(path: &Path, at: u64, keep_mtime: bool) {
    rewrite_byte(path, at, |b| b ^ 0x55, keep_mtime);
}

/// Replaces the byte at `at` of `path` with `new(old byte)`, in place; with `keep_mtime`,
/// puts the file's modification time back afterwards.
fn rewrite_byte(path: &Path, at: u64, new: impl FnOnce(u8) -> u8, keep_mtime: bool) {
    let file = File::options().read(true).write(true).open(path).unwrap();
    let before = rustix::fs::fstat(&file).unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[new(b[0])], at).unwrap();
    if keep_mtime {
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: before.st_atime,
                tv_nsec: before.st_atime_nsec as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: before.st_mtime,
                tv_nsec: before.st_mtime_nsec as _,
            },
        };
        rustix::fs::futimens(&file, &times).unwrap();
    }
}

async fn marks(test: &str) {
    let work = tempfile::tempdir().unwrap();
    let store = crate::streaming::store(test, work.path());
    let repo = Repo::open_or_create(store, CLUSTER, NewRepository::default())
        .await
        .unwrap();
    // Snapshot 1 and, three scattered overwrites later, snapshot 2.
    let one = support::random_bytes(6 << 20, 1);
    let mut two = one.clone();
    for k in 1..=3 {
        let at = k * two.len() / 4;
        two[at..at + 2048].copy_from_slice(&support::random_bytes(2048, 10 + k as u64));
    }
    for (index, data) in [(1u64, &one), (2, &two)] {
        let meta = support::write_snapshot(&work.path().join("leader"), index, 1, data);
        crate::streaming::publish(repo.clone(), &meta, false)
            .await
            .unwrap();
    }
    let dir = work.path().join("follower");
    std::fs::create_dir_all(&dir).unwrap();

    // Nothing local: fetched whole, and marked.
    let first = fetch(&repo, 1, &dir, false).await;
    assert_eq!(first.copied_unchecked_from, None);
    let fingerprint = verified::fingerprint(&manifest(&repo, 1).await).unwrap();
    let marked = verified::check(&File::open(&first.data).unwrap(), &fingerprint);
    if marked == Err("the file system keeps no marks".into()) {
        eprintln!(
            "skipped: {} keeps no user extended attributes",
            dir.display()
        );
        return;
    }
    marked.unwrap();

    // Snapshot 2 onto it: the marked file's bytes are copied unread, the edits fetched.
    // Without the whole-file check the new file is only as good as that mark: it is not
    // marked in turn.
    let fingerprint2 = verified::fingerprint(&manifest(&repo, 2).await).unwrap();
    let unread = fetch(&repo, 2, &dir, false).await;
    assert_eq!(
        unread.copied_unchecked_from.as_deref(),
        Some(first.data.as_path())
    );
    assert!(unread.bytes_transferred < 1 << 20, "{unread:?}");
    assert_eq!(std::fs::read(&unread.data).unwrap(), two);
    assert_eq!(
        verified::check(&File::open(&unread.data).unwrap(), &fingerprint2),
        Err("no mark".into())
    );
    remove(&unread);
    // With it, the new file is marked.
    let second = fetch(&repo, 2, &dir, true).await;
    assert_eq!(
        second.copied_unchecked_from.as_deref(),
        Some(first.data.as_path())
    );
    assert_eq!(std::fs::read(&second.data).unwrap(), two);
    verified::check(&File::open(&second.data).unwrap(), &fingerprint2).unwrap();
    remove(&second);

    // Written since (the modification time moved): every local byte is checked, and the
    // damaged chunk comes from the store.
    tamper(&first.data, 100, false);
    let checked = fetch(&repo, 2, &dir, false).await;
    assert_eq!(checked.copied_unchecked_from, None);
    assert_eq!(std::fs::read(&checked.data).unwrap(), two);
    // Every byte of it was checked: marked.
    verified::check(&File::open(&checked.data).unwrap(), &fingerprint2).unwrap();
    remove(&checked);

    // A mark that lies: bytes changed under it, the modification time put back (what bit
    // rot would look like). The whole-file check catches it; the source loses its mark and
    // the file is assembled again from checked bytes.
    tamper(&first.data, 100, false);
    verified::mark(&File::open(&first.data).unwrap(), &fingerprint).unwrap();
    tamper(&first.data, 200, true);
    verified::check(&File::open(&first.data).unwrap(), &fingerprint).unwrap();
    let caught = fetch(&repo, 2, &dir, true).await;
    assert_eq!(caught.copied_unchecked_from, None);
    assert_eq!(std::fs::read(&caught.data).unwrap(), two);
    assert_eq!(
        verified::check(&File::open(&first.data).unwrap(), &fingerprint),
        Err("no mark".into())
    );
}

/// On the S3 server when one is configured, on a file store otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_snapshot_is_copied_unread_and_a_false_mark_is_caught() {
    marks("a_marked_snapshot_is_copied_unread_and_a_false_mark_is_caught").await;
}

pub(crate) fn log_id(v: &serde_json::Value) -> Option<(u64, u64)> {
    Some((v["index"].as_u64()?, v["term"].as_u64()?))
}

/// Asks `leader` for a snapshot newer than `after` and waits for `follower` to adopt it.
pub(crate) async fn snapshot(
    c: &support::cluster::Cluster,
    leader: u64,
    follower: u64,
    after: Option<(u64, u64)>,
) -> (u64, u64) {
    use std::time::Duration;
    c.post(leader, "/snapshot", serde_json::json!({})).await;
    let s = c
        .wait_for("the leader's snapshot", Duration::from_secs(30), || async {
            log_id(&c.metrics(leader).await["snapshot"]).filter(|s| Some(*s) > after)
        })
        .await;
    c.wait_for(
        "the follower to adopt it",
        Duration::from_secs(60),
        || async { (log_id(&c.metrics(follower).await["snapshot"]) == Some(s)).then_some(()) },
    )
    .await;
    s
}

/// A real follower whose adopted snapshot's bytes change under its mark (the modification
/// time put back): the next snapshot, built from them unread, fails the node's sha256. The
/// sidecar does not quarantine the manifest: the source loses its mark, the snapshot is
/// fetched again checking every local byte, and the node adopts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_the_node_refuses_after_marked_bytes_were_copied_is_fetched_again_checked() {
    use std::time::Duration;
    use support::cluster::{Cluster, StoreSection};

    let work = tempfile::tempdir().unwrap();
    let store = match support::s3("marks") {
        Some(s3) => StoreSection::s3(&s3, &support::unique("marks")),
        None => StoreSection::file(&work.path().join("store")),
    };
    let mut c = Cluster::start_nodes(2, store, &["--snapshot-policy-logs", "1000000"]).await;
    let leader = c.leader(1).await.expect("a leader");
    let follower = 3 - leader;
    for id in 1..=2 {
        c.start_sidecar(id);
    }
    c.write_random_keys("a", 400, 1000, 1).await;
    let first = snapshot(&c, leader, follower, None).await;
    let (name, _) = snaprelay_contract::snapdir::file_names(first.0, first.1);
    let data = c.node(follower).snapshot_dir().join(name);
    // Probed beside the node's snapshot directory, on its file system.
    let node_dir = &c.node(follower).dir;
    let probe = File::create(node_dir.join("xattr-probe")).unwrap();
    if rustix::fs::fsetxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty()).is_err() {
        eprintln!(
            "skipped: {} keeps no user extended attributes",
            node_dir.display()
        );
        return;
    }
    // The sidecar marks the file once the node answered that it adopted it.
    let file = File::open(&data).unwrap();
    c.wait_for(
        "the adopted file's mark",
        Duration::from_secs(10),
        || async {
            rustix::fs::fgetxattr(&file, verified::XATTR, &mut [0u8; 200][..])
                .is_ok()
                .then_some(())
        },
    )
    .await;
    // One letter in the middle changed (the JSON stays valid), the time put back.
    let size = file.metadata().unwrap().len();
    let mut at = size / 3;
    let mut b = [0u8];
    loop {
        file.read_exact_at(&mut b, at).unwrap();
        if b[0].is_ascii_alphanumeric() {
            break;
        }
        at += 1;
    }
    rewrite_byte(&data, at, |b| if b == b'a' { b'b' } else { b'a' }, true);

    c.write_random_keys("z", 5, 1000, 2).await;
    let second = snapshot(&c, leader, follower, Some(first)).await;
    assert!(second > first);
    let log = c.sidecar_log(follower);
    assert!(
        log.contains("the node found a file built from a marked local snapshot not to match"),
        "{log}"
    );
    assert_eq!(
        c.sidecar_metric(follower, "snaprelay_quarantined_manifests")
            .await
            .unwrap_or(0.0),
        0.0
    );
    // The tampered file lost its mark (if the node still keeps it).
    if let Ok(f) = File::open(&data) {
        assert!(rustix::fs::fgetxattr(&f, verified::XATTR, &mut [0u8; 200][..]).is_err());
    }
    c.stop_sidecar(1);
    c.stop_sidecar(2);
}
