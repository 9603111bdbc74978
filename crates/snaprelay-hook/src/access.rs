//! Who may use the hook socket. File mode (0600, or 0660 in group mode) is the first gate;
//! this is the second, and the one that holds when the socket's directory or group is more
//! open than intended.
//!
//! The rule is written the way systemd units are: a peer is allowed if its uid is an allowed
//! user, or its primary gid (SO_PEERCRED) or any of its supplementary groups (SO_PEERGROUPS,
//! read from the socket, so race-free) is an allowed group. Users and groups are given by name
//! or number; names are resolved once, when the socket is bound (`getpwnam_r`/`getgrnam_r`
//! through `nix`, which grows the buffer on `ERANGE`), and a name that does not resolve is an
//! error then, not a silent refusal later.
//!
//! Default, when nothing is configured: the node's own uid; in group mode also the socket's
//! group (so `User=snaprelay` + `SupplementaryGroups=kv` reaches a `kv` node's 0660 socket).

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;

use nix::unistd::{Gid, Group, Uid, User};

/// A user or group as an operator writes it: a name, or a number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl FromStr for Principal {
    type Err = String;

    /// All digits is a number (systemd refuses all-digit names); anything else a name.
    fn from_str(s: &str) -> Result<Principal, String> {
        if s.is_empty() {
            return Err("an empty user or group name".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Principal::Id)
                .map_err(|_| format!("{s:?} is out of range for a uid or gid"));
        }
        if s.contains(['\0', ':', '/', ' ', '\n']) {
            return Err(format!("{s:?} is not a valid user or group name"));
        }
        Ok(Principal::Name(s.to_owned()))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => f.write_str(name),
        }
    }
}

/// Why an allow list could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowListError {
    #[error("hook allow list: no user named {0:?} on this system")]
    UnknownUser(String),
    #[error("hook allow list: no group named {0:?} on this system")]
    UnknownGroup(String),
    #[error("hook allow list: looking up {what} {name:?}: {reason}")]
    Lookup {
        what: &'static str,
        name: String,
        reason: String,
    },
}

/// The peer as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (may include `gid`).
    pub groups: Vec<u32>,
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer uid {} gid {}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            write!(f, " groups {}", groups.join(","))?;
        }
        Ok(())
    }
}

/// The users and groups allowed to connect, with names for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    /// uid → name (if it has one).
    users: BTreeMap<u32, Option<String>>,
    /// gid → name (if it has one).
    groups: BTreeMap<u32, Option<String>>,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{peer} is not allowed to use this socket (allowed: {allowed})")]
    NotAllowed {
        peer: PeerCredentials,
        allowed: String,
    },
    #[error("the peer's credentials could not be read: {0}")]
    NoCredentials(String),
}

fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

fn resolve_user(who: &Principal) -> Result<(u32, Option<String>), AllowListError> {
    match who {
        Principal::Id(uid) => Ok((*uid, user_name(*uid))),
        Principal::Name(name) => match User::from_name(name) {
            Ok(Some(user)) => Ok((user.uid.as_raw(), Some(user.name))),
            Ok(None) => Err(AllowListError::UnknownUser(name.clone())),
            Err(e) => Err(AllowListError::Lookup {
                what: "user",
                name: name.clone(),
                reason: e.desc().to_owned(),
            }),
        },
    }
}

fn resolve_group(who: &Principal) -> Result<(u32, Option<String>), AllowListError> {
    match who {
        Principal::Id(gid) => Ok((*gid, group_name(*gid))),
        Principal::Name(name) => match Group::from_name(name) {
            Ok(Some(group)) => Ok((group.gid.as_raw(), Some(group.name))),
            Ok(None) => Err(AllowListError::UnknownGroup(name.clone())),
            Err(e) => Err(AllowListError::Lookup {
                what: "group",
                name: name.clone(),
                reason: e.desc().to_owned(),
            }),
        },
    }
}

