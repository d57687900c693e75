//! The control-plane client and the ServeHandle behind `serval.serve`.
//!
//! Every blocking call releases the GIL while it waits. All async work runs
//! on pyo3-async-runtimes' tokio runtime, which also bridges futures to
//! asyncio for `get_handle(sync=False)`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serval_node::replica_server;
use serval_protos::backend_config;
use serval_protos::client::{self as control, Client as ControlClient};
use serval_protos::control::{
    Api, AutoscalingConfig, Backend, BackendConfig, ClusterSnapshot, DeleteBackendRequest, Empty,
    Endpoint, GetBlobRequest, NameRequest, PutBlobRequest, ReplicaModelsReport,
    SetHttpMiddlewaresRequest, SetShadowRequest, SetTrafficRequest, UpdateBackendCodeRequest,
    UpdateBackendConfigRequest, WatchRequest,
};
use serval_protos::frame::{CallRequest, LogsRequest, Payload, Request, Response};
use serval_protos::handshake::{self, Credential, Key, Role};
use serval_protos::states::{BackendState, ReplicaState};
use serval_proxy::routing::{
    spawn_load_reporter, ChunkStream, Reply, Router, RouterConfig, RouterError, StreamError,
    MAX_SHARD_KEY_BYTES,
};
use tokio::sync::watch;

use crate::error::{connect_err, status_err, BackPressureError, ServeError, INVALID_ARGUMENT};
use crate::poll::poll_until;

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// Runs `fut` to completion on the SDK runtime with the GIL released.
pub(crate) fn block_on<F, T>(py: Python<'_>, fut: F) -> T
where
    F: std::future::Future<Output = T> + Send,
    T: Send,
{
    py.detach(|| runtime().block_on(fut))
}

type Snapshots = watch::Receiver<Option<Arc<ClusterSnapshot>>>;

/// Connection to a cluster's controller (one per `serve.start()`/`connect()`).
#[pyclass(module = "serval._native")]
pub struct Client {
    address: String,
    client: ControlClient,
    /// The shared router of every handle from this client, fed by one Watch.
    router: Arc<Router>,
    /// Snapshots the router has already applied: waiting on these (not on
    /// the raw watch) means a handle can use whatever the wait saw.
    applied: Snapshots,
    /// Sends this client's routing load to the autoscaler; ends with it.
    reporter: tokio::task::JoinHandle<()>,
    /// The node agents' key (from the cluster token), from which a
    /// replica's own agent key is derived to read its log.
    agents: Key,
    /// `derive_hex(token, PURPOSE_DOTENV)` (see `dotenv_salt`).
    dotenv_salt: String,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reporter.abort();
    }
}

/// The backend config as the Python layer sends it (JSON, Ray's field names).
#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct PyBackendConfig {
    num_replicas: Option<u32>,
    max_concurrent_queries: Option<u32>,
    user_config: Option<serde_json::Value>,
    max_batch_size: Option<u32>,
    batch_wait_timeout: Option<f64>,
    num_cpus: Option<f64>,
    num_gpus: Option<f64>,
    autoscaling: Option<PyAutoscaling>,
    max_surge: Option<String>,
    max_unavailable: Option<String>,
    max_queued_requests: Option<u32>,
    /// Serval's: GET/HEAD may be retried after a lost replica (default true).
    retry_idempotent: Option<bool>,
    experimental_graceful_shutdown_timeout_s: Option<f64>,
}

/// Cortex's autoscaling knobs (durations in seconds; serve.py converts
/// "60s"/"5m" strings), with Cortex's defaults for those left out.
#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PyAutoscaling {
    min_replicas: u32,
    max_replicas: u32,
    target_replica_concurrency: f64,
    window: f64,
    upscale_stabilization_period: f64,
    downscale_stabilization_period: f64,
    max_upscale_factor: f64,
    max_downscale_factor: f64,
    upscale_tolerance: f64,
    downscale_tolerance: f64,
}

impl Default for PyAutoscaling {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 100,
            target_replica_concurrency: 1.0,
            window: 60.0,
            upscale_stabilization_period: 60.0,
            downscale_stabilization_period: 300.0,
            max_upscale_factor: 1.5,
            max_downscale_factor: 0.75,
            upscale_tolerance: 0.05,
            downscale_tolerance: 0.05,
        }
    }
}

impl From<PyAutoscaling> for AutoscalingConfig {
    fn from(a: PyAutoscaling) -> Self {
        AutoscalingConfig {
            min_replicas: a.min_replicas,
            max_replicas: a.max_replicas,
            target_replica_concurrency: a.target_replica_concurrency,
            window: a.window,
            upscale_stabilization_period: a.upscale_stabilization_period,
            downscale_stabilization_period: a.downscale_stabilization_period,
            max_upscale_factor: a.max_upscale_factor,
            max_downscale_factor: a.max_downscale_factor,
            upscale_tolerance: a.upscale_tolerance,
            downscale_tolerance: a.downscale_tolerance,
        }
    }
}

