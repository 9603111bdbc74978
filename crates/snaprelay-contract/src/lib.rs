//! The contracts between an openraft node and its snaprelay sidecar, with no dependency on
//! object storage, file watching or the daemon, so that both sides (and nodes written in
//! other languages, through the documented formats) can share them.
//!
//! # Layout
//!
//! - [`snapdir`]: the snapshot directory: envelope meta file + data file, how they are
//!   committed, which names are never read.
//! - [`dir`]: files in a directory another user can write to, reached through its
//!   descriptor and never through a symbolic link; regular files of bounded size.
//! - [`chunking`]: content-defined chunking and sha256 digests, the same on both sides,
//!   and the chunk index a node writes beside its snapshot.
//! - [`ipc`]: the hook protocol: one JSON request per line, one JSON response per line.

pub mod chunking;
pub mod dir;
pub mod ipc;
pub mod snapdir;
