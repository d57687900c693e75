//! Writes reach the leader: a head that is not the leader forwards the
//! command to the one it knows over `RaftPeer/Propose` and returns the
//! leader's answer, so clients may talk to any head.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serval_protos::client::connect_peer_lazy;
use serval_protos::control::RaftMessage;

use super::log_store::{decode, encode};
use super::Command;
use super::{propose_with_output, Raft, Written};
use crate::error::{ControllerError, StateError};

/// How long a write may wait for a leader to be elected or reached.
const FORWARD_DEADLINE: Duration = Duration::from_secs(10);

/// The leader's answer to a forwarded command, as it travels back.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded {
    Applied(Written),
    Refused(StateError),
    Failed(String),
    /// Not committed in time on the leader; the sender must not retry.
    Uncommitted(Duration),
}

impl From<Result<Written, ControllerError>> for Forwarded {
    fn from(r: Result<Written, ControllerError>) -> Self {
        match r {
            Ok(written) => Forwarded::Applied(written),
            Err(ControllerError::Refused(e)) => Forwarded::Refused(e),
            Err(ControllerError::Uncommitted { after }) => Forwarded::Uncommitted(after),
            Err(e) => Forwarded::Failed(e.to_string()),
        }
    }
}

/// Proposes `cmd` on the leader, wherever it is; retries while an election
/// is under way, but not a write the leader failed to commit in time.
/// A forwarded write whose answer is lost (the leader died after its entry
/// was replicated) may be committed and then retried: `cmd` goes as a
/// `Command::Once` with a fresh id, so the retry gets the first
/// application's answer (a create that was applied answers "created", not
/// "already exists").
pub async fn propose_via_leader(
    raft: &Raft,
    peer_key: &str,
    cmd: Command,
) -> Result<u64, ControllerError> {
    propose_via_leader_with_output(raft, peer_key, cmd)
        .await
        .map(|w| w.version)
}

/// [`propose_via_leader`], with the command's output and log index.
pub async fn propose_via_leader_with_output(
    raft: &Raft,
    peer_key: &str,
    cmd: Command,
) -> Result<Written, ControllerError> {
    let deadline = tokio::time::Instant::now() + FORWARD_DEADLINE;
    let cmd = match cmd {
        once @ Command::Once { .. } => once,
        cmd => Command::Once {
            id: uuid::Uuid::new_v4().as_u128(),
            command: Box::new(cmd),
        },
    };
    loop {
        let outcome = match propose_with_output(raft, cmd.clone()).await {
            Err(ControllerError::NotLeader { leader: Some(addr) }) => {
                forward(&addr, peer_key, &cmd).await
            }
            other => other,
        };
        match outcome {
            // No leader yet, or it just changed: try again shortly. Not
            // once this head's raft has stopped (its storage failed).
            Err(ControllerError::NotLeader { .. }) | Err(ControllerError::Raft(_))
                if tokio::time::Instant::now() < deadline
                    && raft.metrics().borrow().running_state.is_ok() =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

async fn forward(leader: &str, peer_key: &str, cmd: &Command) -> Result<Written, ControllerError> {
    let mut client =
        connect_peer_lazy(leader, peer_key).map_err(|e| ControllerError::Raft(e.to_string()))?;
    let payload = encode(cmd).map_err(|e| ControllerError::Raft(e.to_string()))?;
    let reply =
        client
            .propose(RaftMessage { payload })
            .await
            .map_err(|s| ControllerError::NotLeader {
                leader: Some(format!("{leader} ({})", s.message())),
            })?;
    match decode::<Forwarded>(&reply.into_inner().payload)
        .map_err(|e| ControllerError::Raft(e.to_string()))?
    {
        Forwarded::Applied(written) => Ok(written),
        Forwarded::Refused(e) => Err(ControllerError::Refused(e)),
        Forwarded::Failed(e) => Err(ControllerError::Raft(e)),
        Forwarded::Uncommitted(after) => Err(ControllerError::Uncommitted { after }),
    }
}
