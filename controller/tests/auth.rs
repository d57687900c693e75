//! Every control and peer RPC refuses a call without the cluster token or
//! with a wrong one (UNAUTHENTICATED), and such a call changes nothing. A
//! replica's scoped token reads but does not write; the peer key opens only
//! the peer service, and the cluster token does not open it.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serval_controller::auth::peer_key;
use serval_controller::peer_service::PeerService;
use serval_controller::service::ControlService;
use serval_controller::{open_store, Command, Membership};
use serval_protos::auth::replica_token;
use serval_protos::client::{connect, connect_peer_lazy};
use serval_protos::control::*;
use tokio_stream::StreamExt;

const TOKEN: &str = "the-right-token-0123";

const CODE: &[u8] = &[1];

async fn start() -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let membership = Membership {
        raft_id: 1,
        address: addr.clone(),
        peer_key: peer_key(TOKEN),
        bootstrap: true,
    };
    let (raft, sm) = open_store(dir.path(), &membership).await.unwrap();
    let mut m = raft.metrics();
    tokio::time::timeout(
        Duration::from_secs(30),
        m.wait_for(|m| m.current_leader.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    // The code every backend here names.
    let put = Command::PutBlob {
        digest: serval_protos::blob::digest(CODE),
        data: CODE.to_vec(),
    };
    serval_controller::propose(&raft, put).await.unwrap();
    let control = ControlService::new(raft.clone(), sm, 1, addr.clone(), TOKEN.into())
        .unwrap()
        .into_server();
    let peers = PeerService::new(raft, TOKEN).unwrap().into_server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(control)
            .add_service(peers)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (addr, dir)
}

fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) {
    match r {
        Err(s) if s.code() == tonic::Code::Unauthenticated => {}
        other => panic!("{what} was not refused: {other:?}"),
    }
}

async fn version(addr: &str) -> u64 {
    let mut c = connect(addr, TOKEN).await.unwrap();
    c.get_snapshot(WatchRequest {
        include_code: false,
    })
    .await
    .unwrap()
    .into_inner()
    .version
}