/// Stores a backend's pickled code as a blob and returns its digest, which
/// `CreateBackend`/`UpdateBackendCode` name: the cluster state never holds
/// code. Always put, never skipped after `HasBlob`: a replica's token (the
/// BatchAPI gateway) may not ask about it, and putting code the cluster is
/// about to collect gives it a new grace (`store::blobs` on the controller).
async fn put_code(c: &mut ControlClient, code: Vec<u8>) -> Result<String, tonic::Status> {
    let digest = serval_protos::blob::digest(&code);
    c.put_blob(PutBlobRequest {
        digest: digest.clone(),
        data: code,
    })
    .await?;
    Ok(digest)
}

fn parse_config(json: &str) -> PyResult<BackendConfig> {
    let c: PyBackendConfig = serde_json::from_str(json)
        .map_err(|e| INVALID_ARGUMENT.new_err(format!("invalid config: {e}")))?;
    let config = BackendConfig {
        num_replicas: c.num_replicas.unwrap_or(1),
        max_concurrent_queries: c.max_concurrent_queries.unwrap_or(0),
        user_config_json: c
            .user_config
            .filter(|v| !v.is_null())
            .map(|v| v.to_string())
            .unwrap_or_default(),
        max_batch_size: c.max_batch_size.unwrap_or(0),
        batch_wait_timeout: c.batch_wait_timeout.unwrap_or(0.0),
        num_cpus: c.num_cpus.unwrap_or(1.0),
        num_gpus: c.num_gpus.unwrap_or(0.0),
        autoscaling: c.autoscaling.map(Into::into),
        max_surge: c.max_surge.unwrap_or_default(),
        max_unavailable: c.max_unavailable.unwrap_or_default(),
        max_queued_requests: c.max_queued_requests.unwrap_or(0),
        no_idempotent_retry: !c.retry_idempotent.unwrap_or(true),
        graceful_shutdown_timeout_s: c
            .experimental_graceful_shutdown_timeout_s
            .unwrap_or(backend_config::DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S),
    };
    // The controller's own check, so a bad config fails here, before the
    // code is sent; what is sent is the config as given (the controller
    // fills the defaults).
    config
        .clone()
        .validate()
        .map_err(|e| INVALID_ARGUMENT.new_err(e.to_string()))?;
    Ok(config)
}

impl Client {
    /// Waits until the watched snapshot satisfies `done`, up to `timeout`.
    fn wait_snapshot<T: Send>(
        &self,
        py: Python<'_>,
        timeout: f64,
        done: impl Fn(&ClusterSnapshot) -> Option<T> + Send + Sync,
    ) -> PyResult<Option<T>> {
        let mut rx = self.applied.clone();
        block_on(py, async move {
            let wait = rx.wait_for(|s| s.as_ref().is_some_and(|s| done(s).is_some()));
            match tokio::time::timeout(Duration::from_secs_f64(timeout.max(0.0)), wait).await {
                Ok(Ok(s)) => Ok(s.as_ref().and_then(|s| done(s))),
                Ok(Err(_)) => Err(ServeError::new_err("the snapshot watch stopped")),
                Err(_) => Ok(None),
            }
        })
    }
}

/// How long `replica_logs` waits for a replica to connect and answer.
const REPLICA_LOGS_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls a handle may queue per backend while every replica is at its
/// `max_concurrent_queries`. Handles wait, as Ray Serve's do (a burst of
/// 10,000 calls all complete); the bound only stops a runaway caller from
/// growing the queue without end. The HTTP
/// proxy's queue is far shorter: a client there gets 503 + Retry-After.
const HANDLE_QUEUE_CAPACITY: usize = 1_000_000;
const HANDLE_QUEUE_CAPACITY_ENV: &str = "SERVAL_HANDLE_QUEUE_CAPACITY";

/// The data-plane key this process's handles prove to replicas: the one a
/// node agent gave this replica process, else the one derived from the
/// cluster token (a driver script, the CLI).
fn data_key(token: &str) -> PyResult<Key> {
    match std::env::var(handshake::DATA_KEY_ENV) {
        Ok(hex) => Key::from_hex(&hex).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{} must be 64 hex digits (set by the node agent)",
                handshake::DATA_KEY_ENV
            ))
        }),
        Err(_) => Ok(Key::data_plane(token)),
    }
}

fn handle_router_config(token: &str) -> PyResult<RouterConfig> {
    let queue_capacity = match std::env::var(HANDLE_QUEUE_CAPACITY_ENV) {
        Err(_) => HANDLE_QUEUE_CAPACITY,
        Ok(v) => v.trim().parse::<usize>().map_err(|_| {
            PyValueError::new_err(format!(
                "{HANDLE_QUEUE_CAPACITY_ENV} must be a non-negative integer, got {v:?}"
            ))
        })?,
    };
    Ok(RouterConfig {
        queue_capacity,
        data_key: Some(data_key(token)?),
        ..RouterConfig::default()
    })
}

