//! The routing core: what a caller needs to send a request to a replica of
//! an endpoint, without HTTP. The HTTP ingress (`http`, `proxy`, ...) and
//! the Python SDK's handles (this module alone) both use it.
//!
//! - `router`: endpoint -> backend (traffic weights, shadows) -> replica
//!   (a [`ReplicaChoice`] policy from `policy`, power of two choices by
//!   default), concurrency limits, the bounded queue and backpressure;
//!   `router_metrics` holds its cached metric handles.
//! - `replica_conn`: one multiplexed frame connection per replica, failing
//!   every pending request at once when it breaks.
//! - `load_report`: sends the router's per-backend load to the controller
//!   once a second (the autoscaler's input), off the request path.
//!
//! **Architecture Invariant:** this tree depends on `crate::metrics` (the
//! metric names) and `crate::percent` and on nothing else of the crate:
//! never on the ingress. `tests/layers.rs` checks it.

mod load_report;
mod policy;
mod replica_conn;
mod router;
mod router_metrics;

pub use load_report::spawn_load_reporter;
pub use policy::{PowerOfTwoChoices, ReplicaChoice};
pub use replica_conn::{ChunkStream, Reply, StreamError};
pub use router::{Router, RouterConfig, RouterError, MAX_SHARD_KEY_BYTES};

// What the ingress needs beyond the public API (gRPC, WebSockets, the
// dashboard).
pub(crate) use replica_conn::{RequestSender, WsSession};
pub(crate) use router::Reservation;
