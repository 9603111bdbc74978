//! Files in a directory that another user may write to, reached only through the
//! directory's descriptor and never through a symbolic link, and files named by an operator
//! that must be regular files of bounded size.
//!
//! A node's snapshot directory and its incoming directory are writable by the node's user
//! (and, for the incoming directory, by the sidecar's). Whoever can write there can plant a
//! symbolic link, a hard link, a FIFO or a device at a name the other side is about to open.
//! So every file in such a directory is opened relative to the directory's descriptor with
//! `O_NOFOLLOW` (and `O_NONBLOCK`, so that opening a FIFO cannot hang), checked with
//! `fstat` on the descriptor actually opened, and read through that descriptor. Files are
//! created with `O_CREAT|O_EXCL|O_NOFOLLOW`, and renamed and removed with `renameat` and
//! `unlinkat` on the same descriptor, so the directory cannot be swapped for another one
//! half way through.
//!
//! The syscalls come from `rustix`: thin, safe wrappers of exactly `openat`, `renameat`,
//! `unlinkat`, `fstat`, `fchmod` and `fchown`, already in the dependency tree. (`cap-std`
//! would confine lookups to the directory but still follows symbolic links inside it, which
//! is what must not happen here.)

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

/// A file that is not a regular file where one is required: a symbolic link, FIFO, device,
/// socket or directory. Carried inside an [`io::Error`] of kind `InvalidInput`; the caller's
/// context names the path.
#[derive(Debug, thiserror::Error)]
#[error("is {kind}, not a regular file")]
pub struct NotRegular {
    pub kind: &'static str,
}

impl NotRegular {
    fn error(kind: &'static str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, NotRegular { kind })
    }

    /// The [`NotRegular`] inside `err`, if that is what it is.
    pub fn of(err: &io::Error) -> Option<&NotRegular> {
        err.get_ref()?.downcast_ref::<NotRegular>()
    }
}

/// What a file type is, in words, for errors.
pub fn kind_name(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

fn file_type(stat: &Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

fn require_regular(stat: &Stat) -> io::Result<()> {
    match file_type(stat) {
        FileType::RegularFile => Ok(()),
        other => Err(NotRegular::error(kind_name(other))),
    }
}

/// `O_NONBLOCK` was only there so that opening could not hang on a FIFO; reads of a regular
/// file ignore it, but clearing it keeps the descriptor ordinary for whoever reads it.
fn clear_nonblock(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags - OFlags::NONBLOCK)?;
    Ok(())
}

const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY);

/// Opens `path` for reading, requiring a regular file at the end. With `follow`, symbolic
/// links are followed (an operator may link a config or secret file from elsewhere);
/// without, a symbolic link as the last component is refused. Never blocks on a FIFO and
/// never opens a device: the type is checked before the open and again on the descriptor.
pub fn open_regular(path: &Path, follow: bool) -> io::Result<File> {
    let cwd = rustix::fs::CWD;
    let at = if follow {
        AtFlags::empty()
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    require_regular(&rustix::fs::statat(cwd, path, at)?)?;
    let flags = if follow {
        READ_FLAGS
    } else {
        READ_FLAGS | OFlags::NOFOLLOW
    };
    let fd = rustix::fs::openat(cwd, path, flags, Mode::empty()).map_err(symlink_errno)?;
    require_regular(&rustix::fs::fstat(&fd)?)?;
    clear_nonblock(&fd)?;
    Ok(File::from(fd))
}

/// `O_NOFOLLOW` on a symbolic link fails with `ELOOP`; say what it is instead.
fn symlink_errno(e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::LOOP {
        NotRegular::error(kind_name(FileType::Symlink))
    } else {
        e.into()
    }
}

/// Reads all of `file`, failing (without returning any of it) if it holds more than
/// `limit` bytes. The size is checked as read, not only by `fstat`, since a file can grow.
pub fn read_limited(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("is larger than the {limit}-byte limit"),
        ));
    }
    Ok(bytes)
}

/// A directory, opened once; every file operation in it goes through its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// How many times a planted entry at a name being created is removed before giving up
/// (someone racing to plant it again).
const CREATE_ATTEMPTS: usize = 3;

