//! Raft RPCs to other nodes over HTTP: [`HttpNetwork`] makes one [`HttpConnection`] per target,
//! addressed by the target's `BasicNode::addr`. The receiving end is [`crate::api`].
//!
//! Wire format: JSON bodies; the peer answers `Result<response, String>` as JSON (`Err` carries
//! a raft error's text, e.g. the node is shutting down). A full snapshot is one request whose
//! body is a JSON [`SnapshotHeader`] line, a newline, then the snapshot file's bytes.

use std::future::Future;
use std::time::Duration;

use openraft::alias::VoteOf;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{NodeId, SnapshotMeta, TypeConfig};
use snaprelay_hook::SnapshotFile;

/// What precedes a snapshot's bytes in a `/raft/snapshot` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: VoteOf<TypeConfig>,
    pub meta: SnapshotMeta,
}

/// Makes connections; all share one HTTP client (and its connection pool).
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
}

impl HttpNetwork {
    pub fn new() -> reqwest::Result<HttpNetwork> {
        // Nodes talk over loopback or a private network: never through an HTTP proxy the
        // environment may name.
        let client = reqwest::Client::builder().no_proxy().build()?;
        Ok(HttpNetwork { client })
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> HttpConnection {
        HttpConnection {
            client: self.client.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

pub struct HttpConnection {
    client: reqwest::Client,
    target: NodeId,
    addr: String,
}

fn send_error(e: reqwest::Error) -> RPCError<TypeConfig> {
    if e.is_connect() {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

impl HttpConnection {
    fn url(&self, rpc: &str) -> String {
        format!("http://{}/raft/{rpc}", self.addr)
    }

    async fn answer<Resp: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(RPCError::Network(NetworkError::from_string(format!(
                "node {} answered HTTP {status}: {text}",
                self.target
            ))));
        }
        let result: Result<Resp, String> = response.json().await.map_err(send_error)?;
        result.map_err(|e| {
            RPCError::Network(NetworkError::from_string(format!(
                "node {} failed: {e}",
                self.target
            )))
        })
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let response = self
            .client
            .post(self.url(rpc))
            .json(request)
            .timeout(timeout)
            .send()
            .await
            .map_err(send_error)?;
        self.answer(response).await
    }
}

impl RaftNetworkV2<TypeConfig> for HttpConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append", &rpc, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let mut body = serde_json::to_vec(&header)
            .map_err(|e| NetworkError::from_string(format!("encoding snapshot header: {e}")))?;
        body.push(b'\n');
        let file = snapshot.snapshot;
        let data = tokio::task::spawn_blocking(move || file.read_all())
            .await
            .map_err(|e| NetworkError::from_string(format!("reading snapshot: {e}")))?
            .map_err(|e| NetworkError::from_string(format!("reading snapshot: {e}")))?;
        body.extend_from_slice(&data);

        let send = self
            .client
            .post(self.url("snapshot"))
            .body(body)
            .timeout(option.soft_ttl())
            .send();
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            response = send => response,
        };
        let response = response.map_err(|e| match send_error(e) {
            RPCError::Unreachable(e) => StreamingError::Unreachable(e),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        })?;
        self.answer(response).await.map_err(|e| match e {
            RPCError::Unreachable(e) => StreamingError::Unreachable(e),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        })
    }
}
