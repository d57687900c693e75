//! The controller's front door on real sockets and a real raft store: a
//! started controller serves with the options a new cluster starts with,
//! stops within its bounds while a client still holds a `Watch` stream, and
//! a head that joins with the wrong token does not start.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serval_controller::{ControllerConfig, ControllerError, WriteCheck};
use serval_protos::client::connect;
use serval_protos::control::{HttpOptions, WatchRequest};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

const TOKEN: &str = "the-front-door-token-0123";

/// Far beyond the controller's own stop bounds: reached only if a stop hangs.
const HANG: Duration = Duration::from_secs(60);

fn config(
    dir: &std::path::Path,
    address: &str,
    token: &str,
    join: Option<String>,
) -> ControllerConfig {
    ControllerConfig {
        raft_dir: dir.join("raft"),
        raft_id: if join.is_some() { 2 } else { 1 },
        advertised_address: address.to_string(),
        token: token.to_string(),
        join,
        http_options: HttpOptions {
            location: "EveryNode".into(),
            host: "127.0.0.1".into(),
            port: 8123,
            middlewares_json: String::new(),
        },
        tls: None,
        node_timeout: serval_controller::DEFAULT_NODE_TIMEOUT,
        write_check: WriteCheck::default(),
        unnamed_blob_limit: Default::default(),
    }
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_then_stops_within_its_bounds_with_a_watch_open() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, addr) = bind().await;
    let config = config(dir.path(), &addr, TOKEN, None);
    let write_check = config.write_check.clone();
    assert!(
        write_check.check().is_err(),
        "not ready before the store is open"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(serval_controller::run(
        config,
        TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));

    // A first head sets the cluster's HTTP options before it serves as
    // started; its Watch stream shows them.
    let mut client = connect(&addr, TOKEN).await.unwrap();
    let mut watch = client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        let snapshot = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("the options within the deadline")
            .expect("the stream stays open")
            .unwrap();
        if snapshot
            .http_options
            .is_some_and(|o| o.location == "EveryNode" && o.port == 8123)
        {
            break;
        }
    }
    // The head's readiness: a leader that can commit.
    while let Err(why) = write_check.check() {
        assert!(tokio::time::Instant::now() < deadline, "never ready: {why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The Watch stream stays open, yet the controller stops.
    stop.send(()).unwrap();
    let result = tokio::time::timeout(HANG, run)
        .await
        .expect("run returns once told to stop")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    drop(watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_joining_with_the_wrong_token_does_not_start() {
    let first_dir = tempfile::tempdir().unwrap();
    let (listener, first) = bind().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(serval_controller::run(
        config(first_dir.path(), &first, TOKEN, None),
        TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));

    let dir = tempfile::tempdir().unwrap();
    let (listener, addr) = bind().await;
    let joining = config(
        dir.path(),
        &addr,
        "another-token-long-enough",
        Some(first.clone()),
    );
    let started = tokio::time::timeout(
        HANG,
        serval_controller::start(joining, TcpListenerStream::new(listener)),
    )
    .await
    .expect("start answers within its own bounds");
    match started {
        Err(ControllerError::Start(message)) => {
            assert_eq!(message, format!("the head at {first} refused the token"))
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("a head with the wrong token started"),
    }

    stop.send(()).unwrap();
    let result = tokio::time::timeout(HANG, run).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}
