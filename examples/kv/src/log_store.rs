//! [`LogStore`]: an in-memory raft log and vote, generic over the type config (the crate
//! `openraft-memstore` is hard-wired to its own).
//!
//! Nothing here survives a restart. That keeps the example short, but a node that forgets its
//! vote can vote twice in one term, and one that forgets its log can lose committed entries if
//! a majority restarts at once: a real application persists the vote and the log before
//! answering. (The node enables openraft's `allow_log_reversion` so that a restarted node,
//! which comes back with its newest snapshot and an empty log, can rejoin.)

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::alias::{LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftTypeConfig};

/// The log and vote; clones share them (openraft asks for a separate reader).
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Mutex<Inner<C>>>,
}

struct Inner<C: RaftTypeConfig> {
    last_purged: Option<LogIdOf<C>>,
    entries: BTreeMap<u64, C::Entry>,
    committed: Option<LogIdOf<C>>,
    vote: Option<VoteOf<C>>,
}

impl<C: RaftTypeConfig> LogStore<C> {
    pub fn new() -> LogStore<C> {
        LogStore {
            inner: Arc::new(Mutex::new(Inner {
                last_purged: None,
                entries: BTreeMap::new(),
                committed: None,
                vote: None,
            })),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner<C>> {
        // A panic while holding the lock leaves plain data in a consistent state (every
        // method changes it with single-step operations), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<C: RaftTypeConfig> Default for LogStore<C> {
    fn default() -> Self {
        LogStore::new()
    }
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            inner: self.inner.clone(),
        }
    }
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C>
where
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        Ok(self
            .inner()
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.inner().vote.clone())
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C>
where
    C::Entry: Clone,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let inner = self.inner();
        let last_purged_log_id = inner.last_purged.clone();
        let last_log_id = match inner.entries.last_key_value() {
            Some((_, entry)) => Some(entry.log_id()),
            None => last_purged_log_id.clone(),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.inner().vote = Some(vote.clone());
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.inner().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.inner().committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = self.inner();
            for entry in entries {
                inner.entries.insert(entry.index(), entry);
            }
        }
        // In memory, "flushed" is "stored".
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |id| id.index() + 1);
        self.inner().entries.split_off(&first_removed);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let mut inner = self.inner();
        let kept = inner.entries.split_off(&(log_id.index() + 1));
        inner.entries = kept;
        inner.last_purged = Some(log_id);
        Ok(())
    }
}
