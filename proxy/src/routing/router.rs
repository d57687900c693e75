//! The Router: endpoint -> backend -> replica, shared by the HTTP proxy and
//! the Python ServeHandle.
//!
//! `call` walks the request path:
//! 1. endpoint -> backend by a weighted draw over its traffic, plus a
//!    fire-and-forget copy to each shadow backend (drawn by its proportion);
//!    the draw is random, or, for a call with a shard key, a point fixed by
//!    the key's hash, so one key always reaches the same backend while the
//!    traffic stays as it is (Ray Serve 1.x's shard keys);
//! 2. backend -> replica by the [`ReplicaChoice`] policy (power of two
//!    choices), never above `max_concurrent_queries` in flight per replica;
//! 3. when every replica is full, a wait in a bounded per-backend queue,
//!    woken when a slot frees; a full queue is [`RouterError::Backpressure`];
//! 4. the request goes out on the replica's multiplexed connection;
//! 5. a request whose connection breaks before any response byte arrives is
//!    sent once more, to another replica, when that is safe: it was never
//!    handed to the connection (already known broken), or it is an HTTP GET
//!    or HEAD and its backend did not turn `retry_idempotent` off. One retry
//!    per call, within its deadline; a streamed reply whose head arrived is
//!    never retried. Counted in `serval_router_retries_total{backend}`.
//!
//! In-flight counts are kept exact by [`InFlight`], a guard whose `Drop`
//! releases the slot on every path, including the caller's future being
//! dropped when an HTTP client disconnects.
//!
//! Metrics (`router_metrics`, names in `crate::metrics`): each backend and replica keeps its metric
//! handles; `call` records the outcome and latency per backend, the guards
//! keep the queue-length and in-flight gauges, and a replica's batch-size
//! header is recorded and removed from the response.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use serval_protos::control::ClusterSnapshot;
use serval_protos::frame::{Payload, Request, Response};
use serval_protos::handshake::Key;
use serval_protos::states::ReplicaState;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::policy::{PowerOfTwoChoices, ReplicaChoice};
use super::replica_conn::{Availability, ConnError, ReplicaConn, Reply, StreamError, WsSession};
use super::router_metrics::{self, outcome_of, BackendMetrics};
use crate::metrics::Outcome;

mod models;
#[cfg(test)]
mod tests;

/// Ray Serve's default `max_concurrent_queries`, used when a backend says 0.
const DEFAULT_MAX_CONCURRENT_QUERIES: usize =
    serval_protos::backend_config::DEFAULT_MAX_CONCURRENT_QUERIES as usize;
/// The longest shard key a call may carry (`X-SERVE-SHARD-KEY`,
/// `handle.options(shard_key=...)`): client input, so bounded; a longer one
/// is refused where it enters (400, ValueError).
pub const MAX_SHARD_KEY_BYTES: usize = 1024;

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Deadline of one call, queueing included.
    pub request_timeout: Duration,
    /// Requests that may wait per backend when every replica is full.
    pub queue_capacity: usize,
    /// How long a call waits for an endpoint with no running replica.
    pub no_replica_timeout: Duration,
    /// The cluster's data-plane key, proved to every replica before a
    /// request is sent (`Key::data_plane(token)`). `None`: no replica can
    /// be reached.
    pub data_key: Option<Key>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            queue_capacity: 1000,
            no_replica_timeout: Duration::from_secs(10),
            data_key: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("unknown endpoint {0:?}")]
    UnknownEndpoint(String),
    #[error("endpoint {endpoint:?} has no running replica")]
    NoReplica { endpoint: String },
    #[error("backend {backend:?} is overloaded: every replica is at its limit and {queued} requests are queued")]
    Backpressure { backend: String, queued: usize },
    #[error("replica {replica} died during the request: {reason}")]
    ReplicaDied { replica: String, reason: String },
    #[error("request timed out after {after:?}")]
    Timeout { after: Duration },
    /// The request could not be encoded or the response decoded.
    #[error("replica {replica}: {reason}")]
    Protocol { replica: String, reason: String },
}

/// One backend's live numbers, for the dashboard.
#[derive(Debug, Default)]
pub(crate) struct BackendStats {
    pub in_flight: HashMap<String, usize>,
    pub queued: usize,
    pub last_batch_size: u32,
}

