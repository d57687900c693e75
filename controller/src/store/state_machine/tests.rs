//! Blobs in the state machine on a real redb file: refused and idempotent
//! puts, large blobs in parts, a reopen, and a snapshot installed elsewhere.

use std::path::Path;

use openraft::CommittedLeaderId;
use serval_protos::blob::{self, BLOB_CHUNK_BYTES};
use serval_protos::control::Api;

use super::*;
use crate::store::blobs;

fn open(path: &Path) -> StateMachineStore {
    let db = Database::create(path).expect("redb file");
    let dir = path.parent().expect("a folder").to_path_buf();
    StateMachineStore::open(Arc::new(db), dir).expect("state machine")
}

async fn apply(sm: &mut StateMachineStore, index: u64, cmd: Command) -> Result<u64, StateError> {
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    };
    let mut replies = sm.apply([entry]).await.expect("storage");
    replies.remove(0).result
}

fn put(data: &[u8]) -> Command {
    Command::PutBlob {
        digest: blob::digest(data),
        data: data.to_vec(),
    }
}

/// The blob as GetBlob would stream it.
fn read(sm: &StateMachineStore, digest: &str) -> Option<Vec<u8>> {
    let layout = sm.blob_layout(digest).unwrap()?;
    let mut out = Vec::new();
    for piece in layout {
        out.extend(sm.whole_blob(&piece).unwrap().expect("stored piece"));
    }
    Some(out)
}

/// Pseudo-random bytes, so parts do not repeat.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Applies the commands `PutBlob` over the Control service would.
async fn upload(sm: &mut StateMachineStore, index: &mut u64, data: &[u8]) -> String {
    let digest = blob::digest(data);
    let up = blobs::upload(digest.clone(), data.to_vec());
    for cmd in up.parts.into_iter().chain(up.finish) {
        *index += 1;
        apply(sm, *index, cmd).await.expect("blob stored");
    }
    digest
}

#[tokio::test]
async fn a_wrong_digest_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let watch = sm.subscribe();
    let claimed = blob::digest(b"other bytes");
    let err = apply(
        &mut sm,
        1,
        Command::PutBlob {
            digest: claimed.clone(),
            data: b"package".to_vec(),
        },
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&claimed) && msg.contains(&blob::digest(b"package")),
        "names both digests: {msg}"
    );
    assert!(!sm.has_blob(&claimed).unwrap());
    assert!(!sm.has_blob(&blob::digest(b"package")).unwrap());

    // Parts that do not hash to the claimed digest, and a missing part.
    apply(&mut sm, 2, put(b"part")).await.unwrap();
    let parts = vec![blob::digest(b"part")];
    let err = apply(
        &mut sm,
        3,
        Command::PutBlobParts {
            digest: claimed.clone(),
            parts,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StateError::BlobDigestMismatch { .. }),
        "{err}"
    );
    let err = apply(
        &mut sm,
        4,
        Command::PutBlobParts {
            digest: blob::digest(b"partmissing"),
            parts: vec![blob::digest(b"part"), blob::digest(b"missing")],
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StateError::MissingBlobPart { .. }), "{err}");
    assert!(!sm.has_blob(&claimed).unwrap());

    assert_eq!(sm.current().version, 0, "blobs never touch the state");
    assert!(
        !watch.has_changed().unwrap(),
        "no snapshot for blob commands"
    );
}

#[tokio::test]
async fn putting_a_stored_blob_again_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let digest = blob::digest(b"package");
    assert_eq!(apply(&mut sm, 1, put(b"package")).await, Ok(0));
    assert_eq!(apply(&mut sm, 2, put(b"package")).await, Ok(0));
    assert_eq!(read(&sm, &digest).unwrap(), b"package");
    assert!(read(&sm, &blob::digest(b"nope")).is_none());
}

#[tokio::test]
async fn a_large_blob_is_stored_as_parts_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let data = noise(2 * BLOB_CHUNK_BYTES + 12_345);
    let mut index = 0;
    let digest = upload(&mut sm, &mut index, &data).await;
    assert_eq!(sm.blob_layout(&digest).unwrap().unwrap().len(), 3);
    assert_eq!(read(&sm, &digest).unwrap(), data);
    // Uploading it again changes nothing.
    assert_eq!(upload(&mut sm, &mut index, &data).await, digest);
    assert_eq!(read(&sm, &digest).unwrap(), data);
}

