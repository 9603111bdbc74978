//! The mark a pack fetch leaves on a snapshot file it assembled and checked, so that the next
//! fetch can copy that file's bytes without reading and hashing them again (and, where the
//! file system has reflinks, without copying them at all).
//!
//! The mark is an extended attribute of the file itself, `user.snaprelay.verified`, so it
//! moves with the inode when the node renames the file into its snapshot directory and
//! goes with it when the node deletes it. It holds the fingerprint of the manifest the
//! file was checked against (the sha256 of the manifest as this build serialises it: a
//! different manifest of the same log id and size, whatever the store holds by then, does
//! not match), the file's size, and its modification time after the fetch's last write.
//!
//! A marked file is believed only if nobody but this sidecar's user (or root) can have
//! written it since: it must be owned by the effective user, with no write permission for
//! its group or others (a fetch creates it mode 0640). Then the only processes that can
//! change its bytes run as this user, and any write by them moves the modification time
//! (since Linux 6.13 with a fine-grained stamp once the time was read, as the mark's was);
//! only a deliberate `utimensat` by that user could restore it, and that user could as
//! well rewrite this process's own state. A node running as another user cannot write the
//! file at all, only rename or delete it.
//!
//! What the mark does not cover is the disk: bit rot in a marked file would be copied into
//! the next snapshot. So a file built from a marked file's bytes copied unread is marked only
//! once its whole sha256 was checked: by the node's hook, which hashes every file it is
//! handed before adopting it ([`Pending`]), or by `pull --verify-file`; a plain `pull` marks
//! only files of which it checked every byte. A file that fails that check condemns the
//! source's mark ([`forget`]), and the snapshot is assembled again trusting no local byte.
//!
//! File systems without user extended attributes (tmpfs before Linux 6.6, some network
//! file systems) simply keep no marks: every local byte is then checked as before.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunk::Digest;
use crate::manifest_v2::Manifest;

/// The extended attribute holding the mark.
pub const XATTR: &str = "user.snaprelay.verified";
/// The first word of a mark of this layout.
const VERSION: &str = "v1";

/// What identifies `manifest` in a mark: the sha256 of its JSON as this build writes it.
/// (`None` only if it could not be serialised, which these types cannot fail; then nothing
/// is marked or believed.)
pub fn fingerprint(manifest: &Manifest) -> Option<Digest> {
    serde_json::to_vec(manifest)
        .ok()
        .map(|json| Digest::of(&json))
}

fn value(fingerprint: &Digest, meta: &std::fs::Metadata) -> String {
    format!(
        "{VERSION} {} {} {}.{:09}",
        fingerprint.to_hex(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

/// Marks `file`, which holds exactly the snapshot of the manifest with this [`fingerprint`], every byte checked, and which
/// this process will not write again. Call it after the file's data is synced: a crash
/// after this leaves a mark only on durable bytes. `Ok(false)`: the file system keeps no
/// user extended attributes.
pub fn mark(file: &File, fingerprint: &Digest) -> io::Result<bool> {
    let meta = file.metadata()?;
    let text = value(fingerprint, &meta);
    match rustix::fs::fsetxattr(
        file,
        XATTR,
        text.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::PERM) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `file` is one a fetch marked as holding the snapshot of the manifest with this
/// [`fingerprint`], and nobody else can have changed since. `Err` says why not, for the log.
pub fn check(file: &File, fingerprint: &Digest) -> Result<(), String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not this sidecar's {me}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "mode {:04o} lets others than its owner write it",
            meta.mode() & 0o7777
        ));
    }
    let mut buf = [0u8; 160];
    let n = match rustix::fs::fgetxattr(file, XATTR, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NODATA) => return Err("no mark".into()),
        Err(rustix::io::Errno::NOTSUP) => return Err("the file system keeps no marks".into()),
        Err(rustix::io::Errno::RANGE) => return Err("a mark of another shape".into()),
        Err(e) => return Err(format!("cannot read its mark: {e}")),
    };
    if buf[..n] != *value(fingerprint, &meta).as_bytes() {
        return Err("its mark is of another manifest, size or modification time".into());
    }
    Ok(())
}

