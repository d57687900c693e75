//! Batch jobs (BatchAPI, seed 001): the durable queue, in its own redb
//! tables written in the apply transaction (as blobs are), never in the
//! [`crate::state::ClusterState`] that every apply clones.
//!
//! * `jobs`: job id -> [`JobRecord`] (small: counters, the queue cursor,
//!   the leases, the re-queued and dead-lettered batch indexes).
//! * `job_batches`: (job id, index) -> the batch's bytes.
//!
//! Every write is a [`JobCommand`] carrying the proposing head's clock
//! (`now_ms`): apply never reads a clock, so every head applies alike.
//! Delivery is at least once (an expired lease hands the batch to another
//! worker) and counting exactly once: an ack counts only from the worker
//! that holds the batch's lease.

use std::collections::{BTreeMap, VecDeque};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serval_protos::control::{BatchResult, Job, JobSpec, LeaseReply, LeasedBatch};

use super::log_store::{decode, encode};
use crate::error::StateError;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("job_batches");

pub const ENDED: [&str; 7] = [
    "succeeded",
    "failed while enqueuing",
    "completed with failures",
    "worker error",
    "out of memory",
    "timed out",
    "stopped",
];

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    worker: String,
    until_ms: i64,
    receive_count: u32,
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
        ENDED.contains(&self.status.as_str())
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
        }
    }

    fn end(&mut self, status: &str, error: &str, now_ms: i64) {
        self.status = status.to_string();
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
            let limit = self.start_ms + (timeout * 1000.0) as i64;
            if now_ms > limit {
                let error = format!("the job ran past its timeout of {timeout} s");
                self.end("timed out", &error, now_ms);
            }
        }
    }

    /// Expired leases go back to the queue.
    fn expire(&mut self, now_ms: i64) {
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.until_ms < now_ms)
            .map(|(i, _)| *i)
            .collect();
        for index in expired {
            if let Some(l) = self.leases.remove(&index) {
                self.requeued.push_back((index, l.receive_count));
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
            let job = JobRecord {
                id,
                spec,
                status: "enqueuing".into(),
                error: String::new(),
                total: 0,
                enqueued: 0,
                enqueue_done: false,
                next: 0,
                requeued: VecDeque::new(),
                leases: BTreeMap::new(),
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
            if job.status != "enqueuing" {
                return Ok(Err(invalid(
                    "job",
                    &format!("job {id} is {}, not enqueuing", job.status),
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
            if job.status != "enqueuing" {
                return Ok(Err(invalid(
                    "job",
                    &format!("job {id} is {}, not enqueuing", job.status),
                )));
            }
            job.enqueue_done = true;
            if !error.is_empty() {
                job.end("failed while enqueuing", &error, now_ms);
            } else if total != job.enqueued {
                let e = format!("{} batches were enqueued, not {total}", job.enqueued);
                job.end("failed while enqueuing", &e, now_ms);
            } else {
                job.total = total;
                job.status = "running".into();
                job.start_ms = now_ms;
            }
            save(txn, &job)?;
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
            job.check_timeout(now_ms);
            let mut reply = LeaseReply::default();
            if job.status == "running" {
                job.expire(now_ms);
                let table = txn.open_table(BATCHES).map_err(io)?;
                while reply.batches.len() < max as usize {
                    let (index, receipts) = match job.requeued.pop_front() {
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
                    job.leases.insert(
                        index,
                        Lease {
                            worker: worker.clone(),
                            until_ms: now_ms + visibility_ms,
                            receive_count,
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
                    if job.completer.is_empty() {
                        job.completer = worker.clone();
                        reply.run_on_complete = true;
                    }
                }
            } else {
                reply.done = job.ended();
            }
            reply.status = job.status.clone();
            save(txn, &job)?;
            reply.encode_to_vec()
        }
        JobCommand::Ack {
            id,
            worker,
            results,
            now_ms,
        } => {
            let mut job = job!(&id);
            job.check_timeout(now_ms);
            if job.status == "running" {
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
                    } else if lease.receive_count >= job.spec.max_receive_count {
                        job.dead.insert(r.index, (lease.receive_count, r.error));
                    } else {
                        job.requeued.push_back((r.index, lease.receive_count));
                    }
                }
            }
            save(txn, &job)?;
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
            if !job.ended() {
                if !error.is_empty() {
                    job.end("worker error", &error, now_ms);
                } else if job.dead.is_empty() {
                    job.end("succeeded", "", now_ms);
                } else {
                    job.end("completed with failures", "", now_ms);
                }
            }
            save(txn, &job)?;
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
            let status = if status.is_empty() {
                "stopped".to_string()
            } else {
                status
            };
            if !ENDED.contains(&status.as_str()) {
                return Ok(Err(invalid(
                    "status",
                    &format!("'{status}' is not an end status"),
                )));
            }
            job.end(&status, &error, now_ms);
            save(txn, &job)?;
            job.to_job().encode_to_vec()
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

pub fn get(db: &Database, id: &str) -> std::io::Result<Option<Job>> {
    Ok(read_record(db, id)?.map(|r| r.to_job()))
}

/// The jobs of `api` (every job when empty), oldest first.
pub fn list(db: &Database, api: &str) -> std::io::Result<Vec<Job>> {
    let txn = db.begin_read().map_err(io)?;
    let table = match txn.open_table(JOBS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut jobs = Vec::new();
    for entry in table.iter().map_err(io)? {
        let (_, v) = entry.map_err(io)?;
        let record: JobRecord = decode(v.value())?;
        if api.is_empty() || record.spec.api == api {
            jobs.push(record.to_job());
        }
    }
    jobs.sort_by_key(|j| j.created_ms);
    Ok(jobs)
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
