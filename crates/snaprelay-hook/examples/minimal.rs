//! The complete snaprelay-specific code of a minimal integration: an application's state as a
//! [`SnapshotApp`] and the wiring that makes it the state machine and serves the hook. The
//! README's "Wiring the hook into an application" section shows the code between the
//! `README` markers; `tests/readme.rs` keeps the two equal, and building this example (CI
//! builds every target) keeps it compiling against the API.
//!
//! The log store and the network are the application's own (`start` is generic over them);
//! `examples/counter` is this plus those, as a running service.

openraft::declare_raft_types!(pub C: D = String, R = u64);

// README: begin
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, StoredMembershipOf};
use openraft::network::{NetSnapshot, RaftNetworkFactory};
use openraft::storage::{EntryResponder, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use snaprelay_hook::{
    serve_hook, HookConfig, SnapshotApp, SnapshotDir, SnapshotFile, SnapshotStore, StoreOptions,
};

/// What a snapshot holds: serde_json of sorted maps, the same bytes on every node.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct State {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    counts: BTreeMap<String, u64>,
}

/// The application's state machine; clones share the state.
#[derive(Clone, Default)]
pub struct Counters(Arc<RwLock<State>>);

impl SnapshotApp<C> for Counters {
    type State = State;

    fn applied_state(&self) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>) {
        Self::applied(&self.0.read().unwrap())
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let mut s = self.0.write().unwrap();
            s.last_applied = Some(entry.log_id);
            let mut count = 0;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(key) => {
                    count = *s.counts.entry(key).and_modify(|c| *c += 1).or_insert(1)
                }
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m)
                }
            }
            if let Some(responder) = responder {
                responder.send(count);
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> State {
        self.0.read().unwrap().clone()
    }

    fn restore(&mut self, state: State) {
        *self.0.write().unwrap() = state;
    }

    fn applied(state: &State) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>) {
        (state.last_applied, state.membership.clone())
    }

    fn encode(state: &State, out: &mut dyn Write) -> io::Result<()> {
        serde_json::to_writer(out, state).map_err(io::Error::other)
    }

    fn decode(input: &mut dyn Read) -> io::Result<State> {
        serde_json::from_reader(input).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Starts the node on `data_dir` with the application's own log store and network, and
/// serves the hook for the sidecar on `socket`.
pub async fn start<L, N>(
    id: u64,
    config: openraft::Config,
    network: N,
    mut log: L,
    data_dir: &Path,
    socket: &Path,
) -> Result<openraft::Raft<C, SnapshotStore<C, Counters>>, Box<dyn std::error::Error>>
where
    L: RaftLogStorage<C>,
    N: RaftNetworkFactory<C>,
    N::Network: NetSnapshot<C, SnapshotData = SnapshotFile>,
{
    let log_reader = log.get_log_reader().await; // the hook checks snapshots against the log
    let dir = SnapshotDir::open(data_dir.join("snapshots"))?;
    let options = StoreOptions {
        defer_limit: 4 * 500,
        keep_snapshots: 2,
    }; // 4 x the snapshot policy
    let store = SnapshotStore::open(dir, Counters::default(), options)?;
    let handle = store.handle();
    let raft = openraft::Raft::new(id, Arc::new(config.validate()?), network, log, store).await?;
    let hook_config = HookConfig::new(socket, handle.dir().path(), handle.dir().incoming_dir());
    let hook = serve_hook(&raft, &handle, log_reader, hook_config)?;
    tokio::spawn(hook.run(std::future::pending::<()>()));
    Ok(raft)
}
// README: end

fn main() {}
