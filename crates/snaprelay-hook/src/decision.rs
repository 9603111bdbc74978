//! The choice a state machine makes in `try_create_snapshot_builder`: make the leader's staged
//! snapshot current, build one from its own state, or wait for the leader's.
//!
//! Pure: no I/O, no openraft types, so that every case is a one-line test. The rule
//! (docs/adoption.md, "The protocol"):
//!
//! 1. A staged snapshot at `L` is adopted when `L <= last_applied` (so `L` is committed and
//!    the node's state at `L` equals the leader's) and `L` is newer than the current snapshot.
//!    This wins over everything else, whoever asked for the build.
//! 2. Otherwise a leader builds: it is the one whose snapshot the followers adopt.
//! 3. Otherwise `force` builds: openraft needs a snapshot and must get one.
//! 4. Otherwise a follower or learner defers (`None`), waiting for the leader's snapshot,
//!    unless it has applied `defer_limit` or more logs since its last snapshot: then the
//!    sidecar is presumably down, and the log must not grow without bound.
//!
//! "Newer" compares log indexes: two committed log ids with the same index are the same log
//! id, and a greater index is a later point of the same log.

use snaprelay_contract::ipc::LogIdRef;

/// What `try_create_snapshot_builder` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildDecision {
    /// Make the staged snapshot current (a rename) and return it with its own meta.
    AdoptStaged,
    /// Build a snapshot of the current state.
    BuildLocally,
    /// Return `None`: openraft records nothing and asks again later.
    Defer,
}

/// What the state machine knows when openraft asks it for a snapshot builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildInputs {
    /// The log id of the snapshot staged by the hook, if any.
    pub staged: Option<LogIdRef>,
    /// The log id of the state machine's current snapshot, if any.
    pub current: Option<LogIdRef>,
    /// The state machine's last applied log id.
    pub last_applied: Option<LogIdRef>,
    /// openraft's `force` argument: the build must not be deferred.
    pub force: bool,
    /// Whether this node is the leader (see [`crate::LeaderFlag`]).
    pub is_leader: bool,
}

impl BuildInputs {
    /// How many logs the state machine has applied that its current snapshot does not cover.
    pub fn logs_since_snapshot(&self) -> u64 {
        let Some(applied) = self.last_applied else {
            return 0;
        };
        match self.current {
            // Log indexes start at 0, so index i means i + 1 logs.
            None => applied.index.saturating_add(1),
            Some(current) => applied.index.saturating_sub(current.index),
        }
    }

    /// Whether the staged snapshot can be adopted now.
    pub fn staged_adoptable(&self) -> bool {
        match (self.staged, self.last_applied) {
            (Some(staged), Some(applied)) => {
                staged.index <= applied.index && is_newer(staged, self.current)
            }
            _ => false,
        }
    }

    /// Whether the staged snapshot can never be adopted (the current one is as new or newer),
    /// so that its file should be removed.
    pub fn staged_obsolete(&self) -> bool {
        self.staged
            .is_some_and(|staged| !is_newer(staged, self.current))
    }
}

/// Whether `candidate` is newer than `current`.
pub fn is_newer(candidate: LogIdRef, current: Option<LogIdRef>) -> bool {
    current.is_none_or(|current| candidate.index > current.index)
}

/// The application's knob: how long a follower waits for the leader's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildPolicy {
    /// A follower with nothing to adopt builds locally once it has applied this many logs
    /// since its last snapshot. Set it well above the snapshot policy's threshold (a few
    /// times it), so that a healthy sidecar always wins.
    pub defer_limit: u64,
}

impl BuildPolicy {
    pub fn new(defer_limit: u64) -> BuildPolicy {
        BuildPolicy { defer_limit }
    }

