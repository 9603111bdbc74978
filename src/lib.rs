//! snaprelay: ship openraft snapshots through object storage.
//!
//! The leader's node builds a snapshot once; snaprelay cuts it into content-defined chunks,
//! uploads the chunks the store lacks and commits a manifest. Followers download only the
//! chunks they do not already hold, verify every byte, and hand the node a finished file.
//!
//! # Layout
//!
//! - [`config`]: TOML file → validated [`config::Config`]; errors name the key.
//! - [`snapdir`], [`ipc`], [`chunking`]: the contracts shared with the node, from the
//!   `snaprelay-contract` crate (the snapshot directory layout, the hook protocol, and the
//!   chunking and chunk index both sides agree on).
//! - [`chunk`]: content-defined chunking (FastCDC) and sha256 hashing of a file, streaming.
//! - [`manifest`]: the manifest and repository descriptor formats and their validation.
//! - [`manifest_v2`]: format 2 of both (blocks and packs).
//! - [`layout`]: which of the two a repository is, and what a new one is created as.
//! - [`signing`]: Ed25519 keys, the DSSE envelope every manifest and `repository.json` is
//!   stored in, and the keyring that seals and checks them.
//! - [`metrics`]: the daemon's Prometheus metrics.
//! - [`health`]: what /healthz and /readyz answer: loop progress, store and hook reachability.
//! - [`liveness`]: whether the daemon's loop is stuck: busy steps, progress, the store's
//!   answers as progress; what /healthz and the systemd watchdog go by.
//! - [`store_probe`]: a small request on its own deadline, so readiness sees a hanging store;
//!   the same request watches the advisory `latest` object.
//! - [`latest`]: the advisory `latest` object a publisher rewrites after each manifest.
//! - [`hint`]: "look now" hints from the leader's sidecar to the followers', rate-limited.
//! - [`inprogress`]: the advisory in-progress object a streaming publish keeps up to date,
//!   its checks, and the publisher's [`inprogress::Announcer`].
//! - [`prefetch`]: follower side of streaming: a publish's chunks into the staging file of
//!   its fetch while the upload runs.
//! - [`counting`]: every store request counted by kind (the store's bill).
//! - [`http`]: the HTTP listener serving /metrics, /healthz, /readyz and POST /hint.
//! - [`node`]: the client of the node's IPC hook.
//! - [`store`]: store URLs and options → an `object_store` backend.
//! - [`secret`]: values that are never shown (credentials, secret options).
//! - [`pack`]: packs (the objects holding chunks and tree blocks) and blob encodings.
//! - [`tree`]: a snapshot's chunk list as content-defined blocks.
//! - [`packer`]: a snapshot into packs, reusing a base manifest's blocks.
//! - [`repo`]: the only module that knows object keys: repository.json, manifests, chunks, packs.
//! - [`publish`]: leader side: snapshot → missing chunks (or packs) → manifest.
//! - [`fetch`]: follower side: manifest → verified file in a target directory.
//! - [`assemble`]: a format-2 snapshot into a file, from packs and a local snapshot.
//! - [`gc`]: retention: old manifests, then unreferenced chunks (or packs) past a grace period.
//! - [`lease`]: how a publish and a GC running at once keep out of each other's way.
//! - [`incarnation`]: which incarnation of the repository a sidecar follows.
//! - [`verify`]: re-download and re-hash what the store holds.
//! - [`progress`]: progress reporting hooks (a terminal bar in the CLI, nothing in tests).
//! - [`cli`]: the `snaprelay` command line, one module per subcommand.
//! - [`daemon`]: `snaprelay run`: role tracking, publishing as leader, adopting as follower.
//! - [`quarantine`]: manifests a follower refused for good (for a while), persisted in the
//!   state dir; which failures are permanent for a manifest.
//! - [`systemd`]: sd_notify readiness, status, stopping and a progress-driven watchdog.
//! - [`watch`]: snapshot directory events, debounced.
//! - [`window`]: finding an earlier file's chunks near their new position, in bounded memory.
//! - [`error`]: the error type and how failures are classified: exit codes, retries, metric labels.

pub mod assemble;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod counting;
pub mod daemon;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod health;
pub mod hint;
pub mod http;
pub mod incarnation;
pub mod inprogress;
pub mod latest;
pub mod layout;
pub mod lease;
pub mod liveness;
pub mod manifest;
pub mod manifest_v2;
pub mod metrics;
pub mod node;
pub mod pack;
pub mod packer;
pub mod prefetch;
pub mod progress;
pub mod publish;
pub mod quarantine;
pub mod repo;
pub mod secret;
pub mod signing;
pub mod store;
pub mod store_probe;
pub mod systemd;
pub mod tree;
pub mod verified;
pub mod verify;
pub mod watch;
pub mod window;

pub use snaprelay_contract::{chunking, ipc, snapdir};
