//! The library's error type for repository work (push, pull, list, verify) and how a failure
//! maps onto what an operator can act on: the CLI's exit codes, the daemon's retry loops, and
//! the `reason`/`kind` labels of the failure metrics ([`FailureReason`], [`store_error_kind`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::node::HookError;
use crate::snapdir::SnapdirError;

/// A configuration problem, naming the key (`upload.concurrency`) or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

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

    #[error("{object} is not authentic: {refusal}")]
    Unauthenticated {
        object: String,
        refusal: crate::signing::Refusal,
    },

    #[error(
        "manifest {key} holds the manifest of {found}, not the one its name says; a copy under another name is never used"
    )]
    MisnamedManifest { key: String, found: String },

    #[error("manifest {key} is invalid: {reason}")]
    InvalidManifest { key: String, reason: String },

    #[error("object {key} is {size} bytes, more than the {limit} expected")]
    ObjectTooLarge { key: String, size: u64, limit: u64 },

    #[error("no snapshot at index {index} in the store")]
    SnapshotNotFound { index: u64 },

    #[error("the store holds no snapshot")]
    NoSnapshots,

    /// A chunk stored as an object of its own is missing (in a repository of packs, a
    /// missing pack is [`Error::PackMissing`]).
    #[error("chunk {sha256} is missing from the store")]
    ChunkMissing { sha256: String },

    #[error("chunk {sha256} is corrupt: {reason}")]
    ChunkCorrupt { sha256: String, reason: String },

    #[error("pack {pack} is missing from the store")]
    PackMissing { pack: String },

    #[error("pack {pack} is corrupt: {reason}")]
    PackCorrupt { pack: String, reason: String },

    #[error("tree block {block} (in pack {pack}) is corrupt: {reason}")]
    BlockCorrupt {
        block: String,
        pack: String,
        reason: String,
    },

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

/// An error and its causes on one line, `outer: cause: root cause`, for people to read.
///
/// Like anyhow's `{:#}`, but a cause is left out when the text so far already contains it:
/// object_store's and this crate's messages embed their sources, so `{:#}` would print the
/// same root cause three or four times over.
pub fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A failure whose producer has already decided its class, for a command that reported the
/// details itself (`check-config` prints a table of what failed, then fails with this).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Classified {
    pub class: ErrorClass,
    pub message: String,
}

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

    /// Whether the store's content failed verification (damaged or missing data), as
    /// opposed to the store failing to answer: what the verification-failure metric counts.
    pub fn is_verification_failure(&self) -> bool {
        matches!(
            self,
            Error::ChunkCorrupt { .. }
                | Error::ChunkMissing { .. }
                | Error::PackMissing { .. }
                | Error::PackCorrupt { .. }
                | Error::BlockCorrupt { .. }
                | Error::FileCorrupt { .. }
        )
    }

    /// Whether trying the same operation again later may succeed. Corruption is never
    /// transient: the bytes in the store will not heal by themselves. A full disk is: space
    /// is freed (by the node pruning old snapshots, by an operator).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { source, .. } => store_error_class(source) == ErrorClass::Unreachable,
            Error::LeaseLapsed { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}

/// The HTTP status behind a store error that object_store did not classify.
///
/// object_store 0.14 turns a 401/403/404/409/412 of a GET, PUT, HEAD or DELETE into a typed
/// variant (`PermissionDenied`, `Unauthenticated`, `NotFound`, ...), which [`is_denied`] and
/// [`store_error_class`] match on. A failed *listing* (ListObjectsV2) comes back as
/// `Generic`, and the status it carries (in its private `RetryError`) is not reachable through
/// any public type. Only for `Generic` errors, then, the status is read from the one message
/// object_store writes for it, "Server returned non-2xx status code: <NNN> <reason>";
/// without this, bad credentials on a listing would look like an unreachable store.
pub fn http_status(err: &object_store::Error) -> Option<u16> {
    const MARKER: &str = "non-2xx status code: ";
    if !matches!(err, object_store::Error::Generic { .. }) {
        return None;
    }
    let text = err.to_string();
    let at = text.find(MARKER)? + MARKER.len();
    let code = text.get(at..at + 3)?;
    code.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| code.parse().ok())
        .flatten()
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
        if let Some(e) = cause.downcast_ref::<Classified>() {
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

/// Why a publish or fetch failed, as an operator would triage it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The object store refused or could not be reached.
    Store,
    /// The node's hook failed or its snapshot directory broke the contract.
    Node,
    /// Data that does not match its checksum, or a malformed or missing object.
    Corrupt,
    /// A local file system error.
    Io,
    Other,
}

