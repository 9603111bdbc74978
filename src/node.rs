//! The node as the daemon sees it: a client of the node's IPC hook (protocol in
//! [`crate::ipc`]). One connection per request keeps the client stateless: a node that
//! restarts between two requests is simply reached again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::ipc::{
    self, ErrorCode, Request, RequestFrame, ResponseFrame, SaveResult, Status, TriggerResult,
};
use crate::snapdir::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("node hook at {socket} is unreachable: {source}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node hook at {socket} did not answer within {timeout:?}")]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("node hook at {socket} broke the protocol: {reason}")]
    Protocol { socket: PathBuf, reason: String },
    #[error("node refused {op}: {code:?}: {message}")]
    Refused {
        op: &'static str,
        code: ErrorCode,
        message: String,
    },
}

impl HookError {
    /// Worth retrying later: the node may be restarting or busy.
    pub fn is_transient(&self) -> bool {
        match self {
            HookError::Unreachable { .. } | HookError::Timeout { .. } => true,
            HookError::Refused { code, .. } => code.is_transient(),
            HookError::Protocol { .. } => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HookClient {
    socket: PathBuf,
    timeout: Duration,
}

impl HookClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> HookClient {
        HookClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn status(&self) -> Result<Status, HookError> {
        self.call("status", Request::Status {}).await
    }

    pub async fn trigger_snapshot(&self) -> Result<TriggerResult, HookError> {
        self.call("trigger_snapshot", Request::TriggerSnapshot {})
            .await
    }

    /// Hands the node a verified snapshot; waits for its answer (adoption can take a while).
    pub async fn save_snapshot(
        &self,
        envelope: Envelope,
        path: &Path,
        sha256: &str,
    ) -> Result<SaveResult, HookError> {
        let request = Request::SaveSnapshot {
            envelope,
            path: path.display().to_string(),
            sha256: sha256.to_owned(),
        };
        self.call("save_snapshot", request).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        request: Request,
    ) -> Result<T, HookError> {
        let exchange = async {
            let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
                HookError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                }
            })?;
            let (read, mut write) = stream.into_split();
            let mut read = ipc::LineReader::new(read);
            let protocol = |reason: String| HookError::Protocol {
                socket: self.socket.clone(),
                reason,
            };
            let unreachable = |source| HookError::Unreachable {
                socket: self.socket.clone(),
                source,
            };
            // A node that closes the connection without an answer died or restarted under
            // the request: as unreachable as one that does not accept it.
            let closed = || {
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the node closed the connection without answering",
                ))
            };
            let frame = RequestFrame {
                v: ipc::VERSION,
                request,
            };
            if let Err(e) = ipc::write_frame(&mut write, &frame).await {
                // A node that refuses this peer answers at once and closes; the request
                // write can then fail (EPIPE) although the reason is waiting to be read.
                return match read
                    .next_line()
                    .await
                    .map(|l| ipc::parse_response(l.as_bytes()))
                {
                    Ok(Ok(ResponseFrame {
                        ok: false,
                        error: Some(error),
                        ..
                    })) => Err(HookError::Refused {
                        op,
                        code: error.code,
                        message: error.message,
                    }),
                    _ => Err(match e {
                        ipc::FrameError::Io(source) => unreachable(source),
                        ipc::FrameError::Closed => closed(),
                        other => protocol(other.to_string()),
                    }),
                };
            }
            let frame = read
                .next_line()
                .await
                .and_then(|line| ipc::parse_response(line.as_bytes()))
                .map_err(|e| match e {
                    ipc::FrameError::Io(source) => unreachable(source),
                    ipc::FrameError::Closed => closed(),
                    other => protocol(other.to_string()),
                })?;
            match (frame.ok, frame.result, frame.error) {
                (true, Some(result), _) => serde_json::from_value(result)
                    .map_err(|e| protocol(format!("unexpected {op} result: {e}"))),
                (false, _, Some(error)) => Err(HookError::Refused {
                    op,
                    code: error.code,
                    message: error.message,
                }),
                _ => Err(protocol("response has neither result nor error".into())),
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HookError::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that refuses at once and closes without reading, while the request is still
    /// being written (it is larger than the socket buffer, so the write blocks, then fails
    /// with EPIPE): the client reports the refusal, not "unreachable: Broken pipe".
    #[tokio::test]
    async fn a_refusal_is_reported_even_when_the_request_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hook.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut stream, _) = listener.accept().unwrap();
            let refusal =
                ipc::ResponseFrame::error(ErrorCode::Forbidden, "peer uid 7 is not allowed");
            let mut line = serde_json::to_vec(&refusal).unwrap();
            line.push(b'\n');
            stream.write_all(&line).unwrap();
            // Closed without reading a byte of the request.
        });
        let envelope = Envelope {
            format: 1,
            last_log_index: 1,
            last_log_term: 1,
            data: "x.bin".into(),
            size: 1,
            raft_meta: serde_json::json!({ "pad": "x".repeat(8 << 20) }),
            chunk_index: None,
            sha256: None,
        };
        let client = HookClient::new(&socket, Duration::from_secs(30));
        let err = client
            .save_snapshot(envelope, Path::new("/x/x.bin"), &"0".repeat(64))
            .await
            .unwrap_err();
        server.join().unwrap();
        match err {
            HookError::Refused { code, message, .. } => {
                assert_eq!(code, ErrorCode::Forbidden);
                assert!(message.contains("uid 7"), "{message}");
            }
            other => panic!("expected the refusal, got {other}"),
        }
    }
}