/// One routable replica; kept across snapshots by id, with its connection
/// and in-flight count.
struct Replica {
    id: String,
    in_flight: AtomicUsize,
    /// `serval_replica_in_flight{backend,replica}`, kept with `in_flight`.
    in_flight_gauge: ::metrics::Gauge,
    conn: ReplicaConn,
    /// "host:port" of its gRPC server; empty unless it serves a gRPC API.
    grpc_addr: String,
    /// The model ids it last reported holding (`models`).
    models: models::ReplicaModels,
}

/// One backend's replicas and queue. Kept across snapshots by name so
/// queued waiters stay attached to the live state.
struct Backend {
    name: String,
    /// Swapped whole on update; readers clone the Arc and never hold the lock.
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    max_concurrent: AtomicUsize,
    /// Requests waiting for a slot (bounded by `queue_capacity`, and by
    /// `max_queued` when the backend sets it).
    queued: AtomicUsize,
    /// The backend's own bound on `queued` (`max_queued_requests`); 0: none.
    max_queued: AtomicUsize,
    /// Whether its GET and HEAD requests may be sent again after their
    /// replica was lost mid-request (`retry_idempotent`, on by default).
    retry_idempotent: AtomicBool,
    /// Requests waiting for the backend to have any routable replica (a
    /// backend scaled to zero, or starting): load the autoscaler must see.
    awaiting_replica: AtomicUsize,
    /// Woken (one waiter) when a slot frees and (all) when replicas change.
    slot_freed: Notify,
    /// Whether a replica of it ever reported models: only then is a
    /// request looked at for the model it names.
    reports_models: std::sync::atomic::AtomicBool,
    metrics: BackendMetrics,
}

impl Backend {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            replicas: RwLock::new(Arc::default()),
            max_concurrent: AtomicUsize::new(DEFAULT_MAX_CONCURRENT_QUERIES),
            queued: AtomicUsize::new(0),
            max_queued: AtomicUsize::new(0),
            retry_idempotent: AtomicBool::new(true),
            awaiting_replica: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            reports_models: Default::default(),
            metrics: BackendMetrics::new(name),
        }
    }

    fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        read(&self.replicas).clone()
    }
}

struct EndpointRoute {
    /// Sorted by backend name so a draw is deterministic in its weights.
    traffic: Vec<(String, f64)>,
    shadow: Vec<(String, f64)>,
}

#[derive(Default)]
struct Table {
    endpoints: HashMap<String, EndpointRoute>,
    backends: HashMap<String, Arc<Backend>>,
}

struct Inner {
    config: RouterConfig,
    policy: Box<dyn ReplicaChoice>,
    table: RwLock<Arc<Table>>,
    /// Serialises `update` so two snapshots never interleave.
    updating: Mutex<()>,
    /// Bumped on every update: calls waiting for a replica watch it.
    updates: watch::Sender<u64>,
}

/// Routes calls to replicas; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Why one attempt on a backend did not produce a response.
enum Attempt {
    /// No replica can take requests now; retry after this instant (a
    /// backoff ending) or a snapshot update.
    NoRoutable(Option<Instant>),
    Failed(RouterError),
}

/// Whether an attempt may wait in the backend's queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queueing {
    Wait,
    /// Shadow copies take a free slot or are dropped: they must never take
    /// queue room from real requests.
    NoWait,
}

impl Router {
    pub fn new(config: RouterConfig) -> Self {
        Self::with_policy(config, Box::new(PowerOfTwoChoices))
    }

    pub fn with_policy(config: RouterConfig, policy: Box<dyn ReplicaChoice>) -> Self {
        let (updates, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                config,
                policy,
                table: RwLock::new(Arc::default()),
                updating: Mutex::new(()),
                updates,
            }),
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    pub fn has_endpoint(&self, name: &str) -> bool {
        self.table().endpoints.contains_key(name)
    }

    /// Requests in flight on the replicas of `backend` (0 if unknown).
    /// Whether a backend `endpoint` sends traffic to has a running replica.
    pub fn has_running_replica(&self, endpoint: &str) -> bool {
        let table = self.table();
        table.endpoints.get(endpoint).is_some_and(|route| {
            route.traffic.iter().any(|(name, weight)| {
                *weight > 0.0
                    && table
                        .backends
                        .get(name)
                        .is_some_and(|b| !b.replicas().is_empty())
            })
        })
    }

