//! The `Control` gRPC service: every write becomes a raft command, every
//! read comes from the applied state, and Watch streams a full snapshot on
//! connect and after each change. Calls must carry the cluster token, or
//! for a few calls a replica's scoped token (see `crate::auth`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::Stream;
use serval_protos::blob::{BLOB_CHUNK_BYTES, MAX_BLOB_BYTES};
use serval_protos::control::control_server::{Control, ControlServer};
use serval_protos::control::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticated, Credential, TokenCheck};
use crate::error::{ControllerError, StateError};
use crate::soft_state::SoftState;
use crate::state::ClusterState;
use crate::store::Command;
use crate::store::{self, state_machine::StateMachineStore, Raft};

#[derive(Clone)]
pub struct ControlService {
    raft: Raft,
    sm: StateMachineStore,
    raft_id: u64,
    address: String,
    /// Heartbeats and load: see [`SoftState`].
    soft: SoftState,
    /// The cluster token, presented when this head forwards a node's
    /// heartbeat or a router's load to the leader's `Control` service.
    token: String,
    /// The key this head presents to the leader's `RaftPeer` service when
    /// it forwards a write.
    peer_key: String,
    /// What callers must present.
    check: TokenCheck,
    /// The connection to the current leader, when it is another head.
    leader_conn: Arc<Mutex<Option<(String, serval_protos::client::Client)>>>,
    unnamed_blobs: UnnamedBlobLimit,
}

/// What the blobs that nothing in the state names may hold on the heads:
/// those uploaded and not deployed yet, and those a replica token put
/// (a BatchAPI gateway stores its job workers' code) and never named,
/// which are collected 60 to 70 s after their upload. `PutBlob` of a new
/// blob beyond it is refused with `RESOURCE_EXHAUSTED`, so user code
/// holding a replica token cannot fill the heads' disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnnamedBlobLimit {
    pub bytes: u64,
    /// Blobs, counting each part of a large one.
    pub count: u64,
}

impl Default for UnnamedBlobLimit {
    fn default() -> Self {
        UnnamedBlobLimit {
            bytes: DEFAULT_MAX_UNNAMED_BLOB_BYTES,
            count: MAX_UNNAMED_BLOBS,
        }
    }
}

/// 1 GiB: twenty of the largest blobs (48 MiB) at once, far more than
/// deploys hold between their upload and the command naming it.
pub const DEFAULT_MAX_UNNAMED_BLOB_BYTES: u64 = 1 << 30;
/// Small blobs cost a table entry each.
pub const MAX_UNNAMED_BLOBS: u64 = 4096;

impl ControlService {
    pub fn new(
        raft: Raft,
        sm: StateMachineStore,
        raft_id: u64,
        address: String,
        token: String,
    ) -> Result<Self, serval_protos::auth::TokenError> {
        Ok(Self {
            raft,
            sm,
            raft_id,
            address,
            soft: SoftState::default(),
            check: TokenCheck::control(&token)?,
            peer_key: crate::auth::peer_key(&token),
            token,
            leader_conn: Arc::default(),
            unnamed_blobs: UnnamedBlobLimit::default(),
        })
    }

    pub fn with_unnamed_blob_limit(mut self, limit: UnnamedBlobLimit) -> Self {
        self.unnamed_blobs = limit;
        self
    }

    /// Refuses a new blob of `len` bytes that would take the blobs nothing
    /// names past [`UnnamedBlobLimit`]. Read from this head's state
    /// machine, not under raft: concurrent uploads may pass it by what
    /// they carry, each bounded by `MAX_BLOB_BYTES`.
    fn check_unnamed_room(&self, len: usize) -> Result<(), Status> {
        let (count, bytes) = self.sm.unnamed_blob_usage()?;
        let new = if len > BLOB_CHUNK_BYTES {
            len.div_ceil(BLOB_CHUNK_BYTES) as u64 + 1
        } else {
            1
        };
        let limit = self.unnamed_blobs;
        if count + new > limit.count || bytes + len as u64 > limit.bytes {
            return Err(Status::resource_exhausted(format!(
                "the heads hold {count} blobs ({} MiB) that nothing deployed names yet; a blob of {len} bytes \
                 would pass the limit of {} blobs or {} MiB (--max-unnamed-blob-bytes): deploy what was \
                 uploaded, or retry once the unnamed blobs are collected (about 70 s after their upload)",
                bytes >> 20,
                limit.count,
                limit.bytes >> 20
            )));
        }
        Ok(())
    }

