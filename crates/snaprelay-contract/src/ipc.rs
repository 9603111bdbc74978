//! The IPC hook protocol between a node (server) and its sidecar (client), over a Unix
//! domain socket owned by the node.
//!
//! Framing: one JSON object per line (`\n`-terminated, UTF-8), at most [`MAX_LINE`] bytes
//! including the newline. Each request gets exactly one response line, in order; a client
//! may send several requests on one connection. Every frame carries `"v": 1`.
//!
//! ```text
//! → {"v":1,"op":"status"}
//! ← {"v":1,"ok":true,"result":{"node_id":2,"role":"follower","leader":1,"term":3,...}}
//! → {"v":1,"op":"trigger_snapshot"}
//! ← {"v":1,"ok":true,"result":{"queued":true}}
//! → {"v":1,"op":"save_snapshot","envelope":{...},"path":"/var/lib/kv/snapshots/.incoming/x.bin","sha256":"…"}
//! ← {"v":1,"ok":true,"result":{"outcome":"staged","snapshot":{"term":3,"index":1200}}}
//! ← {"v":1,"ok":false,"error":{"code":"bad_request","message":"line 1: expected value at column 1"}}
//! ```
//!
//! A malformed or oversized line gets an error response and the connection stays usable
//! (an oversized line is skipped up to its newline).
//!
//! # Error codes
//!
//! Every error response carries an [`ErrorCode`]. *Transient* codes
//! ([`ErrorCode::is_transient`]) mean "try again later, the same request may succeed";
//! *permanent* ones mean the same request will get the same answer.
//!
//! | code | when | kind |
//! | --- | --- | --- |
//! | `bad_request` | the line is not a valid request, or `save_snapshot`'s path is not a committed file directly inside the incoming directory, not a regular file, or not the envelope's size | permanent |
//! | `too_large` | the line is longer than [`MAX_LINE`] | permanent |
//! | `unsupported_version` | the frame's `v` is not [`VERSION`] | permanent |
//! | `forbidden` | the peer is not on the node's allow list; the connection is closed | permanent |
//! | `unavailable` | the node is shutting down, or every connection slot is busy | transient |
//! | `internal` | the node failed (I/O error) | transient |
//! | `unreadable` | the node cannot open the data file (permissions: a deployment problem, not the snapshot's; the file is left) | permanent until the incoming directory's mode is fixed |
//! | `checksum_mismatch` | the data file's sha256, computed by the node, is not the request's, or the file was replaced after it was hashed | permanent for that file; the node removes it |
//! | `invalid_snapshot` | the envelope's log id is not `raft_meta.last_log_id`, `raft_meta` is not the application's `SnapshotMeta`, or the application's validation (decode) refused the file | permanent for that snapshot; the node removes the file |
//! | `not_committed` | the snapshot's index is beyond the node's committed index (see `Status::committed`), or its log does not hold the entry yet | transient; the file is kept |
//! | `log_mismatch` | the node's own log entry at the snapshot's index is not the snapshot's log id | permanent for that snapshot; the node removes the file |
//!
//! A refused `save_snapshot` never becomes the node's snapshot.

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::snapdir::Envelope;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest accepted line, newline included.
pub const MAX_LINE: usize = 1 << 20;

/// A raft log id, as the protocol carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogIdRef {
    pub term: u64,
    pub index: u64,
}

