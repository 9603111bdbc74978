//! Hostile file systems: whoever can write to a directory the sidecar reads or writes (the
//! node's user, in its snapshot and incoming directories) plants symbolic links, hard links
//! and FIFOs at the names the sidecar is about to use. Each scenario runs the real
//! `snaprelay` binary under a timeout (a regression fails instead of hanging), and checks
//! that the target outside the directory is untouched and that nothing stored is damaged.

use crate::support;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{fail_text, mkfifo, run_bounded, Target};

fn snaprelay(target: &Target, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_snaprelay"));
    cmd.args(&target.args).args(args);
    cmd
}

/// A file outside every directory snaprelay works in, with content a test checks later.
struct Outside {
    path: PathBuf,
    content: Vec<u8>,
}

impl Outside {
    fn new(dir: &Path, name: &str) -> Outside {
        let path = dir.join(name);
        let content = format!("OUTSIDE-{name}-root:x:0:0:do-not-touch\n").into_bytes();
        std::fs::write(&path, &content).unwrap();
        Outside { path, content }
    }

    fn assert_untouched(&self) {
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "{} was written through",
            self.path.display()
        );
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether any object in a file:// store holds `needle`.
fn store_holds(store_dir: &Path, needle: &[u8]) -> bool {
    files_under(store_dir).iter().any(|p| {
        std::fs::read(p)
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    })
}

/// A file store with one snapshot (index 7, term 2) pushed into it.
struct Published {
    work: tempfile::TempDir,
    target: Target,
    data: Vec<u8>,
}

fn published() -> Published {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = Target::file(work.path(), "hostile", "");
    let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let meta = support::write_snapshot(&work.path().join("leader"), 7, 2, &data);
    let out = run_bounded(
        snaprelay(&target, &["push", meta.to_str().unwrap()]),
        "push",
    );
    assert!(out.status.success(), "{}", fail_text(&out));
    Published { work, target, data }
}

impl Published {
    fn pull(&self, to: &Path) -> Output {
        run_bounded(
            snaprelay(&self.target, &["pull", "--to", to.to_str().unwrap()]),
            "pull",
        )
    }

