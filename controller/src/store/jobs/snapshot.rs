//! The job tables in a raft snapshot.

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{io, BATCHES, JOBS};

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
