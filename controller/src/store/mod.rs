//! The raft-replicated, on-disk store of the controller.
//!
//! Layout (as openraft's examples draw it):
//! - `types`: the raft type configuration, declared once.
//! - [`log_store`]: the raft log, vote and committed index in redb.
//! - `command`: [`Command`], every write, as the log holds it.
//! - [`state_machine`]: applies committed [`Command`]s to the
//!   [`ClusterState`], persists the applied state and snapshots in redb, and
//!   publishes every new state to watchers.
//! - [`blobs`]: content-addressed blobs (project packages) in their own
//!   tables beside the applied state.
//! - [`network`]: the transport between heads.
//!
//! **Architecture Invariant:** the raft log and the applied state are kept
//! apart (separate tables): the log is truncated by snapshots, the state is
//! rebuilt from the newest snapshot plus the log after it.

pub mod blobs;
mod command;
pub mod forward;
pub mod jobs;
pub mod log_store;
pub mod network;
mod snapshot_file;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ControllerError, StateError};
use crate::state::ClusterState;

/// The outcome of one applied command, returned to the proposer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// The state version after the command, or why it was refused.
    pub result: Result<u64, StateError>,
    /// What the command answers besides the version (a batch job's leased
    /// batches, its record after a change: protobuf bytes); empty for most.
    #[serde(default)]
    pub output: Vec<u8>,
}

pub use command::Command;

