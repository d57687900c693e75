//! Wire formats of Serval.
//!
//! Layout:
//! - [`control`]: the control-plane gRPC service and messages (tonic/prost),
//!   generated from `proto/control.proto`.
//! - [`frame`]: the data-plane frame stream between a router (proxy or
//!   handle) and a replica: `[u32 len][u64 request id][bincode body]`;
//!   [`frame_socket`] carries it over a Unix or TCP socket.
//! - [`blob`]: the digest and size limits of content-addressed blobs.
//! - [`auth`]: the cluster token and the credentials derived from it;
//!   [`handshake`]: how a data-plane peer proves it belongs to the cluster
//!   before a replica decodes a frame.
//! - [`private_files`]: the data dir and socket dirs (0700, checked to be
//!   ours) and their files (0600, replaced atomically).
//! - [`route`]: the route grammar (Starlette routes, route prefixes,
//!   collisions) and [`middleware`]: the HTTP middlewares' configuration
//!   and its validation, checked by the controller and built by the proxy;
//!   [`states`]: replica, backend and job states, one enum each; [`ids`]:
//!   the replica id `<backend>#<seq>`; [`backend_config`]: a backend
//!   config's defaults and its one `validate`.
#![forbid(unsafe_code)]

pub mod control {
    tonic::include_proto!("serval.control");
}
pub mod auth;
pub mod backend_config;
pub mod blob;
pub mod client;
pub mod frame;
pub mod frame_socket;
pub mod handshake;
pub mod ids;
pub mod middleware;
pub mod private_files;
pub mod route;
pub mod states;
pub mod tls;

/// Default port of the controller's gRPC service (`serve start --head`).
pub const DEFAULT_CONTROL_PORT: u16 = 6390;
/// Default port of the HTTP proxy.
pub const DEFAULT_HTTP_PORT: u16 = 8000;
/// Tokio worker threads of a Serval process unless told otherwise: half the
/// cores it may use, at least 1. Replicas and clients need the other cores,
/// and on small machines fewer workers wake each other less (on 2 cores one
/// worker served the proxy faster than two).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Metadata key carrying the cluster token on every control RPC.
pub const TOKEN_METADATA_KEY: &str = "x-serval-token";