    /// The leader's control address when it is another head; `None` when
    /// this head leads or no leader is known.
    fn other_leader(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        if leader == m.id {
            return None;
        }
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// A control client to the leader, for the soft state (heartbeats, load)
    /// that only the leader's reconciler reads. Kept while the leader stays
    /// the same, so forwarding costs no new connection per call.
    fn leader_client(&self) -> Option<serval_protos::client::Client> {
        let addr = self.other_leader()?;
        let mut cached = self.leader_conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, c)) = cached.as_ref() {
            if *a == addr {
                return Some(c.clone());
            }
        }
        let client = serval_protos::client::connect_lazy(&addr, &self.token).ok()?;
        *cached = Some((addr, client.clone()));
        Some(client)
    }

    /// The soft state this service records, for this head's reconciler.
    pub(crate) fn soft_state(&self) -> SoftState {
        self.soft.clone()
    }

    /// The tonic server for this service, refusing calls without a
    /// credential that allows them.
    pub fn into_server(self) -> Authenticated<ControlServer<Self>> {
        let check = self.check.clone();
        let server = ControlServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Authenticated::new(server, check)
    }

    /// Refuses a replica token a backend that is not one of its batch
    /// job's workers (see `crate::auth::REPLICA_CALLS`).
    fn may_manage_backend(
        &self,
        credential: Option<&Credential>,
        name: &str,
    ) -> Result<(), Status> {
        Credential::may_manage_backend(credential, name, |job_id| self.job_api(job_id))
    }

    /// The API of job `job_id`, if this head has it.
    fn job_api(&self, job_id: &str) -> Option<String> {
        let job = self
            .jobs()
            .get(JobRequest {
                job_id: job_id.to_string(),
            })
            .ok()?;
        Some(job.into_inner().spec?.api)
    }

    /// Refuses a replica credential a job of another API. An unknown job
    /// passes here: the call itself then answers that it is not found.
    fn may_use_job<T>(&self, req: &Request<T>, job_id: &str) -> Result<(), Status> {
        let credential = Credential::of(req);
        if Credential::api(credential.as_ref()).is_none() {
            return Ok(());
        }
        match self.job_api(job_id) {
            Some(api) => Credential::may_use_jobs_of(credential.as_ref(), &api),
            None => Ok(()),
        }
    }

    /// Refuses a replica credential a blob its backend does not list.
    fn may_read_blob<T>(&self, req: &Request<T>, digest: &str) -> Result<(), Status> {
        let state = self.sm.current();
        Credential::may_read_blob(Credential::of(req).as_ref(), digest, |backend| {
            state
                .backends
                .get(backend)
                .map(|b| b.blobs.clone())
                .unwrap_or_default()
        })
    }

    fn jobs(&self) -> crate::job_service::Jobs<'_> {
        crate::job_service::Jobs {
            raft: &self.raft,
            sm: &self.sm,
            peer_key: &self.peer_key,
        }
    }

    async fn propose(&self, cmd: Command) -> Result<Response<Empty>, Status> {
        store::forward::propose_via_leader(&self.raft, &self.peer_key, cmd).await?;
        Ok(Response::new(Empty {}))
    }

    /// Waits until this head has applied blob `digest` (a follower applies
    /// a commit a moment after the leader), so a client reading back from
    /// the head it wrote through finds it. Bounded: the write is committed
    /// either way.
    async fn await_local_blob(&self, digest: &str) -> Result<(), ControllerError> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        let mut metrics = self.raft.metrics();
        let applied = async {
            // Every apply updates the metrics' last_applied.
            while !self.sm.has_blob(digest)? {
                if metrics.changed().await.is_err() {
                    break;
                }
            }
            Ok(())
        };
        tokio::time::timeout(WAIT, applied).await.unwrap_or(Ok(()))
    }

    /// Proposes independent commands a few at a time: raft batches them,
    /// so a blob's parts do not each wait for a full commit round.
    async fn propose_all(&self, cmds: Vec<Command>) -> Result<(), ControllerError> {
        const IN_FLIGHT: usize = 4;
        let writes = cmds
            .into_iter()
            .map(|cmd| store::forward::propose_via_leader(&self.raft, &self.peer_key, cmd));
        let results =
            futures::StreamExt::buffer_unordered(futures::stream::iter(writes), IN_FLIGHT);
        futures::TryStreamExt::try_for_each(results, |_| async { Ok(()) }).await
    }

    /// Every head of the raft group as this head sees it: its role, the
    /// term, and how far its log is known to reach (the leader tracks its
    /// followers' progress; a follower knows only its own).
    fn heads(&self) -> Vec<Head> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let leader = metrics.current_leader == Some(*id);
                let last_applied = if *id == metrics.id {
                    metrics.last_applied.map(|l| l.index)
                } else {
                    metrics
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .map(|l| l.index)
                };
                Head {
                    raft_id: *id,
                    address: if *id == self.raft_id {
                        self.address.clone()
                    } else {
                        node.addr.clone()
                    },
                    leader,
                    role: if leader {
                        "leader".into()
                    } else if voters.contains(id) {
                        "follower".into()
                    } else {
                        "learner".into()
                    },
                    term: metrics.current_term,
                    last_applied: last_applied.unwrap_or(0),
                }
            })
            .collect()
    }
}