#[tokio::test]
async fn every_rpc_needs_the_token_and_a_refused_call_changes_nothing() {
    let (addr, _dir) = start().await;
    let before = version(&addr).await;
    let peer = peer_key(TOKEN);
    // The peer key is no control credential.
    for token in ["", "wrong-but-long-enough", &peer] {
        let mut c = connect(&addr, token).await.unwrap();
        let backend = Backend {
            name: "b".into(),
            code_digest: serval_protos::blob::digest(CODE),
            ..Default::default()
        };
        refused(
            "RegisterNode",
            c.register_node(RegisterNodeRequest::default()).await,
        );
        refused("Heartbeat", c.heartbeat(HeartbeatRequest::default()).await);
        refused(
            "ReportReplica",
            c.report_replica(ReplicaReport::default()).await,
        );
        refused("CreateBackend", c.create_backend(backend).await);
        refused(
            "UpdateBackendConfig",
            c.update_backend_config(UpdateBackendConfigRequest::default())
                .await,
        );
        refused(
            "UpdateBackendCode",
            c.update_backend_code(UpdateBackendCodeRequest::default())
                .await,
        );
        refused(
            "DeleteBackend",
            c.delete_backend(DeleteBackendRequest::default()).await,
        );
        refused(
            "CreateEndpoint",
            c.create_endpoint(Endpoint::default()).await,
        );
        refused(
            "DeleteEndpoint",
            c.delete_endpoint(NameRequest::default()).await,
        );
        refused(
            "SetTraffic",
            c.set_traffic(SetTrafficRequest::default()).await,
        );
        refused("SetShadow", c.set_shadow(SetShadowRequest::default()).await);
        refused(
            "SetHttpMiddlewares",
            c.set_http_middlewares(SetHttpMiddlewaresRequest::default())
                .await,
        );
        let blob = PutBlobRequest {
            digest: serval_protos::blob::digest(b"x"),
            data: b"x".to_vec(),
        };
        refused("PutBlob", c.put_blob(blob).await);
        refused("GetBlob", c.get_blob(GetBlobRequest::default()).await);
        refused("HasBlob", c.has_blob(GetBlobRequest::default()).await);
        let api = Api {
            name: "a".into(),
            ..Default::default()
        };
        refused("PutApi", c.put_api(api).await);
        refused("DeleteApi", c.delete_api(NameRequest::default()).await);
        refused("GetSnapshot", c.get_snapshot(WatchRequest::default()).await);
        match c.watch(WatchRequest::default()).await {
            Err(s) if s.code() == tonic::Code::Unauthenticated => {}
            Ok(stream) => {
                let first = stream.into_inner().next().await;
                assert!(
                    matches!(first, Some(Err(ref s)) if s.code() == tonic::Code::Unauthenticated),
                    "Watch: {first:?}"
                );
            }
            Err(s) => panic!("Watch refused with {s:?}"),
        }
        refused("ReportLoad", c.report_load(LoadReport::default()).await);
        refused("Shutdown", c.shutdown(Empty {}).await);
    }
    // The cluster token (what clients hold) and the replica token are no
    // peer credential.
    let replica = replica_token(TOKEN, "batch");
    for token in ["", "wrong-but-long-enough", TOKEN, &replica] {
        let mut p = connect_peer_lazy(&addr, token).unwrap();
        let msg = || RaftMessage { payload: vec![0] };
        refused("AppendEntries", p.append_entries(msg()).await);
        refused("Vote", p.vote(msg()).await);
        refused("InstallSnapshot", p.install_snapshot(msg()).await);
        refused("Propose", p.propose(msg()).await);
        refused(
            "JoinHead",
            p.join_head(JoinHeadRequest {
                raft_id: 9,
                address: "127.0.0.1:1".into(),
            })
            .await,
        );
    }
    assert_eq!(
        version(&addr).await,
        before,
        "a refused call changed the state"
    );

    // The right token works.
    let mut c = connect(&addr, TOKEN).await.unwrap();
    c.create_backend(Backend {
        name: "b".into(),
        code_digest: serval_protos::blob::digest(CODE),
        config: Some(BackendConfig {
            num_replicas: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(version(&addr).await > before);
}

#[test]
fn a_service_without_a_valid_token_cannot_be_built() {
    // Authentication is never off: no empty or short token is accepted.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (raft, sm) = open_store(dir.path(), &Membership::single(1, "127.0.0.1:1"))
            .await
            .unwrap();
        for token in ["", "short"] {
            assert!(
                ControlService::new(raft.clone(), sm.clone(), 1, "a:1".into(), token.into())
                    .is_err()
            );
            assert!(PeerService::new(raft.clone(), token).is_err());
        }
        raft.shutdown().await.unwrap();
    });
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) {
    match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => assert!(
            s.message().contains("replica credential"),
            "{what}: {}",
            s.message()
        ),
        other => panic!("{what} was not denied: {other:?}"),
    }
}

#[tokio::test]
async fn a_replica_token_reads_and_runs_jobs_but_does_not_deploy() {
    let (addr, _dir) = start().await;
    let mut c = connect(&addr, &replica_token(TOKEN, "batch"))
        .await
        .unwrap();
    let before = version(&addr).await;
    let backend = |name: &str| Backend {
        name: name.into(),
        code_digest: serval_protos::blob::digest(CODE),
        config: Some(BackendConfig {
            num_replicas: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    denied("CreateBackend", c.create_backend(backend("b")).await);
    denied(
        "DeleteBackend",
        c.delete_backend(DeleteBackendRequest {
            name: "b".into(),
            force: true,
        })
        .await,
    );
    denied(
        "CreateEndpoint",
        c.create_endpoint(Endpoint::default()).await,
    );
    denied(
        "SetTraffic",
        c.set_traffic(SetTrafficRequest::default()).await,
    );
    denied(
        "UpdateBackendCode",
        c.update_backend_code(UpdateBackendCodeRequest::default())
            .await,
    );
    denied(
        "SetHttpMiddlewares",
        c.set_http_middlewares(SetHttpMiddlewaresRequest::default())
            .await,
    );
    denied("PutApi", c.put_api(Api::default()).await);
    let blob = PutBlobRequest {
        digest: serval_protos::blob::digest(b"x"),
        data: b"x".to_vec(),
    };
    // The gateway stores its job workers' code (a blob, state unchanged).
    c.put_blob(blob).await.unwrap();
    denied(
        "RegisterNode",
        c.register_node(RegisterNodeRequest::default()).await,
    );
    denied("Shutdown", c.shutdown(Empty {}).await);
    assert_eq!(
        version(&addr).await,
        before,
        "a denied call changed the state"
    );

    // Reads work; the backends' code is named by digest, not readable.
    c.get_snapshot(WatchRequest::default()).await.unwrap();
    denied(
        "GetBlob of a backend's code",
        read_blob(&mut c, &serval_protos::blob::digest(CODE)).await,
    );
    let mut watch = c.watch(WatchRequest::default()).await.unwrap().into_inner();
    assert!(matches!(watch.next().await, Some(Ok(_))));
    // A batch gateway creates a job and its workers' backend, no other.
    let job = c
        .create_job(JobSpec {
            api: "batch".into(),
            workers: 1,
            max_receive_count: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.get_job(JobRequest {
        job_id: job.id.clone(),
    })
    .await
    .unwrap();
    c.create_backend(backend(&format!("batch--job-{}", job.id)))
        .await
        .unwrap();
    denied(
        "CreateBackend of another api's job",
        c.create_backend(backend(&format!("other--job-{}", job.id)))
            .await,
    );
    c.delete_backend(DeleteBackendRequest {
        name: format!("batch--job-{}", job.id),
        force: true,
    })
    .await
    .unwrap();
}

async fn read_blob(
    c: &mut serval_protos::client::Client,
    digest: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let request = GetBlobRequest {
        digest: digest.into(),
    };
    let mut stream = c.get_blob(request).await?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend(chunk?.data);
    }
    Ok(data)
}

/// A replica's token names its backend: it reads the blobs its backend
/// lists (a job's worker, its API's too) and its own API's jobs, never
/// another API's package, `.env` or jobs.
#[tokio::test]
async fn a_replica_token_reaches_only_its_own_api_s_blobs_and_jobs() {
    let (addr, _dir) = start().await;
    let mut admin = connect(&addr, TOKEN).await.unwrap();
    let blob = |data: &[u8]| PutBlobRequest {
        digest: serval_protos::blob::digest(data),
        data: data.to_vec(),
    };
    let (ours, theirs) = (blob(b"our package"), blob(b"their .env"));
    for b in [ours.clone(), theirs.clone()] {
        admin.put_blob(b).await.unwrap();
    }
    for (name, digest) in [("batch", &ours.digest), ("other", &theirs.digest)] {
        admin
            .create_backend(Backend {
                name: name.into(),
                code_digest: serval_protos::blob::digest(CODE),
                config: Some(BackendConfig {
                    num_replicas: 1,
                    ..Default::default()
                }),
                blobs: vec![digest.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let spec = |api: &str| JobSpec {
        api: api.into(),
        workers: 1,
        max_receive_count: 1,
        ..Default::default()
    };
    let theirs_job = admin.create_job(spec("other")).await.unwrap().into_inner();

    let mut gateway = connect(&addr, &replica_token(TOKEN, "batch"))
        .await
        .unwrap();
    assert_eq!(
        read_blob(&mut gateway, &ours.digest).await.unwrap(),
        ours.data
    );
    denied(
        "GetBlob of another API",
        read_blob(&mut gateway, &theirs.digest).await,
    );
    denied(
        "HasBlob of another API",
        gateway
            .has_blob(GetBlobRequest {
                digest: theirs.digest.clone(),
            })
            .await,
    );
    denied(
        "CreateJob for another API",
        gateway.create_job(spec("other")).await,
    );
    let job_of = |id: &str| JobRequest { job_id: id.into() };
    denied(
        "GetJob of another API",
        gateway.get_job(job_of(&theirs_job.id)).await,
    );
    denied(
        "StopJob of another API",
        gateway
            .stop_job(StopJobRequest {
                job_id: theirs_job.id.clone(),
                ..Default::default()
            })
            .await,
    );
    denied(
        "ListJobs of another API",
        gateway
            .list_jobs(ListJobsRequest {
                api: "other".into(),
            })
            .await,
    );
    denied(
        "CreateBackend for another API's job",
        gateway
            .create_backend(Backend {
                name: format!("other--job-{}", theirs_job.id),
                code_digest: serval_protos::blob::digest(CODE),
                ..Default::default()
            })
            .await,
    );
    let ours_job = gateway
        .create_job(spec("batch"))
        .await
        .unwrap()
        .into_inner();
    let listed = gateway
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .jobs
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        [ours_job.id.as_str()],
        "a replica listed jobs of another API"
    );

    // The job's worker reads its API's package, not the other's.
    let worker = format!("batch--job-{}", ours_job.id);
    let mut worker = connect(&addr, &replica_token(TOKEN, &worker))
        .await
        .unwrap();
    assert_eq!(
        read_blob(&mut worker, &ours.digest).await.unwrap(),
        ours.data
    );
    denied(
        "a worker's GetBlob of another API",
        read_blob(&mut worker, &theirs.digest).await,
    );
    worker.get_job(job_of(&ours_job.id)).await.unwrap();
    denied(
        "a worker's GetJob of another API",
        worker.get_job(job_of(&theirs_job.id)).await,
    );
}

#[tokio::test]
async fn middlewares_the_proxies_would_refuse_are_refused_before_the_log() {
    let (addr, _dir) = start().await;
    let mut c = connect(&addr, TOKEN).await.unwrap();
    let before = version(&addr).await;
    for bad in [
        "not json",
        r#"[{"name": "HTTPSRedirectMiddleware", "options": {}}]"#,
        r#"[{"name": "CORSMiddleware", "options": {"allow_origin_regex": "("}}]"#,
    ] {
        let r = c
            .set_http_middlewares(SetHttpMiddlewaresRequest {
                middlewares_json: bad.into(),
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::InvalidArgument => assert!(
                s.message().contains("http_options.middlewares"),
                "{bad}: {}",
                s.message()
            ),
            other => panic!("{bad} was not refused: {other:?}"),
        }
    }
    assert_eq!(
        version(&addr).await,
        before,
        "a refused call changed the state"
    );

    let cors = r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]"#;
    c.set_http_middlewares(SetHttpMiddlewaresRequest {
        middlewares_json: cors.into(),
    })
    .await
    .unwrap();
    let snapshot = c
        .get_snapshot(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snapshot.http_options.unwrap().middlewares_json, cors);
}
