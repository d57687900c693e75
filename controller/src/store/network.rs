//! Transport between heads: openraft's messages, bincode-encoded, over the
//! `RaftPeer` gRPC service every head serves next to `Control` (same port;
//! heads present the peer key, `crate::auth::peer_key`, which only
//! `RaftPeer` accepts). Peer clients connect lazily and reconnect on their
//! own; an unreachable peer is reported to raft as `Unreachable`, which
//! makes it back off instead of retrying hot.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use serval_protos::client::{connect_peer_lazy, PeerClient};
use serval_protos::control::RaftMessage;

use super::log_store::{decode, encode};
use super::{NodeId, TypeConfig};

/// The most bytes of log entries one AppendEntries carries (one entry is
/// always sent, whatever its size). openraft gives the call one heartbeat
/// interval (100 ms); a follower catching up would otherwise be sent up to
/// 300 entries at once, which with 1 MiB blob parts never arrives in time.
const MAX_APPEND_BYTES: usize = 2 * 1024 * 1024;

#[derive(Clone, Default)]
pub struct Network {
    /// The peer key, presented to every other head.
    pub peer_key: String,
}

pub struct Peer {
    target: NodeId,
    addr: String,
    client: Option<PeerClient>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let client = connect_peer_lazy(&node.addr, &self.peer_key)
            .map_err(
                |e| tracing::warn!(target, addr = %node.addr, error = %e, "bad raft peer address"),
            )
            .ok();
        Peer {
            target,
            addr: node.addr.clone(),
            client,
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

/// Why an exchange with a peer failed before raft got an answer.
enum Transport {
    Unreachable(std::io::Error),
    Network(std::io::Error),
}

impl Transport {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<NodeId, BasicNode, E> {
        match self {
            Transport::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            Transport::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl Peer {
    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        method: Method,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, Transport> {
        let payload = encode(request).map_err(Transport::Network)?;
        self.send(method, payload, ttl).await
    }

    async fn send<Resp: DeserializeOwned>(
        &mut self,
        method: Method,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Resp, Transport> {
        let Some(client) = self.client.as_mut() else {
            return Err(Transport::Unreachable(std::io::Error::other(format!(
                "bad address {}",
                self.addr
            ))));
        };
        let message = RaftMessage { payload };
        let call = async {
            match method {
                Method::AppendEntries => client.append_entries(message).await,
                Method::Vote => client.vote(message).await,
                Method::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(Transport::Network(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "raft rpc timed out",
                )))
            }
            Ok(Err(status)) => {
                let e = std::io::Error::other(format!("{}: {}", self.addr, status.message()));
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unauthenticated => {
                        Transport::Unreachable(e)
                    }
                    _ => Transport::Network(e),
                });
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        decode(&reply.payload).map_err(Transport::Network)
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload = encode(&rpc).map_err(|e| Transport::Network(e).into_rpc())?;
        let entries = rpc.entries.len();
        if entries > 1 && payload.len() > MAX_APPEND_BYTES {
            // openraft then sends at most this many entries per call for a while.
            let fit = (entries * MAX_APPEND_BYTES / payload.len()).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = self
            .send(Method::AppendEntries, payload, option.hard_ttl())
            .await
            .map_err(Transport::into_rpc)?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let reply: Result<
            InstallSnapshotResponse<NodeId>,
            RaftError<NodeId, InstallSnapshotError>,
        > = self
            .exchange(Method::InstallSnapshot, &rpc, option.hard_ttl())
            .await
            .map_err(Transport::into_rpc)?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let reply: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .exchange(Method::Vote, &rpc, option.hard_ttl())
            .await
            .map_err(Transport::into_rpc)?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
