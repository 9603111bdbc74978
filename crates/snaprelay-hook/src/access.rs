//! Who may use the hook socket: the peer's uid, read with SO_PEERCRED, must be on an allow
//! list. File mode (0600/0660) is the first gate; this is the second, and the one that holds
//! when the socket's directory or group is more open than intended.

use std::collections::BTreeSet;
use std::fmt;

/// The uids allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidAllowList {
    uids: BTreeSet<u32>,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("peer uid {uid} is not allowed to use this socket (allowed: {allowed})")]
    UidNotAllowed { uid: u32, allowed: String },
    #[error("the peer's credentials could not be read: {0}")]
    NoCredentials(String),
}

impl UidAllowList {
    /// The configured uids, or `own_uid` alone when none are configured: by default only the
    /// user the node runs as may talk to it.
    pub fn new(configured: &[u32], own_uid: u32) -> UidAllowList {
        let uids = if configured.is_empty() {
            BTreeSet::from([own_uid])
        } else {
            configured.iter().copied().collect()
        };
        UidAllowList { uids }
    }

    pub fn allows(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }

    /// Checks a peer whose uid was read (`Ok`) or could not be (`Err`, refused).
    pub fn check(&self, peer_uid: Result<u32, String>) -> Result<u32, Refusal> {
        match peer_uid {
            Ok(uid) if self.allows(uid) => Ok(uid),
            Ok(uid) => Err(Refusal::UidNotAllowed {
                uid,
                allowed: self.to_string(),
            }),
            Err(reason) => Err(Refusal::NoCredentials(reason)),
        }
    }
}

impl fmt::Display for UidAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, uid) in self.uids.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{uid}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allows_only_own_uid() {
        let list = UidAllowList::new(&[], 1000);
        assert!(list.allows(1000));
        assert!(!list.allows(0), "root is not implicitly allowed");
        assert!(!list.allows(1001));
        assert_eq!(list.check(Ok(1000)), Ok(1000));
    }

    #[test]
    fn configured_list_replaces_own_uid() {
        let list = UidAllowList::new(&[998, 1000, 998], 1000);
        assert!(list.allows(998));
        assert!(list.allows(1000));
        assert_eq!(list.to_string(), "998,1000");
        let list = UidAllowList::new(&[998], 1000);
        assert!(
            !list.allows(1000),
            "an explicit list is the whole list, so an operator can lock the node's own user out"
        );
    }

    #[test]
    fn refusals_name_the_uid_and_the_list() {
        let list = UidAllowList::new(&[7, 9], 1000);
        let err = list.check(Ok(8)).unwrap_err();
        assert_eq!(
            err,
            Refusal::UidNotAllowed {
                uid: 8,
                allowed: "7,9".into()
            }
        );
        assert!(err.to_string().contains("peer uid 8"), "{err}");
        let err = list.check(Err("no SO_PEERCRED".into())).unwrap_err();
        assert!(err.to_string().contains("no SO_PEERCRED"), "{err}");
    }
}