#[tokio::test]
async fn blobs_and_apis_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sm.redb");
    let data = noise(BLOB_CHUNK_BYTES + 1);
    let digest = {
        let mut sm = open(&path);
        let mut index = 0;
        let digest = upload(&mut sm, &mut index, &data).await;
        let api = Api {
            name: "api".into(),
            package_digest: digest.clone(),
            ..Default::default()
        };
        apply(&mut sm, index + 1, Command::PutApi(api))
            .await
            .unwrap();
        digest
    };
    let mut sm = open(&path);
    assert_eq!(read(&sm, &digest).unwrap(), data);
    assert_eq!(sm.current().apis["api"].package_digest, digest);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(4), "3 blob commands + 1 api");
}

#[tokio::test]
async fn a_snapshot_carries_the_blobs_to_a_fresh_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader = open(&dir.path().join("leader.redb"));
    let large = noise(BLOB_CHUNK_BYTES + 7);
    let mut index = 0;
    let large_digest = upload(&mut leader, &mut index, &large).await;
    let small_digest = upload(&mut leader, &mut index, b"small").await;
    let api = Api {
        name: "api".into(),
        ..Default::default()
    };
    apply(&mut leader, index + 1, Command::PutApi(api))
        .await
        .unwrap();
    let snapshot = leader.build_snapshot().await.unwrap();

    let mut fresh = open(&dir.path().join("fresh.redb"));
    fresh
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(read(&fresh, &large_digest).unwrap(), large);
    assert_eq!(read(&fresh, &small_digest).unwrap(), b"small");
    assert!(fresh.current().apis.contains_key("api"));
    let (applied, _) = fresh.applied_state().await.unwrap();
    assert_eq!(applied, snapshot.meta.last_log_id);

    // The installed head can pass the blobs on in turn.
    let passed_on = fresh.get_current_snapshot().await.unwrap().unwrap();
    let mut third = open(&dir.path().join("third.redb"));
    third
        .install_snapshot(&passed_on.meta, passed_on.snapshot)
        .await
        .unwrap();
    assert_eq!(read(&third, &large_digest).unwrap(), large);
}

#[tokio::test]
async fn a_snapshot_carries_the_job_queue_as_it_was() {
    use crate::store::jobs::{self, JobCommand};
    use prost::Message;
    use serval_protos::control::{JobSpec, LeaseReply};

    let dir = tempfile::tempdir().unwrap();
    let mut leader = open(&dir.path().join("leader.redb"));
    let job = |cmd| Command::Job(cmd);
    let spec = JobSpec {
        api: "api".into(),
        workers: 1,
        max_receive_count: 1,
        ..Default::default()
    };
    let mut index = 0;
    for cmd in [
        JobCommand::Create {
            id: "j".into(),
            spec,
            now_ms: 1,
        },
        JobCommand::Enqueue {
            id: "j".into(),
            first_index: 0,
            batches: vec![b"[0]".to_vec(), b"[1]".to_vec(), b"[2]".to_vec()],
        },
        JobCommand::FinishEnqueue {
            id: "j".into(),
            total: 3,
            error: String::new(),
            now_ms: 2,
        },
        JobCommand::Lease {
            id: "j".into(),
            worker: "w".into(),
            max: 1,
            visibility_ms: 60_000,
            now_ms: 3,
        },
    ] {
        index += 1;
        apply(&mut leader, index, job(cmd)).await.unwrap();
    }
    let snapshot = leader.build_snapshot().await.unwrap();
    // A write after the snapshot is not in it.
    index += 1;
    apply(
        &mut leader,
        index,
        job(JobCommand::Stop {
            id: "j".into(),
            status: String::new(),
            error: String::new(),
            now_ms: 4,
        }),
    )
    .await
    .unwrap();

    let mut fresh = open(&dir.path().join("fresh.redb"));
    fresh
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let got = jobs::get(fresh.database(), "j").unwrap().unwrap();
    assert_eq!((got.status.as_str(), got.total_batches), ("running", 3));
    // The queue goes on from where the snapshot left it: batch 0 is leased,
    // 1 and 2 come next, with their payloads.
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index + 1),
        payload: EntryPayload::Normal(job(JobCommand::Lease {
            id: "j".into(),
            worker: "v".into(),
            max: 5,
            visibility_ms: 60_000,
            now_ms: 5,
        })),
    };
    let mut replies = fresh.apply([entry]).await.unwrap();
    let reply = LeaseReply::decode(replies.remove(0).output.as_slice()).unwrap();
    let leased: Vec<(u64, Vec<u8>)> = reply
        .batches
        .into_iter()
        .map(|b| (b.index, b.payload))
        .collect();
    assert_eq!(leased, vec![(1, b"[1]".to_vec()), (2, b"[2]".to_vec())]);
}