/// The applied state as the wire snapshot. It carries no code: backends
/// name theirs by digest (node agents fetch it with `GetBlob`).
pub fn to_snapshot(state: &ClusterState, heads: Vec<Head>) -> ClusterSnapshot {
    ClusterSnapshot {
        version: state.version,
        heads,
        nodes: state.nodes.values().cloned().collect(),
        backends: state.backends.values().cloned().collect(),
        endpoints: state.endpoints.clone(),
        replicas: state.replicas.values().cloned().collect(),
        http_options: state.http_options.clone(),
        shutting_down: state.shutting_down,
        apis: state.apis.values().cloned().collect(),
    }
}

/// The chunks of one blob stored whole, read when the stream reaches it.
fn whole_blob_chunks(sm: &StateMachineStore, digest: &str) -> Vec<Result<BlobChunk, Status>> {
    match sm.whole_blob(digest) {
        Ok(Some(data)) => data
            .chunks(BLOB_CHUNK_BYTES)
            .map(|c| Ok(BlobChunk { data: c.to_vec() }))
            .collect(),
        Ok(None) => vec![Err(Status::internal(format!(
            "blob part {digest} is missing on this head"
        )))],
        Err(e) => vec![Err(e.into())],
    }
}

/// Pickled backends travel in control messages: allow large ones.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// The largest request a client may send the `Control` service: a whole
/// blob part (48 MiB) and headroom. Decoded only after the token check
/// (the interceptor sees the headers first), but bounded all the same: a
/// call over it is refused with OUT_OF_RANGE before it is buffered whole.
/// Answers (snapshots with code) may still be up to `MAX_MESSAGE_BYTES`.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ClusterSnapshot, Status>> + Send>>;
type BlobStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = if r.node_id.is_empty() {
            format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        } else {
            r.node_id
        };
        let node = Node {
            id: node_id.clone(),
            hostname: r.hostname,
            num_cpus: r.num_cpus,
            num_gpus: r.num_gpus,
            alive: true,
            http_address: r.http_address,
            is_head: r.is_head,
            pid: r.pid,
        };
        store::forward::propose_via_leader(&self.raft, &self.peer_key, Command::RegisterNode(node))
            .await?;
        self.soft.heartbeat(node_id.clone(), Instant::now());
        Ok(Response::new(RegisterNodeReply { node_id }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<Empty>, Status> {
        // Heartbeats matter to the leader's reconciler only.
        if let Some(mut leader) = self.leader_client() {
            return leader.heartbeat(req.into_inner()).await;
        }
        let node_id = req.into_inner().node_id;
        match self.sm.current().nodes.get(&node_id) {
            Some(n) if n.alive => {}
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "node '{node_id}' was declared dead; register again"
                )))
            }
            None => {
                return Err(Status::not_found(format!(
                    "node '{node_id}' is not registered"
                )))
            }
        }
        self.soft.heartbeat(node_id, Instant::now());
        Ok(Response::new(Empty {}))
    }

    async fn report_replica(&self, req: Request<ReplicaReport>) -> Result<Response<Empty>, Status> {
        self.propose(Command::ReportReplica(req.into_inner())).await
    }

    async fn create_backend(&self, req: Request<Backend>) -> Result<Response<Empty>, Status> {
        let credential = Credential::of(&req);
        let backend = req.into_inner();
        self.may_manage_backend(credential.as_ref(), &backend.name)?;
        self.propose(Command::CreateBackend(backend)).await
    }

    async fn update_backend_config(
        &self,
        req: Request<UpdateBackendConfigRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        self.propose(Command::UpdateBackendConfig {
            name: r.name,
            config,
        })
        .await
    }

    async fn delete_backend(
        &self,
        req: Request<DeleteBackendRequest>,
    ) -> Result<Response<Empty>, Status> {
        let credential = Credential::of(&req);
        let r = req.into_inner();
        self.may_manage_backend(credential.as_ref(), &r.name)?;
        self.propose(Command::DeleteBackend {
            name: r.name,
            force: r.force,
        })
        .await
    }

    async fn create_endpoint(&self, req: Request<Endpoint>) -> Result<Response<Empty>, Status> {
        self.propose(Command::CreateEndpoint(req.into_inner()))
            .await
    }

    async fn delete_endpoint(&self, req: Request<NameRequest>) -> Result<Response<Empty>, Status> {
        self.propose(Command::DeleteEndpoint {
            name: req.into_inner().name,
        })
        .await
    }

    async fn update_backend_code(
        &self,
        req: Request<UpdateBackendCodeRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        self.propose(Command::UpdateBackendCode {
            name: r.name,
            code_digest: r.code_digest,
            blobs: r.blobs,
        })
        .await
    }

    async fn set_shadow(&self, req: Request<SetShadowRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        self.propose(Command::SetShadow {
            endpoint: r.endpoint,
            backend: r.backend,
            proportion: r.proportion,
        })
        .await
    }

    async fn set_http_middlewares(
        &self,
        req: Request<SetHttpMiddlewaresRequest>,
    ) -> Result<Response<Empty>, Status> {
        let json = req.into_inner().middlewares_json;
        // What every proxy would refuse is refused here, before the log.
        serval_protos::middleware::validate(&json).map_err(|e| {
            Status::invalid_argument(format!("invalid http_options.middlewares: {e}"))
        })?;
        // Location, host and port are set once, by the first head: keep them.
        let options = HttpOptions {
            middlewares_json: json,
            ..self.sm.current().http_options.clone().unwrap_or_default()
        };
        self.propose(Command::SetHttpOptions(options)).await
    }

    async fn set_traffic(
        &self,
        req: Request<SetTrafficRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        self.propose(Command::SetTraffic {
            endpoint: r.endpoint,
            traffic: r.traffic.into_iter().collect(),
        })
        .await
    }

    async fn get_snapshot(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<ClusterSnapshot>, Status> {
        Ok(Response::new(to_snapshot(&self.sm.current(), self.heads())))
    }

    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let this = self.clone();
        // WatchStream yields the current state first, then every new one.
        let stream = tokio_stream::wrappers::WatchStream::new(self.sm.subscribe())
            .map(move |state| Ok(to_snapshot(&state, this.heads())));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_load(&self, req: Request<LoadReport>) -> Result<Response<Empty>, Status> {
        // Load matters to the leader's autoscaler only.
        if let Some(mut leader) = self.leader_client() {
            return leader.report_load(req.into_inner()).await;
        }
        let r = req.into_inner();
        self.soft
            .autoscaler()
            .report(&r.source, Instant::now(), r.load);
        Ok(Response::new(Empty {}))
    }

    async fn report_replica_models(
        &self,
        req: Request<ReplicaModelsReport>,
    ) -> Result<Response<Empty>, Status> {
        let credential = Credential::of(&req);
        let r = req.into_inner();
        // A replica token speaks for the replicas of its own backend only.
        if let Some(Credential::Replica(backend)) = &credential {
            let owner = self
                .sm
                .current()
                .replicas
                .get(&r.replica_id)
                .map(|x| x.backend.clone());
            if owner.as_deref() != Some(backend.as_str()) {
                return Err(Status::permission_denied(format!(
                    "the replica credential of backend '{backend}' may report only its own replicas"
                )));
            }
        }
        self.propose(Command::SetReplicaModels {
            replica_id: r.replica_id,
            model_ids: r.model_ids,
        })
        .await
    }

    async fn shutdown(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.propose(Command::SetShuttingDown(true)).await
    }

    async fn put_blob(&self, req: Request<PutBlobRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        if r.data.len() > MAX_BLOB_BYTES {
            return Err(Status::invalid_argument(format!(
                "blob of {} bytes is over the limit of {} bytes ({} MiB)",
                r.data.len(),
                MAX_BLOB_BYTES,
                MAX_BLOB_BYTES >> 20
            )));
        }
        // The state machine checks again; checking here first keeps a wrong
        // digest from sending its parts through raft.
        let actual = serval_protos::blob::digest(&r.data);
        if actual != r.digest {
            let e = StateError::BlobDigestMismatch {
                claimed: r.digest,
                actual,
            };
            return Err(ControllerError::Refused(e).into());
        }
        // A code blob due for collection is put again (its parts are
        // no-ops), which gives it a new grace before a backend names it.
        if self.sm.has_blob(&r.digest)? {
            if !self.sm.is_orphan_blob(&r.digest)? {
                return Ok(Response::new(Empty {}));
            }
        } else {
            self.check_unnamed_room(r.data.len())?;
        }
        let digest = r.digest.clone();
        let upload = store::blobs::upload(r.digest, r.data);
        self.propose_all(upload.parts).await?;
        if let Some(finish) = upload.finish {
            self.propose(finish).await?;
        }
        self.await_local_blob(&digest).await?;
        Ok(Response::new(Empty {}))
    }

    type GetBlobStream = BlobStream;

    async fn get_blob(
        &self,
        req: Request<GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        self.may_read_blob(&req, &req.get_ref().digest)?;
        let digest = req.into_inner().digest;
        let Some(layout) = self.sm.blob_layout(&digest)? else {
            return Err(Status::not_found(format!(
                "blob {digest} is not stored on this head"
            )));
        };
        let sm = self.sm.clone();
        // One stored piece at a time as the client reads, so a large blob
        // is never all in memory here.
        let stream = futures::StreamExt::flat_map(futures::stream::iter(layout), move |piece| {
            futures::stream::iter(whole_blob_chunks(&sm, &piece))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn has_blob(
        &self,
        req: Request<GetBlobRequest>,
    ) -> Result<Response<HasBlobReply>, Status> {
        self.may_read_blob(&req, &req.get_ref().digest)?;
        // An orphaned code blob may go any moment: a client that means to
        // name it must put it again (`put_blob`).
        let digest = req.into_inner().digest;
        let present = self.sm.has_blob(&digest)? && !self.sm.is_orphan_blob(&digest)?;
        Ok(Response::new(HasBlobReply { present }))
    }

    async fn put_api(&self, req: Request<Api>) -> Result<Response<Empty>, Status> {
        self.propose(Command::PutApi(req.into_inner())).await
    }

    async fn delete_api(&self, req: Request<NameRequest>) -> Result<Response<Empty>, Status> {
        self.propose(Command::DeleteApi {
            name: req.into_inner().name,
        })
        .await
    }

    async fn create_job(&self, req: Request<JobSpec>) -> Result<Response<Job>, Status> {
        Credential::may_use_jobs_of(Credential::of(&req).as_ref(), &req.get_ref().api)?;
        self.jobs().create(req.into_inner()).await
    }

    async fn enqueue_batches(
        &self,
        req: Request<EnqueueRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().enqueue(req.into_inner()).await
    }

    async fn finish_enqueue(
        &self,
        req: Request<FinishEnqueueRequest>,
    ) -> Result<Response<Job>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().finish(req.into_inner()).await
    }

    async fn lease_batches(
        &self,
        req: Request<LeaseRequest>,
    ) -> Result<Response<LeaseReply>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().lease(req.into_inner()).await
    }

    async fn ack_batches(&self, req: Request<AckRequest>) -> Result<Response<Empty>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().ack(req.into_inner()).await
    }

    async fn complete_job(
        &self,
        req: Request<CompleteJobRequest>,
    ) -> Result<Response<Job>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().complete(req.into_inner()).await
    }

    async fn finish_job(&self, req: Request<FinishJobRequest>) -> Result<Response<Job>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().finish_job(req.into_inner()).await
    }

    async fn release_worker(
        &self,
        req: Request<ReleaseWorkerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().release(req.into_inner()).await
    }

    async fn get_job(&self, req: Request<JobRequest>) -> Result<Response<Job>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().get(req.into_inner())
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<JobList>, Status> {
        let credential = Credential::of(&req);
        let mut r = req.into_inner();
        // A replica lists its own API's jobs (all of them when it names none).
        if let Some(own) = Credential::api(credential.as_ref()) {
            if r.api.is_empty() {
                r.api = own.to_string();
            }
        }
        Credential::may_use_jobs_of(credential.as_ref(), &r.api)?;
        self.jobs().list(r)
    }

    async fn stop_job(&self, req: Request<StopJobRequest>) -> Result<Response<Job>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().stop(req.into_inner()).await
    }

    async fn get_dead_letters(
        &self,
        req: Request<JobRequest>,
    ) -> Result<Response<DeadLetters>, Status> {
        self.may_use_job(&req, &req.get_ref().job_id)?;
        self.jobs().dead_letters(req.into_inner())
    }
}
