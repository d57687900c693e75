//! [`Proxy`]: the state the HTTP server reads on every request: the router,
//! the current route table, the middlewares and the HTTP settings. Snapshots replace the
//! route table whole (readers clone an `Arc` and never see a half-built
//! table); the router keeps replica connections across snapshots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::metrics::MetricsHandle;
use serval_protos::control::ClusterSnapshot;
use tokio::task::JoinHandle;

use crate::config::ProxyConfig;
use crate::grpc::{GrpcMetrics, GrpcServices, Reflection};
use crate::http_metrics::HttpMetrics;
use crate::limits::{BodyBudget, Limits};
use crate::middleware::Middlewares;
use crate::route::RouteTable;
use crate::routing::Router;
use crate::watch::SnapshotReceiver;

pub struct Proxy {
    router: Router,
    /// std RwLock: held only to clone or swap the Arc, never across `.await`.
    routes: RwLock<Arc<RouteTable>>,
    /// From the snapshot's `HttpOptions.middlewares_json`; swapped whole.
    middlewares: RwLock<Arc<Middlewares>>,
    /// gRPC services -> endpoints, and the reflection built over them.
    grpc: RwLock<(Arc<GrpcServices>, Arc<Reflection>)>,
    /// Set once the first snapshot is applied (`/-/healthz`).
    ready: AtomicBool,
    pub(crate) max_body_bytes: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) metrics: Option<MetricsHandle>,
    /// Shared with streamed replies, which record themselves when they end.
    pub(crate) http_metrics: std::sync::Arc<HttpMetrics>,
    pub(crate) grpc_metrics: GrpcMetrics,
    pub(crate) limits: Limits,
    /// Shared by every request of this proxy (`limits.max_buffered_body_bytes`).
    pub(crate) body_budget: Arc<BodyBudget>,
    /// Whether error bodies carry internal detail (`SERVAL_DEBUG`).
    pub(crate) debug_errors: bool,
    /// WebSocket bounds and the sessions open through this proxy.
    pub(crate) websockets: Arc<crate::websocket::Sessions>,
    /// The last snapshot applied, whole, for the dashboard (snapshots name
    /// backends' code by digest only).
    snapshot: RwLock<Arc<ClusterSnapshot>>,
    /// Its version, so dashboard streams wake up when it changes.
    snapshot_version: tokio::sync::watch::Sender<u64>,
    /// `/-/dashboard`: its token, history and open streams.
    pub(crate) dashboard: crate::dashboard::Dashboard,
    /// `/-/readyz` asks it after `ready_for_traffic`.
    pub(crate) readiness: crate::readiness::ReadinessSlot,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(config: &ProxyConfig) -> Self {
        Self::with_router(Router::new(config.router_config()), config)
    }

    /// A proxy over an existing router (e.g. one shared with handles).
    pub fn with_router(router: Router, config: &ProxyConfig) -> Self {
        Self {
            router,
            routes: RwLock::new(Arc::new(RouteTable::new())),
            middlewares: RwLock::new(Arc::new(Middlewares::default())),
            grpc: RwLock::new((
                Arc::new(GrpcServices::default()),
                Arc::new(Reflection::build(&[])),
            )),
            ready: AtomicBool::new(false),
            max_body_bytes: config.max_body_bytes,
            shutdown_grace: config.shutdown_grace,
            metrics: config.metrics.clone(),
            http_metrics: Default::default(),
            grpc_metrics: Default::default(),
            limits: config.limits.clone(),
            body_budget: BodyBudget::new(config.limits.max_buffered_body_bytes),
            debug_errors: config.debug_errors,
            websockets: Arc::new(crate::websocket::Sessions::from_env()),
            snapshot: RwLock::default(),
            snapshot_version: tokio::sync::watch::Sender::new(0),
            dashboard: crate::dashboard::Dashboard::new(&config.token, &config.control_addr),
            readiness: config.readiness.clone(),
        }
    }

    /// The last snapshot applied (empty before the first).
    pub(crate) fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wakes when a new snapshot is applied.
    pub(crate) fn snapshot_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.snapshot_version.subscribe()
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn middlewares(&self) -> Arc<Middlewares> {
        self.middlewares
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn grpc_services(&self) -> Arc<GrpcServices> {
        self.grpc
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    pub(crate) fn reflection(&self) -> Arc<Reflection> {
        self.grpc
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Swaps in the snapshot's gRPC services; reflection is rebuilt only
    /// when their descriptors changed (parsing them is not free).
    fn apply_grpc(&self, snapshot: &ClusterSnapshot) {
        let services = GrpcServices::from_snapshot(snapshot);
        let mut grpc = self.grpc.write().unwrap_or_else(|p| p.into_inner());
        if *grpc.0 == services {
            return;
        }
        self.grpc_metrics.retain_deployed(&services);
        let reflection = if grpc.1.built_from(services.descriptors()) {
            grpc.1.clone()
        } else {
            Arc::new(Reflection::build(services.descriptors()))
        };
        *grpc = (Arc::new(services), reflection);
    }

    /// Whether the proxy can route, and why not (Ray's `ready_for_traffic`).
    pub fn ready_for_traffic(&self) -> (bool, &'static str) {
        if self.ready.load(Ordering::Acquire) {
            (true, "")
        } else {
            (false, "no cluster snapshot received yet")
        }
    }

    /// Applies a snapshot: the router first, so a new route never names an
    /// endpoint the router does not know yet.
    pub fn apply_snapshot(&self, snapshot: &ClusterSnapshot) {
        self.router.update(snapshot);
        self.http_metrics.retain_endpoints(|e| {
            e == crate::metrics::NO_ENDPOINT_LABEL || snapshot.endpoints.iter().any(|s| s.name == e)
        });
        let mut table = RouteTable::new();
        for e in snapshot.endpoints.iter().filter(|e| !e.route.is_empty()) {
            let inserted = if e.route_is_prefix {
                table.insert_prefix(&e.name, &e.route)
            } else {
                table.insert(&e.name, &e.route, &e.methods)
            };
            if let Err(error) = inserted {
                // The controller validates routes; one bad route must not
                // take the others down.
                tracing::warn!(endpoint = %e.name, %error, "route skipped");
            }
        }
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.apply_grpc(snapshot);
        self.apply_middlewares(snapshot);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot.clone());
        self.snapshot_version.send_replace(snapshot.version);
        self.ready.store(true, Ordering::Release);
        tracing::debug!(version = snapshot.version, "snapshot applied");
    }

    /// Rebuilds the middlewares when the snapshot's configuration changed
    /// (a head restarted with other `http_options`).
    fn apply_middlewares(&self, snapshot: &ClusterSnapshot) {
        let json = snapshot
            .http_options
            .as_ref()
            .map_or("", |o| o.middlewares_json.as_str());
        if self.middlewares().source() == json {
            return;
        }
        match Middlewares::parse(json) {
            Ok(middlewares) => {
                tracing::info!(count = middlewares.len(), "http middlewares applied");
                *self.middlewares.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(middlewares);
            }
            // `serve start` validates them, so only a version skew gets here:
            // keep serving with the previous ones rather than none.
            Err(error) => {
                tracing::error!(%error, "http middlewares refused; keeping the previous ones")
            }
        }
    }

    /// Applies every snapshot from `rx` (see [`crate::spawn_watch`]) until
    /// the sender goes away; aborting the task stops following.
    pub fn follow(self: &Arc<Self>, mut rx: SnapshotReceiver) -> JoinHandle<()> {
        let proxy = self.clone();
        tokio::spawn(async move {
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(snapshot) = current {
                    proxy.apply_snapshot(&snapshot);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}