    pub fn decide(&self, inputs: &BuildInputs) -> BuildDecision {
        // A leader builds: it is the one whose snapshot the followers adopt. `force` must
        // build. A follower or learner waits for the leader's, within the limit.
        let build =
            inputs.is_leader || inputs.force || inputs.logs_since_snapshot() >= self.defer_limit;
        if inputs.staged_adoptable() {
            BuildDecision::AdoptStaged
        } else if build {
            BuildDecision::BuildLocally
        } else {
            BuildDecision::Defer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BuildDecision::*;

    fn id(index: u64) -> Option<LogIdRef> {
        Some(LogIdRef { term: 3, index })
    }

    /// A follower at applied index 100 whose current snapshot is at 50, nothing staged.
    fn follower() -> BuildInputs {
        BuildInputs {
            staged: None,
            current: id(50),
            last_applied: id(100),
            force: false,
            is_leader: false,
        }
    }

    const POLICY: BuildPolicy = BuildPolicy { defer_limit: 1000 };

    #[test]
    fn follower_adopts_staged_snapshot_it_has_applied() {
        for staged in [60, 100] {
            let inputs = BuildInputs {
                staged: id(staged),
                ..follower()
            };
            assert_eq!(POLICY.decide(&inputs), AdoptStaged, "staged at {staged}");
        }
    }

    #[test]
    fn staged_snapshot_ahead_of_applied_is_not_adopted() {
        let inputs = BuildInputs {
            staged: id(101),
            ..follower()
        };
        assert!(!inputs.staged_adoptable());
        assert!(!inputs.staged_obsolete(), "it becomes adoptable later");
        assert_eq!(POLICY.decide(&inputs), Defer);
        let forced = BuildInputs {
            force: true,
            ..inputs
        };
        assert_eq!(POLICY.decide(&forced), BuildLocally);
        let leader = BuildInputs {
            is_leader: true,
            ..inputs
        };
        assert_eq!(POLICY.decide(&leader), BuildLocally);
    }

    #[test]
    fn staged_snapshot_not_newer_than_current_is_obsolete() {
        for staged in [10, 50] {
            let inputs = BuildInputs {
                staged: id(staged),
                ..follower()
            };
            assert!(!inputs.staged_adoptable(), "staged at {staged}");
            assert!(inputs.staged_obsolete(), "staged at {staged}");
            assert_eq!(POLICY.decide(&inputs), Defer, "staged at {staged}");
        }
    }

    #[test]
    fn adoption_wins_over_force_and_leadership() {
        for (force, is_leader) in [(true, false), (false, true), (true, true)] {
            let inputs = BuildInputs {
                staged: id(80),
                force,
                is_leader,
                ..follower()
            };
            assert_eq!(POLICY.decide(&inputs), AdoptStaged, "{inputs:?}");
        }
    }

    #[test]
    fn first_snapshot_can_be_adopted() {
        let inputs = BuildInputs {
            staged: id(0),
            current: None,
            last_applied: id(0),
            ..follower()
        };
        assert_eq!(POLICY.decide(&inputs), AdoptStaged);
    }

    #[test]
    fn nothing_applied_means_nothing_adoptable() {
        let inputs = BuildInputs {
            staged: id(0),
            current: None,
            last_applied: None,
            ..follower()
        };
        assert!(!inputs.staged_adoptable());
        assert_eq!(inputs.logs_since_snapshot(), 0);
        assert_eq!(POLICY.decide(&inputs), Defer);
    }

    #[test]
    fn leader_builds_locally() {
        let inputs = BuildInputs {
            is_leader: true,
            ..follower()
        };
        assert_eq!(POLICY.decide(&inputs), BuildLocally);
    }

    #[test]
    fn forced_build_on_follower_builds_locally() {
        let inputs = BuildInputs {
            force: true,
            ..follower()
        };
        assert_eq!(POLICY.decide(&inputs), BuildLocally);
    }

    #[test]
    fn follower_defers_until_the_log_grows_past_the_limit() {
        let policy = BuildPolicy::new(100);
        let at = |applied: u64| BuildInputs {
            last_applied: id(applied),
            ..follower()
        };
        // Current snapshot at 50: 149 applied is 99 logs since, 150 is 100.
        assert_eq!(at(149).logs_since_snapshot(), 99);
        assert_eq!(policy.decide(&at(149)), Defer);
        assert_eq!(policy.decide(&at(150)), BuildLocally);
        assert_eq!(policy.decide(&at(10_000)), BuildLocally);
    }

    #[test]
    fn follower_without_any_snapshot_counts_from_index_zero() {
        let policy = BuildPolicy::new(100);
        let at = |applied: u64| BuildInputs {
            current: None,
            last_applied: id(applied),
            ..follower()
        };
        assert_eq!(at(98).logs_since_snapshot(), 99);
        assert_eq!(policy.decide(&at(98)), Defer);
        assert_eq!(policy.decide(&at(99)), BuildLocally);
    }

    #[test]
    fn zero_defer_limit_never_defers() {
        let policy = BuildPolicy::new(0);
        let inputs = BuildInputs {
            last_applied: id(50),
            ..follower()
        };
        assert_eq!(inputs.logs_since_snapshot(), 0);
        assert_eq!(policy.decide(&inputs), BuildLocally);
    }

    #[test]
    fn newer_compares_indexes() {
        assert!(is_newer(LogIdRef { term: 1, index: 5 }, None));
        assert!(is_newer(
            LogIdRef { term: 1, index: 6 },
            Some(LogIdRef { term: 2, index: 5 })
        ));
        assert!(!is_newer(
            LogIdRef { term: 2, index: 5 },
            Some(LogIdRef { term: 2, index: 5 })
        ));
    }
}
