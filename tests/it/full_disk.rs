//! A real full file system under `pull` (a small tmpfs, mounted for the test; needs root,
//! as CI has, and skips with a message otherwise): the error names the real cause and the
//! file, and a disk that fills between the data file and its envelope leaves nothing that
//! looks like a snapshot.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Target;

/// A tmpfs of `kib` KiB, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(test: &str, kib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: mounting a small tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "{test}: mount -t tmpfs failed as root: {}",
            support::stderr(&out)
        );
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A file store holding one snapshot of `size` pseudo-random bytes at index 9, term 3.
fn published(work: &Path, size: u64) -> Target {
    let target = Target::file(work, "full", "");
    let meta = support::write_random_snapshot(&work.join("leader"), 9, 3, size, 5);
    let out = target.run(&["push", meta.to_str().unwrap()]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    target
}

fn pull_into(target: &Target, to: &Path) -> (bool, String) {
    let out = target.run(&["pull", "--to", to.to_str().unwrap()]);
    (out.status.success(), support::stderr(&out))
}

/// Nothing named like a committed snapshot: no meta file, no final-named data file.
fn assert_no_snapshot(dir: &Path) {
    let left: Vec<String> = support::entries(dir);
    let (data, meta) = snaprelay::snapdir::file_names(9, 3);
    assert!(
        !left.contains(&data) && !left.contains(&meta),
        "a failed pull left something that looks like a snapshot: {left:?}"
    );
    let scan = snaprelay::snapdir::scan(dir).unwrap();
    assert!(
        scan.snapshots.is_empty() && scan.rejected.is_empty(),
        "{scan:?}"
    );
}

#[test]
fn pull_onto_a_full_disk_names_the_cause_and_the_file() {
    let Some(fs) = Tmpfs::mount("pull_onto_a_full_disk_names_the_cause_and_the_file", 512) else {
        return;
    };
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = published(work.path(), 3 << 20);
    let (ok, stderr) = pull_into(&target, fs.path());
    assert!(!ok, "a pull of 3 MiB into 512 KiB succeeded: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let staging: PathBuf = fs.path().join(format!(
        ".{}.partial",
        snaprelay::snapdir::file_names(9, 3).0
    ));
    assert!(
        stderr.contains(&staging.display().to_string()),
        "the error does not name the file: {stderr}"
    );
    assert!(!stderr.contains("writer stopped"), "{stderr}");
    assert_eq!(
        stderr.matches("No space left on device").count(),
        1,
        "the cause is printed more than once: {stderr}"
    );
    assert_no_snapshot(fs.path());
    assert!(
        support::entries(fs.path()).is_empty(),
        "{:?}",
        support::entries(fs.path())
    );
}

/// The data file fits exactly; its envelope does not.
#[test]
fn a_disk_that_fills_before_the_envelope_leaves_no_snapshot() {
    const KIB: u64 = 1200;
    let Some(fs) = Tmpfs::mount(
        "a_disk_that_fills_before_the_envelope_leaves_no_snapshot",
        KIB,
    ) else {
        return;
    };
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = published(work.path(), KIB << 10);
    let (ok, stderr) = pull_into(&target, fs.path());
    assert!(!ok, "the envelope fitted on a full disk: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains(".meta.json"), "{stderr}");
    assert_no_snapshot(fs.path());
    // With room again, the same pull completes.
    let bigger = Tmpfs::mount(
        "a_disk_that_fills_before_the_envelope_leaves_no_snapshot",
        4096,
    )
    .unwrap();
    let (ok, stderr) = pull_into(&target, bigger.path());
    assert!(ok, "{stderr}");
    assert_eq!(
        snaprelay::snapdir::scan(bigger.path())
            .unwrap()
            .snapshots
            .len(),
        1
    );
}
