//! Replicas for tests and benchmarks of the data plane (feature
//! `test-util`): a native replica served on its own runtime thread, which
//! a test can kill like a crashed process (dropping the runtime closes
//! every socket it owned), and a handler that holds replies until released.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serval_protos::control::Replica;
use serval_protos::frame::{Request, Response};

use crate::replica_server::{bind_unix, serve, Handler, Reply};
use serval_protos::handshake::{Credential, Key, ReplicaKeys, Role};

/// The cluster token behind tests' native replicas: a proxy or router in a
/// test reaches them with credentials derived from it.
pub const TEST_TOKEN: &str = "serval-test-cluster-token";

/// The keys a native replica `replica_id` of [`TEST_TOKEN`]'s cluster accepts.
pub fn test_keys(replica_id: &str) -> ReplicaKeys {
    ReplicaKeys {
        data: Key::data_plane(TEST_TOKEN),
        agent: Key::replica_agent(&Key::agents(TEST_TOKEN), replica_id),
    }
}

/// A router's credential in [`TEST_TOKEN`]'s cluster.
pub fn router_credential() -> Credential {
    Credential {
        role: Role::Router,
        key: Key::data_plane(TEST_TOKEN),
    }
}

/// A native replica listening on `<dir>/<id>.sock` and a free TCP port.
pub struct ThreadedReplica {
    pub id: String,
    pub unix_path: String,
    pub tcp_addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadedReplica {
    /// Starts serving `handler` with [`test_keys`]; returns once both
    /// listeners are bound.
    pub fn start(dir: &Path, id: &str, handler: Arc<dyn Handler>) -> Self {
        let path = dir.join(format!("{id}.sock"));
        let unix_path = path.to_string_lossy().into_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let keys = test_keys(id);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("replica runtime");
            rt.block_on(async move {
                let unix = bind_unix(&path).expect("bind replica socket");
                let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind replica port");
                let addr = tcp.local_addr().expect("replica port").to_string();
                let _ = ready_tx.send(addr);
                serve(Some(unix), Some(tcp), None, keys, handler, async move {
                    let _ = stop_rx.await;
                })
                .await;
            });
            // Dropping the runtime cancels every connection task: the
            // sockets close as they would when the process dies.
            drop(rt);
        });
        let tcp_addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("replica started");
        Self {
            id: id.into(),
            unix_path,
            tcp_addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops it as a crash would: open connections close at once.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Its record in a cluster snapshot, running, for `backend`.
    pub fn record(&self, backend: &str) -> Replica {
        Replica {
            id: self.id.clone(),
            backend: backend.into(),
            state: serval_protos::states::ReplicaState::Running.into(),
            unix_path: self.unix_path.clone(),
            tcp_addr: self.tcp_addr.clone(),
            ..Default::default()
        }
    }
}

impl Drop for ThreadedReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Holds every reply until the test releases it: fills a replica's
/// concurrency without timing.
#[derive(Default)]
pub struct HoldHandler {
    held: Mutex<Vec<Reply>>,
}

impl Handler for HoldHandler {
    fn handle(&self, _request: Request, reply: Reply) {
        self.lock().push(reply);
    }
}

impl HoldHandler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Reply>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Answers every held request with `response`; returns how many.
    pub fn release_all_with(&self, response: &Response) -> usize {
        let replies: Vec<Reply> = std::mem::take(&mut *self.lock());
        let n = replies.len();
        for r in replies {
            r.send(response);
        }
        n
    }
}
