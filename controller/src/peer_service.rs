//! The `RaftPeer` gRPC service: raft messages between heads, writes
//! forwarded by followers, and joins of new heads. It shares the control
//! port with `Control` but takes only the peer key (`crate::auth`): the
//! cluster token, which clients hold, is refused here.

use std::collections::BTreeSet;

use openraft::BasicNode;
use serval_protos::control::raft_peer_server::{RaftPeer, RaftPeerServer};
use serval_protos::control::{Empty, JoinHeadRequest, RaftMessage};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticated, TokenCheck};
use crate::store::forward::Forwarded;
use crate::store::log_store::{decode, encode};
use crate::store::Command;
use crate::store::{propose_with_output, Raft};

#[derive(Clone)]
pub struct PeerService {
    raft: Raft,
    /// Presented to the leader when a join is forwarded there.
    peer_key: String,
    check: TokenCheck,
}

impl PeerService {
    /// The service of a cluster whose token is `cluster_token`; it accepts
    /// only the peer key derived from it.
    pub fn new(raft: Raft, cluster_token: &str) -> Result<Self, serval_protos::auth::TokenError> {
        Ok(Self {
            raft,
            peer_key: crate::auth::peer_key(cluster_token),
            check: TokenCheck::peer(cluster_token)?,
        })
    }

    pub fn into_server(self) -> Authenticated<RaftPeerServer<Self>> {
        let check = self.check.clone();
        let server = RaftPeerServer::new(self)
            .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES);
        Authenticated::new(server, check)
    }
}

fn bad(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft message: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(&req.into_inner().payload).map_err(bad)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(&req.into_inner().payload).map_err(bad)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(&req.into_inner().payload).map_err(bad)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let cmd: Command = decode(&req.into_inner().payload).map_err(bad)?;
        // Only the leader applies; a stale forward is answered with the
        // usual not-leader error so the sender retries with the new leader.
        reply(&Forwarded::from(propose_with_output(&self.raft, cmd).await))
    }

    async fn join_head(&self, req: Request<JoinHeadRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(metrics.id) {
            // Ask the leader to do it.
            let leader = metrics
                .current_leader
                .and_then(|id| {
                    metrics
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .cloned()
                })
                .ok_or_else(|| Status::unavailable("no raft leader yet"))?;
            let mut client = serval_protos::client::connect_peer_lazy(&leader.addr, &self.peer_key)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            return client.join_head(r).await;
        }
        let node = BasicNode {
            addr: r.address.clone(),
        };
        // First a learner that catches up, then a voter: a slow new head
        // never stalls commits.
        self.raft
            .add_learner(r.raft_id, node, true)
            .await
            .map_err(|e| {
                Status::failed_precondition(format!("adding head {} as a learner: {e}", r.raft_id))
            })?;
        let mut voters: BTreeSet<u64> =
            metrics.membership_config.membership().voter_ids().collect();
        voters.insert(r.raft_id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| {
                Status::failed_precondition(format!("making head {} a voter: {e}", r.raft_id))
            })?;
        tracing::info!(raft_id = r.raft_id, address = %r.address, "head joined the raft group");
        Ok(Response::new(Empty {}))
    }
}