    pub fn in_flight(&self, backend: &str) -> usize {
        self.table().backends.get(backend).map_or(0, |b| {
            b.replicas()
                .iter()
                .map(|r| r.in_flight.load(Ordering::Relaxed))
                .sum()
        })
    }

    /// What the dashboard shows of each backend: requests in flight on
    /// each of its replicas (by replica id), queued, and the last batch
    /// size a replica reported (0: none yet).
    pub(crate) fn backend_stats(&self) -> HashMap<String, BackendStats> {
        self.table()
            .backends
            .values()
            .map(|b| {
                let stats = BackendStats {
                    in_flight: b
                        .replicas()
                        .iter()
                        .map(|r| (r.id.clone(), r.in_flight.load(Ordering::Relaxed)))
                        .collect(),
                    queued: b.queued.load(Ordering::Relaxed),
                    last_batch_size: b.metrics.last_batch_size(),
                };
                (b.name.clone(), stats)
            })
            .collect()
    }

    /// Requests waiting in `backend`'s queue (0 if unknown).
    pub fn queued(&self, backend: &str) -> usize {
        self.table()
            .backends
            .get(backend)
            .map_or(0, |b| b.queued.load(Ordering::Relaxed))
    }

    /// Every backend's load as the autoscaler counts it: requests in flight
    /// on its replicas, queued for a slot, or waiting for a replica at all.
    pub fn load(&self) -> Vec<(String, f64)> {
        self.table()
            .backends
            .values()
            .map(|b| {
                let in_flight: usize = b
                    .replicas()
                    .iter()
                    .map(|r| r.in_flight.load(Ordering::Relaxed))
                    .sum();
                let waiting =
                    b.queued.load(Ordering::Relaxed) + b.awaiting_replica.load(Ordering::Relaxed);
                (b.name.clone(), (in_flight + waiting) as f64)
            })
            .collect()
    }

    fn table(&self) -> Arc<Table> {
        read(&self.inner.table).clone()
    }

