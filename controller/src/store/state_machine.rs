//! Applies committed commands to the [`ClusterState`]. The applied state
//! (with the last applied log id and membership) is written to redb in the
//! same step, and so are snapshots; every new state is published on a
//! `tokio::sync::watch` channel that the Watch RPC streams from. Blobs are
//! written to their own tables ([`super::blobs`]) in the same transaction
//! as the applied state, and snapshots carry them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::log_store::{decode, encode};
use super::Command;
use super::{blobs, jobs, snapshot_file};
use super::{Applied, NodeId, SharedState, TypeConfig};
use crate::error::{ControllerError, StateError};
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

/// The newest snapshot as stored: `data` is the encoded state only; its
/// blobs are the ones in the blob tables.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
    /// The job tables as they were at `meta`'s log index (they change, so
    /// unlike blobs they cannot be read again later).
    jobs: jobs::JobSet,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    /// The store's folder, where snapshot files are made.
    dir: PathBuf,
    inner: Arc<Mutex<AppliedState>>,
    /// Held while entries are applied and while a snapshot reads the state
    /// and the job tables, so a snapshot's tables match its log index.
    gate: Arc<Mutex<()>>,
    publish: watch::Sender<SharedState>,
    recent: Arc<Mutex<RecentOnce>>,
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Writes one value of the state-machine table inside `txn`.
fn put_in<T: Serialize>(txn: &WriteTransaction, key: &str, value: &T) -> std::io::Result<()> {
    let bytes = encode(value)?;
    let mut table = txn.open_table(SM).map_err(io)?;
    table.insert(key, bytes.as_slice()).map_err(io)?;
    Ok(())
}

/// Commands that write the store's own tables (blobs, jobs) and leave the
/// cluster state as it was: watchers need no new snapshot for them.
fn is_blob(cmd: &Command) -> bool {
    match cmd {
        Command::Once { command, .. } => is_blob(command),
        cmd => matches!(
            cmd,
            Command::PutBlob { .. }
                | Command::PutBlobParts { .. }
                | Command::Job(_)
                | Command::CollectCodeBlobs { .. }
        ),
    }
}

/// How many answers of `Command::Once` the state machine remembers: more
/// than the writes that can be in flight across a leader change, so a
/// retry always finds the answer of its first application.
const RECENT_ONCE: usize = 4096;

/// One applied command's answer: its result and output.
type Answer = (Result<u64, StateError>, Vec<u8>);

/// The answers of the last `RECENT_ONCE` `Command::Once` ids applied.
/// In memory only: every head builds it by applying the same log, and one
/// that installed a snapshot starts empty (a retry that reaches it after
/// its first application fell into the snapshot is applied again, as
/// before this table existed).
#[derive(Default)]
struct RecentOnce {
    answers: HashMap<u128, Answer>,
    order: VecDeque<u128>,
}