#[pymethods]
impl Client {
    /// `token_source` names where the token came from (a flag, an
    /// environment variable, a file) in the error a bad token gets.
    #[new]
    #[pyo3(signature = (address, token, token_source="token"))]
    fn new(py: Python<'_>, address: String, token: String, token_source: &str) -> PyResult<Self> {
        Self::check_token(&token, token_source)?;
        // SERVAL_TLS_CA / SERVAL_TLS_DOMAIN, read at each connect: every
        // control client of this process (this one, its watch, the
        // handles' load reports) then uses TLS.
        let tls = serval_protos::tls::TlsSettings::from_env()
            .map_err(|e| ServeError::new_err(e.to_string()))?;
        serval_protos::tls::set_tls(tls);
        let addr = address.clone();
        let tok = token.clone();
        let client = block_on(py, async move {
            // Fails now, with the reason, when no head answers.
            let first = control::connect(&addr, &tok).await?;
            if control::heads(&addr).len() > 1 {
                // Several heads: calls go to those that accept connections.
                control::connect_lazy(&addr, &tok)
            } else {
                Ok(first)
            }
        })
        .map_err(connect_err)?;
        let router = Arc::new(Router::new(handle_router_config(&token)?));
        let agents = Key::agents(&token);
        let token_for_reports = token.clone();
        let dotenv_salt =
            serval_protos::auth::derive_hex(token.as_bytes(), serval_protos::auth::PURPOSE_DOTENV);
        let snapshots = {
            let _guard = runtime().enter();
            control::spawn_watch(address.clone(), token)
        };
        let mut follow = snapshots;
        let (applied_tx, applied) = watch::channel(None);
        let r = router.clone();
        runtime().spawn(async move {
            loop {
                let snapshot = follow.borrow_and_update().clone();
                if let Some(s) = &snapshot {
                    r.update(s);
                    applied_tx.send_replace(snapshot);
                }
                if follow.changed().await.is_err() {
                    break;
                }
            }
        });
        // Handles count towards autoscaling like proxies do.
        let reporter = {
            let _guard = runtime().enter();
            let source = format!(
                "handle-{}-{}",
                std::process::id(),
                Arc::as_ptr(&router) as usize
            );
            spawn_load_reporter(
                (*router).clone(),
                address.clone(),
                token_for_reports,
                source,
            )
        };
        Ok(Self {
            address,
            client,
            router,
            applied,
            reporter,
            agents,
            dotenv_salt,
        })
    }

    /// Refuses a token that cannot be a cluster token (empty, shorter than
    /// 16 characters, with spaces), naming `token_source` in the error.
    #[staticmethod]
    fn check_token(token: &str, token_source: &str) -> PyResult<()> {
        serval_protos::auth::validate_token(token)
            .map_err(|e| ServeError::new_err(format!("{token_source}: {e}")))
    }

    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// The salt `serve deploy` puts in a project's `.env` blob: the same
    /// for every deploy to this cluster (an unchanged `.env` is the same
    /// blob), unknown to anyone without the cluster token.
    fn dotenv_salt(&self) -> String {
        self.dotenv_salt.clone()
    }

    /// `blobs`: the digests its replicas may fetch with their replica
    /// token (a Cortex API's package and `.env`).
    #[pyo3(signature = (name, code, config_json, blobs = Vec::new()))]
    fn create_backend(
        &self,
        py: Python<'_>,
        name: String,
        code: Vec<u8>,
        config_json: &str,
        blobs: Vec<String>,
    ) -> PyResult<()> {
        let config = parse_config(config_json)?;
        let mut c = self.client.clone();
        block_on(py, async move {
            let backend = Backend {
                name,
                code_digest: put_code(&mut c, code).await?,
                config: Some(config),
                blobs,
                ..Default::default()
            };
            c.create_backend(backend).await
        })
        .map_err(status_err)?;
        Ok(())
    }

    fn update_backend_config(
        &self,
        py: Python<'_>,
        name: String,
        config_json: &str,
    ) -> PyResult<()> {
        let config = parse_config(config_json)?;
        let mut c = self.client.clone();
        block_on(py, async move {
            c.update_backend_config(UpdateBackendConfigRequest {
                name,
                config: Some(config),
            })
            .await
        })
        .map_err(status_err)?;
        Ok(())
    }