    /// Rebuilds endpoints and replica sets from a snapshot, keeping the
    /// connections and counters of replicas that stay.
    pub fn update(&self, snapshot: &ClusterSnapshot) {
        let _serial = self
            .inner
            .updating
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let old = self.table();
        let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
        let mut backend = |name: &str| -> Arc<Backend> {
            backends
                .entry(name.to_owned())
                .or_insert_with(|| {
                    old.backends
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Backend::new(name)))
                })
                .clone()
        };

        for b in &snapshot.backends {
            let limit = b
                .config
                .as_ref()
                .map_or(0, |c| c.max_concurrent_queries as usize);
            let limit = if limit == 0 {
                DEFAULT_MAX_CONCURRENT_QUERIES
            } else {
                limit
            };
            let max_queued = b
                .config
                .as_ref()
                .map_or(0, |c| c.max_queued_requests as usize);
            let state = backend(&b.name);
            state.max_concurrent.store(limit, Ordering::Relaxed);
            state.max_queued.store(max_queued, Ordering::Relaxed);
            let no_retry = b.config.as_ref().is_some_and(|c| c.no_idempotent_retry);
            state.retry_idempotent.store(!no_retry, Ordering::Relaxed);
        }
        let mut running: HashMap<String, Vec<Arc<Replica>>> = HashMap::new();
        for r in snapshot
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
        {
            let b = backend(&r.backend);
            let existing = b.replicas().iter().find(|x| x.id == r.id).cloned();
            let replica = match existing {
                Some(x)
                    if x.conn.same_target(&r.unix_path, &r.tcp_addr, r.tls)
                        && x.grpc_addr == r.grpc_addr =>
                {
                    x
                }
                _ => Arc::new(Replica {
                    id: r.id.clone(),
                    in_flight: AtomicUsize::new(0),
                    in_flight_gauge: router_metrics::replica_in_flight(&r.backend, &r.id),
                    conn: ReplicaConn::new(
                        &r.id,
                        &r.unix_path,
                        &r.tcp_addr,
                        r.tls,
                        self.inner.config.data_key,
                    ),
                    grpc_addr: r.grpc_addr.clone(),
                    models: Default::default(),
                }),
            };
            if replica.models.update_from_snapshot(&r.model_ids) {
                b.reports_models.store(true, Ordering::Relaxed);
            }
            running.entry(r.backend.clone()).or_default().push(replica);
        }
        let mut endpoints = HashMap::new();
        for e in &snapshot.endpoints {
            let sorted = |m: &HashMap<String, f64>| {
                let mut v: Vec<(String, f64)> = m.iter().map(|(k, w)| (k.clone(), *w)).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            for name in e.traffic.keys().chain(e.shadow.keys()) {
                backend(name);
            }
            endpoints.insert(
                e.name.clone(),
                EndpointRoute {
                    traffic: sorted(&e.traffic),
                    shadow: sorted(&e.shadow),
                },
            );
        }

        for (name, b) in &backends {
            // A removed endpoint's series go with its counters.
            b.metrics.retain_endpoints(|e| endpoints.contains_key(e));
            let mut list = running.remove(name).unwrap_or_default();
            list.sort_by(|a, b| a.id.cmp(&b.id));
            *write(&b.replicas) = Arc::new(list);
            // Waiters re-check: replicas or limits may have changed.
            b.slot_freed.notify_waiters();
        }
        for (name, b) in &old.backends {
            if !backends.contains_key(name) {
                *write(&b.replicas) = Arc::default();
                b.slot_freed.notify_waiters();
            }
        }
        *write(&self.inner.table) = Arc::new(Table {
            endpoints,
            backends,
        });
        self.inner.updates.send_modify(|v| *v += 1);
    }

    /// Sends `request` to a replica of `endpoint` and waits for its response.
    pub async fn call(&self, endpoint: &str, request: Request) -> Result<Response, RouterError> {
        self.call_sharded(endpoint, None, request).await
    }

    /// `call`, with the backend drawn by `shard_key` when one is given: the
    /// same key reaches the same backend for as long as the endpoint's
    /// traffic weights stay (the replica within it is still chosen by load).
    /// A streamed reply is read to its end (up to the frame size limit).
    pub async fn call_sharded(
        &self,
        endpoint: &str,
        shard_key: Option<&str>,
        request: Request,
    ) -> Result<Response, RouterError> {
        let Reply {
            mut response,
            stream,
        } = self.call_streaming(endpoint, shard_key, request).await?;
        let Some(mut stream) = stream else {
            return Ok(response);
        };
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk)
                    if response.body.len() + chunk.len() <= serval_protos::frame::MAX_FRAME_LEN =>
                {
                    response.body.extend_from_slice(&chunk)
                }
                Ok(_) => {
                    return Err(RouterError::Protocol {
                        replica: String::new(),
                        reason: "a streamed reply exceeded the frame size limit".into(),
                    })
                }
                Err(StreamError::Failed(failed)) => return Ok(failed),
                Err(StreamError::Lost(reason)) => {
                    return Err(RouterError::ReplicaDied {
                        replica: String::new(),
                        reason,
                    })
                }
            }
        }
        Ok(response)
    }

    /// `call_sharded`, with a streamed reply handed on as it comes: its
    /// chunks in [`Reply::stream`], which holds the replica's slot until it
    /// is dropped. A stream is counted in the metrics when it ends.
    pub async fn call_streaming(
        &self,
        endpoint: &str,
        shard_key: Option<&str>,
        request: Request,
    ) -> Result<Reply, RouterError> {
        let start = Instant::now();
        let mut chosen = None;
        let point = shard_key.map(shard_point);
        let mut result = self
            .route(endpoint, request, point, start, &mut chosen)
            .await;
        // Counted under the backend last drawn; a call that found no
        // backend at all (unknown endpoint, all weights zero) is not.
        let Some(backend) = chosen else {
            return result;
        };
        match &mut result {
            Ok(Reply {
                response,
                stream: Some(stream),
            }) => {
                let status = response.status;
                let endpoint = endpoint.to_owned();
                stream.on_end(move |completed| {
                    let outcome = if completed {
                        Outcome::of_status(status)
                    } else {
                        Outcome::of_status(500)
                    };
                    backend.metrics.record(&endpoint, outcome, start.elapsed());
                });
            }
            Ok(reply) => {
                let outcome = Outcome::of_status(reply.response.status);
                backend.metrics.record(endpoint, outcome, start.elapsed());
            }
            Err(e) => {
                let outcome = outcome_of(&Err(e.clone()));
                backend.metrics.record(endpoint, outcome, start.elapsed());
            }
        }
        result
    }

    /// `call`'s walk; `chosen` is left holding the backend last drawn.
    async fn route(
        &self,
        endpoint: &str,
        request: Request,
        point: Option<f64>,
        start: Instant,
        chosen: &mut Option<Arc<Backend>>,
    ) -> Result<Reply, RouterError> {
        let mut shadows_sent = false;
        // One retry per call, across the walk's rounds and backends.
        let retried = AtomicBool::new(false);
        self.walk(
            endpoint,
            point,
            start,
            chosen,
            |table, route, deadline| {
                if !shadows_sent {
                    shadows_sent = true;
                    self.send_shadows(table, route, &request, point, deadline);
                }
            },
            |backend, deadline| {
                let request = &request;
                let retried = &retried;
                async move {
                    self.call_backend(&backend, request, deadline, Queueing::Wait, retried)
                        .await
                }
            },
        )
        .await
    }

    /// A slot on one replica of `endpoint` for a call its caller carries
    /// itself (a gRPC call, forwarded as an HTTP/2 stream): the same
    /// traffic draw, per-replica limit and bounded queue as `call`, and
    /// the slot counts as in flight until the [`Reservation`] is dropped
    /// (an open stream is load). No shadow copies: a stream cannot be
    /// duplicated after the fact.
    pub async fn reserve(&self, endpoint: &str) -> Result<Reservation, RouterError> {
        let start = Instant::now();
        let mut chosen = None;
        let slot = self
            .walk(
                endpoint,
                None,
                start,
                &mut chosen,
                |_, _, _| {},
                |backend, deadline| async move {
                    self.acquire(&backend, deadline, Queueing::Wait, None).await
                },
            )
            .await?;
        Ok(Reservation { slot })
    }

    /// A slot for a WebSocket session: as [`Router::reserve`], except that
    /// a backend whose replicas are all at their limit refuses at once
    /// ([`RouterError::Backpressure`], 503 with Retry-After) instead of
    /// queueing the upgrade. The session holds the slot while it is open.
    pub async fn reserve_now(&self, endpoint: &str) -> Result<Reservation, RouterError> {
        let start = Instant::now();
        let mut chosen = None;
        let slot = self
            .walk(
                endpoint,
                None,
                start,
                &mut chosen,
                |_, _, _| {},
                |backend, deadline| async move {
                    self.acquire(&backend, deadline, Queueing::NoWait, None)
                        .await
                },
            )
            .await?;
        Ok(Reservation { slot })
    }

    /// Draws a backend of `endpoint` (at `point` in [0, 1) when given, else
    /// at random) and runs `attempt` on it until it succeeds or fails for
    /// good, waiting (never polling) for a routable replica while there is
    /// none. `on_route` sees the route on every round (shadows); `chosen` is
    /// left holding the backend last drawn.
    async fn walk<T, F>(
        &self,
        endpoint: &str,
        point: Option<f64>,
        start: Instant,
        chosen: &mut Option<Arc<Backend>>,
        mut on_route: impl FnMut(&Table, &EndpointRoute, Instant),
        mut attempt: impl FnMut(Arc<Backend>, Instant) -> F,
    ) -> Result<T, RouterError>
    where
        F: std::future::Future<Output = Result<T, Attempt>>,
    {
        let deadline = start + self.inner.config.request_timeout;
        let no_replica_deadline = (start + self.inner.config.no_replica_timeout).min(deadline);
        let mut updates = self.inner.updates.subscribe();
        loop {
            let table = self.table();
            let route = table
                .endpoints
                .get(endpoint)
                .ok_or_else(|| RouterError::UnknownEndpoint(endpoint.to_owned()))?;
            on_route(&table, route, deadline);
            let point = point.unwrap_or_else(|| rand::rng().random_range(0.0..1.0));
            let drawn = draw(&route.traffic, point)
                .and_then(|name| table.backends.get(name))
                .cloned();
            drop(table);
            if drawn.is_some() {
                chosen.clone_from(&drawn);
            }
            let mut retry_at = None;
            let mut _awaiting = None;
            if let Some(backend) = drawn {
                match attempt(backend.clone(), deadline).await {
                    Ok(response) => return Ok(response),
                    Err(Attempt::Failed(e)) => return Err(e),
                    Err(Attempt::NoRoutable(at)) => {
                        retry_at = at;
                        _awaiting = Some(AwaitingReplica::new(backend));
                    }
                }
            }
            // Nothing routable: wait for the controller to report a replica
            // (or for a backoff to end), never a polling sleep.
            if Instant::now() >= no_replica_deadline {
                return Err(RouterError::NoReplica {
                    endpoint: endpoint.to_owned(),
                });
            }
            let wake = retry_at.map_or(no_replica_deadline, |t| t.min(no_replica_deadline));
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(wake).await;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn send_shadows(
        &self,
        table: &Table,
        route: &EndpointRoute,
        request: &Request,
        point: Option<f64>,
        deadline: Instant,
    ) {
        for (name, proportion) in &route.shadow {
            if *proportion <= 0.0 {
                continue;
            }
            // A sharded call's key also decides its shadow copies.
            let copied = match point {
                Some(point) => point < *proportion,
                None => {
                    proportion.is_nan()
                        || *proportion >= 1.0
                        || rand::rng().random_bool(*proportion)
                }
            };
            if !copied {
                continue;
            }
            let Some(backend) = table.backends.get(name).cloned() else {
                continue;
            };
            let router = self.clone();
            let copy = request.clone();
            tokio::spawn(async move {
                // A shadow copy is never retried: nobody waits for it.
                let retried = AtomicBool::new(true);
                match router
                    .call_backend(&backend, &copy, deadline, Queueing::NoWait, &retried)
                    .await
                {
                    Ok(_) => {}
                    Err(Attempt::NoRoutable(_)) => {
                        tracing::debug!(backend = %backend.name, "shadow dropped: no replica")
                    }
                    Err(Attempt::Failed(e)) => {
                        tracing::debug!(backend = %backend.name, error = %e, "shadow failed")
                    }
                }
            });
        }
    }

    /// One call on `backend`; `retried` is set once the call's one retry
    /// after a lost connection is spent.
    async fn call_backend(
        &self,
        backend: &Arc<Backend>,
        request: &Request,
        deadline: Instant,
        queueing: Queueing,
        retried: &AtomicBool,
    ) -> Result<Reply, Attempt> {
        loop {
            let model = if backend.reports_models.load(Ordering::Relaxed) {
                models::model_id_of(request)
            } else {
                None
            };
            let slot = self
                .acquire(backend, deadline, queueing, model.as_deref())
                .await?;
            let replica = &slot.replica.id;
            let result = slot.replica.conn.request(request, deadline).await;
            let never_sent = matches!(result, Err(ConnError::NotSent(_)));
            return match result {
                Ok(mut reply) => {
                    backend.metrics.take_batch_size(&mut reply.response);
                    if slot.replica.models.take_report(&mut reply.response) {
                        backend.reports_models.store(true, Ordering::Relaxed);
                    }
                    if let Some(stream) = &mut reply.stream {
                        // An open stream is load on its replica.
                        stream.hold(slot);
                    }
                    Ok(reply)
                }
                // Never sent, and that replica is now backing off: try another.
                Err(ConnError::Connect(reason)) => {
                    tracing::debug!(%replica, %reason, "replica unreachable; choosing another");
                    continue;
                }
                // Lost before any response byte, and safe to send again:
                // the broken connection put its replica in backoff, so
                // `acquire` chooses another (or waits, within the deadline,
                // for one to become routable).
                Err(ConnError::NotSent(reason) | ConnError::Died(reason))
                    if (never_sent || retry_idempotent(backend, request))
                        && !retried.swap(true, Ordering::Relaxed) =>
                {
                    tracing::info!(%replica, %reason, "replica lost before it answered; retrying on another");
                    backend.metrics.retried();
                    continue;
                }
                Err(ConnError::NotSent(reason) | ConnError::Died(reason)) => {
                    Err(Attempt::Failed(RouterError::ReplicaDied {
                        replica: replica.clone(),
                        reason,
                    }))
                }
                Err(ConnError::Timeout) => Err(Attempt::Failed(RouterError::Timeout {
                    after: self.inner.config.request_timeout,
                })),
                Err(e @ (ConnError::Encode(_) | ConnError::Protocol(_))) => {
                    Err(Attempt::Failed(RouterError::Protocol {
                        replica: replica.clone(),
                        reason: e.to_string(),
                    }))
                }
            };
        }
    }

    /// Reserves a slot on one replica of `backend`, waiting in the bounded
    /// queue while every routable replica is at its limit. With a `model`,
    /// the least loaded replica holding it that has room is preferred;
    /// without one (or none holding it with room) the policy chooses, and
    /// the chosen replica loads the model.
    async fn acquire(
        &self,
        backend: &Arc<Backend>,
        deadline: Instant,
        queueing: Queueing,
        model: Option<&str>,
    ) -> Result<InFlight, Attempt> {
        let mut ticket: Option<QueueTicket> = None;
        loop {
            // Registered before looking, so a slot freed between the look
            // and the wait still wakes us.
            let notified = backend.slot_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let replicas = backend.replicas();
            let limit = backend.max_concurrent.load(Ordering::Relaxed);
            let now = Instant::now();
            let mut routable = false;
            let mut retry_at: Option<Instant> = None;
            let loads: Vec<Option<usize>> = replicas
                .iter()
                .map(|r| match r.conn.available(now) {
                    Availability::Available => {
                        routable = true;
                        let n = r.in_flight.load(Ordering::Acquire);
                        (n < limit).then_some(n)
                    }
                    Availability::BackoffUntil(t) => {
                        retry_at = Some(retry_at.map_or(t, |r: Instant| r.min(t)));
                        None
                    }
                })
                .collect();
            if !routable {
                return Err(Attempt::NoRoutable(retry_at));
            }
            let holding = model.and_then(|id| {
                (0..replicas.len())
                    .filter(|&i| loads[i].is_some() && replicas[i].models.holds(id))
                    .min_by_key(|&i| loads[i])
            });
            if let Some(i) = holding.or_else(|| self.inner.policy.choose(&loads)) {
                if let Some(slot) = InFlight::try_acquire(&replicas[i], backend, limit) {
                    return Ok(slot);
                }
                // Another request took the last slot first: look again.
                continue;
            }
            if queueing == Queueing::NoWait {
                return Err(Attempt::Failed(RouterError::Backpressure {
                    backend: backend.name.clone(),
                    queued: backend.queued.load(Ordering::Relaxed),
                }));
            }
            if ticket.is_none() {
                ticket = Some(
                    QueueTicket::join(backend, self.inner.config.queue_capacity)
                        .map_err(Attempt::Failed)?,
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Attempt::Failed(RouterError::Timeout {
                    after: self.inner.config.request_timeout,
                }));
            }
        }
    }
}

/// Whether `request` may be sent again after its replica was lost before
/// answering: an HTTP GET or HEAD, unless its backend said otherwise.
fn retry_idempotent(backend: &Backend, request: &Request) -> bool {
    matches!(&request.payload, Payload::Http(h) if h.method == "GET" || h.method == "HEAD")
        && backend.retry_idempotent.load(Ordering::Relaxed)
}

/// A slot reserved by [`Router::reserve`]: which replica, and where its
/// gRPC server listens. Dropping it frees the slot.
pub struct Reservation {
    slot: InFlight,
}

impl Reservation {
    pub fn replica_id(&self) -> &str {
        &self.slot.replica.id
    }

    /// Empty when the replica serves no gRPC API.
    pub fn grpc_addr(&self) -> &str {
        &self.slot.replica.grpc_addr
    }

    /// Whether the replica's servers (gRPC included) speak TLS only.
    pub fn tls(&self) -> bool {
        self.slot.replica.conn.tls()
    }

    pub fn backend(&self) -> &str {
        &self.slot.backend.name
    }

    /// Opens a WebSocket session on the reserved replica (`request` carries
    /// a `WsOpen`); the first frame of its `rx` is the app's answer.
    pub(crate) async fn open_websocket(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<WsSession, RouterError> {
        let replica = &self.slot.replica;
        let deadline = Instant::now() + timeout;
        replica
            .conn
            .open_websocket(request, deadline)
            .await
            .map_err(|e| self.failed(e, timeout))
    }

    /// Sends `request` (a `Grpc` call) to the reserved replica and waits
    /// for its answer until `deadline`. The slot stays held until the
    /// reservation is dropped.
    pub(crate) async fn request(
        &self,
        request: &Request,
        deadline: Instant,
    ) -> Result<Reply, RouterError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.slot
            .replica
            .conn
            .request(request, deadline)
            .await
            .map_err(|e| self.failed(e, timeout))
    }

    /// A connection's failure as the router reports it.
    fn failed(&self, e: ConnError, timeout: Duration) -> RouterError {
        let replica = self.slot.replica.id.clone();
        match e {
            ConnError::Timeout => RouterError::Timeout { after: timeout },
            ConnError::Encode(reason) | ConnError::Protocol(reason) => {
                RouterError::Protocol { replica, reason }
            }
            ConnError::Connect(reason) | ConnError::NotSent(reason) | ConnError::Died(reason) => {
                RouterError::ReplicaDied { replica, reason }
            }
        }
    }

    /// Counts a session the app accepted (`serval_websocket_sessions_total`).
    pub(crate) fn websocket_opened(&self) {
        self.slot.backend.metrics.websocket_opened();
    }
}

/// A reserved slot on one replica; releasing it wakes one queued waiter.
struct InFlight {
    replica: Arc<Replica>,
    backend: Arc<Backend>,
}

impl InFlight {
    fn try_acquire(replica: &Arc<Replica>, backend: &Arc<Backend>, limit: usize) -> Option<Self> {
        replica
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| {
                replica.in_flight_gauge.increment(1.0);
                Self {
                    replica: replica.clone(),
                    backend: backend.clone(),
                }
            })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.replica.in_flight_gauge.decrement(1.0);
        self.backend.slot_freed.notify_one();
    }
}

