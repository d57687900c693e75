//! What the service and the reconciler read from the job tables, each in
//! its own read transaction.

use redb::{Database, ReadableDatabase, ReadableTable};
use serval_protos::control::{Job, LeasedBatch};
use serval_protos::states::JobStatus;

use super::record::JobRecord;
use super::{io, LeaseGrant, BATCHES, JOBS, RESULT_INDEX};
use crate::store::log_store::decode;

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