    #[pyo3(signature = (name, force=false))]
    fn delete_backend(&self, py: Python<'_>, name: String, force: bool) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move {
            c.delete_backend(DeleteBackendRequest { name, force }).await
        })
        .map_err(status_err)?;
        Ok(())
    }

    /// `blobs` replaces the backend's (see `create_backend`).
    #[pyo3(signature = (name, code, blobs = Vec::new()))]
    fn update_backend_code(
        &self,
        py: Python<'_>,
        name: String,
        code: Vec<u8>,
        blobs: Vec<String>,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move {
            let code_digest = put_code(&mut c, code).await?;
            c.update_backend_code(UpdateBackendCodeRequest {
                name,
                code_digest,
                blobs,
            })
            .await
        })
        .map_err(status_err)?;
        Ok(())
    }

    /// Waits until every replica of `name` runs a version at least
    /// `min_version` ("done"), or a replica of that version failed
    /// ("failed", reason). `min_version` keeps a snapshot from before the
    /// update (all replicas on the old version) from counting as done.
    fn wait_rollout(
        &self,
        py: Python<'_>,
        name: String,
        min_version: u64,
        timeout: f64,
    ) -> PyResult<Option<(String, String)>> {
        self.wait_snapshot(py, timeout, move |s| {
            let b = s
                .backends
                .iter()
                .find(|b| b.name == name && b.version >= min_version)?;
            let replicas: Vec<_> = s.replicas.iter().filter(|r| r.backend == name).collect();
            let want = b
                .config
                .as_ref()
                .map(|c| c.num_replicas as usize)
                .unwrap_or(1);
            if let Some(f) = replicas
                .iter()
                .find(|r| r.backend_version == b.version && r.state == ReplicaState::Failed)
            {
                return Some((ReplicaState::Failed.into(), f.error.clone()));
            }
            let done = replicas.len() == want
                && replicas
                    .iter()
                    .all(|r| r.backend_version == b.version && r.state == ReplicaState::Running);
            done.then(|| ("done".to_string(), String::new()))
        })
    }

    /// Waits until config version `min_version` of `name` (see
    /// `Backend.config_version`) is in place: every running replica reports
    /// it and none is still starting; then "done", or ("failed", the
    /// traceback) when a running replica's `reconfigure` of it raised.
    /// Replicas not running (failed, waiting for a node) start with the
    /// latest config. `None` on timeout.
    fn wait_config(
        &self,
        py: Python<'_>,
        name: String,
        min_version: u64,
        timeout: f64,
    ) -> PyResult<Option<(String, String)>> {
        self.wait_snapshot(py, timeout, move |s| {
            let b = s
                .backends
                .iter()
                .find(|b| b.name == name && b.config_version >= min_version)?;
            let replicas = || s.replicas.iter().filter(|r| r.backend == name);
            let pending = replicas().any(|r| {
                r.state == ReplicaState::Starting
                    || (r.state == ReplicaState::Running && r.config_version < b.config_version)
            });
            if pending {
                return None;
            }
            Some(
                match replicas().find(|r| r.state == ReplicaState::Running && !r.error.is_empty()) {
                    Some(r) => (ReplicaState::Failed.into(), r.error.clone()),
                    None => ("done".to_string(), String::new()),
                },
            )
        })
    }

    /// Replaces the middlewares every proxy runs and waits (up to
    /// `timeout` s) until this client's snapshot carries them; false when
    /// it does not in time.
    fn set_http_middlewares(
        &self,
        py: Python<'_>,
        middlewares_json: String,
        timeout: f64,
    ) -> PyResult<bool> {
        let mut c = self.client.clone();
        let json = middlewares_json.clone();
        block_on(py, async move {
            c.set_http_middlewares(SetHttpMiddlewaresRequest { middlewares_json })
                .await
        })
        .map_err(status_err)?;
        Ok(self
            .wait_snapshot(py, timeout, move |s| {
                let current = s.http_options.as_ref().map_or("", |o| &o.middlewares_json);
                (current == json).then_some(())
            })?
            .is_some())
    }

    fn set_shadow(
        &self,
        py: Python<'_>,
        endpoint: String,
        backend: String,
        proportion: f64,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move {
            c.set_shadow(SetShadowRequest {
                endpoint,
                backend,
                proportion,
            })
            .await
        })
        .map_err(status_err)?;
        Ok(())
    }

    /// `route_is_prefix`: `route` is a Ray Serve 2.x route prefix.
    #[pyo3(signature = (name, backend, route, methods, grpc_service = None, grpc_descriptor = None,
                        route_is_prefix = false))]
    #[allow(clippy::too_many_arguments)]
    fn create_endpoint(
        &self,
        py: Python<'_>,
        name: String,
        backend: String,
        route: Option<String>,
        methods: Vec<String>,
        grpc_service: Option<String>,
        grpc_descriptor: Option<Vec<u8>>,
        route_is_prefix: bool,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        let endpoint = Endpoint {
            name,
            route: route.unwrap_or_default(),
            route_is_prefix,
            methods,
            traffic: [(backend, 1.0)].into_iter().collect(),
            grpc_service: grpc_service.unwrap_or_default(),
            grpc_descriptor: grpc_descriptor.unwrap_or_default(),
            ..Default::default()
        };
        block_on(py, async move { c.create_endpoint(endpoint).await }).map_err(status_err)?;
        Ok(())
    }

    fn delete_endpoint(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(
            py,
            async move { c.delete_endpoint(NameRequest { name }).await },
        )
        .map_err(status_err)?;
        Ok(())
    }

    fn set_traffic(
        &self,
        py: Python<'_>,
        endpoint: String,
        traffic: std::collections::HashMap<String, f64>,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move {
            c.set_traffic(SetTrafficRequest { endpoint, traffic }).await
        })
        .map_err(status_err)?;
        Ok(())
    }

    /// The controller's current state as JSON text.
    fn snapshot_json(&self, py: Python<'_>) -> PyResult<String> {
        let mut c = self.client.clone();
        let snapshot = block_on(py, async move {
            c.get_snapshot(WatchRequest {
                include_code: false,
            })
            .await
        })
        .map_err(status_err)?
        .into_inner();
        serde_json::to_string(&snapshot).map_err(|e| ServeError::new_err(e.to_string()))
    }

    /// Stores `data` in the cluster (content-addressed, raft-replicated)
    /// and returns its digest (lowercase hex sha256). Data the cluster
    /// already holds is not sent again.
    fn put_blob(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<String> {
        let mut c = self.client.clone();
        block_on(py, async move {
            let digest = serval_protos::blob::digest(&data);
            let request = GetBlobRequest {
                digest: digest.clone(),
            };
            if !c.has_blob(request).await?.into_inner().present {
                let request = PutBlobRequest {
                    digest: digest.clone(),
                    data,
                };
                c.put_blob(request).await?;
            }
            Ok::<_, tonic::Status>(digest)
        })
        .map_err(status_err)
    }

    /// The bytes of blob `digest`, from the head this client talks to.
    fn get_blob(&self, py: Python<'_>, digest: String) -> PyResult<Py<PyBytes>> {
        let mut c = self.client.clone();
        let data = block_on(py, async move {
            let mut stream = c.get_blob(GetBlobRequest { digest }).await?.into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await? {
                data.extend_from_slice(&chunk.data);
            }
            Ok::<_, tonic::Status>(data)
        })
        .map_err(status_err)?;
        Ok(PyBytes::new(py, &data).unbind())
    }

    /// Creates or replaces the record of deployed API `name`.
    #[allow(clippy::too_many_arguments)]
    fn put_api(
        &self,
        py: Python<'_>,
        name: String,
        kind: String,
        spec_json: String,
        package_digest: String,
        fingerprint: String,
        deployed_at: f64,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        let api = Api {
            name,
            kind,
            spec_json,
            package_digest,
            fingerprint,
            deployed_at,
        };
        block_on(py, async move { c.put_api(api).await }).map_err(status_err)?;
        Ok(())
    }

    /// The batch-job RPCs (`crate::jobs`).
    fn jobs(&self) -> crate::jobs::Jobs {
        crate::jobs::Jobs {
            client: self.client.clone(),
        }
    }

    fn delete_api(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move { c.delete_api(NameRequest { name }).await })
            .map_err(status_err)?;
        Ok(())
    }

    /// A replica's report of the models it holds (``serval.multiplex``).
    fn report_replica_models(
        &self,
        py: Python<'_>,
        replica_id: String,
        model_ids: Vec<String>,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        let report = ReplicaModelsReport {
            replica_id,
            model_ids,
        };
        block_on(py, async move { c.report_replica_models(report).await }).map_err(status_err)?;
        Ok(())
    }

    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let mut c = self.client.clone();
        block_on(py, async move { c.shutdown(Empty {}).await }).map_err(status_err)?;
        Ok(())
    }

    /// Waits until the backend has settled: `("running", "")` once every
    /// replica has started (each running, or failed and waiting to restart,
    /// with one running), `("failed", reason)` when none runs and one
    /// failed; with `stop_unplaceable`, `("unplaceable", reason)` as soon as
    /// a replica waits for a node with room for it (the controller's
    /// reason, as `serve status` shows it). `None` on timeout. Waiting for
    /// every replica, not the first, means a caller's next requests can
    /// reach them all.
    #[pyo3(signature = (name, timeout, stop_unplaceable=false))]
    fn wait_backend(
        &self,
        py: Python<'_>,
        name: String,
        timeout: f64,
        stop_unplaceable: bool,
    ) -> PyResult<Option<(String, String)>> {
        self.wait_snapshot(py, timeout, move |s| {
            let b = s.backends.iter().find(|b| b.name == name)?;
            if b.state == BackendState::Failed {
                return Some((b.state.clone(), b.error.clone()));
            }
            let mut replicas = s.replicas.iter().filter(|r| r.backend == name);
            if stop_unplaceable {
                if let Some(r) = replicas.clone().find(|r| r.state == ReplicaState::Pending) {
                    return Some(("unplaceable".into(), r.error.clone()));
                }
            }
            let started = replicas
                .all(|r| r.state == ReplicaState::Running || r.state == ReplicaState::Failed);
            (b.state == BackendState::Running && started)
                .then(|| (b.state.clone(), b.error.clone()))
        })
    }

    /// Waits until this client's router knows `endpoint`; false on timeout.
    fn wait_endpoint(&self, py: Python<'_>, endpoint: String, timeout: f64) -> PyResult<bool> {
        Ok(self
            .wait_snapshot(py, timeout, move |s| {
                s.endpoints.iter().any(|e| e.name == endpoint).then_some(())
            })?
            .is_some())
    }

    /// A chunk of a replica's log, read through the replica itself (its
    /// node may be another machine): `(bytes from offset, the log's size)`.
    /// A size below `offset` means the log was truncated or replaced.
    /// Reading a log needs the replica's agent credential, so the cluster
    /// token (a replica's scoped credential cannot read other replicas').
    /// `tls`: the replica record's flag (its TCP address serves TLS).
    #[pyo3(signature = (replica_id, unix_path, tcp_addr, offset, max_bytes=262144, tls=false))]
    #[allow(clippy::too_many_arguments)]
    fn replica_logs(
        &self,
        py: Python<'_>,
        replica_id: String,
        unix_path: String,
        tcp_addr: String,
        offset: u64,
        max_bytes: u32,
        tls: bool,
    ) -> PyResult<(Py<PyBytes>, u64)> {
        let request = LogsRequest { offset, max_bytes };
        let credential = Credential {
            role: Role::Agent,
            key: Key::replica_agent(&self.agents, &replica_id),
        };
        let chunk = block_on(py, async move {
            replica_server::fetch_logs(
                &unix_path,
                &tcp_addr,
                tls,
                &credential,
                request,
                REPLICA_LOGS_TIMEOUT,
            )
            .await
        })
        .map_err(|e| ServeError::new_err(format!("cannot read the replica's log: {e}")))?;
        Ok((PyBytes::new(py, &chunk.bytes).unbind(), chunk.size))
    }

    fn handle(&self, endpoint: String) -> Handle {
        Handle {
            endpoint,
            router: self.router.clone(),
        }
    }
}