impl fmt::Display for LogIdRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.term, self.index)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// What the node is: role, leader, term, applied and snapshot log ids.
    Status {},
    /// Queue a snapshot build (answered at once; watch the directory for the result).
    TriggerSnapshot {},
    /// Hand the node a verified snapshot to adopt.
    SaveSnapshot {
        /// The snapshot's envelope. Its `chunk_index`, if set, names a chunk index (format
        /// 2, the manifest's chunk list, header `size` and `sha256` those of the data file)
        /// beside the data file in the incoming directory: a node may check the file chunk
        /// by chunk against it instead of hashing it whole. A node that does not use it
        /// ignores it; the sidecar removes it with the data file.
        envelope: Envelope,
        /// Absolute path of the verified data file, in the node's incoming directory.
        path: String,
        /// sha256 of the data file (64 hex digits); the node checks it before staging
        /// (`checksum_mismatch`).
        sha256: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Learner,
    Candidate,
    Shutdown,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Learner => "learner",
            Role::Candidate => "candidate",
            Role::Shutdown => "shutdown",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub role: Role,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: Option<LogIdRef>,
    /// Last log id covered by the node's current snapshot.
    pub snapshot: Option<LogIdRef>,
    /// Last purged log id.
    pub purged: Option<LogIdRef>,
    pub snapshot_dir: String,
    pub incoming_dir: String,
    /// The node's local committed log id: a snapshot beyond it is answered `not_committed`,
    /// so a sidecar need not fetch one. (Absent from nodes that predate it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<LogIdRef>,
    /// The snapshot the node has staged but not adopted yet, if any. A node forgets it when
    /// it restarts (it removes staged files at startup): a sidecar that handed a snapshot
    /// over and sees neither it here nor in `snapshot` hands it over again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<LogIdRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveOutcome {
    /// The snapshot is now the node's current snapshot.
    Adopted,
    /// Kept; it becomes current once the node has applied up to its index.
    Staged,
    /// Not newer than what the node has; ignored.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveResult {
    pub outcome: SaveOutcome,
    /// The node's current snapshot after the call.
    pub snapshot: Option<LogIdRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerResult {
    pub queued: bool,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a valid request.
    BadRequest,
    /// The line is longer than [`MAX_LINE`].
    TooLarge,
    /// The request's `v` is not one this node speaks.
    UnsupportedVersion,
    /// The request is valid but cannot be served now (e.g. trigger on a shut-down node).
    Unavailable,
    /// The peer is not allowed to use this socket (its uid is not on the node's allow list);
    /// the node closes the connection after this response.
    Forbidden,
    /// The node failed to serve it.
    Internal,
    /// `save_snapshot`: the node cannot open the data file (permissions). A deployment
    /// problem, not the snapshot's: the incoming directory must be setgid to the node's
    /// group (mode 2770) so that the node can read what the sidecar writes. The file is left
    /// where it is; retrying the same file gives the same answer until the mode is fixed.
    Unreadable,
    /// `save_snapshot`: the sha256 the node computed over the data file is not the
    /// request's, or the file at the name was replaced after it was hashed. Permanent for
    /// that file; the node has removed it.
    ChecksumMismatch,
    /// `save_snapshot`: the snapshot is not one this node can adopt: its envelope's log id
    /// is not its `raft_meta.last_log_id`, `raft_meta` is not the application's
    /// `SnapshotMeta`, or the application's validation (a decode) refused the data.
    /// Permanent for that snapshot; the node has removed the file.
    InvalidSnapshot,
    /// `save_snapshot`: the snapshot's index is beyond this node's committed index, or the
    /// node's log does not hold that entry yet. Transient: hand it over again once the
    /// node's `committed` (see [`Status`]) reaches it; the file is kept. A manifest far
    /// beyond what the cluster has committed never gets past this.
    NotCommitted,
    /// `save_snapshot`: the node's own log entry at the snapshot's index is not the
    /// snapshot's log id (Raft's log matching property): a relabelled snapshot, or one from
    /// another history. Permanent for that snapshot; the node has removed the file.
    LogMismatch,
}

impl ErrorCode {
    /// Whether the same request may succeed later (the node is busy or stopping, or failed
    /// on I/O); otherwise the node will answer the same again.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::NotCommitted
        )
    }

    /// Whether the node refused the snapshot itself (not the request's form, not the
    /// deployment): a sidecar should not hand that manifest over again.
    pub fn refuses_snapshot(self) -> bool {
        matches!(
            self,
            ErrorCode::ChecksumMismatch | ErrorCode::InvalidSnapshot | ErrorCode::LogMismatch
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// A request line: `{"v":1,"op":...,...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// A response line: `{"v":1,"ok":true,"result":...}` or `{"v":1,"ok":false,"error":...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl ResponseFrame {
    pub fn ok(result: &impl Serialize) -> ResponseFrame {
        ResponseFrame {
            v: VERSION,
            ok: true,
            // Serializing the protocol's own result types cannot fail (no maps with
            // non-string keys, no custom serializers that error).
            result: Some(serde_json::to_value(result).expect("result serializes")),
            error: None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> ResponseFrame {
        ResponseFrame {
            v: VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLarge,
    #[error("invalid frame: {0}")]
    Invalid(String),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u32),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The error response a server sends for this frame error, if the connection can go on.
    pub fn response(&self) -> Option<ResponseFrame> {
        match self {
            FrameError::TooLarge => {
                Some(ResponseFrame::error(ErrorCode::TooLarge, self.to_string()))
            }
            FrameError::Invalid(_) => Some(ResponseFrame::error(
                ErrorCode::BadRequest,
                self.to_string(),
            )),
            FrameError::Version(_) => Some(ResponseFrame::error(
                ErrorCode::UnsupportedVersion,
                self.to_string(),
            )),
            FrameError::Closed | FrameError::Io(_) => None,
        }
    }
}

/// The framing as a `tokio_util` codec: lines of at most [`MAX_LINE`] bytes including the
/// newline (a trailing `\r` is dropped). An oversized line is an error, after which the codec
/// skips to the line's newline; a line that is not UTF-8 is an error and consumed. Either
/// way the stream stays in sync. (A `FramedRead` ends its stream after a decoder error, so
/// a server that keeps the connection calls `decode` itself.)
pub fn line_codec() -> tokio_util::codec::LinesCodec {
    tokio_util::codec::LinesCodec::new_with_max_length(MAX_LINE - 1)
}

/// The reading side of a connection: lines decoded with [`line_codec`], one at a time, as
/// [`FrameError`]s say what went wrong. Unlike a `FramedRead`, it goes on after a bad line:
/// an oversized line is skipped to its newline ([`FrameError::TooLarge`]) and a line that is
/// not UTF-8 is consumed ([`FrameError::Invalid`]), so the next line is read in sync.
pub struct LineReader<R> {
    inner: R,
    codec: tokio_util::codec::LinesCodec,
    buf: tokio_util::bytes::BytesMut,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> LineReader<R> {
        LineReader {
            inner,
            codec: line_codec(),
            buf: tokio_util::bytes::BytesMut::with_capacity(8 * 1024),
            eof: false,
        }
    }

    /// The next line, without its newline. A last line without a newline counts as a line;
    /// after it, [`FrameError::Closed`].
    pub async fn next_line(&mut self) -> Result<String, FrameError> {
        use tokio_util::codec::{Decoder, LinesCodecError};
        loop {
            let decoded = match self.eof {
                true => self.codec.decode_eof(&mut self.buf),
                false => self.codec.decode(&mut self.buf),
            };
            match decoded {
                Ok(Some(line)) => return Ok(line),
                Ok(None) if self.eof => return Err(FrameError::Closed),
                Ok(None) => {}
                Err(LinesCodecError::MaxLineLengthExceeded) => return Err(FrameError::TooLarge),
                Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(FrameError::Invalid("the line is not UTF-8".into()));
                }
                Err(LinesCodecError::Io(e)) => return Err(FrameError::Io(e)),
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                self.eof = true;
            }
        }
    }
}

/// Parses a request line, checking the version.
pub fn parse_request(line: &[u8]) -> Result<Request, FrameError> {
    // Look at the version first, so that a future client gets "unsupported version" rather
    // than a confusing field error.
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(|e| FrameError::Invalid(e.to_string()))?;
    let v = value
        .remove("v")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| FrameError::Invalid("missing numeric field \"v\"".into()))?;
    if v != VERSION as u64 {
        return Err(FrameError::Version(v.min(u32::MAX as u64) as u32));
    }
    // Without "v", the rest is exactly a `Request`, whose unknown fields are refused.
    serde_json::from_value(serde_json::Value::Object(value))
        .map_err(|e| FrameError::Invalid(e.to_string()))
}

/// Parses a response line, checking the version.
pub fn parse_response(line: &[u8]) -> Result<ResponseFrame, FrameError> {
    let frame: ResponseFrame =
        serde_json::from_slice(line).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if frame.v != VERSION {
        return Err(FrameError::Version(frame.v));
    }
    Ok(frame)
}

/// Writes one frame and its newline, and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &impl Serialize,
) -> Result<(), FrameError> {
    let mut line = serde_json::to_vec(frame).map_err(|e| FrameError::Invalid(e.to_string()))?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await?;
    Ok(())
}

/// One request/response exchange on an open connection: writes `request` as a frame, reads
/// one line and parses it as a response. The client side of the protocol in one call.
pub async fn exchange<R, W>(
    reader: &mut LineReader<R>,
    writer: &mut W,
    request: Request,
) -> Result<ResponseFrame, FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write_frame(
        writer,
        &RequestFrame {
            v: VERSION,
            request,
        },
    )
    .await?;
    let line = reader.next_line().await?;
    parse_response(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let envelope = Envelope {
            format: 1,
            last_log_index: 9,
            last_log_term: 2,
            data: "x.bin".into(),
            size: 3,
            raft_meta: serde_json::json!({}),
            chunk_index: None,
            sha256: None,
        };
        for request in [
            Request::Status {},
            Request::TriggerSnapshot {},
            Request::SaveSnapshot {
                envelope,
                path: "/a/x.bin".into(),
                sha256: "00".repeat(32),
            },
        ] {
            let line = serde_json::to_vec(&RequestFrame {
                v: VERSION,
                request: request.clone(),
            })
            .unwrap();
            assert_eq!(parse_request(&line).unwrap(), request);
        }
        assert_eq!(
            serde_json::to_string(&RequestFrame {
                v: 1,
                request: Request::Status {}
            })
            .unwrap(),
            r#"{"v":1,"op":"status"}"#
        );
    }

    #[test]
    fn bad_requests() {
        assert!(matches!(
            parse_request(b"not json"),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(br#"{"op":"status"}"#),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(br#"{"v":2,"op":"status"}"#),
            Err(FrameError::Version(2))
        ));
        assert!(matches!(
            parse_request(br#"{"v":1,"op":"reboot"}"#),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(br#"{"v":1,"op":"status","x":1}"#),
            Err(FrameError::Invalid(_))
        ));
        let resp = FrameError::Invalid("x".into()).response().unwrap();
        assert!(!resp.ok);
        assert_eq!(resp.error.unwrap().code, ErrorCode::BadRequest);
    }

    #[tokio::test]
    async fn oversized_line_is_skipped_and_stream_stays_in_sync() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.push(b'\n');
        input.extend_from_slice(b"{\"v\":1,\"op\":\"status\"}\n");
        input.extend_from_slice(b"\xff\xfe\n");
        input.extend_from_slice(b"{\"v\":1,\"op\":\"status\"}\r\n");
        input.extend_from_slice(b"last line without newline");
        let mut reader = LineReader::new(&input[..]);
        assert!(matches!(
            reader.next_line().await,
            Err(FrameError::TooLarge)
        ));
        let line = reader.next_line().await.unwrap();
        assert_eq!(parse_request(line.as_bytes()).unwrap(), Request::Status {});
        assert!(matches!(
            reader.next_line().await,
            Err(FrameError::Invalid(_))
        ));
        let line = reader.next_line().await.unwrap();
        assert_eq!(parse_request(line.as_bytes()).unwrap(), Request::Status {});
        assert_eq!(
            reader.next_line().await.unwrap(),
            "last line without newline"
        );
        assert!(matches!(reader.next_line().await, Err(FrameError::Closed)));
        assert!(matches!(reader.next_line().await, Err(FrameError::Closed)));
    }

    #[test]
    fn error_codes_say_whether_to_retry_and_whether_the_snapshot_was_refused() {
        use ErrorCode::*;
        for code in [Unavailable, Internal, NotCommitted] {
            assert!(code.is_transient() && !code.refuses_snapshot(), "{code:?}");
        }
        for code in [ChecksumMismatch, InvalidSnapshot, LogMismatch] {
            assert!(!code.is_transient() && code.refuses_snapshot(), "{code:?}");
        }
        for code in [
            BadRequest,
            TooLarge,
            UnsupportedVersion,
            Forbidden,
            Unreadable,
        ] {
            assert!(!code.is_transient() && !code.refuses_snapshot(), "{code:?}");
        }
        let names: Vec<String> = [
            NotCommitted,
            LogMismatch,
            ChecksumMismatch,
            InvalidSnapshot,
            Unreadable,
        ]
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        assert_eq!(
            names,
            [
                "not_committed",
                "log_mismatch",
                "checksum_mismatch",
                "invalid_snapshot",
                "unreadable"
            ]
        );
    }

    #[test]
    fn responses() {
        let ok = ResponseFrame::ok(&TriggerResult { queued: true });
        let line = serde_json::to_vec(&ok).unwrap();
        assert_eq!(parse_response(&line).unwrap(), ok);
        let status = Status {
            node_id: 1,
            role: Role::Leader,
            leader: Some(1),
            term: 2,
            last_applied: Some(LogIdRef { term: 2, index: 10 }),
            snapshot: None,
            purged: None,
            snapshot_dir: "/s".into(),
            incoming_dir: "/s/.incoming".into(),
            committed: Some(LogIdRef { term: 2, index: 12 }),
            staged: None,
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["role"], "leader");
        assert_eq!(serde_json::from_value::<Status>(v.clone()).unwrap(), status);
        // A status from a node that predates `committed` and `staged` still reads.
        let mut old = v;
        old.as_object_mut().unwrap().remove("committed");
        let old: Status = serde_json::from_value(old).unwrap();
        assert_eq!((old.committed, old.staged), (None, None));
    }
}
