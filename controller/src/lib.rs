//! The Serval controller: the cluster's hard state and the control-plane
//! gRPC service.
//!
//! Layout:
//! - [`state`]: the state machine (nodes, backends, endpoints, replicas) and
//!   the [`Command`]s it applies; [`scheduler`] places replicas on nodes.
//! - [`limits`]: the caps every command is checked against, where it is
//!   proposed and where it is applied.
//! - [`store`]: raft (openraft) with the log, vote, applied state and
//!   snapshots in redb under the data dir.
//! - [`auth`]: which credential may call what (cluster token, replica
//!   token, peer key), checked before a call is decoded.
//! - [`service`]: the `Control` gRPC service and the Watch
//!   stream proxies, node agents and handles follow.
//! - [`reconciler`]: the leader's loop that notices dead nodes.
//! - `soft_state`: heartbeats and load reports, in memory: written by the
//!   service, read by the reconciler.
//! - `job_service`: the batch-job RPCs over `store::jobs`, the durable
//!   queue of BatchAPI jobs.
#![forbid(unsafe_code)]

pub mod auth;
pub mod autoscaler;
pub mod error;
mod job_service;
pub mod limits;
pub mod peer_service;
pub mod reconciler;
pub mod scheduler;
pub mod service;
pub mod soft_state;
pub mod state;
pub mod store;

pub use error::{ControllerError, StateError};
pub use service::ControlService;
pub use store::Command;