/// A ServeHandle's transport: calls go straight to replicas through the
/// same router the HTTP proxy uses.
#[pyclass(module = "serval._native")]
pub struct Handle {
    endpoint: String,
    router: Arc<Router>,
}

type Outcome = Result<Response, RouterError>;
/// (status, headers, body) as Python sees a finished call.
type PyResponse = (u16, Vec<(String, String)>, Py<PyBytes>);

fn request(
    method_name: Option<String>,
    args: Vec<u8>,
    http_method: String,
    headers: Vec<(String, String)>,
) -> Request {
    Request {
        method_name,
        payload: Payload::Call(CallRequest {
            args,
            http_method,
            http_headers: headers,
        }),
    }
}

/// A shard key is bounded as the proxy bounds `X-SERVE-SHARD-KEY`.
fn check_shard_key(key: Option<&str>) -> PyResult<()> {
    match key {
        Some(k) if k.len() > MAX_SHARD_KEY_BYTES => Err(PyValueError::new_err(format!(
            "shard_key is {} bytes; at most {MAX_SHARD_KEY_BYTES}",
            k.len()
        ))),
        _ => Ok(()),
    }
}

/// (status, headers, body) of a finished call, or ServeError for a call that
/// never reached user code (no replica, backpressure, replica died...).
fn outcome_to_py(py: Python<'_>, outcome: &Outcome) -> PyResult<PyResponse> {
    match outcome {
        Ok(r) => Ok((
            r.status,
            r.headers.clone(),
            PyBytes::new(py, &r.body).unbind(),
        )),
        Err(e @ RouterError::Backpressure { .. }) => Err(BackPressureError::new_err(e.to_string())),
        Err(e) => Err(ServeError::new_err(e.to_string())),
    }
}

