//! The data plane of Serval: the HTTP proxy and the router it shares with
//! the Python ServeHandle.
//!
//! Two layers, and two leaves under both; dependencies point down only:
//!
//! ```text
//! HTTP ingress   http, proxy, config, limits, errors, builtin, middleware/,
//!                conn_streams, route, websocket, grpc/, dashboard/, readiness,
//!                applications, http_metrics, watch
//!      |
//!      v
//! routing core   routing/ (router, replica_conn, policy, load_report,
//!      |         router_metrics): what the SDK's handles use alone
//!      v
//! leaves         metrics (names, exporter, per-endpoint handle maps),
//!                percent (percent-decoding)
//! ```
//!
//! `tests/layers.rs` fails when a file of the core or a leaf names a module
//! above it.
//!
//! The ingress, in request order:
//! - [`http`]: the hyper server and the request path (built-ins, route,
//!   body limit, forward, metrics), with `errors` mapping every failure to
//!   an HTTP answer and `builtin` serving `/-/routes`, `/-/healthz`,
//!   `/-/metrics`; `http_metrics` keeps its metric handles by endpoint;
//!   `conn_streams` runs an HTTP/2 connection's streams in its own task.
//! - [`middleware`]: Starlette's CORS, GZip and TrustedHost middlewares
//!   (`http_options.middlewares`), one file each, run natively around
//!   routing, built from the configuration `serval_protos::middleware`
//!   parses and checks.
//! - [`route`]: Starlette routes compiled to matchit; the grammar
//!   ([`parse_route`], [`collides`]) is `serval_protos::route`.
//! - [`routing`]: the router core (see there).
//! - `watch`: follows the controller's snapshots, serving from the last one
//!   while the controller is unreachable.
//! - `proxy`: [`Proxy`], the state the server reads; `config`: [`ProxyConfig`];
//!   `limits`: [`Limits`], what one client may hold (connections, time,
//!   buffered bytes) and the pieces that enforce them.
//! - [`applications`]: Ray Serve 2.x application and deployment statuses
//!   from a snapshot (`serve status`, `serve.status()`, the dashboard).
//! - `dashboard`: `/-/dashboard`, the web page, its JSON/SSE API behind
//!   the cluster token and the endpoints' 15-minute history.
//! - [`metrics`]: metric names, the Prometheus exporter settings every
//!   process installs, and the maps of cached metric handles.
//!
//! **Architecture Invariant:** the request path never calls the controller;
//! it reads the last snapshot only.
#![forbid(unsafe_code)]

pub mod applications;
mod builtin;
mod config;
mod conn_streams;
mod dashboard;
mod errors;
pub mod grpc;
pub mod http;
mod http_metrics;
mod limits;
pub mod metrics;
pub mod middleware;
mod percent;
mod proxy;
mod readiness;
pub mod route;
pub mod routing;
mod watch;
mod websocket;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::routing::spawn_load_reporter;

pub use config::{ProxyConfig, ProxyError, DEFAULT_MAX_BODY_BYTES};
pub use dashboard::DashboardSlot;
pub use http::serve;
pub use limits::{ConnIo, Limits};
pub use middleware::{MiddlewareError, Middlewares};
pub use proxy::Proxy;
pub use readiness::{ReadinessCheck, ReadinessSlot, READYZ_PATH};
pub use route::{check_prefix, collides, parse_route, ParsedRoute, RouteError, RouteTable};
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
    let snapshots = spawn_watch(config.control_addr.clone(), config.token.clone());
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