impl RecentOnce {
    fn insert(&mut self, id: u128, answer: Answer) {
        if self.answers.insert(id, answer).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_ONCE {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

/// Applies one command: a blob to its tables inside `txn`, anything else
/// to `state`.
fn apply_command(
    txn: &WriteTransaction,
    state: &mut ClusterState,
    cmd: Command,
) -> std::io::Result<(Result<u64, StateError>, Vec<u8>)> {
    // Blobs and jobs skip `ClusterState::apply`, which checks the rest.
    if let Err(e) = crate::limits::check(&cmd) {
        return Ok((Err(e), Vec::new()));
    }
    // A backend's code must be stored before a backend names it.
    let code = match &cmd {
        Command::CreateBackend(b) => Some((&b.name, &b.code_digest)),
        Command::UpdateBackendCode {
            name, code_digest, ..
        } => Some((name, code_digest)),
        _ => None,
    };
    if let Some((backend, digest)) = code {
        if let Err(e) = blobs::check_code(txn, backend, digest)? {
            return Ok((Err(e), Vec::new()));
        }
    }
    // Commands that may name code, a package or a backend's blobs, or stop
    // naming them.
    let names_blobs = matches!(
        cmd,
        Command::CreateBackend(_)
            | Command::UpdateBackendCode { .. }
            | Command::DeleteBackend { .. }
            | Command::PutApi(_)
    );
    let applied = match cmd {
        Command::PutBlob { digest, data } => blobs::put(txn, &digest, &data)?,
        Command::PutBlobParts { digest, parts } => blobs::put_parts(txn, &digest, &parts)?,
        Command::CollectCodeBlobs { now_ms } => {
            blobs::collect(txn, now_ms, &state.named_blobs())?;
            Ok(())
        }
        cmd if names_blobs => {
            let before = state.code_digests();
            let applied = state.apply(cmd);
            if applied.is_ok() {
                blobs::track_code(txn, &before, &state.code_digests())?;
                // Named now: HasBlob says so at once, not after the next
                // collection.
                blobs::named(txn, &state.named_blobs())?;
            }
            applied
        }
        Command::Job(cmd) => {
            return Ok(match jobs::apply(txn, cmd)? {
                Ok(output) => (Ok(state.version), output),
                Err(e) => (Err(e), Vec::new()),
            })
        }
        cmd => state.apply(cmd),
    };
    Ok((applied.map(|()| state.version), Vec::new()))
}

impl StateMachineStore {
    pub fn open(db: Arc<Database>, dir: PathBuf) -> Result<Self, ControllerError> {
        let storage = |e: std::io::Error| ControllerError::Storage(e.to_string());
        let applied: AppliedState = {
            let txn = db.begin_write().map_err(|e| storage(io(e)))?;
            let loaded = {
                let table = txn.open_table(SM).map_err(|e| storage(io(e)))?;
                let got = table.get(KEY_APPLIED).map_err(|e| storage(io(e)))?;
                match got {
                    // The applied state is bincode of this build's structs:
                    // a store from another Serval version does not decode.
                    Some(v) => decode(v.value()).map_err(|e| {
                        ControllerError::Storage(format!(
                            "the cluster state in this data dir was written by an incompatible \
                             Serval version ({e}); use a new --data-dir, or move the old one's \
                             raft/ folder away to start an empty cluster"
                        ))
                    })?,
                    None => AppliedState::default(),
                }
            };
            blobs::create_tables(&txn).map_err(storage)?;
            jobs::create_tables(&txn).map_err(storage)?;
            txn.commit().map_err(|e| storage(io(e)))?;
            loaded
        };
        let (publish, _) = watch::channel(Arc::new(applied.state.clone()));
        Ok(Self {
            db,
            dir,
            inner: Arc::new(Mutex::new(applied)),
            gate: Arc::new(Mutex::new(())),
            publish,
            recent: Arc::default(),
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

    /// The database, for reads of the job tables (`store::jobs`).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Whether blob `digest` is stored on this head.
    pub fn has_blob(&self, digest: &str) -> Result<bool, ControllerError> {
        Ok(self.blob_layout(digest)?.is_some())
    }

    /// Whether `digest` is a code blob no backend names, due for collection
    /// (`store::blobs`): a client about to name it must put it again.
    pub fn is_orphan_blob(&self, digest: &str) -> Result<bool, ControllerError> {
        blobs::is_orphan(&self.db, digest).map_err(|e| ControllerError::Storage(e.to_string()))
    }

    /// How many blobs nothing names, and their bytes (`PutBlob` refuses
    /// more beyond [`crate::service::UnnamedBlobLimit`]).
    pub fn unnamed_blob_usage(&self) -> Result<(u64, u64), ControllerError> {
        blobs::orphan_usage(&self.db).map_err(|e| ControllerError::Storage(e.to_string()))
    }

    /// Whether some code blob waits for `CollectCodeBlobs`.
    pub fn has_orphan_blobs(&self) -> Result<bool, ControllerError> {
        blobs::has_orphans(&self.db).map_err(|e| ControllerError::Storage(e.to_string()))
    }

    /// The blobs stored whole that make up blob `digest`, in order (itself,
    /// or the parts of a large one); `None` when this head does not have it.
    pub fn blob_layout(&self, digest: &str) -> Result<Option<Vec<String>>, ControllerError> {
        blobs::layout(&self.db, digest).map_err(|e| ControllerError::Storage(e.to_string()))
    }

    /// The bytes of a blob stored whole (one of a [`Self::blob_layout`]).
    pub fn whole_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, ControllerError> {
        blobs::read_whole(&self.db, digest).map_err(|e| ControllerError::Storage(e.to_string()))
    }

    /// Writes one value of the state-machine table durably.
    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), std::io::Error> {
        let txn = self.db.begin_write().map_err(io)?;
        put_in(&txn, key, value)?;
        txn.commit().map_err(io)
    }

    /// A snapshot file of `state` (encoded) and `jobs` with every blob
    /// (content-addressed and never removed, so blobs applied after the
    /// snapshot's log index do no harm: putting them again is a no-op).
    /// Written on a blocking thread: it reads and writes every blob.
    async fn snapshot_file(
        &self,
        state: Vec<u8>,
        jobs: jobs::JobSet,
    ) -> Result<Box<tokio::fs::File>, std::io::Error> {
        let (dir, db) = (self.dir.clone(), self.db.clone());
        let file =
            tokio::task::spawn_blocking(move || snapshot_file::write(&dir, &db, state, jobs))
                .await
                .map_err(io)??;
        Ok(Box::new(tokio::fs::File::from_std(file)))
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
        let (applied, jobs) = {
            let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            let txn = self
                .db
                .begin_read()
                .map_err(|e| StorageIOError::read_state_machine(&io(e)))?;
            let jobs = jobs::export(&txn).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (self.lock().clone(), jobs)
        };
        let state = encode(&applied.state).map_err(|e| StorageIOError::read_state_machine(&e))?;
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
            data: state.clone(),
            jobs: jobs.clone(),
        };
        self.write_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let snapshot = self
            .snapshot_file(state, jobs)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot { meta, snapshot })
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
        let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.lock().clone();
        let mut replies = Vec::new();
        // Blob-only batches leave the state as it was: watchers need no new
        // snapshot for them.
        let mut changed = false;
        let write = |e: std::io::Error| StorageIOError::write_state_machine(&e);
        let txn = self.db.begin_write().map_err(|e| write(io(e)))?;
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            let (result, output) = match entry.payload {
                EntryPayload::Blank => {
                    changed = true;
                    (Ok(next.state.version), Vec::new())
                }
                EntryPayload::Normal(Command::Once { id, command }) => {
                    let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                    match recent.answers.get(&id) {
                        // A retry of a write already applied.
                        Some(answer) => answer.clone(),
                        None => {
                            changed |= !is_blob(&command);
                            let answer =
                                apply_command(&txn, &mut next.state, *command).map_err(write)?;
                            recent.insert(id, answer.clone());
                            answer
                        }
                    }
                }
                EntryPayload::Normal(cmd) => {
                    changed |= !is_blob(&cmd);
                    apply_command(&txn, &mut next.state, cmd).map_err(write)?
                }
                EntryPayload::Membership(m) => {
                    changed = true;
                    next.membership = StoredMembership::new(Some(entry.log_id), m);
                    (Ok(next.state.version), Vec::new())
                }
            };
            if let Err(e) = &result {
                tracing::info!(error = %e, "command refused");
            }
            replies.push(Applied { result, output });
        }
        put_in(&txn, KEY_APPLIED, &next).map_err(write)?;
        txn.commit().map_err(|e| write(io(e)))?;
        let publish = changed.then(|| Arc::new(next.state.clone()));
        *self.lock() = next;
        if let Some(state) = publish {
            self.publish.send_replace(state);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let file = tempfile::tempfile_in(&self.dir)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let read = |e: std::io::Error| StorageIOError::read_snapshot(Some(meta.signature()), &e);
        // Chunks received may still be on their way to the file.
        snapshot.flush().await.map_err(read)?;
        let mut file = snapshot.into_std().await;
        let (db, snapshot_meta) = (self.db.clone(), meta.clone());
        // Blobs, snapshot and applied state in one transaction: a crash
        // leaves either the old state or all of the new one. On a blocking
        // thread: it reads and writes every blob.
        let next = tokio::task::spawn_blocking(move || {
            let meta = snapshot_meta;
            // Boxed: the error is large, and crosses the thread's result.
            let read = |e: std::io::Error| {
                Box::new(StorageError::from(StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    &e,
                )))
            };
            let write = |e: std::io::Error| {
                Box::new(StorageError::from(StorageIOError::write_snapshot(
                    Some(meta.signature()),
                    &e,
                )))
            };
            let txn = db.begin_write().map_err(|e| write(io(e)))?;
            let (data, jobs) = snapshot_file::read(&mut file, &txn).map_err(read)?;
            let state: ClusterState = decode(&data).map_err(read)?;
            let next = AppliedState {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                state,
            };
            jobs::import(&txn, jobs.clone()).map_err(write)?;
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data,
                jobs,
            };
            put_in(&txn, KEY_SNAPSHOT, &stored).map_err(write)?;
            put_in(&txn, KEY_APPLIED, &next).map_err(write)?;
            txn.commit().map_err(|e| write(io(e)))?;
            Ok::<_, Box<StorageError<NodeId>>>(next)
        })
        .await
        .map_err(|e| read(io(e)))?
        .map_err(|e| *e)?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed a snapshot from the leader");
        let publish = Arc::new(next.state.clone());
        *self.lock() = next;
        self.publish.send_replace(publish);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(stored) = self
            .read_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let snapshot = self
            .snapshot_file(stored.data, stored.jobs)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot,
        }))
    }
}

#[cfg(test)]
mod tests;