#[pymethods]
impl Handle {
    #[getter]
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Starts a call; the returned future's `result()` blocks for it.
    /// `shard_key` picks the backend of a traffic split by its hash.
    #[pyo3(signature = (method_name, args, http_method, headers, shard_key=None))]
    fn call(
        &self,
        method_name: Option<String>,
        args: Vec<u8>,
        http_method: String,
        headers: Vec<(String, String)>,
        shard_key: Option<String>,
    ) -> PyResult<CallFuture> {
        check_shard_key(shard_key.as_deref())?;
        let (tx, rx) = watch::channel(None);
        let router = self.router.clone();
        let endpoint = self.endpoint.clone();
        let req = request(method_name, args, http_method, headers);
        runtime().spawn(async move {
            let outcome = router
                .call_sharded(&endpoint, shard_key.as_deref(), req)
                .await;
            tx.send_replace(Some(Arc::new(outcome)));
        });
        Ok(CallFuture { rx })
    }

    /// Starts a streaming call (`handle.options(stream=True)`): its chunks
    /// come from the returned [`StreamCall`] as the replica yields them.
    #[pyo3(signature = (method_name, args, http_method, headers, shard_key=None))]
    fn stream(
        &self,
        method_name: Option<String>,
        args: Vec<u8>,
        http_method: String,
        headers: Vec<(String, String)>,
        shard_key: Option<String>,
    ) -> PyResult<StreamCall> {
        check_shard_key(shard_key.as_deref())?;
        let router = self.router.clone();
        let endpoint = self.endpoint.clone();
        let req = request(method_name, args, http_method, headers);
        let head = runtime().spawn(async move {
            router
                .call_streaming(&endpoint, shard_key.as_deref(), req)
                .await
        });
        Ok(StreamCall {
            state: Arc::new(tokio::sync::Mutex::new(StreamState::Starting(head))),
        })
    }