/// A place in a backend's bounded queue, given back on drop.
struct QueueTicket {
    backend: Arc<Backend>,
}

impl QueueTicket {
    fn join(backend: &Arc<Backend>, capacity: usize) -> Result<Self, RouterError> {
        let capacity = match backend.max_queued.load(Ordering::Relaxed) {
            0 => capacity,
            own => own.min(capacity),
        };
        backend
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map(|_| {
                backend.metrics.queue_joined();
                Self {
                    backend: backend.clone(),
                }
            })
            .map_err(|queued| RouterError::Backpressure {
                backend: backend.name.clone(),
                queued,
            })
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.backend.queued.fetch_sub(1, Ordering::AcqRel);
        self.backend.metrics.queue_left();
    }
}

/// The backend at `point` (in [0, 1)) of the weights laid end to end, in
/// name order; zero weights are never drawn.
fn draw(traffic: &[(String, f64)], point: f64) -> Option<&str> {
    let total: f64 = traffic.iter().map(|(_, w)| w.max(0.0)).sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut x = point * total;
    let mut last = None;
    for (name, w) in traffic.iter().filter(|(_, w)| *w > 0.0) {
        if x < *w {
            return Some(name);
        }
        x -= w;
        last = Some(name.as_str());
    }
    // Rounding left x just above the sum: the last positive weight takes it.
    last
}

/// A shard key's fixed point in [0, 1): the first 53 bits of its SHA-256,
/// the same in every proxy and handle, whatever the build.
fn shard_point(key: &str) -> f64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Counts one request waiting for `backend` to get a routable replica, for
/// as long as it lives (every exit path, the caller's drop included).
struct AwaitingReplica(Arc<Backend>);

impl AwaitingReplica {
    fn new(backend: Arc<Backend>) -> Self {
        backend.awaiting_replica.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }
}

impl Drop for AwaitingReplica {
    fn drop(&mut self) {
        self.0.awaiting_replica.fetch_sub(1, Ordering::Relaxed);
    }
}