/// A `Command::Once` applied twice (a proposer's retry after the first
/// answer was lost) is applied once; the second gets the first's answer.
#[tokio::test]
async fn a_once_command_is_applied_once_and_its_retry_gets_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let data = b"the same bytes";
    let once = |id| Command::Once {
        id,
        command: Box::new(put(data)),
    };
    let first = apply(&mut sm, 1, once(7)).await;
    assert!(first.is_ok(), "{first:?}");
    // Without the id, the same put again is a fresh command (here: still
    // accepted, blobs are idempotent), with it the first answer comes back.
    assert_eq!(apply(&mut sm, 2, once(7)).await, first);
    // A state-changing command: applied again it bumps the version, its
    // retry does not.
    let create = |id| Command::Once {
        id,
        command: Box::new(Command::SetShuttingDown(true)),
    };
    let version = apply(&mut sm, 3, create(8)).await.unwrap();
    assert_eq!(apply(&mut sm, 4, create(8)).await, Ok(version));
    assert_eq!(
        apply(&mut sm, 5, Command::SetShuttingDown(true)).await,
        Ok(version + 1),
        "without Once the command applies again"
    );
}

/// Applies `cmd` as the next entry; it must be accepted.
async fn then(sm: &mut StateMachineStore, index: &mut u64, cmd: Command) {
    *index += 1;
    apply(sm, *index, cmd).await.expect("accepted");
}

