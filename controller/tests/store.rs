//! The raft store on a real temp dir: commands survive a restart, refused
//! commands change nothing, and a long log is compacted into a snapshot.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use serval_controller::Command;
use serval_controller::ControllerError;
use serval_controller::{open_store, propose, propose_within, Membership, Raft};
use serval_protos::control::{Backend, BackendConfig, Node};

const CODE: &[u8] = b"pickled";

/// Stores the code [`backend`] names (a backend names a stored blob).
async fn put_code(raft: &Raft) {
    let put = Command::PutBlob {
        digest: serval_protos::blob::digest(CODE),
        data: CODE.to_vec(),
    };
    propose(raft, put).await.unwrap();
}

fn backend(name: &str) -> Backend {
    Backend {
        name: name.into(),
        code_digest: serval_protos::blob::digest(CODE),
        config: Some(BackendConfig {
            num_replicas: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn wait_leader(raft: &Raft) {
    let mut m = raft.metrics();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        m.wait_for(|m| m.current_leader.is_some()),
    )
    .await
    .expect("leader elected in time")
    .expect("raft running");
}

#[tokio::test]
async fn committed_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (raft, sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
            .await
            .unwrap();
        wait_leader(&raft).await;
        propose(
            &raft,
            Command::RegisterNode(Node {
                id: "n".into(),
                num_cpus: 4.0,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        put_code(&raft).await;
        propose(&raft, Command::CreateBackend(backend("b")))
            .await
            .unwrap();
        let err = propose(&raft, Command::CreateBackend(backend("b")))
            .await
            .unwrap_err();
        assert!(matches!(err, ControllerError::Refused(_)), "{err}");
        assert_eq!(sm.current().backends.len(), 1);
        raft.shutdown().await.unwrap();
    }
    let (raft, sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
        .await
        .unwrap();
    wait_leader(&raft).await;
    let state = sm.current();
    assert!(
        state.backends.contains_key("b"),
        "backend lost across restart: {state:?}"
    );
    assert_eq!(state.replicas.len(), 1);
    assert_eq!(
        state.backends["b"].code_digest,
        serval_protos::blob::digest(CODE)
    );
    raft.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_long_log_is_snapshotted_and_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (raft, _sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
            .await
            .unwrap();
        wait_leader(&raft).await;
        put_code(&raft).await;
        // Past the snapshot policy (500 logs since the last snapshot).
        for i in 0..600 {
            propose(&raft, Command::CreateBackend(backend(&format!("b{i}"))))
                .await
                .unwrap();
        }
        let mut m = raft.metrics();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            m.wait_for(|m| m.snapshot.is_some()),
        )
        .await
        .expect("snapshot built in time")
        .unwrap();
        raft.shutdown().await.unwrap();
    }
    let (raft, sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
        .await
        .unwrap();
    wait_leader(&raft).await;
    assert_eq!(sm.current().backends.len(), 600);
    raft.shutdown().await.unwrap();
}

/// A leader that cannot reach a majority keeps its role but cannot commit:
/// a write fails after the commit timeout instead of hanging, and changes
/// nothing.
#[tokio::test]
async fn a_write_no_majority_commits_fails_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
        .await
        .unwrap();
    wait_leader(&raft).await;
    // A second voter that never answers (nothing listens on port 1): the
    // joint configuration needs it, so nothing commits from here on.
    raft.add_learner(
        2,
        openraft::BasicNode {
            addr: "127.0.0.1:1".into(),
        },
        false,
    )
    .await
    .unwrap();
    let change = {
        let raft = raft.clone();
        tokio::spawn(async move { raft.change_membership([1, 2], false).await })
    };
    let mut m = raft.metrics();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        m.wait_for(|m| {
            m.membership_config
                .membership()
                .voter_ids()
                .any(|id| id == 2)
        }),
    )
    .await
    .expect("joint membership appended")
    .unwrap();
    let timeout = std::time::Duration::from_millis(500);
    let started = std::time::Instant::now();
    let err = propose_within(&raft, Command::CreateBackend(backend("lost")), timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, ControllerError::Uncommitted { .. }), "{err}");
    assert!(
        started.elapsed() < timeout * 4,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::DeadlineExceeded
    );
    assert!(!sm.current().backends.contains_key("lost"));
    assert!(
        raft.metrics().borrow().current_leader == Some(1),
        "the leader stays leader"
    );
    change.abort();
    raft.shutdown().await.unwrap();
}
