//! The shared snapshot watch (`serval_protos::client::spawn_watch`) against
//! the real Control service: the token travels as metadata, snapshots
//! arrive, the last one is kept while the controller is down, and the watch
//! reconnects when a controller comes back on the same address.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use serval_controller::service::ControlService;
use serval_controller::Command;
use serval_controller::{open_store, propose, Membership};
use serval_protos::client::{spawn_watch, SnapshotReceiver};
use serval_protos::control::HttpOptions;

const TOKEN: &str = "s3cret-long-enough";

/// Runs a controller on its own runtime thread with its store in `dir`,
/// proposes `commands` options so its state reaches a known version, and
/// serves until the returned sender fires; the runtime is then dropped,
/// closing every connection as a dying controller process would.
fn start_controller(
    listener: std::net::TcpListener,
    dir: std::path::PathBuf,
    commands: usize,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr = listener.local_addr().unwrap().to_string();
            let (raft, sm) = open_store(&dir, &Membership::single(1, &addr))
                .await
                .unwrap();
            let mut m = raft.metrics();
            m.wait_for(|m| m.current_leader.is_some()).await.unwrap();
            for i in 0..commands {
                let options = HttpOptions {
                    location: "HeadOnly".into(),
                    port: i as u32,
                    ..Default::default()
                };
                propose(&raft, Command::SetHttpOptions(options))
                    .await
                    .unwrap();
            }
            let service = ControlService::new(raft, sm, 1, addr, TOKEN.into())
                .unwrap()
                .into_server();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let server = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
            ready_tx.send(()).unwrap();
            tokio::select! {
                _ = server => {}
                _ = stop_rx => {}
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("controller started");
    stop
}

/// Binds with SO_REUSEADDR, so a controller can come back on its port while
/// old connections sit in TIME_WAIT.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(128)?.into_std()?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn wait_for_version(rx: &mut SnapshotReceiver, version: u64) {
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
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = start_controller(listener, dirs.0.path().to_path_buf(), 1);

    let mut rx = spawn_watch(addr.to_string(), TOKEN.into());
    wait_for_version(&mut rx, 1).await;

    // The controller goes away: the cached snapshot stays, and a proxy that
    // follows it is ready for traffic.
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

    // A controller comes back on the same address with a newer state.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("rebind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    let _stop = start_controller(listener, dirs.1.path().to_path_buf(), 2);
    wait_for_version(&mut rx, 2).await;
    follower.abort();
}

#[tokio::test]
async fn a_wrong_token_gets_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let _stop = start_controller(listener, dir.path().to_path_buf(), 1);
    let mut rx = spawn_watch(format!("http://{addr}"), "wrong".into());
    // Several reconnect rounds (100 ms, 200 ms, ...) fit in this window.
    let got = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    assert!(got.is_err(), "a snapshot arrived despite the wrong token");
    assert!(rx.borrow().is_none());
}
