//! A job queue in a redb file of its own, for the tests beside each
//! command: the queue's semantics, applied straight to the tables.

pub(super) use prost::Message;
pub(super) use redb::{Database, ReadableDatabase};
pub(super) use serval_protos::control::{BatchResult, Job, JobSpec, LeaseReply};

pub(super) use super::{
    apply, create_tables, dead_letters, get, leases, list, JobCommand, BATCHES,
    ENDED_JOB_RETENTION_MS, MAX_ENDED_JOBS, RESULT_INDEX,
};
pub(super) use crate::error::StateError;

pub(super) struct Queue {
    pub(super) db: Database,
    _dir: tempfile::TempDir,
}

pub(super) const ID: &str = "job";

impl Queue {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("jobs.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        create_tables(&txn).unwrap();
        txn.commit().unwrap();
        Self { db, _dir: dir }
    }

    /// A running job of `n` batches ("b0", "b1", ...) started at 1000.
    pub(super) fn running(n: u64, max_receive_count: u32, timeout_s: f64) -> Self {
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

    pub(super) fn run(&self, cmd: JobCommand) -> Result<Vec<u8>, StateError> {
        let txn = self.db.begin_write().unwrap();
        let out = apply(&txn, cmd).unwrap();
        if out.is_ok() {
            txn.commit().unwrap();
        }
        out
    }

    pub(super) fn lease(
        &self,
        worker: &str,
        max: u32,
        visibility_ms: i64,
        now_ms: i64,
    ) -> LeaseReply {
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

    pub(super) fn ack(&self, worker: &str, results: &[(u64, bool)], now_ms: i64) {
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
    pub(super) fn expire(&self, indexes: &[u64]) {
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

    pub(super) fn complete(&self, worker: &str, error: &str) -> Result<Job, StateError> {
        self.run(JobCommand::Complete {
            id: ID.into(),
            worker: worker.into(),
            error: error.into(),
            now_ms: 9000,
        })
        .map(|out| Job::decode(out.as_slice()).unwrap())
    }

    pub(super) fn job(&self) -> Job {
        get(&self.db, ID).unwrap().unwrap()
    }

    /// The indexes whose payloads are stored.
    pub(super) fn payloads(&self) -> Vec<u64> {
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(BATCHES).unwrap();
        table
            .range((ID, 0)..=(ID, u64::MAX))
            .unwrap()
            .map(|e| e.unwrap().0.value().1)
            .collect()
    }
}

pub(super) fn leased(reply: &LeaseReply) -> Vec<(u64, u32)> {
    reply
        .batches
        .iter()
        .map(|b| (b.index, b.receive_count))
        .collect()
}
