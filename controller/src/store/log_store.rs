//! The raft log, vote and committed index, in redb tables.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use super::{NodeId, TypeConfig};
use crate::error::ControllerError;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, std::io::Error> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(std::io::Error::other)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, std::io::Error> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(std::io::Error::other)
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(db: Arc<Database>) -> Result<Self, ControllerError> {
        // Create the tables up front so readers never meet a missing table.
        let txn = db
            .begin_write()
            .map_err(|e| ControllerError::Storage(e.to_string()))?;
        txn.open_table(LOGS)
            .map_err(|e| ControllerError::Storage(e.to_string()))?;
        txn.open_table(META)
            .map_err(|e| ControllerError::Storage(e.to_string()))?;
        txn.commit()
            .map_err(|e| ControllerError::Storage(e.to_string()))?;
        Ok(Self { db })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, std::io::Error> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(META).map_err(io)?;
        match table.get(key).map_err(io)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), std::io::Error> {
        let bytes = encode(value)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(META).map_err(io)?;
            table.insert(key, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    fn read_range(
        &self,
        start: u64,
        end_inclusive: Option<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, std::io::Error> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(LOGS).map_err(io)?;
        let iter = match end_inclusive {
            Some(end) => table.range(start..=end).map_err(io)?,
            None => table.range(start..).map_err(io)?,
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(io)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn delete_range(&self, range: impl RangeBounds<u64>) -> Result<(), std::io::Error> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(LOGS).map_err(io)?;
            table.retain_in(range, |_, _| false).map_err(io)?;
        }
        txn.commit().map_err(io)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(*e),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(e) => Some(e - 1),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e < start) {
            return Ok(Vec::new());
        }
        self.read_range(start, end)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self
            .get_meta(KEY_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last = {
            let txn = self
                .db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(&io(e)))?;
            let table = txn
                .open_table(LOGS)
                .map_err(|e| StorageIOError::read_logs(&io(e)))?;
            let last = table
                .last()
                .map_err(|e| StorageIOError::read_logs(&io(e)))?;
            match last {
                Some((_, v)) => {
                    let entry: Entry<TypeConfig> =
                        decode(v.value()).map_err(|e| StorageIOError::read_logs(&e))?;
                    Some(entry.log_id)
                }
                None => None,
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(KEY_VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.put_meta(KEY_COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let v: Option<Option<LogId<NodeId>>> = self
            .get_meta(KEY_COMMITTED)
            .map_err(|e| StorageIOError::read(&e))?;
        Ok(v.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let result = (|| -> Result<(), std::io::Error> {
            let txn = self.db.begin_write().map_err(io)?;
            {
                let mut table = txn.open_table(LOGS).map_err(io)?;
                for entry in entries {
                    let bytes = encode(&entry)?;
                    table
                        .insert(entry.log_id.index, bytes.as_slice())
                        .map_err(io)?;
                }
            }
            // redb commits durably (fsync) by default: the entries are on disk
            // before raft is told they are flushed.
            txn.commit().map_err(io)
        })();
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(e));
                Err(StorageIOError::write_logs(&std::io::Error::other(msg)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.delete_range(log_id.index..)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(KEY_LAST_PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.delete_range(..=log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
