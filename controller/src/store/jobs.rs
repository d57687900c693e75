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

use std::collections::{BTreeMap, VecDeque};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serval_protos::control::{BatchResult, Job, JobSpec, LeaseReply, LeasedBatch};
use serval_protos::states::JobStatus;

use super::log_store::{decode, encode};
use crate::error::StateError;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    worker: String,
    receive_count: u32,
    /// How long the holder may keep the batch, counted by the leader.
    visibility_ms: i64,
    /// This grant's number in its job (`JobRecord::grants`): an expiry
    /// names the grant it timed, so it never ends a later one.
    grant: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    id: String,
    spec: JobSpec,
    status: String,
    error: String,
    total: u64,
    enqueued: u64,
    enqueue_done: bool,
    /// The next never-leased batch.
    next: u64,
    /// Batches back in the queue: (index, receipts so far).
    requeued: VecDeque<(u64, u32)>,
    leases: BTreeMap<u64, Lease>,
    /// Leases granted so far (numbers them).
    grants: u64,
    /// Dead letters: index -> (receipts, last error).
    dead: BTreeMap<u64, (u32, String)>,
    succeeded: u64,
    ok_seconds: f64,
    created_ms: i64,
    start_ms: i64,
    end_ms: i64,
    completer: String,
    completed: bool,
}

impl JobRecord {
    fn ended(&self) -> bool {
        self.status
            .parse::<JobStatus>()
            .is_ok_and(JobStatus::is_ended)
    }

    fn in_queue(&self) -> u64 {
        let finished = self.succeeded + self.dead.len() as u64;
        self.enqueued.max(self.total).saturating_sub(finished)
    }

    fn to_job(&self) -> Job {
        Job {
            id: self.id.clone(),
            spec: Some(self.spec.clone()),
            status: self.status.clone(),
            total_batches: self.total,
            enqueued: self.enqueued,
            succeeded: self.succeeded,
            failed: self.dead.len() as u64,
            batches_in_queue: if self.ended() { 0 } else { self.in_queue() },
            avg_time_per_batch_s: if self.succeeded > 0 {
                self.ok_seconds / self.succeeded as f64
            } else {
                0.0
            },
            created_ms: self.created_ms,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            error: self.error.clone(),
            completer: self.completer.clone(),
            leased: self.leases.len() as u64,
            result: String::new(),
        }
    }

    fn end(&mut self, status: JobStatus, error: &str, now_ms: i64) {
        self.status = status.into();
        self.error = error.to_string();
        self.end_ms = now_ms;
        // Outstanding leases are void; re-queued ones will never run.
        self.leases.clear();
        self.requeued.clear();
    }

    /// A job past its timeout ends as "timed out" at the next write.
    fn check_timeout(&mut self, now_ms: i64) {
        let timeout = self.spec.timeout_s;
        if !self.ended() && timeout > 0.0 && self.start_ms > 0 {
            let limit = self.start_ms.saturating_add((timeout * 1000.0) as i64);
            if now_ms > limit {
                let error = format!("the job ran past its timeout of {timeout} s");
                self.end(JobStatus::TimedOut, &error, now_ms);
            }
        }
    }

    /// The named grants, if still held, go back to the queue.
    fn expire(&mut self, grants: &[(u64, u64)]) {
        for &(index, grant) in grants {
            if self.leases.get(&index).is_some_and(|l| l.grant == grant) {
                if let Some(l) = self.leases.remove(&index) {
                    self.requeued.push_back((index, l.receive_count));
                }
            }
        }
    }

    fn nothing_left(&self) -> bool {
        self.enqueue_done
            && self.requeued.is_empty()
            && self.leases.is_empty()
            && self.next >= self.total
    }
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

pub fn create_tables(txn: &WriteTransaction) -> std::io::Result<()> {
    txn.open_table(JOBS).map_err(io)?;
    txn.open_table(BATCHES).map_err(io)?;
    Ok(())
}

fn load(txn: &WriteTransaction, id: &str) -> std::io::Result<Result<JobRecord, StateError>> {
    let table = txn.open_table(JOBS).map_err(io)?;
    let got = table.get(id).map_err(io)?;
    Ok(match got {
        Some(v) => Ok(decode(v.value())?),
        None => Err(StateError::UnknownJob(id.to_string())),
    })
}

fn save(txn: &WriteTransaction, job: &JobRecord) -> std::io::Result<()> {
    let bytes = encode(job)?;
    txn.open_table(JOBS)
        .map_err(io)?
        .insert(job.id.as_str(), bytes.as_slice())
        .map_err(io)?;
    Ok(())
}

/// [`save`]; a job that has just ended also drops the payloads nobody will
/// read again: it keeps only its dead letters' (GetDeadLetters).
fn save_ending(txn: &WriteTransaction, job: &JobRecord, was_ended: bool) -> std::io::Result<()> {
    save(txn, job)?;
    if was_ended || !job.ended() {
        return Ok(());
    }
    let mut table = txn.open_table(BATCHES).map_err(io)?;
    let id = job.id.as_str();
    let mut stale = Vec::new();
    for entry in table.range((id, 0)..=(id, u64::MAX)).map_err(io)? {
        let index = entry.map_err(io)?.0.value().1;
        if !job.dead.contains_key(&index) && index != RESULT_INDEX {
            stale.push(index);
        }
    }
    for index in stale {
        table.remove((id, index)).map_err(io)?;
    }
    Ok(())
}

/// How long `spec`'s job is kept once ended.
fn retention_ms(spec: &JobSpec) -> i64 {
    if spec.retention_s > 0.0 {
        // Within the cap (crate::limits), so the product fits an i64.
        (spec.retention_s * 1000.0) as i64
    } else {
        ENDED_JOB_RETENTION_MS
    }
}

/// Removes the ended jobs past their retention at `now_ms`, and the
/// longest ended beyond [`MAX_ENDED_JOBS`], with their dead letters.
fn prune(txn: &WriteTransaction, now_ms: i64) -> std::io::Result<()> {
    let mut ended: Vec<(i64, String, i64)> = Vec::new();
    for entry in txn.open_table(JOBS).map_err(io)?.iter().map_err(io)? {
        let (_, value) = entry.map_err(io)?;
        let job: JobRecord = decode(value.value())?;
        if job.ended() {
            ended.push((job.end_ms, job.id, retention_ms(&job.spec)));
        }
    }
    ended.sort();
    let over = ended.len().saturating_sub(MAX_ENDED_JOBS);
    let mut jobs = txn.open_table(JOBS).map_err(io)?;
    let mut batches = txn.open_table(BATCHES).map_err(io)?;
    for (i, (end_ms, id, retention)) in ended.iter().enumerate() {
        if i >= over && *end_ms >= now_ms.saturating_sub(*retention) {
            continue;
        }
        jobs.remove(id.as_str()).map_err(io)?;
        let mut indexes = Vec::new();
        for entry in batches
            .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))
            .map_err(io)?
        {
            indexes.push(entry.map_err(io)?.0.value().1);
        }
        for index in indexes {
            batches.remove((id.as_str(), index)).map_err(io)?;
        }
    }
    Ok(())
}

