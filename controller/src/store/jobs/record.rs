//! A job's record (small: counters, the queue cursor, the leases, the
//! re-queued and dead-lettered batch indexes), how it is loaded and saved
//! inside an apply transaction, and how ended jobs are pruned.

use std::collections::{BTreeMap, VecDeque};

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use serval_protos::control::{Job, JobSpec};
use serval_protos::states::JobStatus;

use super::{io, BATCHES, ENDED_JOB_RETENTION_MS, JOBS, MAX_ENDED_JOBS, RESULT_INDEX};
use crate::error::StateError;
use crate::store::log_store::{decode, encode};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Lease {
    pub(super) worker: String,
    pub(super) receive_count: u32,
    /// How long the holder may keep the batch, counted by the leader.
    pub(super) visibility_ms: i64,
    /// This grant's number in its job (`JobRecord::grants`): an expiry
    /// names the grant it timed, so it never ends a later one.
    pub(super) grant: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct JobRecord {
    pub(super) id: String,
    pub(super) spec: JobSpec,
    pub(super) status: String,
    pub(super) error: String,
    pub(super) total: u64,
    pub(super) enqueued: u64,
    pub(super) enqueue_done: bool,
    /// The next never-leased batch.
    pub(super) next: u64,
    /// Batches back in the queue: (index, receipts so far).
    pub(super) requeued: VecDeque<(u64, u32)>,
    pub(super) leases: BTreeMap<u64, Lease>,
    /// Leases granted so far (numbers them).
    pub(super) grants: u64,
    /// Dead letters: index -> (receipts, last error).
    pub(super) dead: BTreeMap<u64, (u32, String)>,
    pub(super) succeeded: u64,
    pub(super) ok_seconds: f64,
    pub(super) created_ms: i64,
    pub(super) start_ms: i64,
    pub(super) end_ms: i64,
    pub(super) completer: String,
    pub(super) completed: bool,
}

impl JobRecord {
    pub(super) fn ended(&self) -> bool {
        self.status
            .parse::<JobStatus>()
            .is_ok_and(JobStatus::is_ended)
    }

    pub(super) fn in_queue(&self) -> u64 {
        let finished = self.succeeded + self.dead.len() as u64;
        self.enqueued.max(self.total).saturating_sub(finished)
    }

    pub(super) fn to_job(&self) -> Job {
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

    pub(super) fn end(&mut self, status: JobStatus, error: &str, now_ms: i64) {
        self.status = status.into();
        self.error = error.to_string();
        self.end_ms = now_ms;
        // Outstanding leases are void; re-queued ones will never run.
        self.leases.clear();
        self.requeued.clear();
    }

    /// A job past its timeout ends as "timed out" at the next write.
    pub(super) fn check_timeout(&mut self, now_ms: i64) {
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
    pub(super) fn expire(&mut self, grants: &[(u64, u64)]) {
        for &(index, grant) in grants {
            if self.leases.get(&index).is_some_and(|l| l.grant == grant) {
                if let Some(l) = self.leases.remove(&index) {
                    self.requeued.push_back((index, l.receive_count));
                }
            }
        }
    }

    pub(super) fn nothing_left(&self) -> bool {
        self.enqueue_done
            && self.requeued.is_empty()
            && self.leases.is_empty()
            && self.next >= self.total
    }
}

pub(super) fn load(
    txn: &WriteTransaction,
    id: &str,
) -> std::io::Result<Result<JobRecord, StateError>> {
    let table = txn.open_table(JOBS).map_err(io)?;
    let got = table.get(id).map_err(io)?;
    Ok(match got {
        Some(v) => Ok(decode(v.value())?),
        None => Err(StateError::UnknownJob(id.to_string())),
    })
}

pub(super) fn save(txn: &WriteTransaction, job: &JobRecord) -> std::io::Result<()> {
    let bytes = encode(job)?;
    txn.open_table(JOBS)
        .map_err(io)?
        .insert(job.id.as_str(), bytes.as_slice())
        .map_err(io)?;
    Ok(())
}

/// [`save`]; a job that has just ended also drops the payloads nobody will
/// read again: it keeps only its dead letters' (GetDeadLetters).
pub(super) fn save_ending(
    txn: &WriteTransaction,
    job: &JobRecord,
    was_ended: bool,
) -> std::io::Result<()> {
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
pub(super) fn prune(txn: &WriteTransaction, now_ms: i64) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    //! Retention: ended jobs go with their dead letters, the longest ended first.

    use super::super::test_queue::*;

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
}
