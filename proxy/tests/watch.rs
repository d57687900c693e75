//! `spawn_watch` against a fake controller: the token travels as metadata,
//! snapshots arrive, the last one is kept while the controller is down, and
//! the watch reconnects when it comes back on the same address.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serval_protos::control::control_server::{Control, ControlServer};
use serval_protos::control::*;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

struct FakeController {
    version: u64,
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Control for FakeController {
    async fn register_node(&self, _: Request<RegisterNodeRequest>) -> Reply<RegisterNodeReply> {
        Err(Status::unimplemented("fake"))
    }
    async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn report_replica(&self, _: Request<ReplicaReport>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_backend(&self, _: Request<Backend>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn update_backend_config(&self, _: Request<UpdateBackendConfigRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_backend(&self, _: Request<DeleteBackendRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_endpoint(&self, _: Request<Endpoint>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_endpoint(&self, _: Request<NameRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_traffic(&self, _: Request<SetTrafficRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_shadow(&self, _: Request<SetShadowRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn update_backend_code(&self, _: Request<UpdateBackendCodeRequest>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_snapshot(&self, _: Request<WatchRequest>) -> Reply<ClusterSnapshot> {
        Err(Status::unimplemented("fake"))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<ClusterSnapshot, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Reply<Self::WatchStream> {
        let token = request
            .metadata()
            .get(serval_protos::TOKEN_METADATA_KEY)
            .and_then(|v| v.to_str().ok());
        if token != Some("s3cret") {
            return Err(Status::unauthenticated("bad token"));
        }
        let snapshot = ClusterSnapshot {
            version: self.version,
            ..Default::default()
        };
        // One snapshot, then the stream stays open like a quiet controller.
        let stream = tokio_stream::iter(vec![Ok(snapshot)]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
    async fn shutdown(&self, _: Request<Empty>) -> Reply<Empty> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves the fake on its own runtime thread until the returned sender
/// fires; the runtime is then dropped, closing every connection as a dying
/// controller process would (a graceful tonic shutdown would wait forever
/// for the open watch stream).
fn start_controller(
    listener: std::net::TcpListener,
    version: u64,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let server = tonic::transport::Server::builder()
                .add_service(ControlServer::new(FakeController { version }))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
            tokio::select! {
                _ = server => {}
                _ = stop_rx => {}
            }
        });
    });
    stop
}

/// Binds with SO_REUSEADDR (as tokio's own `bind` does), so the controller
/// can come back on its port while old connections sit in TIME_WAIT.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)?.into_std()
}

async fn wait_for_version(rx: &mut serval_proxy::SnapshotReceiver, version: u64) {
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.version == version)),
    )
    .await;
    assert!(
        matches!(got, Ok(Ok(_))),
        "snapshot version {version} never arrived"
    );
}

#[tokio::test]
async fn watch_keeps_the_last_snapshot_and_reconnects() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = start_controller(listener, 1);

    let mut rx = serval_proxy::spawn_watch(addr.to_string(), "s3cret".into(), false);
    wait_for_version(&mut rx, 1).await;

    // The controller goes away: the cached snapshot stays.
    stop.send(()).unwrap();
    let proxy = Arc::new(serval_proxy::Proxy::new(
        &serval_proxy::ProxyConfig::default(),
    ));
    let follower = proxy.follow(rx.clone());
    tokio::time::timeout(Duration::from_secs(10), async {
        while !proxy.ready_for_traffic().0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(rx.borrow().as_ref().map(|s| s.version), Some(1));

    // It comes back on the same address with a newer snapshot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            // The old server may still be closing its listener.
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("rebind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    let _stop = start_controller(listener, 2);
    wait_for_version(&mut rx, 2).await;
    follower.abort();
}

#[tokio::test]
async fn a_wrong_token_gets_no_snapshot() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let _stop = start_controller(listener, 1);
    let mut rx = serval_proxy::spawn_watch(format!("http://{addr}"), "wrong".into(), false);
    // Several reconnect rounds (100 ms, 200 ms, ...) fit in this window.
    let got = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    assert!(got.is_err(), "a snapshot arrived despite the wrong token");
    assert!(rx.borrow().is_none());
}
