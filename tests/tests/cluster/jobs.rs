//! The batch-job queue (issue 9) through the control RPCs of a real head
//! (its raft log in a temp dir): 10,000 batches enqueued in chunks and
//! drained by two concurrent workers leasing and acking in groups, each
//! batch counted once and `on_job_complete` handed to exactly one worker;
//! a worker that dies holding leases, a batch that fails into the dead
//! letters, a stopped job. Prints the batches/s the queue sustained.

use std::collections::HashSet;
use std::time::Instant;

use serval_protos::client::Client;
use serval_protos::control::*;
use serval_tests::*;

fn start_head(root: &std::path::Path) -> ServeProcess {
    start_head_without_replicas(root, "head", None)
}

async fn new_job(c: &mut Client, batches: u64, max_receive_count: u32) -> String {
    let job = c
        .create_job(JobSpec {
            api: "api".into(),
            workers: 2,
            max_receive_count,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.status, "enqueuing");
    let mut first = 0;
    while first < batches {
        let n = (batches - first).min(2000);
        let chunk = (first..first + n)
            .map(|i| format!("[{i}]").into_bytes())
            .collect();
        c.enqueue_batches(EnqueueRequest {
            job_id: job.id.clone(),
            first_index: first,
            batches: chunk,
        })
        .await
        .unwrap();
        first += n;
    }
    let job = c
        .finish_enqueue(FinishEnqueueRequest {
            job_id: job.id.clone(),
            total: batches,
            error: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.status, "running");
    job.id
}

async fn lease(c: &mut Client, job: &str, worker: &str, max: u32) -> LeaseReply {
    c.lease_batches(LeaseRequest {
        job_id: job.into(),
        worker_id: worker.into(),
        max,
        visibility_s: 600.0,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn ack(c: &mut Client, job: &str, worker: &str, results: Vec<(u64, bool)>) {
    c.ack_batches(AckRequest {
        job_id: job.into(),
        worker_id: worker.into(),
        results: results
            .into_iter()
            .map(|(index, ok)| BatchResult {
                index,
                ok,
                seconds: 0.001,
                error: if ok { String::new() } else { "it broke".into() },
            })
            .collect(),
    })
    .await
    .unwrap();
}

/// Leases and acks (all ok) until the job is done; returns the indexes it
/// ran and whether it was told to run on_job_complete.
async fn worker(mut c: Client, job: String, name: String) -> (Vec<u64>, bool) {
    let mut ran = Vec::new();
    loop {
        let reply = lease(&mut c, &job, &name, 20).await;
        if reply.run_on_complete {
            return (ran, true);
        }
        if reply.done {
            return (ran, false);
        }
        if reply.batches.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        let results = reply.batches.iter().map(|b| (b.index, true)).collect();
        ran.extend(reply.batches.iter().map(|b| b.index));
        ack(&mut c, &job, &name, results).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_batches_on_two_workers_count_once() {
    let root = tempfile::tempdir().unwrap();
    let head = start_head(root.path());
    let mut c = head.client().await;

    let started = Instant::now();
    let job = new_job(&mut c, 10_000, 1).await;
    let enqueued = started.elapsed();
    let started = Instant::now();
    let a = tokio::spawn(worker(head.client().await, job.clone(), "a".into()));
    let b = tokio::spawn(worker(head.client().await, job.clone(), "b".into()));
    let (ran_a, complete_a) = a.await.unwrap();
    let (ran_b, complete_b) = b.await.unwrap();
    let ran = started.elapsed();
    // Exactly one worker runs on_job_complete.
    assert!(
        complete_a ^ complete_b,
        "on_job_complete went to {complete_a} / {complete_b}"
    );
    let all: HashSet<u64> = ran_a.iter().chain(&ran_b).copied().collect();
    assert_eq!(
        ran_a.len() + ran_b.len(),
        10_000,
        "a batch was leased twice"
    );
    assert_eq!(all.len(), 10_000);
    let completer = if complete_a { "a" } else { "b" };
    let done = c
        .complete_job(CompleteJobRequest {
            job_id: job.clone(),
            worker_id: completer.into(),
            error: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, "succeeded");
    assert_eq!(
        (done.succeeded, done.failed, done.batches_in_queue),
        (10_000, 0, 0)
    );
    assert!(done.end_ms >= done.start_ms && done.start_ms >= done.created_ms);
    // A second completion is refused.
    assert!(c
        .complete_job(CompleteJobRequest {
            job_id: job.clone(),
            worker_id: completer.into(),
            error: String::new(),
        })
        .await
        .is_err());
    println!(
        "FIGURES: 10,000 batches enqueued in {:.2} s; run by 2 workers (20 per lease) in {:.2} s: {:.0} batches/s",
        enqueued.as_secs_f64(),
        ran.as_secs_f64(),
        10_000.0 / ran.as_secs_f64()
    );
    let listed = c
        .list_jobs(ListJobsRequest { api: "api".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_workers_failed_batches_and_stopped_jobs() {
    let root = tempfile::tempdir().unwrap();
    let head = start_head(root.path());
    let mut c = head.client().await;

    // A worker dies holding leases: released, they run again elsewhere and
    // count once; the dead worker's late acks count for nothing.
    let job = new_job(&mut c, 10, 2).await;
    let held = lease(&mut c, &job, "dead", 3).await;
    assert_eq!(held.batches.len(), 3);
    c.release_worker(ReleaseWorkerRequest {
        job_id: job.clone(),
        worker_id: "dead".into(),
    })
    .await
    .unwrap();
    ack(
        &mut c,
        &job,
        "dead",
        held.batches.iter().map(|b| (b.index, true)).collect(),
    )
    .await;
    assert_eq!(
        c.get_job(JobRequest {
            job_id: job.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .succeeded,
        0
    );
    let mut seen = Vec::new();
    loop {
        let reply = lease(&mut c, &job, "live", 4).await;
        if reply.done {
            assert!(reply.run_on_complete);
            break;
        }
        for b in &reply.batches {
            seen.push((b.index, b.receive_count));
        }
        // Batch 5 fails every time: dead-lettered after 2 receipts.
        let results = reply
            .batches
            .iter()
            .map(|b| (b.index, b.index != 5))
            .collect();
        ack(&mut c, &job, "live", results).await;
    }
    // The released batches were received a second time.
    for b in &held.batches {
        assert!(seen.contains(&(b.index, 2)), "{seen:?}");
    }
    let job_now = c
        .get_job(JobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((job_now.succeeded, job_now.failed), (9, 1));
    let letters = c
        .get_dead_letters(JobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(letters.batches.len(), 1);
    assert_eq!(letters.batches[0].payload, b"[5]");
    assert_eq!(letters.batches[0].receive_count, 2);
    assert_eq!(letters.batches[0].error, "it broke");
    let done = c
        .complete_job(CompleteJobRequest {
            job_id: job.clone(),
            worker_id: "live".into(),
            error: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, "completed with failures");

    // A stopped job leases nothing more; stopping it again is refused.
    let job = new_job(&mut c, 5, 1).await;
    let stopped = c
        .stop_job(StopJobRequest {
            job_id: job.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.status, "stopped");
    let reply = lease(&mut c, &job, "w", 5).await;
    assert!(reply.done && reply.batches.is_empty() && !reply.run_on_complete);
    let again = c
        .stop_job(StopJobRequest {
            job_id: job.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        again.message().contains("already ended"),
        "{}",
        again.message()
    );

    // Unknown jobs and bad specs are named.
    let e = c
        .get_job(JobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .create_job(JobSpec {
            api: "api".into(),
            workers: 0,
            max_receive_count: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("workers"), "{}", e.message());
}

#[test]
fn a_job_goes_on_after_the_leader_head_is_killed() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut heads, leader_ix) = three_heads_without_replicas(tmp.path());
    let job = rt.block_on(async {
        let mut c = heads[(leader_ix + 1) % 3].client().await;
        let job = new_job(&mut c, 100, 1).await;
        // Written through a follower, read back through it at once: the
        // control writes return once this head has applied them.
        let read = c
            .get_job(JobRequest {
                job_id: job.clone(),
            })
            .await
            .expect("the job, on the follower it was created through")
            .into_inner();
        assert_eq!((read.status.as_str(), read.total_batches), ("running", 100));
        // Half the batches done and a few held, then the leader dies.
        let reply = lease(&mut c, &job, "w", 50).await;
        let (done, held) = reply.batches.split_at(45);
        ack(
            &mut c,
            &job,
            "w",
            done.iter().map(|b| (b.index, true)).collect(),
        )
        .await;
        let held: Vec<u64> = held.iter().map(|b| b.index).collect();
        (job, held)
    });
    drop(heads.remove(leader_ix));
    let (job, held) = job;
    rt.block_on(async {
        // A surviving head answers once a new leader is elected (writes
        // wait for it); the held batches are still leased to "w".
        let mut c = heads[0].client().await;
        ack(&mut c, &job, "w", held.iter().map(|i| (*i, true)).collect()).await;
        let (ran, complete) = worker(c.clone(), job.clone(), "v".into()).await;
        assert!(complete);
        assert_eq!(ran.len(), 50, "the other 50 batches, each once");
        let done = c
            .complete_job(CompleteJobRequest {
                job_id: job.clone(),
                worker_id: "v".into(),
                error: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (done.status.as_str(), done.succeeded, done.failed),
            ("succeeded", 100, 0)
        );
        let read = c
            .get_job(JobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((read.status.as_str(), read.succeeded), ("succeeded", 100));
        // The other survivor has the same job.
        let mut other = heads[1].client().await;
        let seen = wait_for_job(&mut other, &job, "succeeded").await;
        assert_eq!(seen.succeeded, 100);
    });
}

/// An AsyncAPI submission is a job of one batch ended by `FinishJob`: a
/// queued one and a finished one's result outlive the leader head.
#[test]
fn a_queued_submission_and_a_finished_one_s_result_outlive_the_leader() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut heads, leader_ix) = three_heads_without_replicas(tmp.path());
    let (finished, queued) = rt.block_on(async {
        let mut c = heads[(leader_ix + 1) % 3].client().await;
        let finished = new_job(&mut c, 1, 1).await;
        let queued = new_job(&mut c, 1, 1).await;
        let reply = lease(&mut c, &finished, "r1", 1).await;
        assert_eq!(reply.batches.len(), 1);
        // A lease returns before this follower applied it: it shows soon.
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let job = c
                .get_job(JobRequest {
                    job_id: finished.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if job.leased == 1 {
                break; // a leased submission is in progress
            }
            assert!(Instant::now() < deadline, "the lease never showed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Only the lease holder may finish it.
        let refused = c
            .finish_job(FinishJobRequest {
                job_id: finished.clone(),
                worker_id: "r2".into(),
                index: 0,
                result: "{}".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            refused.message().contains("no lease"),
            "{}",
            refused.message()
        );
        let done = c
            .finish_job(FinishJobRequest {
                job_id: finished.clone(),
                worker_id: "r1".into(),
                index: 0,
                result: r#"{"label": "setosa"}"#.into(),
                seconds: 0.1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((done.status.as_str(), done.leased), ("succeeded", 0));
        (finished, queued)
    });
    drop(heads.remove(leader_ix));
    rt.block_on(async {
        for head in &heads {
            let mut c = head.client().await;
            let seen = wait_for_job(&mut c, &finished, "succeeded").await;
            assert_eq!(seen.result, r#"{"label": "setosa"}"#);
        }
        // The queued one is still there for a consumer of the new leader.
        let mut c = heads[0].client().await;
        let reply = lease(&mut c, &queued, "r3", 1).await;
        assert_eq!(reply.batches[0].payload, b"[0]");
        let failed = c
            .finish_job(FinishJobRequest {
                job_id: queued.clone(),
                worker_id: "r3".into(),
                index: 0,
                error: "ValueError: no".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                failed.status.as_str(),
                failed.error.as_str(),
                failed.result.as_str()
            ),
            ("worker error", "ValueError: no", "")
        );
    });
}

/// The job as `c`'s head has it, once it reached `status` there (a
/// follower applies a commit a moment after the leader).
async fn wait_for_job(c: &mut Client, job: &str, status: &str) -> Job {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(j) = c.get_job(JobRequest { job_id: job.into() }).await {
            if j.get_ref().status == status {
                return j.into_inner();
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job} never reached {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
