//! `serval._native.ReplicaServer`: the frame server on its one-worker
//! tokio runtime, and what the Python thread calls: `drain`, `wait`,
//! `stop`, `shutdown`.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use serval_node::replica_server::{self, Handler};
use serval_onnx::NativeHandler;
use serval_protos::handshake::{self, Key, ReplicaKeys};

use super::dispatch::{run_job, Dispatch};
use super::outbox::Outbox;
use super::queue::{max_queued, Job, QueueHandler};
use super::reply::unavailable;
use super::wake::{StopSignal, Wake};
use crate::onnx::OnnxModel;
use crate::poll::poll_until;

/// How long a blocked wait sleeps before looking at signals / shutdown again.
const POLL: Duration = Duration::from_millis(100);
/// How long `shutdown` lets the io runtime write out queued replies.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

/// The keys this replica's frame server checks peers with, from the
/// environment its node agent set. There is no way to serve without them:
/// a replica port that takes frames from anyone runs anyone's pickles.
/// `agent_key`: the agent key as hex when the caller already took it out of
/// the environment (so that user code loaded before cannot read it).
fn replica_keys(agent_key: Option<String>) -> PyResult<ReplicaKeys> {
    let key = |name: &str, given: Option<String>| {
        let text = match given {
            Some(text) => text,
            None => std::env::var(name).map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} is not set: a replica needs the data-plane keys its node agent gives it"
                ))
            })?,
        };
        Key::from_hex(&text)
            .ok_or_else(|| PyValueError::new_err(format!("{name} must be 64 hex digits")))
    };
    Ok(ReplicaKeys {
        data: key(handshake::DATA_KEY_ENV, None)?,
        agent: key(handshake::AGENT_KEY_ENV, agent_key)?,
    })
}

/// The frame server of one Python replica. See the module docs for the API.
#[pyclass(frozen, module = "serval._native")]
pub struct ReplicaServer {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    serve_stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    rx: Receiver<Job>,
    wake: Arc<Wake>,
    stop: Arc<StopSignal>,
    unix_path: Option<PathBuf>,
    tcp_addr: Option<String>,
    /// The TCP listener serves TLS (`SERVAL_TLS_CERT`/`SERVAL_TLS_KEY`).
    tls: bool,
    max_drain: usize,
    /// Replies a drain gathers per connection before it sends them.
    reply_batch: AtomicUsize,
    max_queued: usize,
}