openraft::declare_raft_types!(
    /// Raft types of the Serval controller.
    pub TypeConfig:
        D = Command,
        R = Applied,
        // A snapshot carries every blob: in a file, not in memory
        // (snapshot_file.rs).
        SnapshotData = tokio::fs::File,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// Open (or create) the store under `dir` and start this head's raft member.
/// A fresh single-head store initialises a one-member cluster.
/// How this head joins raft.
#[derive(Debug, Clone)]
pub struct Membership {
    pub raft_id: NodeId,
    /// This head's control address; peers reach its RaftPeer service there.
    pub address: String,
    /// The key heads present to each other (`crate::auth::peer_key`).
    pub peer_key: String,
    /// A fresh store starts a one-member cluster (the first head); a head
    /// that joins an existing cluster waits to be added instead.
    pub bootstrap: bool,
}

impl Membership {
    /// A single head with no peers: tests of the store alone.
    pub fn single(raft_id: NodeId, address: &str) -> Self {
        Self {
            raft_id,
            address: address.to_string(),
            peer_key: String::new(),
            bootstrap: true,
        }
    }
}

/// redb's page cache (its default is 1 GiB).
const REDB_CACHE_BYTES: usize = 64 << 20;

pub async fn open(
    dir: &Path,
    membership: &Membership,
) -> Result<(Raft, state_machine::StateMachineStore), ControllerError> {
    let (raft_id, address) = (membership.raft_id, membership.address.as_str());
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ControllerError::Io { path, source }
    };
    // The store holds every backend's code and every package: its owner's
    // only. redb would create its file with the default mode (0644 under
    // the usual umask), so the file is made 0600 first.
    serval_protos::private_files::private_dir(dir).map_err(io(dir))?;
    let file = dir.join("raft.redb");
    serval_protos::private_files::ensure_private_file(&file).map_err(io(&file))?;
    let db = redb::Builder::new()
        .set_cache_size(REDB_CACHE_BYTES)
        .create(&file)
        .map_err(|e| ControllerError::Storage(e.to_string()))?;
    let db = Arc::new(db);
    let log = log_store::LogStore::open(db.clone())?;
    let sm = state_machine::StateMachineStore::open(db, dir.to_path_buf())?;
    let config = openraft::Config {
        cluster_name: "serval".into(),
        // openraft gives an AppendEntries call (heartbeats, and so every
        // commit) `heartbeat_interval` to answer: 200 ms lets heads 100 ms
        // apart (round trip) commit, where 100 ms let none (tests/tests/
        // cluster/multihost.rs, 50 ms delay each way). Three heartbeats make the
        // shortest election timeout, so a late one (a TCP retransmit under
        // packet loss) starts no election; a lost leader is replaced in
        // about 1 to 2 s (the goal is < 2 s).
        heartbeat_interval: 200,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 100,
        // A snapshot carries every blob: small chunks cross in well under
        // the timeout, and the last one, answered once the receiver has
        // installed the whole snapshot, gets time for that.
        snapshot_max_chunk_size: serval_protos::blob::BLOB_CHUNK_BYTES as u64,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    let config = Arc::new(
        config
            .validate()
            .map_err(|e| ControllerError::Raft(e.to_string()))?,
    );
    let network = network::Network {
        peer_key: membership.peer_key.clone(),
    };
    let raft = Raft::new(raft_id, config, network, log, sm.clone())
        .await
        .map_err(|e| ControllerError::Raft(e.to_string()))?;
    if membership.bootstrap
        && !raft
            .is_initialized()
            .await
            .map_err(|e| ControllerError::Raft(e.to_string()))?
    {
        let members = [(
            raft_id,
            openraft::BasicNode {
                addr: address.to_string(),
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
        raft.initialize(members)
            .await
            .map_err(|e| ControllerError::Raft(e.to_string()))?;
    }
    Ok((raft, sm))
}

/// How long a write waits to be committed by a majority of heads. A leader
/// cut off from the others keeps its role until it hears of a newer term,
/// but it cannot commit: its writes fail after this with
/// [`ControllerError::Uncommitted`] instead of hanging (election and a
/// healthy commit take well under a second; 5 s leaves room for a loaded
/// machine).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The commit timeout of blob commands: a 1 MiB part is written to disk by
/// every head, and the last command of a large blob hashes all of it on the
/// leader before it answers; a busy machine needs more than 5 s for that.
pub const BLOB_COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Proposes `cmd` and waits until it is applied; a refused command comes
/// back as [`ControllerError::Refused`], one no majority committed within
/// [`COMMIT_TIMEOUT`] ([`BLOB_COMMIT_TIMEOUT`] for blobs) as
/// [`ControllerError::Uncommitted`].
pub async fn propose(raft: &Raft, cmd: Command) -> Result<u64, ControllerError> {
    propose_with_output(raft, cmd).await.map(|w| w.version)
}

/// A committed and applied write, as its proposer sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Written {
    /// The state version after the command.
    pub version: u64,
    /// See [`Applied::output`].
    pub output: Vec<u8>,
    /// The command's raft log index: a head that has applied it has the
    /// write (see `job_service`, read-your-writes on followers).
    pub log_index: u64,
}

/// [`propose`], with the command's output (see [`Applied::output`]) and
/// log index.
pub async fn propose_with_output(raft: &Raft, cmd: Command) -> Result<Written, ControllerError> {
    let inner = match &cmd {
        Command::Once { command, .. } => command,
        cmd => cmd,
    };
    let timeout = match inner {
        Command::PutBlob { .. } | Command::PutBlobParts { .. } => BLOB_COMMIT_TIMEOUT,
        _ => COMMIT_TIMEOUT,
    };
    propose_within(raft, cmd, timeout).await
}

/// [`propose_with_output`] with another commit timeout.
pub async fn propose_within(
    raft: &Raft,
    cmd: Command,
    timeout: Duration,
) -> Result<Written, ControllerError> {
    // A command over a cap is refused here, before it reaches the log
    // (the state machine checks again: see `limits`).
    let cmd = crate::limits::clip(cmd);
    crate::limits::check(&cmd)?;
    let Ok(written) = tokio::time::timeout(timeout, raft.client_write(cmd)).await else {
        // The entry may still sit uncommitted in this head's log: a later
        // leader either commits it or, far more likely, overwrites it.
        return Err(ControllerError::Uncommitted { after: timeout });
    };
    match written {
        Ok(resp) => Ok(Written {
            version: resp.data.result?,
            output: resp.data.output,
            log_index: resp.log_id.index,
        }),
        Err(openraft::error::RaftError::APIError(
            openraft::error::ClientWriteError::ForwardToLeader(f),
        )) => Err(ControllerError::NotLeader {
            leader: f.leader_node.map(|n| n.addr),
        }),
        Err(e) => Err(ControllerError::Raft(e.to_string())),
    }
}

/// The current state, shared with watchers.
pub type SharedState = Arc<ClusterState>;

/// How long a leader may go without a quorum's acknowledgement and still
/// call itself able to write: the longest election timeout, after which
/// the others may have elected another leader.
const QUORUM_ACK_MAX_MS: u64 = 1200;

/// Whether this head can commit writes now, judged from its raft metrics
/// (no round trip): a leader that a quorum acknowledged within
/// `QUORUM_ACK_MAX_MS`, or a member that knows another head as its leader
/// (its writes are forwarded there). A head cut off from the quorum loses
/// its leader within an election timeout and so stops being ready; the
/// reason says which case holds (`/-/readyz`'s 503 body).
pub fn can_write(raft: &Raft) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    if let Err(fatal) = &m.running_state {
        return Err(format!("raft stopped: {fatal}"));
    }
    if m.membership_config.membership().get_node(&m.id).is_none() {
        return Err(NOT_A_MEMBER.into());
    }
    match (m.state, m.current_leader) {
        (openraft::ServerState::Leader, _) => match m.millis_since_quorum_ack {
            Some(ms) if ms <= QUORUM_ACK_MAX_MS => Ok(()),
            Some(ms) => Err(format!(
                "leader without a quorum's acknowledgement for {ms} ms"
            )),
            None => Err("leader not yet acknowledged by a quorum".into()),
        },
        (_, Some(leader)) if leader != m.id => Ok(()),
        _ => Err("no leader known: an election is under way or no quorum is reachable".into()),
    }
}

/// `can_write`'s reason for a head that has not joined a cluster yet (the
/// Kubernetes start script of the first head reads it).
pub const NOT_A_MEMBER: &str = "not a member of a cluster yet";