    /// The same call as an awaitable for asyncio code.
    #[pyo3(signature = (method_name, args, http_method, headers, shard_key=None))]
    fn call_async<'py>(
        &self,
        py: Python<'py>,
        method_name: Option<String>,
        args: Vec<u8>,
        http_method: String,
        headers: Vec<(String, String)>,
        shard_key: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        check_shard_key(shard_key.as_deref())?;
        let router = self.router.clone();
        let endpoint = self.endpoint.clone();
        let req = request(method_name, args, http_method, headers);
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let outcome = router
                .call_sharded(&endpoint, shard_key.as_deref(), req)
                .await;
            Python::attach(|py| outcome_to_py(py, &outcome))
        })
    }
}

enum StreamState {
    /// The call is on its way; its head has not come.
    Starting(tokio::task::JoinHandle<Result<Reply, RouterError>>),
    Open(ChunkStream),
    Done,
}

/// What the next step of a stream gives Python: `("chunk", bytes)`,
/// `("end", None)`, or `("response", (status, headers, body))` when the
/// replica answered with a whole response instead of a stream (an error
/// before the first chunk, or a method that does not stream) or the
/// stream failed with one.
type StreamStep = (&'static str, Option<Py<PyAny>>);

enum Step {
    Chunk(bytes::Bytes),
    End,
    Whole(Response),
}

impl StreamState {
    async fn step(&mut self) -> Result<Step, RouterError> {
        loop {
            match self {
                StreamState::Done => return Ok(Step::End),
                StreamState::Starting(head) => {
                    let reply = match head.await {
                        Ok(reply) => reply,
                        Err(e) => {
                            *self = StreamState::Done;
                            return Err(RouterError::Protocol {
                                replica: String::new(),
                                reason: format!("the call's task failed: {e}"),
                            });
                        }
                    };
                    match reply {
                        Ok(Reply {
                            stream: Some(stream),
                            ..
                        }) => *self = StreamState::Open(stream),
                        Ok(Reply { response, .. }) => {
                            *self = StreamState::Done;
                            return Ok(Step::Whole(response));
                        }
                        Err(e) => {
                            *self = StreamState::Done;
                            return Err(e);
                        }
                    }
                }
                StreamState::Open(stream) => {
                    let next = stream.next().await;
                    let step = match next {
                        Some(Ok(chunk)) => return Ok(Step::Chunk(chunk)),
                        None => Ok(Step::End),
                        Some(Err(StreamError::Failed(response))) => Ok(Step::Whole(response)),
                        Some(Err(StreamError::Lost(reason))) => Err(RouterError::ReplicaDied {
                            replica: String::new(),
                            reason,
                        }),
                    };
                    // Ended: the slot goes back now, not when Python drops us.
                    *self = StreamState::Done;
                    return step;
                }
            }
        }
    }
}

fn step_to_py(py: Python<'_>, step: Result<Step, RouterError>) -> PyResult<StreamStep> {
    match step {
        Ok(Step::Chunk(chunk)) => Ok(("chunk", Some(PyBytes::new(py, &chunk).into_any().unbind()))),
        Ok(Step::End) => Ok(("end", None)),
        Ok(Step::Whole(r)) => {
            let whole = (r.status, r.headers, PyBytes::new(py, &r.body)).into_pyobject(py)?;
            Ok(("response", Some(whole.into_any().unbind())))
        }
        Err(e) => outcome_to_py(py, &Err(e)).map(|_| ("end", None)),
    }
}

/// A streaming handle call (`DeploymentResponseGenerator`'s transport).
/// Dropped or closed before its end, it cancels the replica's generator.
#[pyclass(frozen, module = "serval._native")]
pub struct StreamCall {
    state: Arc<tokio::sync::Mutex<StreamState>>,
}

#[pymethods]
impl StreamCall {
    /// The next step (see [`StreamStep`]), waiting with the GIL released.
    fn next(&self, py: Python<'_>) -> PyResult<StreamStep> {
        let state = self.state.clone();
        let step =
            py.detach(move || runtime().block_on(async move { state.lock().await.step().await }));
        step_to_py(py, step)
    }

    /// `next` as an asyncio awaitable.
    fn next_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let step = state.lock().await.step().await;
            Python::attach(|py| step_to_py(py, step))
        })
    }

    /// Cancels the stream (the replica's generator stops) unless it ended.
    /// A step in progress (another thread or task waiting on `next`) keeps
    /// the stream; it is cancelled when that step's owner lets go.
    fn close(&self) {
        if let Ok(mut state) = self.state.try_lock() {
            if let StreamState::Starting(head) = &*state {
                head.abort();
            }
            *state = StreamState::Done;
        }
    }
}