/// Removes `file`'s mark, if it has one: its bytes turned out not to be what the mark said.
pub fn forget(file: &File) -> io::Result<()> {
    match rustix::fs::fremovexattr(file, XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// [`mark`], for callers to whom a mark is only a speed-up: a failure (a full disk, a
/// read-only or foreign file system, a security module) is logged, never an error.
pub fn mark_or_log(file: &File, fingerprint: &Digest, shown: &Path) {
    if let Err(e) = mark(file, fingerprint) {
        tracing::warn!(path = %shown.display(), error = %e, "cannot mark a fetched snapshot as checked; the next fetch will check its bytes instead of copying them unread");
    }
}

/// [`forget`], logged instead of failing.
pub fn forget_or_log(file: &File, shown: &Path) {
    if let Err(e) = forget(file) {
        tracing::warn!(path = %shown.display(), error = %e, "cannot remove the mark of a local snapshot that did not hold what it said");
    }
}

/// A fetch's file that its node is still to check (the hook hashes the whole file against
/// the manifest's sha256 before adopting it): marked once the node adopted it, and, if it
/// was built from a marked local snapshot's bytes copied unread and the node found it
/// wrong, that snapshot is what loses its mark.
#[derive(Debug, Clone)]
pub struct Pending {
    pub(crate) file: Arc<File>,
    pub(crate) shown: PathBuf,
    pub(crate) fingerprint: Digest,
    pub(crate) source: Option<(PathBuf, Arc<File>)>,
}

impl Pending {
    /// The local snapshot whose bytes were copied unread, if any.
    pub fn copied_unread_from(&self) -> Option<&Path> {
        self.source.as_ref().map(|(p, _)| p.as_path())
    }

    /// The node adopted the file, having checked it (its whole sha256, or every chunk it
    /// did not share with its last checked snapshot against the manifest's chunk list):
    /// mark it (the same inode, wherever the node put it).
    pub fn adopted(&self) {
        mark_or_log(&self.file, &self.fingerprint, &self.shown);
    }

    /// The node found the file not to match the manifest's sha256: if it was built from
    /// marked bytes copied unread, those lose their mark. Returns whether they were.
    pub fn refuted(&self) -> bool {
        match &self.source {
            Some((path, file)) => {
                forget_or_log(file, path);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn manifest(size: u64) -> Digest {
        let mut m = crate::manifest_v2::tests::manifest();
        m.size = size;
        fingerprint(&m).unwrap()
    }

    fn file_of(dir: &Path, name: &str, bytes: &[u8]) -> File {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
        // An old modification time, so that a write in the same clock tick as the mark
        // still moves it whatever the kernel's timestamp granularity.
        let old = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_600_000_000,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_600_000_000,
                tv_nsec: 0,
            },
        };
        rustix::fs::futimens(&f, &old).unwrap();
        File::options().read(true).write(true).open(&path).unwrap()
    }

    #[test]
    fn a_marked_file_is_trusted_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(5);
        let f = file_of(dir.path(), "a", b"hello");
        assert_eq!(check(&f, &m).unwrap_err(), "no mark");
        if !mark(&f, &m).unwrap() {
            eprintln!(
                "skipped: {} keeps no user extended attributes",
                dir.path().display()
            );
            return;
        }
        check(&f, &m).unwrap();
        // Renamed (as the node does): the mark goes with the inode.
        std::fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let reopened = File::open(dir.path().join("b")).unwrap();
        check(&reopened, &m).unwrap();

        // Another manifest of the same size is not the one the file was checked against.
        let mut other = crate::manifest_v2::tests::manifest();
        other.size = 5;
        other.blocks.clear();
        assert!(check(&f, &fingerprint(&other).unwrap())
            .unwrap_err()
            .contains("another manifest"));
        // A mode that lets the group write it.
        f.set_permissions(std::fs::Permissions::from_mode(0o660))
            .unwrap();
        assert!(check(&f, &m).unwrap_err().contains("mode 0660"));
        f.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
        check(&f, &m).unwrap();
        // A write moves the modification time, even of the same bytes.
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"h", 0).unwrap();
        assert!(check(&f, &m).unwrap_err().contains("modification time"));

        // Forgotten: no mark left.
        mark(&f, &m).unwrap();
        check(&f, &m).unwrap();
        forget(&reopened).unwrap();
        assert_eq!(check(&f, &m).unwrap_err(), "no mark");
        forget(&reopened).unwrap();
    }

    #[test]
    fn a_forged_or_foreign_mark_is_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(5);
        let f = file_of(dir.path(), "a", b"hello");
        if !mark(&f, &m).unwrap() {
            return;
        }
        for forged in [&b"v1 garbage"[..], &[0xff; 159][..], &[b'x'; 160][..], b""] {
            rustix::fs::fsetxattr(&f, XATTR, forged, rustix::fs::XattrFlags::empty()).unwrap();
            assert!(check(&f, &m).is_err());
        }
        // Longer than any mark this build writes.
        rustix::fs::fsetxattr(&f, XATTR, &[b'v'; 400][..], rustix::fs::XattrFlags::empty())
            .unwrap();
        assert_eq!(check(&f, &m).unwrap_err(), "a mark of another shape");
        // Not this user's file (runs as root in CI: give it to nobody).
        if rustix::process::geteuid().is_root() {
            mark(&f, &m).unwrap();
            rustix::fs::fchown(&f, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
            assert!(check(&f, &m).unwrap_err().contains("owned by uid 65534"));
        }
    }
}