#[pymethods]
impl ReplicaServer {
    #[new]
    #[pyo3(signature = (unix_path, tcp_host = Some("127.0.0.1".to_string()), watch_stdin = false, max_drain = 64, native = None, agent_key = None))]
    fn new(
        py: Python<'_>,
        unix_path: Option<PathBuf>,
        tcp_host: Option<String>,
        watch_stdin: bool,
        max_drain: usize,
        native: Option<PyRef<'_, OnnxModel>>,
        agent_key: Option<String>,
    ) -> PyResult<Self> {
        if unix_path.is_none() && tcp_host.is_none() {
            return Err(PyValueError::new_err(
                "ReplicaServer needs a unix_path or a tcp_host",
            ));
        }
        init_tracing();
        let keys = replica_keys(agent_key)?;
        // The node's data-plane identity, when it has one: TCP is TLS only.
        let tls = serval_protos::tls::DataPlaneIdentity::from_env()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .map(|identity| identity.acceptor().clone());
        let serves_tls = tls.is_some() && tcp_host.is_some();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("serval-replica-io")
            .enable_all()
            .build()
            .map_err(|e| PyOSError::new_err(format!("cannot start the replica runtime: {e}")))?;
        let (unix, tcp, tcp_addr) = {
            let _enter = runtime.enter();
            let unix = match &unix_path {
                Some(p) => Some(replica_server::bind_unix(p).map_err(|e| {
                    PyOSError::new_err(format!("cannot bind unix socket {}: {e}", p.display()))
                })?),
                None => None,
            };
            let (tcp, tcp_addr) = match &tcp_host {
                Some(host) => {
                    let std_listener = std::net::TcpListener::bind((host.as_str(), 0))
                        .and_then(|l| l.set_nonblocking(true).map(|_| l))
                        .map_err(|e| {
                            PyOSError::new_err(format!("cannot bind tcp {host}:0: {e}"))
                        })?;
                    let addr = std_listener
                        .local_addr()
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    (Some(listener), Some(addr.to_string()))
                }
                None => (None, None),
            };
            (unix, tcp, tcp_addr)
        };
        let wake = Arc::new(
            Wake::new()
                .map_err(|e| PyOSError::new_err(format!("cannot create the wake socket: {e}")))?,
        );
        let max_queued = max_queued()?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(max_queued);
        let (serve_tx, serve_rx) = tokio::sync::oneshot::channel::<()>();
        let mut handler: Arc<dyn Handler> = Arc::new(QueueHandler {
            tx,
            wake: wake.clone(),
        });
        if let Some(model) = native {
            // POSTs are answered by the model in Rust; the rest goes on to Python.
            handler = Arc::new(
                NativeHandler::start(model.model.clone(), model.config.clone(), handler).map_err(
                    |e| PyOSError::new_err(format!("cannot start the model threads: {e}")),
                )?,
            );
        }
        runtime.spawn(replica_server::serve(
            unix,
            tcp,
            tls,
            keys,
            handler,
            async move {
                let _ = serve_rx.await;
            },
        ));
        let stop = Arc::new(StopSignal::new(wake.clone()));
        if watch_stdin {
            let stop = stop.clone();
            // Detached: blocked in read(0) until EOF, which means the agent died.
            std::thread::Builder::new()
                .name("serval-stdin-watch".into())
                .spawn(move || {
                    let mut stdin = std::io::stdin();
                    let mut buf = [0u8; 512];
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(_) => break,
                        }
                    }
                    stop.stop("stdin closed");
                })
                .map_err(|e| PyOSError::new_err(e.to_string()))?;
        }
        let _ = py;
        Ok(Self {
            runtime: Mutex::new(Some(runtime)),
            serve_stop: Mutex::new(Some(serve_tx)),
            rx,
            wake,
            stop,
            unix_path,
            tcp_addr,
            tls: serves_tls,
            max_drain: max_drain.max(1),
            reply_batch: AtomicUsize::new(1),
            max_queued,
        })
    }

    /// Replies a drain gathers per router connection before it writes them
    /// (at least 1; the rest go when the drain ends). Fewer writes, but a
    /// router waits on held replies before it may send this replica more
    /// (`max_concurrent_queries`), so the host sets it from that limit.
    #[getter]
    fn reply_batch(&self) -> usize {
        self.reply_batch.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_reply_batch(&self, n: usize) {
        self.reply_batch.store(n.max(1), Ordering::Relaxed);
    }

    /// What may queue for the Python thread, and so also wait in the host
    /// beyond `max_concurrent_queries` (`SERVAL_REPLICA_MAX_QUEUED`).
    #[getter]
    fn max_queued(&self) -> usize {
        self.max_queued
    }

    #[getter]
    fn unix_path(&self) -> Option<String> {
        self.unix_path.as_ref().map(|p| p.display().to_string())
    }

    #[getter]
    fn tcp_addr(&self) -> Option<String> {
        self.tcp_addr.clone()
    }

    /// Whether `tcp_addr` serves TLS only.
    #[getter]
    fn tls(&self) -> bool {
        self.tls
    }

    #[getter]
    fn wake_fd(&self) -> i32 {
        self.wake.reader.as_raw_fd()
    }

    /// Whether requests wait in the queue for a drain (a stream that has
    /// sent its first chunk looks, to let them start first).
    #[getter]
    fn queued(&self) -> bool {
        !self.rx.is_empty()
    }

    #[getter]
    fn stop_reason(&self) -> Option<String> {
        self.stop.reason()
    }

    /// Hands up to `max_drain` queued requests to the dispatch callables
    /// (see the module docs); returns how many. Call it when `wake_fd` is
    /// readable: it consumes the wake, and wakes the loop again itself when
    /// it leaves requests queued. With `poll_us` and `ready` (the loop's
    /// queue of ready callbacks), once the queue is empty and nothing is
    /// ready on the loop, it polls for more requests that long (GIL
    /// released) and runs what arrived: see [`ReplicaServer::poll_for_job`].
    #[pyo3(signature = (on_http, on_call, on_reconfigure, poll_us = 0, ready = None, on_ws_open = None, on_ws_event = None, on_stream = None, on_grpc = None, on_grpc_message = None))]
    #[allow(clippy::too_many_arguments)]
    fn drain(
        &self,
        py: Python<'_>,
        on_http: Bound<'_, PyAny>,
        on_call: Bound<'_, PyAny>,
        on_reconfigure: Bound<'_, PyAny>,
        poll_us: u64,
        ready: Option<Bound<'_, PyAny>>,
        on_ws_open: Option<Bound<'_, PyAny>>,
        on_ws_event: Option<Bound<'_, PyAny>>,
        on_stream: Option<Bound<'_, PyAny>>,
        on_grpc: Option<Bound<'_, PyAny>>,
        on_grpc_message: Option<Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.wake.clear();
        if self.stop.is_stopped() {
            // `shutdown` answers whatever is still queued.
            return Ok(0);
        }
        let outbox = Outbox::open(self.reply_batch.load(Ordering::Relaxed));
        let mut ran = 0;
        // Once per drain, so the loop gets its turn after each batch.
        let mut poll = Duration::from_micros(poll_us);
        while ran < self.max_drain {
            let Ok(job) = self.rx.try_recv() else {
                // Tasks the requests started (async methods, background
                // tasks) run on the loop: never keep them waiting. Asked
                // only while the poll is still to come.
                if poll.is_zero() || !loop_is_idle(ready.as_ref())? {
                    return Ok(ran);
                }
                outbox.flush();
                if !self.poll_for_job(py, std::mem::take(&mut poll)) {
                    return Ok(ran);
                }
                continue;
            };
            ran += 1;
            let dispatch = Dispatch {
                on_http: &on_http,
                on_call: &on_call,
                on_reconfigure: &on_reconfigure,
                ws: (on_ws_open.as_ref(), on_ws_event.as_ref()),
                on_stream: on_stream.as_ref(),
                on_grpc: on_grpc.as_ref(),
                on_grpc_message: on_grpc_message.as_ref(),
            };
            run_job(py, job, &dispatch)?;
        }
        if !self.rx.is_empty() {
            // Let the loop run ready tasks before the next round.
            self.wake.force();
        }
        Ok(ran)
    }

    /// Blocks (GIL released) until the server stops or `timeout` passes;
    /// runs signal handlers every 100 ms, so SIGINT/SIGTERM handlers raise here.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<String>> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            let step = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(self.stop.reason());
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            let stop = &self.stop;
            if let Some(reason) = py.detach(|| stop.wait(step)) {
                return Ok(Some(reason));
            }
            py.check_signals()?;
        }
    }

    /// Marks the server stopping and wakes the worker loop, which then
    /// runs no new request; replies still go out until `shutdown`.
    #[pyo3(signature = (reason = "shutdown"))]
    fn stop(&self, reason: &str) {
        self.stop.stop(reason);
    }

    /// Stops serving. Safe to call more than once and from any thread.
    #[pyo3(signature = (reason = "shutdown"))]
    fn shutdown(&self, py: Python<'_>, reason: &str) {
        self.stop.stop(reason);
        // Poisoned or not, the `Option`s below are whole: take what is there.
        if let Some(tx) = self
            .serve_stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
        while let Ok(job) = self.rx.try_recv() {
            job.refuse(&unavailable("replica is shutting down"));
        }
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rt) = runtime {
            py.detach(move || {
                // Let the connection writers flush replies already queued
                // (e.g. the 500 for a request whose user code called sys.exit).
                rt.block_on(async { tokio::time::sleep(FLUSH_GRACE).await });
                rt.shutdown_timeout(Duration::from_secs(2))
            });
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        // Normally `shutdown()` already took the runtime; never block here,
        // the GIL may be held (interpreter finalization).
        if let Some(rt) = self.runtime.get_mut().ok().and_then(|r| r.take()) {
            rt.shutdown_background();
        }
    }
}

impl ReplicaServer {
    /// Polls the queue for up to `budget` with the GIL released (under load
    /// the next request is usually microseconds away: see `poll`); whether
    /// a job is queued. While it polls, `pending` is held so the I/O thread
    /// skips writing the wake socket.
    fn poll_for_job(&self, py: Python<'_>, budget: Duration) -> bool {
        self.wake.pending.store(true, Ordering::SeqCst);
        let (rx, stop) = (&self.rx, &self.stop);
        py.detach(|| poll_until(budget, || !rx.is_empty() || stop.is_stopped()));
        // Released before the last look: a job queued after it writes the
        // wake socket, so the loop cannot sleep through it.
        self.wake.pending.store(false, Ordering::SeqCst);
        !self.rx.is_empty()
    }
}

/// Whether the loop's ready queue is known and empty.
fn loop_is_idle(ready: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    match ready {
        Some(ready) => Ok(ready.len()? == 0),
        None => Ok(false),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SERVAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