impl AllowList {
    /// The configured users and groups (names resolved now), or, when none are configured,
    /// `own_uid` and, if given, `socket_gid` (group mode): by default only the node's user,
    /// and in group mode its group. An explicit list is the whole list.
    pub fn resolve(
        users: &[Principal],
        groups: &[Principal],
        own_uid: u32,
        socket_gid: Option<u32>,
    ) -> Result<AllowList, AllowListError> {
        let mut list = AllowList {
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
        };
        if users.is_empty() && groups.is_empty() {
            list.users.insert(own_uid, user_name(own_uid));
            if let Some(gid) = socket_gid {
                list.groups.insert(gid, group_name(gid));
            }
            return Ok(list);
        }
        for who in users {
            let (uid, name) = resolve_user(who)?;
            list.users.insert(uid, name);
        }
        for who in groups {
            let (gid, name) = resolve_group(who)?;
            list.groups.insert(gid, name);
        }
        Ok(list)
    }

    /// Numeric ids only, without name lookups (for tests and callers that have ids).
    pub fn from_ids(uids: &[u32], gids: &[u32]) -> AllowList {
        AllowList {
            users: uids.iter().map(|&u| (u, None)).collect(),
            groups: gids.iter().map(|&g| (g, None)).collect(),
        }
    }

    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        self.users.contains_key(&peer.uid)
            || self.groups.contains_key(&peer.gid)
            || peer.groups.iter().any(|g| self.groups.contains_key(g))
    }

    /// Checks a peer whose credentials were read (`Ok`) or could not be (`Err`, refused).
    pub fn check(&self, peer: Result<PeerCredentials, String>) -> Result<PeerCredentials, Refusal> {
        match peer {
            Ok(peer) if self.allows(&peer) => Ok(peer),
            Ok(peer) => Err(Refusal::NotAllowed {
                peer,
                allowed: self.to_string(),
            }),
            Err(reason) => Err(Refusal::NoCredentials(reason)),
        }
    }
}

impl fmt::Display for AllowList {
    /// `users kv(995),1000; groups kv(995)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn write_set(
            f: &mut fmt::Formatter<'_>,
            label: &str,
            set: &BTreeMap<u32, Option<String>>,
        ) -> fmt::Result {
            write!(f, "{label} ")?;
            if set.is_empty() {
                return f.write_str("none");
            }
            for (i, (id, name)) in set.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                match name {
                    Some(name) => write!(f, "{name}({id})")?,
                    None => write!(f, "{id}")?,
                }
            }
            Ok(())
        }
        write_set(f, "users", &self.users)?;
        f.write_str("; ")?;
        write_set(f, "groups", &self.groups)
    }
}

/// Linux's SO_PEERGROUPS (4.13+); the `libc` crate does not export it on every target.
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERGROUPS: libc::c_int = 0x003d;
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERGROUPS: libc::c_int = 59;

/// Reads the peer's uid, gid and supplementary groups from a connected Unix socket.
pub fn peer_credentials(socket: &impl AsRawFd) -> Result<PeerCredentials, String> {
    let fd = socket.as_raw_fd();
    let cred = peer_cred(fd).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let groups = match peer_groups(fd) {
        Ok(groups) => groups,
        // Kernels before 4.13: the peer's /proc entry, the next best thing (racy if the pid
        // is reused, but it is only read for a process connected right now).
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => proc_groups(cred.pid)
            .map_err(|e| format!("reading the groups of pid {}: {e}", cred.pid))?,
        Err(e) => return Err(format!("SO_PEERGROUPS: {e}")),
    };
    Ok(PeerCredentials {
        pid: Some(cred.pid),
        uid: cred.uid,
        gid: cred.gid,
        groups,
    })
}

fn peer_cred(fd: RawFd) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket for the duration of the call; `cred` and `len` are valid
    // for writes of `len` bytes, which is the size of `ucred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    // Start with room for 64 groups; the kernel says how much it needs on ERANGE.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is valid for writes of `len` bytes; `fd` is an open socket.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // A peer has at most NGROUPS_MAX (65536) groups: grow to what the kernel asked for.
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

fn proc_groups(pid: i32) -> std::io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_proc_groups(&status))
}