    /// The pull succeeded, its snapshot is the published one, and the stored snapshot
    /// still verifies.
    fn assert_pulled(&self, to: &Path, out: &Output) {
        assert!(out.status.success(), "{}", fail_text(out));
        let (data, _) = snaprelay::snapdir::file_names(7, 2);
        let pulled = to.join(&data);
        assert!(
            std::fs::symlink_metadata(&pulled)
                .unwrap()
                .file_type()
                .is_file(),
            "{} is not a regular file",
            pulled.display()
        );
        assert_eq!(std::fs::read(&pulled).unwrap(), self.data);
        let verify = run_bounded(snaprelay(&self.target, &["verify", "--all"]), "verify");
        assert!(verify.status.success(), "{}", fail_text(&verify));
    }
}

fn staging_name() -> String {
    format!(".{}.partial", snaprelay::snapdir::file_names(7, 2).0)
}

#[test]
fn pull_does_not_write_through_a_symlink_at_the_staging_name() {
    let p = published();
    let outside = Outside::new(p.work.path(), "passwd");
    let to = p.work.path().join("incoming");
    std::fs::create_dir(&to).unwrap();
    symlink(&outside.path, to.join(staging_name())).unwrap();
    let out = p.pull(&to);
    outside.assert_untouched();
    p.assert_pulled(&to, &out);
    assert!(
        support::stderr(&out).contains("planted"),
        "{}",
        fail_text(&out)
    );
}

#[test]
fn pull_does_not_write_through_a_hard_link_at_the_staging_name() {
    let p = published();
    // The same size as the snapshot, so that it would even pass for a resumable file.
    let outside = Outside {
        path: p.work.path().join("victim"),
        content: vec![b'v'; p.data.len()],
    };
    std::fs::write(&outside.path, &outside.content).unwrap();
    let to = p.work.path().join("incoming");
    std::fs::create_dir(&to).unwrap();
    std::fs::hard_link(&outside.path, to.join(staging_name())).unwrap();
    let out = p.pull(&to);
    outside.assert_untouched();
    p.assert_pulled(&to, &out);
}

/// The envelope's temp name holds the pid of the process writing it; the pid is known in
/// the child between fork and exec, where the link is planted.
#[test]
fn pull_does_not_write_through_a_symlink_at_the_meta_temp_name() {
    use std::os::unix::process::CommandExt;
    let p = published();
    let outside = Outside::new(p.work.path(), "shadow");
    let to = p.work.path().join("incoming");
    std::fs::create_dir(&to).unwrap();
    let (_, meta) = snaprelay::snapdir::file_names(7, 2);
    // Everything the child needs is prepared here: after fork only async-signal-safe
    // calls are allowed (no allocation).
    let prefix = format!("{}/.{meta}.", to.display()).into_bytes();
    let target = std::ffi::CString::new(outside.path.to_str().unwrap()).unwrap();
    let mut cmd = snaprelay(&p.target, &["pull", "--to", to.to_str().unwrap()]);
    // SAFETY: the closure only calls getpid and symlink on stack buffers.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 4096];
            let n = prefix.len();
            buf[..n].copy_from_slice(&prefix);
            let mut pid = libc::getpid() as u32;
            let mut digits = [0u8; 10];
            let mut d = 0;
            loop {
                digits[d] = b'0' + (pid % 10) as u8;
                d += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let mut at = n;
            for i in (0..d).rev() {
                buf[at] = digits[i];
                at += 1;
            }
            buf[at..at + 4].copy_from_slice(b".tmp");
            buf[at + 4] = 0;
            if libc::symlink(target.as_ptr(), buf.as_ptr() as *const libc::c_char) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_bounded(cmd, "pull");
    outside.assert_untouched();
    p.assert_pulled(&to, &out);
    // The planted link is gone; only the snapshot is left.
    let left = support::entries(&to);
    assert_eq!(left.len(), 2, "{left:?}");
}

/// A FIFO named like a snapshot's meta file in the target directory (scanned for chunks to
/// reuse) is skipped with a warning, never opened for reading.
#[test]
fn pull_skips_a_fifo_meta_file_in_the_target_directory() {
    let p = published();
    let to = p.work.path().join("incoming");
    std::fs::create_dir(&to).unwrap();
    mkfifo(&to.join("snapshot-x.meta.json"));
    let out = p.pull(&to);
    p.assert_pulled(&to, &out);
    assert!(
        support::stderr(&out).contains("FIFO"),
        "{}",
        fail_text(&out)
    );
}

/// A leader's snapshot directory, as the node's user leaves it for `push`.
struct Leader {
    work: tempfile::TempDir,
    target: Target,
    store_dir: PathBuf,
    dir: PathBuf,
}

fn leader() -> Leader {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = Target::file(work.path(), "hostile", "");
    let store_dir = match &target.settings.url {
        snaprelay::store::StoreUrl::File(p) => p.clone(),
        other => panic!("not a file store: {other}"),
    };
    let dir = work.path().join("snapshots");
    std::fs::create_dir(&dir).unwrap();
    Leader {
        work,
        target,
        store_dir,
        dir,
    }
}

impl Leader {
    fn push(&self, meta: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["push", meta.to_str().unwrap()];
        args.extend_from_slice(extra);
        run_bounded(snaprelay(&self.target, &args), "push")
    }

    /// Nothing was published: no manifest in the store.
    fn assert_nothing_published(&self) {
        let manifests: Vec<PathBuf> = files_under(&self.store_dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("manifests"))
            .collect();
        assert!(manifests.is_empty(), "{manifests:?}");
    }
}

/// `push` used to publish whatever a symlinked data file pointed at (`/etc/passwd`, the
/// sidecar's own credentials): the node's user could make the sidecar upload any file it
/// can read.
#[test]
fn push_refuses_a_symlinked_data_file() {
    let l = leader();
    let secret = Outside::new(l.work.path(), "credentials");
    let meta = support::write_snapshot(&l.dir, 3, 1, &secret.content);
    let data = l.dir.join("node-3-1.snap");
    std::fs::remove_file(&data).unwrap();
    symlink(&secret.path, &data).unwrap();
    let out = l.push(&meta, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", fail_text(&out));
    let stderr = support::stderr(&out);
    assert!(
        stderr.contains("node-3-1.snap is a symbolic link, not a regular file"),
        "{stderr}"
    );
    l.assert_nothing_published();
    assert!(!store_holds(&l.store_dir, &secret.content));
    secret.assert_untouched();
}

#[test]
fn push_refuses_a_symlinked_meta_file() {
    let l = leader();
    let elsewhere = l.work.path().join("elsewhere");
    let real = support::write_snapshot(&elsewhere, 4, 1, b"some state");
    let meta = l.dir.join("node-4-1.meta.json");
    symlink(&real, &meta).unwrap();
    let out = l.push(&meta, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", fail_text(&out));
    assert!(
        support::stderr(&out).contains("node-4-1.meta.json is a symbolic link"),
        "{}",
        fail_text(&out)
    );
    l.assert_nothing_published();
}

/// A FIFO as the meta file used to hang `push` forever.
#[test]
fn push_refuses_a_fifo_meta_file_without_hanging() {
    let l = leader();
    let meta = l.dir.join("node-5-1.meta.json");
    mkfifo(&meta);
    let out = l.push(&meta, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", fail_text(&out));
    assert!(
        support::stderr(&out).contains("node-5-1.meta.json is a FIFO"),
        "{}",
        fail_text(&out)
    );
    l.assert_nothing_published();
}

/// A node-written snapshot whose chunk index is then replaced by `plant`.
fn indexed_push_with(plant: impl FnOnce(&Path, &Leader)) -> (Leader, Output, Vec<u8>) {
    let l = leader();
    let data: Vec<u8> = (0..400_000u32)
        .flat_map(|i| (i * 7).to_le_bytes())
        .collect();
    let meta = support::write_node_snapshot(&l.dir, 6, 2, &data, Some(Default::default()));
    let index = l.dir.join(snaprelay::snapdir::index_file_name(6, 2));
    assert!(index.exists());
    plant(&index, &l);
    let out = l.push(&meta, &["--json"]);
    (l, out, data)
}

/// The published snapshot pulls back to exactly `data`.
fn assert_published(l: &Leader, out: &Output, data: &[u8]) {
    assert!(out.status.success(), "{}", fail_text(out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["chunk_index"], false, "{report}");
    let to = l.work.path().join("pulled");
    let pulled = run_bounded(
        snaprelay(&l.target, &["pull", "--to", to.to_str().unwrap()]),
        "pull",
    );
    assert!(pulled.status.success(), "{}", fail_text(&pulled));
    let (name, _) = snaprelay::snapdir::file_names(6, 2);
    assert_eq!(std::fs::read(to.join(name)).unwrap(), data);
}

/// A chunk index that is a symbolic link (to a copy of the real index elsewhere) is not
/// followed: the publisher names it, cuts the file itself, and publishes the right bytes.
#[test]
fn push_does_not_follow_a_symlinked_chunk_index() {
    let (l, out, data) = indexed_push_with(|index, l| {
        let copy = l.work.path().join("index-elsewhere.json");
        std::fs::rename(index, &copy).unwrap();
        symlink(&copy, index).unwrap();
    });
    assert!(
        support::stderr(&out).contains(".chunks is a symbolic link"),
        "{}",
        fail_text(&out)
    );
    assert_published(&l, &out, &data);
}

/// A FIFO as the chunk index used to hang `push` forever.
#[test]
fn push_does_not_hang_on_a_fifo_chunk_index() {
    let (l, out, data) = indexed_push_with(|index, _| {
        std::fs::remove_file(index).unwrap();
        mkfifo(index);
    });
    assert!(
        support::stderr(&out).contains(".chunks is a FIFO"),
        "{}",
        fail_text(&out)
    );
    assert_published(&l, &out, &data);
}

/// An envelope whose raft_meta is null (or names another log id) is refused: a follower's
/// node would adopt a snapshot its meta does not describe.
#[test]
fn push_refuses_an_envelope_whose_raft_meta_is_not_the_snapshots() {
    let l = leader();
    for (n, raft_meta) in [
        serde_json::json!(null),
        serde_json::json!({"last_log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 99}}),
    ]
    .into_iter()
    .enumerate()
    {
        let meta = support::write_snapshot(&l.dir, 10 + n as u64, 1, b"state");
        let mut envelope: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        envelope["raft_meta"] = raft_meta;
        std::fs::write(&meta, serde_json::to_vec(&envelope).unwrap()).unwrap();
        let out = l.push(&meta, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", fail_text(&out));
        assert!(
            support::stderr(&out).contains("raft_meta"),
            "{}",
            fail_text(&out)
        );
    }
    l.assert_nothing_published();
}
