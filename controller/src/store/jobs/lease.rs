//! Handing out batches and taking them back: [`JobCommand::Lease`],
//! [`JobCommand::Ack`], [`JobCommand::Expire`], [`JobCommand::ReleaseWorker`].

use std::collections::VecDeque;

use prost::Message;
use redb::{ReadableTable, WriteTransaction};
use serval_protos::control::{BatchResult, LeaseReply, LeasedBatch};
use serval_protos::states::JobStatus;

use super::record::{save, save_ending, Lease};
#[cfg(doc)]
use super::JobCommand;
use super::{io, Applied, BATCHES};

/// [`JobCommand::Lease`]: up to `max` batches for `worker`: first those it
/// holds already (a lease whose reply it never got), then re-queued ones,
/// then fresh ones; with nothing left, `done`, and the first worker to ask
/// is told to run the completer.
pub(super) fn lease(
    txn: &WriteTransaction,
    id: String,
    worker: String,
    max: u32,
    visibility_ms: i64,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
            let (index, receipts) = match held.pop_front().or_else(|| job.requeued.pop_front()) {
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
    Ok(Ok(reply.encode_to_vec()))
}

/// [`JobCommand::Ack`]: counts the lease holder's results: an ok batch is
/// done, a failed one goes back to the queue or, at `max_receive_count`, to
/// the dead letters.
pub(super) fn ack(
    txn: &WriteTransaction,
    id: String,
    worker: String,
    results: Vec<BatchResult>,
    now_ms: i64,
) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(Vec::new()))
}

/// [`JobCommand::Expire`]: the named grants whose visibility timeout ran
/// out on the leader go back to the queue.
pub(super) fn expire(txn: &WriteTransaction, id: String, leases: Vec<(u64, u64)>) -> Applied {
    let mut job = load_job!(txn, &id);
    if job.status == JobStatus::Running {
        job.expire(&leases);
        save(txn, &job)?;
    }
    Ok(Ok(Vec::new()))
}

/// [`JobCommand::ReleaseWorker`]: a worker that goes away gives back its
/// leases and its claim to complete the job.
pub(super) fn release_worker(txn: &WriteTransaction, id: String, worker: String) -> Applied {
    let mut job = load_job!(txn, &id);
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
    Ok(Ok(Vec::new()))
}

#[cfg(test)]
mod tests {
    //! Leases: counted once, expiry, re-queue, dead letters, release.

    use super::super::test_queue::*;

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
}
