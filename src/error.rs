//! The library's error type for repository work (push, pull, list, verify) and how a failure
//! maps onto what an operator can act on: the CLI's exit codes and the daemon's retry loops.

use std::io;

use crate::config::ConfigError;
use crate::snapdir::SnapdirError;

/// What a failure means to the caller; the CLI turns it into an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Corruption, a failed verification, a malformed or missing object: exit 1.
    Data,
    /// A bad config, argument or a store that belongs to another cluster: exit 2.
    Usage,
    /// The store could not be reached (network, server down, timeouts): exit 3.
    Unreachable,
}

impl ErrorClass {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Data => 1,
            ErrorClass::Usage => 2,
            ErrorClass::Unreachable => 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Snapdir(#[from] SnapdirError),

    #[error(
        "the store at {location} belongs to cluster {found:?}, not {expected:?}; refusing to use another cluster's snapshots"
    )]
    ClusterMismatch {
        location: String,
        expected: String,
        found: String,
    },

    #[error("no snaprelay repository at {location} (repository.json is missing; nothing was ever pushed there)")]
    NoRepository { location: String },

    #[error("repository.json at {location} is invalid: {reason}")]
    InvalidRepository { location: String, reason: String },

    #[error("manifest {key} is invalid: {reason}")]
    InvalidManifest { key: String, reason: String },

    #[error("object {key} is {size} bytes, more than the {limit} expected")]
    ObjectTooLarge { key: String, size: u64, limit: u64 },

    #[error("no snapshot at index {index} in the store")]
    SnapshotNotFound { index: u64 },

    #[error("the store holds no snapshot")]
    NoSnapshots,

    #[error("chunk {sha256} is missing from the store")]
    ChunkMissing { sha256: String },

    #[error("chunk {sha256} is corrupt: {reason}")]
    ChunkCorrupt { sha256: String, reason: String },

    #[error("assembled snapshot {index} does not match its manifest: sha256 {actual}, expected {expected}")]
    FileCorrupt {
        index: u64,
        expected: String,
        actual: String,
    },

    #[error(
        "snapshot data file {data} does not match its chunk index {index} at offset {offset} ({len} bytes): {reason}; refusing to publish it"
    )]
    IndexMismatch {
        data: std::path::PathBuf,
        index: std::path::PathBuf,
        offset: u64,
        len: u64,
        reason: String,
    },

    #[error("store {op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error(
        "stopped: lease {lease} could not be renewed for {secs} s, so others may no longer see it"
    )]
    LeaseLapsed { lease: String, secs: u64 },

    #[error("cannot hand snapshots over to the node through {dir}: {reason}")]
    Handover {
        dir: std::path::PathBuf,
        reason: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config(_)
            | Error::ClusterMismatch { .. }
            | Error::NoRepository { .. }
            | Error::Handover { .. } => ErrorClass::Usage,
            Error::Store { source, .. } => store_error_class(source),
            // Renewals fail when the store does not answer.
            Error::LeaseLapsed { .. } => ErrorClass::Unreachable,
            _ => ErrorClass::Data,
        }
    }

    /// Whether trying the same operation again later may succeed. Corruption is never
    /// transient: the bytes in the store will not heal by themselves.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { source, .. } => store_error_class(source) == ErrorClass::Unreachable,
            Error::LeaseLapsed { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }
}

/// The HTTP status behind a store error, when the backend reports one only in its message.
/// object_store classifies 403/404 for gets and puts but not for listings, which come back
/// as `Generic` errors saying "status code: 403 Forbidden"; without this, bad credentials
/// would look like an unreachable store.
pub fn http_status(err: &object_store::Error) -> Option<u16> {
    let text = err.to_string();
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Whether a store error means "not allowed" (bad credentials or missing permission).
pub fn is_denied(err: &object_store::Error) -> bool {
    matches!(
        err,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || matches!(http_status(err), Some(401 | 403))
}

fn store_error_class(err: &object_store::Error) -> ErrorClass {
    use object_store::Error as E;
    if is_denied(err) {
        return ErrorClass::Usage;
    }
    match err {
        E::NotFound { .. } | E::AlreadyExists { .. } | E::Precondition { .. } => ErrorClass::Data,
        E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::InvalidPath { .. } => ErrorClass::Usage,
        _ => ErrorClass::Unreachable,
    }
}

/// Finds the class of the first classified error in an `anyhow` chain; errors the library
/// does not know (argument parsing aside) count as data problems.
pub fn classify(err: &anyhow::Error) -> ErrorClass {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<crate::cli::ProbeFailed>() {
            return e.class;
        }
        if let Some(e) = cause.downcast_ref::<Error>() {
            return e.class();
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return ErrorClass::Usage;
        }
        if let Some(e) = cause.downcast_ref::<object_store::Error>() {
            return store_error_class(e);
        }
    }
    ErrorClass::Data
}

/// The whole cause chain of `err` on one line, each cause once. Several errors here (and
/// in object_store) show their source in their own message and also return it as their
/// source, so `{:#}` would print it twice ("writer stopped: writer stopped"); a cause
/// whose text the line already ends with is skipped.
pub fn chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_prints_each_cause_once() {
        let io = io::Error::new(io::ErrorKind::StorageFull, "No space left on device");
        let err = anyhow::Error::from(Error::io("writing the staging file /x/.s.partial", io))
            .context("pulling snapshot 9 into /x");
        assert_eq!(
            chain(&err),
            "pulling snapshot 9 into /x: writing the staging file /x/.s.partial: No space left on device"
        );
    }
}
