//! The batch-job RPCs of the `Control` service (see `store::jobs` for the
//! queue's semantics). Writes go through raft to the leader, stamped with
//! this head's clock; reads (GetJob, ListJobs, GetDeadLetters) come from
//! this head's store, which may trail the leader by the commits in flight.
//! A client reads its own control writes back through the head it wrote
//! them through: CreateJob, FinishEnqueue, CompleteJob, FinishJob and StopJob return
//! once this head has applied them (see `write_visible`).

use prost::Message;
use serval_protos::control::*;
use tonic::{Response, Status};

use crate::error::ControllerError;
use crate::store::jobs::{self, JobCommand};
use crate::store::Command;
use crate::store::{self, state_machine::StateMachineStore, Raft};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn storage(e: std::io::Error) -> Status {
    Status::from(ControllerError::Storage(e.to_string()))
}

/// How long a write through a follower waits for that follower to apply
/// it (see [`write_visible`]); the write is committed either way.
const VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes `cmd` and decodes its output as `T`.
async fn write<T: Message + Default>(
    raft: &Raft,
    peer_key: &str,
    cmd: JobCommand,
) -> Result<T, Status> {
    let written =
        store::forward::propose_via_leader_with_output(raft, peer_key, Command::Job(cmd)).await?;
    decode(&written)
}

fn decode<T: Message + Default>(written: &store::Written) -> Result<T, Status> {
    T::decode(written.output.as_slice())
        .map_err(|e| Status::internal(format!("undecodable job reply: {e}")))
}

/// [`write`], then waits until this head has applied the write, so a
/// client that reads back through the same head (GetJob after CreateJob,
/// StopJob or CompleteJob) finds it even when this head is a follower. On
/// the leader the write is applied when it returns. Not used for the
/// frequent writes (leases, acks, enqueues): nobody reads those back at once.
async fn write_visible<T: Message + Default>(
    raft: &Raft,
    peer_key: &str,
    cmd: JobCommand,
) -> Result<T, Status> {
    let written =
        store::forward::propose_via_leader_with_output(raft, peer_key, Command::Job(cmd)).await?;
    let _ = raft
        .wait(Some(VISIBLE_WAIT))
        .applied_index_at_least(Some(written.log_index), "job write visible")
        .await;
    decode(&written)
}

pub(crate) struct Jobs<'a> {
    pub raft: &'a Raft,
    pub sm: &'a StateMachineStore,
    /// Presented to the leader's `RaftPeer` service when forwarding.
    pub peer_key: &'a str,
}

impl Jobs<'_> {
    pub async fn create(&self, spec: JobSpec) -> Result<Response<Job>, Status> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let cmd = JobCommand::Create {
            id,
            spec,
            now_ms: now_ms(),
        };
        Ok(Response::new(
            write_visible(self.raft, self.peer_key, cmd).await?,
        ))
    }

    pub async fn enqueue(&self, r: EnqueueRequest) -> Result<Response<Empty>, Status> {
        let cmd = JobCommand::Enqueue {
            id: r.job_id,
            first_index: r.first_index,
            batches: r.batches,
        };
        store::forward::propose_via_leader(self.raft, self.peer_key, Command::Job(cmd)).await?;
        Ok(Response::new(Empty {}))
    }

    pub async fn finish(&self, r: FinishEnqueueRequest) -> Result<Response<Job>, Status> {
        let cmd = JobCommand::FinishEnqueue {
            id: r.job_id,
            total: r.total,
            error: r.error,
            now_ms: now_ms(),
        };
        Ok(Response::new(
            write_visible(self.raft, self.peer_key, cmd).await?,
        ))
    }

    pub async fn lease(&self, r: LeaseRequest) -> Result<Response<LeaseReply>, Status> {
        if r.visibility_s <= 0.0 || !r.visibility_s.is_finite() {
            return Err(Status::invalid_argument("visibility_s: must be above 0"));
        }
        let cmd = JobCommand::Lease {
            id: r.job_id,
            worker: r.worker_id,
            max: r.max.max(1),
            visibility_ms: (r.visibility_s * 1000.0) as i64,
            now_ms: now_ms(),
        };
        Ok(Response::new(write(self.raft, self.peer_key, cmd).await?))
    }

    pub async fn ack(&self, r: AckRequest) -> Result<Response<Empty>, Status> {
        let cmd = JobCommand::Ack {
            id: r.job_id,
            worker: r.worker_id,
            results: r.results,
            now_ms: now_ms(),
        };
        store::forward::propose_via_leader(self.raft, self.peer_key, Command::Job(cmd)).await?;
        Ok(Response::new(Empty {}))
    }

    pub async fn complete(&self, r: CompleteJobRequest) -> Result<Response<Job>, Status> {
        let cmd = JobCommand::Complete {
            id: r.job_id,
            worker: r.worker_id,
            error: r.error,
            now_ms: now_ms(),
        };
        Ok(Response::new(
            write_visible(self.raft, self.peer_key, cmd).await?,
        ))
    }

    pub async fn finish_job(&self, r: FinishJobRequest) -> Result<Response<Job>, Status> {
        let cmd = JobCommand::Finish {
            id: r.job_id,
            worker: r.worker_id,
            index: r.index,
            error: r.error,
            result: r.result,
            seconds: r.seconds,
            now_ms: now_ms(),
        };
        Ok(Response::new(
            write_visible(self.raft, self.peer_key, cmd).await?,
        ))
    }

    pub async fn release(&self, r: ReleaseWorkerRequest) -> Result<Response<Empty>, Status> {
        let cmd = JobCommand::ReleaseWorker {
            id: r.job_id,
            worker: r.worker_id,
        };
        store::forward::propose_via_leader(self.raft, self.peer_key, Command::Job(cmd)).await?;
        Ok(Response::new(Empty {}))
    }

    pub async fn stop(&self, r: StopJobRequest) -> Result<Response<Job>, Status> {
        let cmd = JobCommand::Stop {
            id: r.job_id,
            status: r.status,
            error: r.error,
            now_ms: now_ms(),
        };
        Ok(Response::new(
            write_visible(self.raft, self.peer_key, cmd).await?,
        ))
    }

    pub fn get(&self, r: JobRequest) -> Result<Response<Job>, Status> {
        match jobs::get(self.sm.database(), &r.job_id).map_err(storage)? {
            Some(job) => Ok(Response::new(job)),
            None => Err(Status::not_found(format!(
                "job '{}' does not exist",
                r.job_id
            ))),
        }
    }

    pub fn list(&self, r: ListJobsRequest) -> Result<Response<JobList>, Status> {
        let jobs = jobs::list(self.sm.database(), &r.api).map_err(storage)?;
        Ok(Response::new(JobList { jobs }))
    }

    pub fn dead_letters(&self, r: JobRequest) -> Result<Response<DeadLetters>, Status> {
        match jobs::dead_letters(self.sm.database(), &r.job_id).map_err(storage)? {
            Some(batches) => Ok(Response::new(DeadLetters { batches })),
            None => Err(Status::not_found(format!(
                "job '{}' does not exist",
                r.job_id
            ))),
        }
    }
}
