//! Applies committed commands to the [`ClusterState`]. The applied state
//! (with the last applied log id and membership) is written to redb in the
//! same step, and so are snapshots; every new state is published on a
//! `tokio::sync::watch` channel that the Watch RPC streams from.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::log_store::{decode, encode};
use super::{Applied, NodeId, SharedState, TypeConfig};
use crate::error::ControllerError;
use crate::state::ClusterState;

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");
const KEY_APPLIED: &str = "applied";
const KEY_SNAPSHOT: &str = "snapshot";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: ClusterState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    inner: Arc<Mutex<AppliedState>>,
    publish: watch::Sender<SharedState>,
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl StateMachineStore {
    pub fn open(db: Arc<Database>) -> Result<Self, ControllerError> {
        let storage = |e: std::io::Error| ControllerError::Storage(e.to_string());
        let applied: AppliedState = {
            let txn = db.begin_write().map_err(|e| storage(io(e)))?;
            let loaded = {
                let table = txn.open_table(SM).map_err(|e| storage(io(e)))?;
                let got = table.get(KEY_APPLIED).map_err(|e| storage(io(e)))?;
                match got {
                    Some(v) => decode(v.value()).map_err(storage)?,
                    None => AppliedState::default(),
                }
            };
            txn.commit().map_err(|e| storage(io(e)))?;
            loaded
        };
        let (publish, _) = watch::channel(Arc::new(applied.state.clone()));
        Ok(Self {
            db,
            inner: Arc::new(Mutex::new(applied)),
            publish,
        })
    }

    /// The newest applied state and a receiver for the ones after it.
    pub fn subscribe(&self) -> watch::Receiver<SharedState> {
        self.publish.subscribe()
    }

    pub fn current(&self) -> SharedState {
        self.publish.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AppliedState> {
        // A panic while holding the lock leaves a consistent value (every
        // change is computed on a copy first), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one value of the state-machine table durably.
    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), std::io::Error> {
        let bytes = encode(value)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(SM).map_err(io)?;
            table.insert(key, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    fn persist(&self, applied: &AppliedState) -> Result<(), std::io::Error> {
        self.put(KEY_APPLIED, applied)
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, std::io::Error> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = match txn.open_table(SM) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        match table.get(KEY_SNAPSHOT).map_err(io)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn write_snapshot(&self, snap: &StoredSnapshot) -> Result<(), std::io::Error> {
        self.put(KEY_SNAPSHOT, snap)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let applied = self.lock().clone();
        let data = encode(&applied.state).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match &applied.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, applied.state.version),
            None => format!("empty-{}", applied.state.version),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.write_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let applied = self.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut next = self.lock().clone();
        let mut replies = Vec::new();
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Applied {
                    result: Ok(next.state.version),
                }),
                EntryPayload::Normal(cmd) => {
                    let result = next.state.apply(cmd).map(|()| next.state.version);
                    if let Err(e) = &result {
                        tracing::info!(error = %e, "command refused");
                    }
                    replies.push(Applied { result });
                }
                EntryPayload::Membership(m) => {
                    next.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(Applied {
                        result: Ok(next.state.version),
                    });
                }
            }
        }
        self.persist(&next)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let publish = Arc::new(next.state.clone());
        *self.lock() = next;
        self.publish.send_replace(publish);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: ClusterState =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let next = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        self.write_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.persist(&next)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let publish = Arc::new(next.state.clone());
        *self.lock() = next;
        self.publish.send_replace(publish);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored = self
            .read_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
