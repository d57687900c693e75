//! Batch jobs (BatchAPI, seed 001): the durable queue, in its own redb
//! tables written in the apply transaction (as blobs are), never in the
//! [`crate::state::ClusterState`] that every apply clones.
//!
//! * `jobs`: job id -> [`JobRecord`] (small: counters, the queue cursor,
//!   the leases, the re-queued and dead-lettered batch indexes).
//! * `job_batches`: (job id, index) -> the batch's bytes, while the batch
//!   may still run or is a dead letter: an ok ack drops it, and a job that
//!   ends drops every payload but its dead letters'. Under the index
//!   [`RESULT_INDEX`], the result a job was finished with (`Finish`, an
//!   AsyncAPI submission's answer), kept and removed with the job.
//!
//! Ended jobs are kept for their spec's `retention_s` (default
//! [`ENDED_JOB_RETENTION_MS`]), at most [`MAX_ENDED_JOBS`] of them, then
//! removed with their dead letters when a job is created (so the tables
//! stay bounded however many jobs a cluster runs).
//!
//! Every write is a [`JobCommand`]; apply never reads a clock, so every
//! head applies alike. The commands carry the proposing head's wall clock
//! (`now_ms`) for what is shown (created, start and end times) and for a
//! job's `timeout` and retention, but not for lease expiry: a lease ends
//! only by an explicit [`JobCommand::Expire`], which the leader proposes
//! once the lease's visibility timeout has run out on its own monotonic
//! clock (`crate::reconciler::LeaseClock`), counted from when that leader
//! first saw the lease. So no head's wall clock, however skewed, can end a
//! lease early, and a new leader gives every lease a full visibility
//! timeout again. Delivery is at least once (an expired lease hands the
//! batch to another worker) and counting exactly once: an ack counts only
//! from the worker that holds the batch's lease.
//!
//! Layout: `record` (a job's record, how it is stored and pruned), one
//! file per group of commands, each command a function with its tests
//! beside it (`enqueue`: create, enqueue, finish enqueuing; `lease`:
//! lease, ack, expire, release a worker; `end`: complete, stop, finish),
//! `reads` (what the service reads) and `snapshot` (the tables in a raft
//! snapshot).

use redb::{TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serval_protos::control::{BatchResult, JobSpec};

use crate::error::StateError;

/// Loads job `$id` inside `$txn`, or returns the command's refusal (an
/// unknown job) from the function it is used in.
macro_rules! load_job {
    ($txn:expr, $id:expr) => {
        match super::record::load($txn, $id)? {
            Ok(job) => job,
            Err(e) => return Ok(Err(e)),
        }
    };
}

mod end;
mod enqueue;
mod lease;
mod reads;
mod record;
mod snapshot;
#[cfg(test)]
mod test_queue;

pub use reads::{dead_letters, get, leases, list};
pub(crate) use snapshot::{export, import, JobSet};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("job_batches");

/// How long an ended job (its record and dead letters) is kept when its
/// spec does not say (`retention_s` 0).
pub const ENDED_JOB_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// How many ended jobs are kept at most; the longest ended go first.
pub const MAX_ENDED_JOBS: usize = 1000;

/// Where a job's result lies in `job_batches` (no batch has this index:
/// the cap on batches is far below it).
const RESULT_INDEX: u64 = u64::MAX;

/// A write to the job tables (one `Command::Job`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobCommand {
    Create {
        id: String,
        spec: JobSpec,
        now_ms: i64,
    },
    Enqueue {
        id: String,
        first_index: u64,
        batches: Vec<Vec<u8>>,
    },
    FinishEnqueue {
        id: String,
        total: u64,
        error: String,
        now_ms: i64,
    },
    Lease {
        id: String,
        worker: String,
        max: u32,
        visibility_ms: i64,
        now_ms: i64,
    },
    Ack {
        id: String,
        worker: String,
        results: Vec<BatchResult>,
        now_ms: i64,
    },
    Complete {
        id: String,
        worker: String,
        error: String,
        now_ms: i64,
    },
    ReleaseWorker {
        id: String,
        worker: String,
    },
    Stop {
        id: String,
        status: String,
        error: String,
        now_ms: i64,
    },
    // Last: the variants are numbered in logs and snapshots already written.
    /// The lease holder of batch `index` ends the job: "succeeded" keeping
    /// `result`, or "worker error" with `error` (not empty).
    Finish {
        id: String,
        worker: String,
        index: u64,
        error: String,
        result: String,
        seconds: f64,
        now_ms: i64,
    },
    /// The leases (batch index, grant) whose visibility timeout ran out on
    /// the leader's clock go back to the queue; a lease granted again since
    /// (another grant number) is not touched.
    Expire {
        id: String,
        leases: Vec<(u64, u64)>,
    },
}

/// A lease of a running job, as the leader's lease clock reads them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseGrant {
    pub job: String,
    pub index: u64,
    pub grant: u64,
    pub visibility_ms: i64,
}

/// What one applied job command gives: its output (protobuf bytes of a Job
/// or a LeaseReply, or nothing), or why it was refused; the outer error is
/// the store's.
type Applied = std::io::Result<Result<Vec<u8>, StateError>>;

/// Applies one job command inside `txn`.
pub fn apply(txn: &WriteTransaction, cmd: JobCommand) -> Applied {
    match cmd {
        JobCommand::Create { id, spec, now_ms } => enqueue::create(txn, id, spec, now_ms),
        JobCommand::Enqueue {
            id,
            first_index,
            batches,
        } => enqueue::enqueue(txn, id, first_index, batches),
        JobCommand::FinishEnqueue {
            id,
            total,
            error,
            now_ms,
        } => enqueue::finish_enqueue(txn, id, total, error, now_ms),
        JobCommand::Lease {
            id,
            worker,
            max,
            visibility_ms,
            now_ms,
        } => lease::lease(txn, id, worker, max, visibility_ms, now_ms),
        JobCommand::Ack {
            id,
            worker,
            results,
            now_ms,
        } => lease::ack(txn, id, worker, results, now_ms),
        JobCommand::Complete {
            id,
            worker,
            error,
            now_ms,
        } => end::complete(txn, id, worker, error, now_ms),
        JobCommand::ReleaseWorker { id, worker } => lease::release_worker(txn, id, worker),
        JobCommand::Stop {
            id,
            status,
            error,
            now_ms,
        } => end::stop(txn, id, status, error, now_ms),
        JobCommand::Finish {
            id,
            worker,
            index,
            error,
            result,
            seconds,
            now_ms,
        } => end::finish(txn, id, worker, index, error, result, seconds, now_ms),
        JobCommand::Expire { id, leases } => lease::expire(txn, id, leases),
    }
}

pub fn create_tables(txn: &WriteTransaction) -> std::io::Result<()> {
    txn.open_table(JOBS).map_err(io)?;
    txn.open_table(BATCHES).map_err(io)?;
    Ok(())
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn invalid(field: &str, reason: &str) -> StateError {
    StateError::InvalidConfig {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}
