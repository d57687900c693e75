//! The data plane of Serval: the HTTP proxy and the router it shares with
//! the Python ServeHandle.
//!
//! Layout, in request order:
//! - [`http`]: the hyper server and the request path (built-ins, route,
//!   body limit, forward, metrics), with `errors` mapping every failure to
//!   an HTTP answer and `builtin` serving `/-/routes`, `/-/healthz`,
//!   `/-/metrics`.
//! - [`middleware`]: Starlette's CORS, GZip and TrustedHost middlewares
//!   (`http_options.middlewares`), run natively around routing, built from
//!   the configuration `serval_protos::middleware` parses and checks.
//! - [`route`]: Starlette routes compiled to matchit; the grammar
//!   ([`parse_route`], [`collides`]) is `serval_protos::route`.
//! - `router`: endpoint -> backend (traffic weights, shadows) -> replica
//!   (a [`ReplicaChoice`] policy from `policy/`, power of two choices by
//!   default), concurrency limits, the bounded queue and backpressure.
//! - `replica_conn`: one multiplexed frame connection per replica, failing
//!   every pending request at once when it breaks.
//! - `watch`: follows the controller's snapshots, serving from the last one
//!   while the controller is unreachable.
//! - `proxy`: [`Proxy`], the state the server reads; `config`: [`ProxyConfig`];
//!   `limits`: [`Limits`], what one client may hold (connections, time,
//!   buffered bytes) and the pieces that enforce them.
//! - `load_report`: sends the router's per-backend load to the controller
//!   once a second (the autoscaler's input), off the request path.
//! - [`applications`]: Ray Serve 2.x application and deployment statuses
//!   from a snapshot (`serve status`, `serve.status()`, the dashboard).
//! - `dashboard`: `/-/dashboard`, the web page, its JSON/SSE API behind
//!   the cluster token and the endpoints' 15-minute history.
//! - [`metrics`]: metric names, the Prometheus exporter settings every
//!   process installs, and the router's cached metric handles.
//!
//! **Architecture Invariant:** the request path never calls the controller;
//! it reads the last snapshot only.
#![forbid(unsafe_code)]

pub mod applications;
mod builtin;
mod config;
mod dashboard;
mod errors;
pub mod grpc;
pub mod http;
mod limits;
mod load_report;
pub mod metrics;
pub mod middleware;
mod policy;
mod proxy;
mod readiness;
mod replica_conn;
pub mod route;
mod router;
mod watch;
mod websocket;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{ProxyConfig, ProxyError, DEFAULT_MAX_BODY_BYTES};
pub use dashboard::DashboardSlot;
pub use http::serve;
pub use limits::{ConnIo, Limits};
pub use load_report::spawn_load_reporter;
pub use middleware::{MiddlewareError, Middlewares};
pub use policy::{PowerOfTwoChoices, ReplicaChoice};
pub use proxy::Proxy;
pub use readiness::{ReadinessCheck, ReadinessSlot, READYZ_PATH};
pub use replica_conn::{ChunkStream, Reply, StreamError};
pub use route::{check_prefix, collides, parse_route, ParsedRoute, RouteError, RouteTable};
pub use router::{Router, RouterConfig, RouterError, MAX_SHARD_KEY_BYTES};
pub use watch::{spawn_watch, SnapshotReceiver};

/// Runs a proxy: validates `config`, follows the controller's snapshots and
/// serves HTTP on `listener` until `shutdown` resolves.
pub async fn run(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    config.validate()?;
    let proxy = Arc::new(Proxy::new(&config));
    if let Some(slot) = &config.dashboard {
        slot.set(proxy.clone());
    }
    let snapshots = spawn_watch(config.control_addr.clone(), config.token.clone(), false);
    let follower = proxy.follow(snapshots);
    let source = format!(
        "proxy-{}-{}",
        std::process::id(),
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let reporter = spawn_load_reporter(
        proxy.router().clone(),
        config.control_addr.clone(),
        config.token.clone(),
        source,
    );
    serve(listener, proxy, shutdown).await;
    // Dropping the receiver with the follower also ends the watch task.
    follower.abort();
    reporter.abort();
    Ok(())
}
