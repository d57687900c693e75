//! The node agent and the replica runtime.
//!
//! Layout:
//! - [`agent`]: registers the node, heartbeats, follows the controller's
//!   Watch stream and keeps a supervisor per replica placed on this node.
//! - [`code_cache`]: backends' code by digest, fetched once per node.
//! - [`supervisor`]: starts one replica process, reports its state,
//!   restarts it with backoff, stops it.
//! - [`metrics`]: replicas by backend and state, restarts.
//! - [`replica_server`]: the replica side of the data-plane frame stream and
//!   the [`replica_server::Handler`] trait that user code sits behind.
#![forbid(unsafe_code)]

pub mod agent;
pub mod code_cache;
pub mod metrics;
pub mod replica_server;
pub mod supervisor;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use agent::{AgentConfig, NodeAgent};