impl FailureReason {
    pub const ALL: [FailureReason; 5] = [
        FailureReason::Store,
        FailureReason::Node,
        FailureReason::Corrupt,
        FailureReason::Io,
        FailureReason::Other,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Store => "store",
            FailureReason::Node => "node",
            FailureReason::Corrupt => "corrupt",
            FailureReason::Io => "io",
            FailureReason::Other => "other",
        }
    }

    /// Classifies a failed step by the first error in its chain that snaprelay knows.
    pub fn of(err: &anyhow::Error) -> FailureReason {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<Error>() {
                return match e {
                    Error::Store { .. } | Error::LeaseLapsed { .. } => FailureReason::Store,
                    Error::Io { .. } => FailureReason::Io,
                    Error::Snapdir(e) => snapdir_reason(e),
                    Error::InvalidManifest { .. }
                    | Error::Unauthenticated { .. }
                    | Error::MisnamedManifest { .. }
                    | Error::InvalidRepository { .. }
                    | Error::ObjectTooLarge { .. }
                    | Error::ChunkMissing { .. }
                    | Error::ChunkCorrupt { .. }
                    | Error::PackMissing { .. }
                    | Error::PackCorrupt { .. }
                    | Error::BlockCorrupt { .. }
                    | Error::FileCorrupt { .. }
                    | Error::IndexMismatch { .. } => FailureReason::Corrupt,
                    Error::Config(_)
                    | Error::ClusterMismatch { .. }
                    | Error::NoRepository { .. }
                    | Error::SnapshotNotFound { .. }
                    | Error::NoSnapshots
                    | Error::Handover { .. } => FailureReason::Other,
                };
            }
            if cause.is::<HookError>() {
                return FailureReason::Node;
            }
            if let Some(e) = cause.downcast_ref::<SnapdirError>() {
                return snapdir_reason(e);
            }
            if cause.is::<object_store::Error>() {
                return FailureReason::Store;
            }
            if cause.is::<std::io::Error>() {
                return FailureReason::Io;
            }
        }
        FailureReason::Other
    }
}

fn snapdir_reason(err: &SnapdirError) -> FailureReason {
    match err {
        SnapdirError::Read { .. } | SnapdirError::Write { .. } => FailureReason::Io,
        // The node wrote something that breaks the directory contract.
        _ => FailureReason::Node,
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `kind` label for [`Metrics::store_error`] of the first store error in `err`'s chain;
/// `None` if the failure did not come from the store.
pub fn store_error_kind(err: &anyhow::Error) -> Option<&'static str> {
    use object_store::Error as E;
    let store_error = err
        .chain()
        .find_map(|cause| match cause.downcast_ref::<Error>() {
            Some(Error::Store { source, .. }) => Some(source),
            _ => cause.downcast_ref::<E>(),
        })?;
    if crate::error::is_denied(store_error) {
        return Some("permission");
    }
    Some(match store_error {
        E::NotFound { .. } => "not_found",
        // How the HTTP backends report connection failures, timeouts and server errors.
        E::Generic { .. } => "unreachable",
        _ => "other",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chain_names_each_cause_once() {
        let root = std::io::Error::other("No space left on device");
        let err = anyhow::Error::new(Error::io("writing /x/.s.partial", root))
            .context("pulling snapshot 7");
        assert_eq!(
            chain(&err),
            "pulling snapshot 7: writing /x/.s.partial: No space left on device"
        );
    }

    #[test]
    fn denials_are_classified_by_type_or_by_a_listings_status() {
        let typed = object_store::Error::PermissionDenied {
            path: "manifests/x".into(),
            source: "403".into(),
        };
        assert!(is_denied(&typed));
        assert_eq!(store_error_class(&typed), ErrorClass::Usage);
        // What a denied ListObjectsV2 looks like: a Generic error carrying the status text.
        let listing = |status: &str| {
            object_store::Error::Generic {
            store: "S3",
            source: format!(
                "Error performing list request: Error performing GET http://127.0.0.1:8333/b?list-type=2 in 3ms - Server returned non-2xx status code: {status}: <Error/>"
            )
            .into(),
        }
        };
        assert_eq!(http_status(&listing("403 Forbidden")), Some(403));
        assert!(is_denied(&listing("403 Forbidden")));
        assert_eq!(
            store_error_class(&listing("403 Forbidden")),
            ErrorClass::Usage
        );
        assert_eq!(http_status(&listing("503 Service Unavailable")), Some(503));
        assert_eq!(
            store_error_class(&listing("503 Service Unavailable")),
            ErrorClass::Unreachable
        );
        // Nothing is read from the text of a typed error, or of a message without a status.
        let not_found = object_store::Error::NotFound {
            path: "x".into(),
            source: "status code: 403".into(),
        };
        assert_eq!(http_status(&not_found), None);
        let refused = object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        };
        assert_eq!(http_status(&refused), None);
        assert_eq!(store_error_class(&refused), ErrorClass::Unreachable);
    }

    #[test]
    fn failure_reasons_are_classified_from_the_error_chain() {
        let corrupt = anyhow::Error::new(Error::ChunkCorrupt {
            sha256: "ab".into(),
            reason: "sha256 mismatch".into(),
        })
        .context("fetching snapshot 7");
        assert_eq!(FailureReason::of(&corrupt), FailureReason::Corrupt);

        let store = anyhow::Error::new(Error::Store {
            op: "get",
            key: "manifests/x".into(),
            source: object_store::Error::NotFound {
                path: "manifests/x".into(),
                source: "gone".into(),
            },
        })
        .context("publishing snapshot 3");
        assert_eq!(FailureReason::of(&store), FailureReason::Store);
        assert_eq!(store_error_kind(&store), Some("not_found"));

        let hook = anyhow::Error::new(HookError::Timeout {
            socket: "/run/node.sock".into(),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(FailureReason::of(&hook), FailureReason::Node);
        assert_eq!(store_error_kind(&hook), None);

        let io = anyhow::Error::new(std::io::Error::other("disk full")).context("staging");
        assert_eq!(FailureReason::of(&io), FailureReason::Io);
        assert_eq!(
            FailureReason::of(&anyhow::anyhow!("???")),
            FailureReason::Other
        );

        let denied = anyhow::Error::new(object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "403".into(),
        });
        assert_eq!(store_error_kind(&denied), Some("permission"));
        let down = anyhow::Error::new(object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        });
        assert_eq!(store_error_kind(&down), Some("unreachable"));
    }

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