/// The `Groups:` line of `/proc/<pid>/status`.
fn parse_proc_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCredentials {
        PeerCredentials {
            pid: None,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn principals_parse_as_numbers_or_names() {
        assert_eq!("995".parse(), Ok(Principal::Id(995)));
        assert_eq!("kv".parse(), Ok(Principal::Name("kv".into())));
        assert_eq!("kv-2".parse(), Ok(Principal::Name("kv-2".into())));
        assert!("".parse::<Principal>().is_err());
        assert!("99999999999".parse::<Principal>().is_err());
        assert!("a:b".parse::<Principal>().is_err());
    }

    #[test]
    fn default_allows_own_uid_and_in_group_mode_the_socket_group() {
        let list = AllowList::resolve(&[], &[], 1000, None).unwrap();
        assert!(list.allows(&peer(1000, 1000, &[])));
        assert!(
            !list.allows(&peer(0, 0, &[])),
            "root is not implicitly allowed"
        );
        assert!(!list.allows(&peer(1001, 1000, &[1000])));

        let list = AllowList::resolve(&[], &[], 1000, Some(995)).unwrap();
        assert!(list.allows(&peer(1000, 1000, &[])));
        assert!(
            list.allows(&peer(999, 999, &[995])),
            "a member of the socket's group"
        );
        assert!(list.allows(&peer(999, 995, &[])), "primary group");
        assert!(!list.allows(&peer(999, 999, &[4, 27])));
    }

    #[test]
    fn configured_list_replaces_the_default() {
        let list = AllowList::resolve(
            &[Principal::Id(998), Principal::Id(998)],
            &[],
            1000,
            Some(7),
        )
        .unwrap();
        assert!(list.allows(&peer(998, 1, &[])));
        assert!(
            !list.allows(&peer(1000, 1000, &[])),
            "an explicit list is the whole list, so an operator can lock the node's own user out"
        );
        assert!(
            !list.allows(&peer(5, 7, &[7])),
            "the socket group is not added"
        );
        let groups = AllowList::resolve(&[], &[Principal::Id(50)], 1000, None).unwrap();
        assert!(groups.allows(&peer(3, 3, &[1, 50])));
        assert!(!groups.allows(&peer(1000, 1000, &[])));
    }

    #[test]
    fn names_resolve_through_the_system_databases() {
        // root (0) exists on every system this runs on.
        let list = AllowList::resolve(
            &[Principal::Name("root".into())],
            &[Principal::Name("root".into())],
            1000,
            None,
        )
        .unwrap();
        assert!(list.allows(&peer(0, 5, &[])));
        assert!(list.allows(&peer(5, 0, &[])));
        assert_eq!(list.to_string(), "users root(0); groups root(0)");
        let err = AllowList::resolve(&[Principal::Name("no-such-user-x7".into())], &[], 1, None)
            .unwrap_err();
        assert_eq!(err, AllowListError::UnknownUser("no-such-user-x7".into()));
        assert!(err.to_string().contains("no-such-user-x7"), "{err}");
        let err = AllowList::resolve(&[], &[Principal::Name("no-such-group-x7".into())], 1, None)
            .unwrap_err();
        assert!(matches!(err, AllowListError::UnknownGroup(_)), "{err}");
    }

    #[test]
    fn refusals_name_the_peer_and_what_is_allowed() {
        let list = AllowList::from_ids(&[7, 9], &[40]);
        let err = list.check(Ok(peer(8, 8, &[8, 30]))).unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "peer uid 8 gid 8 groups 8,30 is not allowed to use this socket \
             (allowed: users 7,9; groups 40)"
        );
        let err = list.check(Err("no SO_PEERCRED".into())).unwrap_err();
        assert!(err.to_string().contains("no SO_PEERCRED"), "{err}");
        assert_eq!(
            AllowList::from_ids(&[1], &[]).to_string(),
            "users 1; groups none"
        );
    }

    #[test]
    fn proc_status_groups_line() {
        let status = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 27 995 \nNgid:\t0\n";
        assert_eq!(parse_proc_groups(status), vec![4, 27, 995]);
        assert_eq!(parse_proc_groups("Groups:\n"), Vec::<u32>::new());
    }

    #[test]
    fn credentials_of_a_socket_pair_are_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let creds = peer_credentials(&a).unwrap();
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((creds.uid, creds.gid), (uid, gid));
        assert_eq!(creds.pid, Some(std::process::id() as i32));
        let own = proc_groups(std::process::id() as i32).unwrap();
        assert_eq!(creds.groups, own, "SO_PEERGROUPS matches /proc");
    }
}