/// Why batches cannot be added to `job` now, if they cannot.
fn not_enqueuing(job: &JobRecord) -> Option<StateError> {
    (job.status != JobStatus::Enqueuing).then(|| {
        invalid(
            "job",
            &format!("job {} is {}, not enqueuing", job.id, job.status),
        )
    })
}

fn invalid(field: &str, reason: &str) -> StateError {
    StateError::InvalidConfig {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// Applies one job command inside `txn`: its output (protobuf bytes of a
/// Job or a LeaseReply), or why it was refused.
pub fn apply(
    txn: &WriteTransaction,
    cmd: JobCommand,
) -> std::io::Result<Result<Vec<u8>, StateError>> {
    macro_rules! job {
        ($id:expr) => {
            match load(txn, $id)? {
                Ok(job) => job,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    let output = match cmd {
        JobCommand::Create { id, spec, now_ms } => {
            if spec.workers < 1 {
                return Ok(Err(invalid("workers", "must be at least 1")));
            }
            if spec.max_receive_count < 1 {
                return Ok(Err(invalid("max_receive_count", "must be at least 1")));
            }
            if load(txn, &id)?.is_ok() {
                return Ok(Err(invalid("job id", &format!("{id} exists"))));
            }
            prune(txn, now_ms)?;
            let job = JobRecord {
                id,
                spec,
                status: JobStatus::Enqueuing.into(),
                error: String::new(),
                total: 0,
                enqueued: 0,
                enqueue_done: false,
                next: 0,
                requeued: VecDeque::new(),
                leases: BTreeMap::new(),
                grants: 0,
                dead: BTreeMap::new(),
                succeeded: 0,
                ok_seconds: 0.0,
                created_ms: now_ms,
                start_ms: 0,
                end_ms: 0,
                completer: String::new(),
                completed: false,
            };
            save(txn, &job)?;
            job.to_job().encode_to_vec()
        }
        JobCommand::Enqueue {
            id,
            first_index,
            batches,
        } => {
            let mut job = job!(&id);
            if let Some(e) = not_enqueuing(&job) {
                return Ok(Err(e));
            }
            let after = job.enqueued.saturating_add(batches.len() as u64);
            if after > crate::limits::MAX_JOB_BATCHES {
                return Ok(Err(invalid(
                    "batches",
                    &format!(
                        "job {id} would hold {after}; the cap is {}",
                        crate::limits::MAX_JOB_BATCHES
                    ),
                )));
            }
            if first_index != job.enqueued {
                return Ok(Err(invalid(
                    "first_index",
                    &format!(
                        "job {id} has {} batches; got first_index {first_index}",
                        job.enqueued
                    ),
                )));
            }
            let mut table = txn.open_table(BATCHES).map_err(io)?;
            for (i, batch) in batches.iter().enumerate() {
                table
                    .insert((id.as_str(), first_index + i as u64), batch.as_slice())
                    .map_err(io)?;
            }
            drop(table);
            job.enqueued += batches.len() as u64;
            save(txn, &job)?;
            Vec::new()
        }
        JobCommand::FinishEnqueue {
            id,
            total,
            error,
            now_ms,
        } => {
            let mut job = job!(&id);
            if let Some(e) = not_enqueuing(&job) {
                return Ok(Err(e));
            }
            job.enqueue_done = true;
            if !error.is_empty() {
                job.end(JobStatus::FailedWhileEnqueuing, &error, now_ms);
            } else if total != job.enqueued {
                let e = format!("{} batches were enqueued, not {total}", job.enqueued);
                job.end(JobStatus::FailedWhileEnqueuing, &e, now_ms);
            } else {
                job.total = total;
                job.status = JobStatus::Running.into();
                job.start_ms = now_ms;
            }
            save_ending(txn, &job, false)?;
            job.to_job().encode_to_vec()
        }
        JobCommand::Lease {
            id,
            worker,
            max,
            visibility_ms,
            now_ms,
        } => {
            let mut job = job!(&id);
            let was_ended = job.ended();
            job.check_timeout(now_ms);
            let mut reply = LeaseReply::default();
            if job.status == JobStatus::Running {
                let table = txn.open_table(BATCHES).map_err(io)?;
                // A worker leases only once it has acked all it held, so
                // what it still holds was leased by a call whose reply it
                // never got (its head died, a retry): handed out again, as
                // the same receipt, before anything new.
                let mut held: VecDeque<(u64, u32)> = job
                    .leases
                    .iter()
                    .filter(|(_, l)| l.worker == worker)
                    .map(|(i, l)| (*i, l.receive_count - 1))
                    .collect();
                while reply.batches.len() < max as usize {
                    let (index, receipts) =
                        match held.pop_front().or_else(|| job.requeued.pop_front()) {
                            Some(r) => r,
                            None if job.next < job.total => {
                                job.next += 1;
                                (job.next - 1, 0)
                            }
                            None => break,
                        };
                    let payload = table
                        .get((id.as_str(), index))
                        .map_err(io)?
                        .map(|v| v.value().to_vec())
                        .unwrap_or_default();
                    let receive_count = receipts + 1;
                    job.grants += 1;
                    job.leases.insert(
                        index,
                        Lease {
                            worker: worker.clone(),
                            receive_count,
                            visibility_ms,
                            grant: job.grants,
                        },
                    );
                    reply.batches.push(LeasedBatch {
                        index,
                        batch_id: format!("{id}-{index}"),
                        payload,
                        receive_count,
                        error: String::new(),
                    });
                }
                if reply.batches.is_empty() && job.nothing_left() {
                    reply.done = true;
                    // Asked again by the completer, whose reply was lost
                    // (its head died, a retry): it is told again.
                    if job.completer.is_empty() || (job.completer == worker && !job.completed) {
                        job.completer = worker.clone();
                        reply.run_on_complete = true;
                    }
                }
            } else {
                reply.done = job.ended();
            }
            reply.status = job.status.clone();
            save_ending(txn, &job, was_ended)?;
            reply.encode_to_vec()
        }
        JobCommand::Ack {
            id,
            worker,
            results,
            now_ms,
        } => {
            let mut job = job!(&id);
            let was_ended = job.ended();
            job.check_timeout(now_ms);
            if job.status == JobStatus::Running {
                let mut table = txn.open_table(BATCHES).map_err(io)?;
                for r in results {
                    // Only the lease holder's answer counts: a batch whose
                    // lease expired belongs to whoever holds it now.
                    if job.leases.get(&r.index).is_none_or(|l| l.worker != worker) {
                        continue;
                    }
                    let Some(lease) = job.leases.remove(&r.index) else {
                        continue;
                    };
                    if r.ok {
                        job.succeeded += 1;
                        job.ok_seconds += r.seconds.max(0.0);
                        // Done: never leased again, never read again.
                        table.remove((id.as_str(), r.index)).map_err(io)?;
                    } else if lease.receive_count >= job.spec.max_receive_count {
                        job.dead.insert(r.index, (lease.receive_count, r.error));
                    } else {
                        job.requeued.push_back((r.index, lease.receive_count));
                    }
                }
            }
            save_ending(txn, &job, was_ended)?;
            Vec::new()
        }
        JobCommand::Complete {
            id,
            worker,
            error,
            now_ms,
        } => {
            let mut job = job!(&id);
            if job.completer != worker || job.completed {
                return Ok(Err(invalid(
                    "worker_id",
                    &format!("{worker} was not asked to complete job {id}"),
                )));
            }
            job.completed = true;
            let was_ended = job.ended();
            if !was_ended {
                if !error.is_empty() {
                    job.end(JobStatus::WorkerError, &error, now_ms);
                } else if job.dead.is_empty() {
                    job.end(JobStatus::Succeeded, "", now_ms);
                } else {
                    job.end(JobStatus::CompletedWithFailures, "", now_ms);
                }
            }
            save_ending(txn, &job, was_ended)?;
            job.to_job().encode_to_vec()
        }
        JobCommand::ReleaseWorker { id, worker } => {
            let mut job = job!(&id);
            let held: Vec<u64> = job
                .leases
                .iter()
                .filter(|(_, l)| l.worker == worker)
                .map(|(i, _)| *i)
                .collect();
            for index in held {
                if let Some(l) = job.leases.remove(&index) {
                    job.requeued.push_back((index, l.receive_count));
                }
            }
            if job.completer == worker && !job.completed {
                job.completer.clear();
            }
            save(txn, &job)?;
            Vec::new()
        }
        JobCommand::Stop {
            id,
            status,
            error,
            now_ms,
        } => {
            let mut job = job!(&id);
            if job.ended() {
                return Ok(Err(invalid(
                    "job",
                    &format!("job {id} has already ended ({})", job.status),
                )));
            }
            let end = if status.is_empty() {
                Ok(JobStatus::Stopped)
            } else {
                status.parse::<JobStatus>()
            };
            let Some(end) = end.ok().filter(|s| s.is_ended()) else {
                return Ok(Err(invalid(
                    "status",
                    &format!("'{status}' is not an end status"),
                )));
            };
            job.end(end, &error, now_ms);
            save_ending(txn, &job, false)?;
            job.to_job().encode_to_vec()
        }
        JobCommand::Finish {
            id,
            worker,
            index,
            error,
            result,
            seconds,
            now_ms,
        } => {
            let mut job = job!(&id);
            job.check_timeout(now_ms);
            if job.ended() {
                return Ok(Err(invalid(
                    "job",
                    &format!("job {id} has already ended ({})", job.status),
                )));
            }
            if job.leases.get(&index).is_none_or(|l| l.worker != worker) {
                return Ok(Err(invalid(
                    "worker_id",
                    &format!("{worker} holds no lease on batch {index} of job {id}"),
                )));
            }
            job.leases.remove(&index);
            if error.is_empty() {
                job.succeeded += 1;
                job.ok_seconds += seconds.max(0.0);
                txn.open_table(BATCHES)
                    .map_err(io)?
                    .insert((id.as_str(), RESULT_INDEX), result.as_bytes())
                    .map_err(io)?;
                job.end(JobStatus::Succeeded, "", now_ms);
            } else {
                job.end(JobStatus::WorkerError, &error, now_ms);
            }
            job.completed = true;
            save_ending(txn, &job, false)?;
            job.to_job().encode_to_vec()
        }
        JobCommand::Expire { id, leases } => {
            let mut job = job!(&id);
            if job.status == JobStatus::Running {
                job.expire(&leases);
                save(txn, &job)?;
            }
            Vec::new()
        }
    };
    Ok(Ok(output))
}

// -- reads ---------------------------------------------------------------

fn read_record(db: &Database, id: &str) -> std::io::Result<Option<JobRecord>> {
    let txn = db.begin_read().map_err(io)?;
    let table = match txn.open_table(JOBS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let got = table.get(id).map_err(io)?;
    got.map(|v| decode(v.value())).transpose()
}

/// The job, with the result it was finished with.
pub fn get(db: &Database, id: &str) -> std::io::Result<Option<Job>> {
    let Some(mut job) = read_record(db, id)?.map(|r| r.to_job()) else {
        return Ok(None);
    };
    let txn = db.begin_read().map_err(io)?;
    if let Some(v) = txn
        .open_table(BATCHES)
        .map_err(io)?
        .get((id, RESULT_INDEX))
        .map_err(io)?
    {
        job.result = String::from_utf8_lossy(v.value()).into_owned();
    }
    Ok(Some(job))
}

/// Every job record.
fn records(db: &Database) -> std::io::Result<Vec<JobRecord>> {
    let txn = db.begin_read().map_err(io)?;
    let table = match txn.open_table(JOBS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut records = Vec::new();
    for entry in table.iter().map_err(io)? {
        let (_, v) = entry.map_err(io)?;
        records.push(decode(v.value())?);
    }
    Ok(records)
}

/// The jobs of `api` (every job when empty), oldest first.
pub fn list(db: &Database, api: &str) -> std::io::Result<Vec<Job>> {
    let mut jobs: Vec<Job> = records(db)?
        .into_iter()
        .filter(|r| api.is_empty() || r.spec.api == api)
        .map(|r| r.to_job())
        .collect();
    jobs.sort_by_key(|j| j.created_ms);
    Ok(jobs)
}

/// Every lease of every running job.
pub fn leases(db: &Database) -> std::io::Result<Vec<LeaseGrant>> {
    let mut out = Vec::new();
    for record in records(db)? {
        if record.status != JobStatus::Running {
            continue;
        }
        for (index, lease) in &record.leases {
            out.push(LeaseGrant {
                job: record.id.clone(),
                index: *index,
                grant: lease.grant,
                visibility_ms: lease.visibility_ms,
            });
        }
    }
    Ok(out)
}

pub fn dead_letters(db: &Database, id: &str) -> std::io::Result<Option<Vec<LeasedBatch>>> {
    let Some(record) = read_record(db, id)? else {
        return Ok(None);
    };
    let txn = db.begin_read().map_err(io)?;
    let table = txn.open_table(BATCHES).map_err(io)?;
    let mut out = Vec::new();
    for (index, (receive_count, error)) in &record.dead {
        let payload = table
            .get((id, *index))
            .map_err(io)?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        out.push(LeasedBatch {
            index: *index,
            batch_id: format!("{id}-{index}"),
            payload,
            receive_count: *receive_count,
            error: error.clone(),
        });
    }
    Ok(Some(out))
}

// -- snapshots -------------------------------------------------------------

/// Every job and batch, as a snapshot carries them.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct JobSet {
    jobs: Vec<(String, Vec<u8>)>,
    batches: Vec<(String, u64, Vec<u8>)>,
}

/// The job tables as of `txn` (a read transaction taken with the applied
/// state it must match).
pub(crate) fn export(txn: &redb::ReadTransaction) -> std::io::Result<JobSet> {
    let mut set = JobSet::default();
    for item in txn.open_table(JOBS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        set.jobs.push((k.value().to_string(), v.value().to_vec()));
    }
    for item in txn.open_table(BATCHES).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let (id, index) = k.value();
        set.batches
            .push((id.to_string(), index, v.value().to_vec()));
    }
    Ok(set)
}

/// Replaces the job tables with a snapshot's: unlike blobs, job records
/// change, so what this head held beyond the snapshot is not kept.
pub(crate) fn import(txn: &WriteTransaction, set: JobSet) -> std::io::Result<()> {
    txn.delete_table(JOBS).map_err(io)?;
    txn.delete_table(BATCHES).map_err(io)?;
    let mut jobs = txn.open_table(JOBS).map_err(io)?;
    for (id, record) in &set.jobs {
        jobs.insert(id.as_str(), record.as_slice()).map_err(io)?;
    }
    let mut batches = txn.open_table(BATCHES).map_err(io)?;
    for (id, index, data) in &set.batches {
        batches
            .insert((id.as_str(), *index), data.as_slice())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The queue's semantics, applied straight to a redb file: counted once,
    //! expiry, re-queue, dead letters, the completer, stop, timeout.

    use super::*;

    struct Queue {
        db: Database,
        _dir: tempfile::TempDir,
    }

    const ID: &str = "job";

    impl Queue {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("jobs.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            create_tables(&txn).unwrap();
            txn.commit().unwrap();
            Self { db, _dir: dir }
        }

        /// A running job of `n` batches ("b0", "b1", ...) started at 1000.
        fn running(n: u64, max_receive_count: u32, timeout_s: f64) -> Self {
            let q = Self::new();
            let spec = JobSpec {
                api: "api".into(),
                workers: 2,
                timeout_s,
                config_json: "{}".into(),
                max_receive_count,
                ..Default::default()
            };
            q.run(JobCommand::Create {
                id: ID.into(),
                spec,
                now_ms: 500,
            })
            .unwrap();
            let batches: Vec<Vec<u8>> = (0..n).map(|i| format!("b{i}").into_bytes()).collect();
            // Two chunks, as the gateway sends them.
            let half = batches.len() / 2;
            q.run(JobCommand::Enqueue {
                id: ID.into(),
                first_index: 0,
                batches: batches[..half].to_vec(),
            })
            .unwrap();
            q.run(JobCommand::Enqueue {
                id: ID.into(),
                first_index: half as u64,
                batches: batches[half..].to_vec(),
            })
            .unwrap();
            let job = Job::decode(
                q.run(JobCommand::FinishEnqueue {
                    id: ID.into(),
                    total: n,
                    error: String::new(),
                    now_ms: 1000,
                })
                .unwrap()
                .as_slice(),
            )
            .unwrap();
            assert_eq!((job.status.as_str(), job.start_ms), ("running", 1000));
            q
        }

        fn run(&self, cmd: JobCommand) -> Result<Vec<u8>, StateError> {
            let txn = self.db.begin_write().unwrap();
            let out = apply(&txn, cmd).unwrap();
            if out.is_ok() {
                txn.commit().unwrap();
            }
            out
        }

        fn lease(&self, worker: &str, max: u32, visibility_ms: i64, now_ms: i64) -> LeaseReply {
            let out = self
                .run(JobCommand::Lease {
                    id: ID.into(),
                    worker: worker.into(),
                    max,
                    visibility_ms,
                    now_ms,
                })
                .unwrap();
            LeaseReply::decode(out.as_slice()).unwrap()
        }

        fn ack(&self, worker: &str, results: &[(u64, bool)], now_ms: i64) {
            let results = results
                .iter()
                .map(|&(index, ok)| BatchResult {
                    index,
                    ok,
                    seconds: 0.5,
                    error: if ok {
                        String::new()
                    } else {
                        format!("boom {index}")
                    },
                })
                .collect();
            self.run(JobCommand::Ack {
                id: ID.into(),
                worker: worker.into(),
                results,
                now_ms,
            })
            .unwrap();
        }

        /// What the leader proposes once the leases of `indexes` ran out
        /// on its clock: an expiry of the grants they hold now.
        fn expire(&self, indexes: &[u64]) {
            let leases = leases(&self.db)
                .unwrap()
                .into_iter()
                .filter(|g| indexes.contains(&g.index))
                .map(|g| (g.index, g.grant))
                .collect();
            self.run(JobCommand::Expire {
                id: ID.into(),
                leases,
            })
            .unwrap();
        }

        fn complete(&self, worker: &str, error: &str) -> Result<Job, StateError> {
            self.run(JobCommand::Complete {
                id: ID.into(),
                worker: worker.into(),
                error: error.into(),
                now_ms: 9000,
            })
            .map(|out| Job::decode(out.as_slice()).unwrap())
        }

        fn job(&self) -> Job {
            get(&self.db, ID).unwrap().unwrap()
        }

        /// The indexes whose payloads are stored.
        fn payloads(&self) -> Vec<u64> {
            let txn = self.db.begin_read().unwrap();
            let table = txn.open_table(BATCHES).unwrap();
            table
                .range((ID, 0)..=(ID, u64::MAX))
                .unwrap()
                .map(|e| e.unwrap().0.value().1)
                .collect()
        }
    }

    fn leased(reply: &LeaseReply) -> Vec<(u64, u32)> {
        reply
            .batches
            .iter()
            .map(|b| (b.index, b.receive_count))
            .collect()
    }

    #[test]
    fn an_ack_counts_once_and_only_from_the_lease_holder() {
        let q = Queue::running(3, 3, 0.0);
        let first = q.lease("w1", 2, 100, 1000);
        assert_eq!(leased(&first), [(0, 1), (1, 1)]);
        assert_eq!(first.batches[0].payload, b"b0");
        assert_eq!(first.batches[1].batch_id, "job-1");
        // w1's leases expire; w2 gets those batches again, then the fresh one.
        q.expire(&[0, 1]);
        let second = q.lease("w2", 5, 10_000, 1200);
        assert_eq!(leased(&second), [(0, 2), (1, 2), (2, 1)]);
        // w1 answers late: not its batches any more.
        q.ack("w1", &[(0, true), (1, true)], 1300);
        assert_eq!(q.job().succeeded, 0);
        q.ack("w2", &[(0, true), (1, true), (2, true)], 1300);
        // Acked twice: still counted once.
        q.ack("w2", &[(0, true), (1, true), (2, true)], 1400);
        let job = q.job();
        assert_eq!((job.succeeded, job.failed, job.batches_in_queue), (3, 0, 0));
        assert_eq!(job.avg_time_per_batch_s, 0.5);
    }

    #[test]
    fn expired_leases_then_requeued_then_fresh_batches() {
        let q = Queue::running(4, 5, 0.0);
        assert_eq!(leased(&q.lease("w1", 1, 100, 1000)), [(0, 1)]);
        assert_eq!(leased(&q.lease("w2", 1, 10_000, 1000)), [(1, 1)]);
        // A failed batch goes back to the queue.
        q.ack("w2", &[(1, false)], 1050);
        assert_eq!(q.job().batches_in_queue, 4);
        // w1's lease has expired: both come back before the fresh
        // batches, each received once more.
        q.expire(&[0]);
        assert_eq!(
            leased(&q.lease("w3", 3, 10_000, 1200)),
            [(1, 2), (0, 2), (2, 1)]
        );
        assert_eq!(leased(&q.lease("w5", 3, 10_000, 1200)), [(3, 1)]);
        // Nothing left to lease, but leases are out: not done.
        let reply = q.lease("w4", 3, 10_000, 1200);
        assert!(reply.batches.is_empty() && !reply.done && !reply.run_on_complete);
    }

    #[test]
    fn no_clock_in_a_command_ends_a_lease() {
        let q = Queue::running(2, 3, 0.0);
        assert_eq!(leased(&q.lease("w1", 1, 100, 1000)), [(0, 1)]);
        // A head whose wall clock runs a day ahead proposes the next lease:
        // w1's lease of 100 ms stands (only the leader's expiry ends it).
        let day = 24 * 3600 * 1000;
        assert_eq!(leased(&q.lease("w2", 2, 100, 1000 + day)), [(1, 1)]);
        // ... and so does w2's, acked from a head a day behind.
        q.ack("w1", &[(0, true)], 1000 - day);
        q.ack("w2", &[(1, true)], 1000 - day);
        let job = q.job();
        assert_eq!((job.succeeded, job.leased, job.batches_in_queue), (2, 0, 0));
    }

    #[test]
    fn an_expiry_ends_only_the_grant_it_timed() {
        let q = Queue::running(2, 3, 0.0);
        assert_eq!(leased(&q.lease("w1", 1, 100, 1000)), [(0, 1)]);
        let timed = leases(&q.db).unwrap()[0].grant;
        // w1 lost that reply and leases again: the same batch, a new grant.
        assert_eq!(leased(&q.lease("w1", 1, 100, 1010)), [(0, 1)]);
        q.run(JobCommand::Expire {
            id: ID.into(),
            leases: vec![(0, timed)],
        })
        .unwrap();
        assert_eq!(q.job().leased, 1);
        assert_eq!(leased(&q.lease("w2", 2, 100, 1020)), [(1, 1)]);
        // The grant held now runs out: batch 0 goes to the next lease.
        q.expire(&[0]);
        assert_eq!(leased(&q.lease("w3", 2, 100, 1030)), [(0, 2)]);
    }

    #[test]
    fn a_lease_whose_reply_was_lost_is_handed_out_again_first() {
        let q = Queue::running(5, 3, 0.0);
        assert_eq!(leased(&q.lease("w1", 2, 10_000, 1000)), [(0, 1), (1, 1)]);
        // w1 never saw that reply and asks again: the same batches, as the
        // same receipt, then fresh ones; nobody else gets them meanwhile.
        assert_eq!(leased(&q.lease("w2", 1, 10_000, 1010)), [(2, 1)]);
        assert_eq!(
            leased(&q.lease("w1", 3, 10_000, 1020)),
            [(0, 1), (1, 1), (3, 1)]
        );
        q.ack("w1", &[(0, true), (1, true), (3, true)], 1030);
        q.ack("w2", &[(2, true)], 1030);
        assert_eq!(leased(&q.lease("w1", 3, 10_000, 1040)), [(4, 1)]);
        q.ack("w1", &[(4, true)], 1050);
        let job = q.job();
        assert_eq!((job.succeeded, job.batches_in_queue), (5, 0));
    }

    #[test]
    fn a_batch_failing_max_receive_count_times_is_dead_lettered() {
        let q = Queue::running(2, 2, 0.0);
        assert_eq!(leased(&q.lease("w1", 2, 10_000, 1000)), [(0, 1), (1, 1)]);
        q.ack("w1", &[(0, true), (1, false)], 1100);
        assert_eq!(leased(&q.lease("w1", 2, 10_000, 1100)), [(1, 2)]);
        q.ack("w1", &[(1, false)], 1200);
        let job = q.job();
        assert_eq!((job.succeeded, job.failed, job.batches_in_queue), (1, 1, 0));
        // The acked batch's payload is gone; the dead letter's stays.
        assert_eq!(q.payloads(), [1]);
        let dead = dead_letters(&q.db, ID).unwrap().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (
                dead[0].index,
                dead[0].receive_count,
                dead[0].payload.as_slice()
            ),
            (1, 2, b"b1".as_slice())
        );
        assert_eq!(dead[0].error, "boom 1");
        let reply = q.lease("w1", 2, 10_000, 1300);
        assert!(reply.done && reply.run_on_complete);
        let job = q.complete("w1", "").unwrap();
        assert_eq!(job.status, "completed with failures");
        assert_eq!(q.payloads(), [1]);
        assert_eq!(dead_letters(&q.db, ID).unwrap().unwrap()[0].payload, b"b1");
    }

    #[test]
    fn on_job_complete_goes_to_exactly_one_worker() {
        let q = Queue::running(1, 1, 0.0);
        q.lease("w1", 1, 10_000, 1000);
        q.ack("w1", &[(0, true)], 1100);
        let first = q.lease("w1", 1, 10_000, 1200);
        assert!(first.done && first.run_on_complete && first.batches.is_empty());
        let second = q.lease("w2", 1, 10_000, 1200);
        assert!(second.done && !second.run_on_complete);
        assert_eq!(q.job().completer, "w1");
        // Only the completer completes, once.
        assert!(matches!(
            q.complete("w2", ""),
            Err(StateError::InvalidConfig { field, .. }) if field == "worker_id"
        ));
        let job = q.complete("w1", "").unwrap();
        assert_eq!((job.status.as_str(), job.end_ms), ("succeeded", 9000));
        assert!(q.complete("w1", "").is_err());
        // An ended job: done, nothing leased.
        let after = q.lease("w3", 1, 10_000, 9100);
        assert!(after.done && !after.run_on_complete && after.batches.is_empty());
        assert_eq!(after.status, "succeeded");
    }

    #[test]
    fn a_completer_whose_reply_was_lost_is_told_again() {
        let q = Queue::running(1, 1, 0.0);
        q.lease("w1", 1, 10_000, 1000);
        q.ack("w1", &[(0, true)], 1100);
        assert!(q.lease("w1", 1, 10_000, 1200).run_on_complete);
        // w1 never saw that reply and asks again: still its turn.
        assert!(q.lease("w1", 1, 10_000, 1210).run_on_complete);
        assert!(!q.lease("w2", 1, 10_000, 1220).run_on_complete);
        q.complete("w1", "").unwrap();
        assert!(!q.lease("w1", 1, 10_000, 1230).run_on_complete);
    }

    #[test]
    fn an_error_in_on_job_complete_is_a_worker_error() {
        let q = Queue::running(1, 1, 0.0);
        q.lease("w1", 1, 10_000, 1000);
        q.ack("w1", &[(0, true)], 1100);
        assert!(q.lease("w1", 1, 10_000, 1200).run_on_complete);
        let job = q.complete("w1", "ValueError: nope").unwrap();
        assert_eq!(
            (job.status.as_str(), job.error.as_str()),
            ("worker error", "ValueError: nope")
        );
    }

    #[test]
    fn a_released_worker_gives_back_its_leases_and_its_completer_claim() {
        let q = Queue::running(3, 3, 0.0);
        assert_eq!(leased(&q.lease("w1", 2, 60_000, 1000)), [(0, 1), (1, 1)]);
        q.run(JobCommand::ReleaseWorker {
            id: ID.into(),
            worker: "w1".into(),
        })
        .unwrap();
        // At once, long before the visibility timeout.
        assert_eq!(
            leased(&q.lease("w2", 5, 60_000, 1001)),
            [(0, 2), (1, 2), (2, 1)]
        );
        q.ack("w1", &[(0, true)], 1002);
        q.ack("w2", &[(0, true), (1, true), (2, true)], 1002);
        assert_eq!(q.job().succeeded, 3);
        assert!(q.lease("w2", 1, 60_000, 1003).run_on_complete);
        q.run(JobCommand::ReleaseWorker {
            id: ID.into(),
            worker: "w2".into(),
        })
        .unwrap();
        assert_eq!(q.job().completer, "");
        assert!(q.lease("w3", 1, 60_000, 1004).run_on_complete);
        assert_eq!(q.complete("w3", "").unwrap().status, "succeeded");
    }

    #[test]
    fn stop_ends_a_running_job_once() {
        let q = Queue::running(3, 3, 0.0);
        q.lease("w1", 2, 60_000, 1000);
        let stop = |status: &str| {
            q.run(JobCommand::Stop {
                id: ID.into(),
                status: status.into(),
                error: String::new(),
                now_ms: 2000,
            })
        };
        assert!(matches!(
            stop("paused"),
            Err(StateError::InvalidConfig { field, .. }) if field == "status"
        ));
        assert_eq!(q.payloads(), [0, 1, 2]);
        let job = Job::decode(stop("").unwrap().as_slice()).unwrap();
        assert_eq!((job.status.as_str(), job.end_ms), ("stopped", 2000));
        // A job that ended drops the payloads nobody will lease again.
        assert!(q.payloads().is_empty());
        assert_eq!(job.batches_in_queue, 0);
        let err = stop("").unwrap_err().to_string();
        assert!(err.contains("already ended (stopped)"), "{err}");
        // Acks after the end change nothing; leases get nothing.
        q.ack("w1", &[(0, true)], 2100);
        assert_eq!(q.job().succeeded, 0);
        let reply = q.lease("w1", 5, 60_000, 2100);
        assert!(reply.done && reply.batches.is_empty() && !reply.run_on_complete);
    }

    #[test]
    fn a_job_past_its_timeout_ends_timed_out() {
        let q = Queue::running(3, 3, 1.0);
        assert_eq!(leased(&q.lease("w1", 1, 60_000, 1500)), [(0, 1)]);
        // Still within 1 s of the start (1000): counted.
        q.ack("w1", &[(0, true)], 2000);
        assert_eq!(q.job().succeeded, 1);
        let reply = q.lease("w1", 1, 60_000, 2001);
        assert!(reply.done && reply.batches.is_empty());
        let job = q.job();
        assert_eq!((job.status.as_str(), job.end_ms), ("timed out", 2001));
        assert!(job.error.contains("timeout"), "{}", job.error);
        assert!(q.payloads().is_empty());
    }

    #[test]
    fn ended_jobs_are_removed_with_their_dead_letters_after_the_retention() {
        let q = Queue::running(2, 1, 0.0);
        let reply = q.lease("w1", 2, 60_000, 1100);
        assert_eq!(reply.batches.len(), 2);
        q.ack("w1", &[(0, true), (1, false)], 1200);
        assert_eq!(q.payloads(), vec![1], "the dead letter's payload is kept");
        q.run(JobCommand::Stop {
            id: ID.into(),
            status: String::new(),
            error: String::new(),
            now_ms: 2000,
        })
        .unwrap();
        let create = |id: &str, now_ms: i64| {
            let spec = JobSpec {
                api: "api".into(),
                workers: 1,
                max_receive_count: 1,
                ..Default::default()
            };
            q.run(JobCommand::Create {
                id: id.into(),
                spec,
                now_ms,
            })
            .unwrap();
        };
        // Within the retention: kept, dead letters and all.
        create("second", 2000 + ENDED_JOB_RETENTION_MS);
        assert!(get(&q.db, ID).unwrap().is_some());
        assert_eq!(dead_letters(&q.db, ID).unwrap().unwrap().len(), 1);
        // Past it: gone, with its payloads; a job still running stays.
        create("third", 2001 + ENDED_JOB_RETENTION_MS);
        assert!(get(&q.db, ID).unwrap().is_none());
        assert!(q.payloads().is_empty());
        assert!(get(&q.db, "second").unwrap().is_some());
    }

    #[test]
    fn finish_ends_a_job_with_its_lease_holders_result_kept_until_removal() {
        let finish = |q: &Queue, worker: &str, error: &str, now_ms| {
            q.run(JobCommand::Finish {
                id: ID.into(),
                worker: worker.into(),
                index: 0,
                error: error.into(),
                result: r#"{"label":"setosa"}"#.into(),
                seconds: 0.25,
                now_ms,
            })
            .map(|out| Job::decode(out.as_slice()).unwrap())
        };
        let q = Queue::running(1, 1, 0.0);
        assert_eq!(q.job().leased, 0);
        assert_eq!(leased(&q.lease("w1", 1, 10_000, 1100)), [(0, 1)]);
        assert_eq!((q.job().leased, q.job().batches_in_queue), (1, 1));
        // Only the lease holder finishes it.
        assert!(finish(&q, "w2", "", 1200).is_err());
        let job = finish(&q, "w1", "", 1200).unwrap();
        assert_eq!(
            (job.status.as_str(), job.succeeded, job.leased),
            ("succeeded", 1, 0)
        );
        // The result is kept (the payload is not) and GetJob answers it;
        // finishing again is refused.
        assert_eq!(q.job().result, r#"{"label":"setosa"}"#);
        assert_eq!(q.payloads(), [RESULT_INDEX]);
        assert!(list(&q.db, "api").unwrap()[0].result.is_empty());
        assert!(finish(&q, "w1", "", 1300).is_err());
        // Removed with the job after the retention.
        q.run(JobCommand::Create {
            id: "later".into(),
            spec: JobSpec {
                api: "api".into(),
                workers: 1,
                max_receive_count: 1,
                ..Default::default()
            },
            now_ms: 1201 + ENDED_JOB_RETENTION_MS,
        })
        .unwrap();
        assert!(get(&q.db, ID).unwrap().is_none());
        assert!(q.payloads().is_empty());

        // A handler that raised: worker error, with its message, no result.
        let q = Queue::running(1, 1, 0.0);
        q.lease("w1", 1, 10_000, 1100);
        let job = finish(&q, "w1", "ValueError: bad", 1200).unwrap();
        assert_eq!(
            (job.status.as_str(), job.error.as_str()),
            ("worker error", "ValueError: bad")
        );
        assert!(q.job().result.is_empty());
    }

    #[test]
    fn at_most_max_ended_jobs_are_kept_the_longest_ended_go_first() {
        let q = Queue::new();
        let spec = JobSpec {
            api: "api".into(),
            workers: 1,
            max_receive_count: 1,
            ..Default::default()
        };
        for i in 0..=MAX_ENDED_JOBS as i64 {
            let id = format!("job-{i}");
            q.run(JobCommand::Create {
                id: id.clone(),
                spec: spec.clone(),
                now_ms: 10 + i,
            })
            .unwrap();
            q.run(JobCommand::Stop {
                id,
                status: String::new(),
                error: String::new(),
                now_ms: 10 + i,
            })
            .unwrap();
        }
        // MAX_ENDED_JOBS + 1 ended: the next creation removes the first.
        q.run(JobCommand::Create {
            id: "next".into(),
            spec,
            now_ms: 5000,
        })
        .unwrap();
        assert!(get(&q.db, "job-0").unwrap().is_none());
        assert!(get(&q.db, "job-1").unwrap().is_some());
        assert_eq!(list(&q.db, "api").unwrap().len(), MAX_ENDED_JOBS + 1);
    }

    #[test]
    fn enqueue_checks_and_validation_name_the_field() {
        let q = Queue::new();
        let spec = |workers, max_receive_count| JobSpec {
            api: "api".into(),
            workers,
            max_receive_count,
            ..Default::default()
        };
        let create = |spec| {
            q.run(JobCommand::Create {
                id: ID.into(),
                spec,
                now_ms: 1,
            })
        };
        for (spec, field) in [(spec(0, 1), "workers"), (spec(1, 0), "max_receive_count")] {
            match create(spec) {
                Err(StateError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
        let unknown = q.run(JobCommand::Lease {
            id: "nope".into(),
            worker: "w".into(),
            max: 1,
            visibility_ms: 1000,
            now_ms: 1,
        });
        assert!(matches!(unknown, Err(StateError::UnknownJob(id)) if id == "nope"));
        let job = Job::decode(create(spec(1, 1)).unwrap().as_slice()).unwrap();
        assert_eq!((job.status.as_str(), job.created_ms), ("enqueuing", 1));
        // Leasing while enqueuing gets nothing and is not done.
        let reply = q.lease("w", 1, 1000, 2);
        assert!(reply.batches.is_empty() && !reply.done);
        let enqueue = |first_index| {
            q.run(JobCommand::Enqueue {
                id: ID.into(),
                first_index,
                batches: vec![b"x".to_vec()],
            })
        };
        enqueue(0).unwrap();
        assert!(matches!(
            enqueue(5),
            Err(StateError::InvalidConfig { field, .. }) if field == "first_index"
        ));
        // A total that does not match what was stored fails the job.
        let out = q
            .run(JobCommand::FinishEnqueue {
                id: ID.into(),
                total: 2,
                error: String::new(),
                now_ms: 3,
            })
            .unwrap();
        let job = Job::decode(out.as_slice()).unwrap();
        assert_eq!(job.status, "failed while enqueuing");
        assert!(enqueue(1).is_err());
        assert_eq!(list(&q.db, "api").unwrap().len(), 1);
        assert!(list(&q.db, "other").unwrap().is_empty());
    }
}