impl Dir {
    /// Opens the directory at `path` (which may itself be reached through symbolic links:
    /// the operator or the node names it).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: path.to_owned(),
        })
    }

    /// The path the directory was opened by (for messages and for callers that hand paths
    /// on).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's own status (owner, group, mode).
    pub fn stat(&self) -> io::Result<Stat> {
        Ok(rustix::fs::fstat(&self.fd)?)
    }

    /// The status of the entry `name` itself (a symbolic link is not followed), or `None`
    /// if there is none.
    pub fn entry(&self, name: &str) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the regular file `name` for reading. A symbolic link, FIFO, device, socket or
    /// directory at that name is refused with a [`NotRegular`] error, without blocking.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        if let Some(stat) = self.entry(name)? {
            require_regular(&stat)?;
        }
        let fd = rustix::fs::openat(&self.fd, name, READ_FLAGS | OFlags::NOFOLLOW, Mode::empty())
            .map_err(symlink_errno)?;
        require_regular(&rustix::fs::fstat(&fd)?)?;
        clear_nonblock(&fd)?;
        Ok(File::from(fd))
    }

    /// Opens `name` for reading and writing if it is a regular file this process owns with
    /// a single link: a file it created earlier (a resumable download). Anything else at
    /// that name was planted by someone else (a symbolic link, a hard link to a file
    /// elsewhere, a FIFO, another user's file): it is removed, with a warning, and `None`
    /// is returned, as when there is nothing there.
    pub fn open_own(&self, name: &str) -> io::Result<Option<File>> {
        let Some(stat) = self.entry(name)? else {
            return Ok(None);
        };
        if !is_own_single_file(&stat) {
            self.remove_planted(name, &stat)?;
            return Ok(None);
        }
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            // Swapped for a symbolic link since the look: planted.
            Err(rustix::io::Errno::LOOP) => {
                self.remove_entry(name)?;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        // The descriptor is what will be written; check what it really is.
        let stat = rustix::fs::fstat(&fd)?;
        if !is_own_single_file(&stat) {
            drop(fd);
            self.remove_planted(name, &stat)?;
            return Ok(None);
        }
        clear_nonblock(&fd)?;
        Ok(Some(File::from(fd)))
    }

    /// Creates the new regular file `name` for reading and writing (`O_CREAT|O_EXCL|
    /// O_NOFOLLOW`; `mode` is subject to the umask). An entry already at that name is
    /// removed first: a stale file of this process's own silently, anything else with a
    /// warning, since it was planted. The file created is always a fresh inode that only
    /// this process has opened.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        let flags = OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY;
        let mut last = None;
        for _ in 0..CREATE_ATTEMPTS {
            match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode)) {
                Ok(fd) => return Ok(File::from(fd)),
                Err(rustix::io::Errno::EXIST) => {
                    match self.entry(name)? {
                        Some(stat) if is_own_single_file(&stat) => {
                            tracing::debug!(path = %self.join(name).display(), "removing a stale file of this process");
                            self.remove_entry(name)?;
                        }
                        Some(stat) => self.remove_planted(name, &stat)?,
                        None => {}
                    }
                    last = Some(io::Error::from(rustix::io::Errno::EXIST));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from(rustix::io::Errno::EXIST)))
    }

    fn remove_planted(&self, name: &str, stat: &Stat) -> io::Result<()> {
        tracing::warn!(
            path = %self.join(name).display(),
            kind = kind_name(file_type(stat)),
            uid = stat.st_uid,
            links = stat.st_nlink,
            "removing an entry planted at a name this process writes; its target is left alone"
        );
        self.remove_entry(name)
    }

    /// Removes the entry `name` (a symbolic link itself, never its target). Refuses to
    /// remove a directory.
    fn remove_entry(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
                match self.entry(name)? {
                    Some(stat) if file_type(&stat) == FileType::Directory => Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} is a directory where a file must be created; remove it",
                            self.join(name).display()
                        ),
                    )),
                    _ => Err(rustix::io::Errno::PERM.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `name` if it exists (symbolic links themselves, never their targets).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.remove_entry(name)
    }

    /// Renames `from` to `to` inside this directory, replacing whatever entry `to` is.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, from, &self.fd, to)?)
    }

    /// Takes an exclusive `flock` on the directory through this descriptor, without waiting:
    /// `Ok(false)` if another open of it (in this process or another) holds one. The lock
    /// is advisory, held until this `Dir` is dropped, and lost with the process, so a
    /// killed holder never leaves it behind.
    pub fn try_lock_exclusive(&self) -> io::Result<bool> {
        use rustix::fs::FlockOperation;
        match rustix::fs::flock(&self.fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// fsyncs the directory, so that creations and renames in it survive a power loss.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Creates the temp file that will become `name` (`.<name>.<pid>.tmp`), with `mode`
    /// (subject to the umask). Write it through [`Pending::file`], then
    /// [`Pending::commit`]; dropped uncommitted, it is removed.
    pub fn create_temp(&self, name: &str, mode: u32) -> io::Result<Pending<'_>> {
        let temp = format!(".{name}.{}.tmp", std::process::id());
        let file = self.create_new(&temp, mode)?;
        Ok(Pending {
            dir: self,
            temp: Some(temp),
            name: name.to_owned(),
            file,
        })
    }

    /// temp file + fsync + rename + directory fsync: readers see the old file or the whole
    /// new one.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut pending = self.create_temp(name, 0o666)?;
        pending.file.write_all(bytes)?;
        pending.file.sync_all()?;
        pending.commit()
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn is_own_single_file(stat: &Stat) -> bool {
    file_type(stat) == FileType::RegularFile
        && stat.st_uid == rustix::process::geteuid().as_raw()
        && stat.st_nlink == 1
}

/// A temp file in a [`Dir`] that becomes `name` on [`Pending::commit`]; removed if dropped
/// before.
#[derive(Debug)]
pub struct Pending<'d> {
    dir: &'d Dir,
    temp: Option<String>,
    name: String,
    file: File,
}