fn backend(name: &str, code_digest: &str) -> Command {
    Command::CreateBackend(serval_protos::control::Backend {
        name: name.into(),
        code_digest: code_digest.into(),
        config: Some(serval_protos::control::BackendConfig {
            num_replicas: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_backend_names_only_stored_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let missing = blob::digest(b"never put");
    let err = apply(&mut sm, 1, backend("b", &missing)).await.unwrap_err();
    assert!(matches!(err, StateError::MissingCodeBlob { .. }), "{err}");
    assert!(err.to_string().contains("code_digest"), "{err}");
    assert!(sm.current().backends.is_empty());
    let mut index = 2;
    let code = upload(&mut sm, &mut index, b"code").await;
    then(&mut sm, &mut index, backend("b", &code)).await;
    let update = Command::UpdateBackendCode {
        name: "b".into(),
        code_digest: missing,
        blobs: Vec::new(),
    };
    let err = apply(&mut sm, index + 1, update).await.unwrap_err();
    assert!(matches!(err, StateError::MissingCodeBlob { .. }), "{err}");
    assert_eq!(sm.current().backends["b"].code_digest, code);
}

#[tokio::test]
async fn code_no_backend_names_is_collected_after_its_grace_and_packages_never() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let mut index = 1;
    // Large (in parts) and small code, a package, and shared code.
    let big = noise(3 * BLOB_CHUNK_BYTES + 5);
    let (old, shared) = (
        upload(&mut sm, &mut index, &big).await,
        upload(&mut sm, &mut index, b"shared").await,
    );
    let package = upload(&mut sm, &mut index, b"package").await;
    let new = upload(&mut sm, &mut index, b"new code").await;
    for cmd in [
        backend("a", &old),
        backend("b", &shared),
        backend("c", &shared),
        Command::UpdateBackendCode {
            name: "a".into(),
            code_digest: new.clone(),
            blobs: vec![package.clone()],
        },
        Command::DeleteBackend {
            name: "b".into(),
            force: false,
        },
    ] {
        then(&mut sm, &mut index, cmd).await;
    }
    let collect = |now_ms| Command::CollectCodeBlobs { now_ms };
    let t0 = 1_000_000;
    then(&mut sm, &mut index, collect(t0)).await;
    // Stamped now, kept for the grace.
    then(
        &mut sm,
        &mut index,
        collect(t0 + blobs::CODE_BLOB_GRACE_MS - 1),
    )
    .await;
    assert!(sm.has_blob(&old).unwrap());
    assert!(sm.is_orphan_blob(&old).unwrap());
    then(&mut sm, &mut index, collect(t0 + blobs::CODE_BLOB_GRACE_MS)).await;
    assert!(!sm.has_blob(&old).unwrap(), "replaced code is collected");
    for part in big.chunks(BLOB_CHUNK_BYTES) {
        assert!(!sm.has_blob(&blob::digest(part)).unwrap(), "its parts too");
    }
    assert!(!sm.has_orphan_blobs().unwrap());
    // Still named (by "c"), named as new code, or a package: kept.
    for kept in [&shared, &new, &package] {
        assert!(read(&sm, kept).is_some());
    }
    // Deleted, then put again within the grace by a client about to name
    // it: its grace starts over.
    let delete = Command::DeleteBackend {
        name: "c".into(),
        force: false,
    };
    then(&mut sm, &mut index, delete).await;
    let t1 = t0 + 100_000;
    then(&mut sm, &mut index, collect(t1)).await;
    then(&mut sm, &mut index, put(b"shared")).await;
    then(&mut sm, &mut index, collect(t1 + blobs::CODE_BLOB_GRACE_MS)).await;
    assert!(
        sm.has_blob(&shared).unwrap(),
        "a put again restarts the grace"
    );
    then(
        &mut sm,
        &mut index,
        collect(t1 + 2 * blobs::CODE_BLOB_GRACE_MS),
    )
    .await;
    assert!(!sm.has_blob(&shared).unwrap());
}

#[tokio::test]
async fn a_blob_put_and_never_named_is_collected_after_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(&dir.path().join("sm.redb"));
    let mut index = 1;
    // What a replica token may put and leave (a job worker's code never
    // used), small and large; and code a backend names within the grace.
    let big = noise(2 * BLOB_CHUNK_BYTES + 7);
    let stray = upload(&mut sm, &mut index, b"stray").await;
    let stray_big = upload(&mut sm, &mut index, &big).await;
    let named = upload(&mut sm, &mut index, b"named").await;
    // Reversed: parts of its own (noise always starts the same).
    let big_code: Vec<u8> = noise(2 * BLOB_CHUNK_BYTES + 9).into_iter().rev().collect();
    let named_big = upload(&mut sm, &mut index, &big_code).await;
    assert!(sm.is_orphan_blob(&stray).unwrap(), "HasBlob answers false");
    let collect = |now_ms| Command::CollectCodeBlobs { now_ms };
    let t0 = 1_000_000;
    then(&mut sm, &mut index, collect(t0)).await;
    then(&mut sm, &mut index, backend("b", &named)).await;
    then(&mut sm, &mut index, backend("c", &named_big)).await;
    then(&mut sm, &mut index, collect(t0 + 1)).await;
    assert_eq!(read(&sm, &stray_big).as_deref(), Some(&big[..]));
    then(&mut sm, &mut index, collect(t0 + blobs::CODE_BLOB_GRACE_MS)).await;
    assert!(!sm.has_blob(&stray).unwrap(), "never named: collected");
    assert!(!sm.has_blob(&stray_big).unwrap());
    for part in big.chunks(BLOB_CHUNK_BYTES) {
        assert!(!sm.has_blob(&blob::digest(part)).unwrap(), "its parts too");
    }
    assert_eq!(read(&sm, &named).as_deref(), Some(&b"named"[..]));
    // A named large blob keeps its parts, which nothing names by itself.
    assert_eq!(read(&sm, &named_big).as_deref(), Some(&big_code[..]));
    assert!(!sm.is_orphan_blob(&named).unwrap());
    assert!(!sm.has_orphan_blobs().unwrap());
}