/// How long `result()` polls for the outcome, yielding its core between
/// looks, before it parks. A sequential call on an idle replica finishes
/// within it; parking and being woken by the runtime instead costs the
/// caller a futex round and the core's wake-up latency, about 40 % of such
/// a call (p50 0.15 -> 0.09 ms on a 2-core host). A longer call pays this
/// much yielded CPU once, then parks.
const RESULT_SPIN: Duration = Duration::from_micros(250);

/// Threads of this process polling at once; the others park at once, so
/// a pool of callers never turns into a pool of spinners taking the cores
/// the runtime needs.
static SPINNING: AtomicUsize = AtomicUsize::new(0);
const MAX_SPINNING: usize = 1;

struct SpinSlot;

impl SpinSlot {
    fn take() -> Option<Self> {
        if SPINNING.fetch_add(1, Ordering::AcqRel) < MAX_SPINNING {
            Some(SpinSlot)
        } else {
            SPINNING.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for SpinSlot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A call's outcome once it has one, shared by every waiter.
type SharedOutcome = watch::Receiver<Option<Arc<Outcome>>>;

fn finished(rx: &SharedOutcome) -> Option<Arc<Outcome>> {
    rx.borrow().clone()
}

/// Polls `rx` for up to [`RESULT_SPIN`] (or `limit`, when shorter) when no
/// other thread is polling; `None` when it is still pending.
fn spin_for_result(rx: &SharedOutcome, limit: Option<Duration>) -> Option<Arc<Outcome>> {
    let _slot = SpinSlot::take()?;
    let mut outcome = None;
    poll_until(limit.map_or(RESULT_SPIN, |l| l.min(RESULT_SPIN)), || {
        outcome = finished(rx);
        outcome.is_some() || rx.has_changed().is_err()
    });
    outcome
}

/// The `ObjectRef` role: a call in flight. Any number of threads and event
/// loops may wait for it, at once or one after another; none holds a lock
/// while it waits, so none can block another that holds the GIL.
#[pyclass(module = "serval._native")]
pub struct CallFuture {
    rx: SharedOutcome,
}

#[pymethods]
impl CallFuture {
    /// Waits (GIL released) up to `timeout` seconds, or forever when None.
    /// A timeout leaves the call running for a later `result()`.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyResponse> {
        let mut rx = self.rx.clone();
        // A timeout too large for a Duration (inf) waits forever.
        let limit = timeout.and_then(|t| Duration::try_from_secs_f64(t.max(0.0)).ok());
        // Ok(None): still running after `limit`; Err: the call was dropped.
        let got: Result<Option<Arc<Outcome>>, ()> = py.detach(move || {
            if let Some(outcome) = finished(&rx).or_else(|| spin_for_result(&rx, limit)) {
                return Ok(Some(outcome));
            }
            runtime().block_on(async move {
                let wait = async {
                    rx.wait_for(Option::is_some)
                        .await
                        .map(|o| o.clone())
                        .map_err(|_| ())
                };
                match limit {
                    Some(t) => tokio::time::timeout(t, wait).await.unwrap_or(Ok(None)),
                    None => wait.await,
                }
            })
        });
        match got {
            Ok(Some(outcome)) => outcome_to_py(py, &outcome),
            Ok(None) => Err(pyo3::exceptions::PyTimeoutError::new_err(
                "the call did not finish in time",
            )),
            Err(()) => Err(ServeError::new_err("the call was dropped")),
        }
    }

    /// The same outcome as an asyncio awaitable, so a sync handle's result
    /// can be awaited inside async code without blocking its event loop.
    fn result_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut rx = self.rx.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .map(|o| o.clone())
                .ok()
                .flatten()
                .ok_or_else(|| ServeError::new_err("the call was dropped"))?;
            Python::attach(|py| outcome_to_py(py, &outcome))
        })
    }

    /// Whether the call has finished (its outcome is there).
    fn done(&self) -> bool {
        finished(&self.rx).is_some()
    }
}

/// The Ray Serve 2.x statuses of the applications in `snapshot_json` (a
/// `Client.snapshot_json()`), as JSON: computed by `serval_head`, as
/// `serve status` shows them.
#[pyfunction]
fn application_statuses(snapshot_json: &str) -> PyResult<String> {
    let snapshot: ClusterSnapshot = serde_json::from_str(snapshot_json)
        .map_err(|e| PyValueError::new_err(format!("not a cluster snapshot: {e}")))?;
    serde_json::to_string(&serval_head::applications::statuses(&snapshot))
        .map_err(|e| ServeError::new_err(e.to_string()))
}

/// Runs the `serve` command line in this process (the console script).
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>, relaunch: Vec<String>) -> PyResult<i32> {
    match py.detach(|| serval_head::main_with(argv, relaunch)) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(1)
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Handle>()?;
    m.add_class::<CallFuture>()?;
    m.add_class::<StreamCall>()?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(application_statuses, m)?)?;
    Ok(())
}