impl Pending<'_> {
    /// The temp file, to write, fsync, chmod or chown before the commit.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Renames the temp file to its name and fsyncs the directory. Call it only once the
    /// file's content is complete and fsynced.
    pub fn commit(mut self) -> io::Result<()> {
        let temp = self.temp.take().unwrap_or_default();
        if let Err(e) = self.dir.rename(&temp, &self.name) {
            let _ = self.dir.remove(&temp);
            return Err(e);
        }
        self.dir.sync()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(temp) = &self.temp {
            let _ = self.dir.remove(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }

    #[test]
    fn open_file_refuses_what_is_not_a_regular_file_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "secret").unwrap();
        let dir_path = tmp.path().join("d");
        std::fs::create_dir(&dir_path).unwrap();
        symlink(&outside, dir_path.join("link")).unwrap();
        mkfifo(&dir_path.join("fifo"));
        std::fs::create_dir(dir_path.join("sub")).unwrap();
        std::fs::write(dir_path.join("ok"), "fine").unwrap();
        let dir = Dir::open(&dir_path).unwrap();
        for (name, kind) in [
            ("link", "a symbolic link"),
            ("fifo", "a FIFO (named pipe)"),
            ("sub", "a directory"),
        ] {
            let err = dir.open_file(name).unwrap_err();
            assert_eq!(NotRegular::of(&err).map(|n| n.kind), Some(kind), "{name}");
        }
        let mut s = String::new();
        dir.open_file("ok").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "fine");
        assert!(open_regular(&dir_path.join("fifo"), true).is_err());
        assert!(open_regular(Path::new("/dev/zero"), true).is_err());
        assert!(open_regular(&dir_path.join("link"), false).is_err());
        assert!(open_regular(&dir_path.join("link"), true).is_ok());
    }

    #[test]
    fn create_new_replaces_planted_entries_and_leaves_their_targets_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "keep me").unwrap();
        let dir_path = tmp.path().join("d");
        std::fs::create_dir(&dir_path).unwrap();
        let dir = Dir::open(&dir_path).unwrap();
        // A symbolic link, a hard link and a FIFO at the name, in turn.
        symlink(&outside, dir_path.join("x")).unwrap();
        dir.create_new("x", 0o600)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        std::fs::remove_file(dir_path.join("x")).unwrap();
        std::fs::hard_link(&outside, dir_path.join("x")).unwrap();
        assert!(
            dir.open_own("x").unwrap().is_none(),
            "a hard link is not ours"
        );
        dir.create_new("x", 0o600)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        std::fs::remove_file(dir_path.join("x")).unwrap();
        mkfifo(&dir_path.join("x"));
        dir.create_new("x", 0o600)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert_eq!(std::fs::read_to_string(dir_path.join("x")).unwrap(), "new");
        // Our own single-link file is reopened as it is.
        let mut own = dir.open_own("x").unwrap().unwrap();
        let mut s = String::new();
        own.read_to_string(&mut s).unwrap();
        assert_eq!(s, "new");
        // A directory cannot be removed as a file; the error says what to do.
        std::fs::create_dir(dir_path.join("y")).unwrap();
        let err = dir.create_new("y", 0o600).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }

    #[test]
    fn write_atomic_through_a_planted_temp_name_leaves_the_target_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "keep me").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let temp = format!(".m.json.{}.tmp", std::process::id());
        symlink(&outside, tmp.path().join(&temp)).unwrap();
        dir.write_atomic("m.json", b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert_eq!(std::fs::read(tmp.path().join("m.json")).unwrap(), b"{}");
        assert!(!tmp.path().join(&temp).exists());
        // An uncommitted temp file is removed.
        drop(dir.create_temp("n.json", 0o600).unwrap());
        assert!(!tmp
            .path()
            .join(format!(".n.json.{}.tmp", std::process::id()))
            .exists());
    }

    #[test]
    fn read_limited_refuses_more_than_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        std::fs::write(&p, vec![b'a'; 11]).unwrap();
        assert_eq!(read_limited(File::open(&p).unwrap(), 11).unwrap().len(), 11);
        let err = read_limited(File::open(&p).unwrap(), 10).unwrap_err();
        assert!(err.to_string().contains("10-byte limit"), "{err}");
    }
}
