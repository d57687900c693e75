//! Ending a job: [`JobCommand::Complete`] (the completer's answer),
//! [`JobCommand::Stop`], [`JobCommand::Finish`] (an AsyncAPI submission's
//! one batch).

use prost::Message;
use redb::WriteTransaction;
use serval_protos::states::JobStatus;

use super::record::save_ending;
#[cfg(doc)]
use super::JobCommand;
use super::{invalid, io, Applied, BATCHES, RESULT_INDEX};

/// [`JobCommand::Complete`]: the completer's answer ends the job.
pub(super) fn complete(
    txn: &WriteTransaction,
    id: String,
    worker: String,
    error: String,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(job.to_job().encode_to_vec()))
}

/// [`JobCommand::Stop`]: ends a job that has not ended, as `status`
/// (default "stopped").
pub(super) fn stop(
    txn: &WriteTransaction,
    id: String,
    status: String,
    error: String,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(job.to_job().encode_to_vec()))
}

/// [`JobCommand::Finish`]: the lease holder of batch `index` ends the job
/// with its result or its error.
#[allow(clippy::too_many_arguments)] // the fields of its command, one for one
pub(super) fn finish(
    txn: &WriteTransaction,
    id: String,
    worker: String,
    index: u64,
    error: String,
    result: String,
    seconds: f64,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(job.to_job().encode_to_vec()))
}

#[cfg(test)]
mod tests {
    //! Ending: the completer, stop, timeout, finish.

    use super::super::test_queue::*;

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
}
