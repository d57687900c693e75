//! Creating a job and filling its queue: [`JobCommand::Create`],
//! [`JobCommand::Enqueue`], [`JobCommand::FinishEnqueue`].

use std::collections::{BTreeMap, VecDeque};

use prost::Message;
use redb::WriteTransaction;
use serval_protos::control::JobSpec;
use serval_protos::states::JobStatus;

use super::record::{load, prune, save, save_ending, JobRecord};
#[cfg(doc)]
use super::JobCommand;
use super::{invalid, io, Applied, BATCHES};
use crate::error::StateError;

/// [`JobCommand::Create`]: a new job, enqueuing; first the ended jobs past
/// their retention go.
pub(super) fn create(txn: &WriteTransaction, id: String, spec: JobSpec, now_ms: i64) -> Applied {
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
    Ok(Ok(job.to_job().encode_to_vec()))
}

/// [`JobCommand::Enqueue`]: stores a chunk of batches, which must follow
/// those stored.
pub(super) fn enqueue(
    txn: &WriteTransaction,
    id: String,
    first_index: u64,
    batches: Vec<Vec<u8>>,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(Vec::new()))
}

/// [`JobCommand::FinishEnqueue`]: every batch is stored: the job runs, or
/// fails if `total` is not what was stored or the enqueuer sent an error.
pub(super) fn finish_enqueue(
    txn: &WriteTransaction,
    id: String,
    total: u64,
    error: String,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(job.to_job().encode_to_vec()))
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

#[cfg(test)]
mod tests {
    //! Creation, enqueuing and its checks.

    use super::super::test_queue::*;

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
