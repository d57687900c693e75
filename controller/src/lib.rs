//! The Serval controller: the cluster's hard state and the control-plane
//! gRPC service.
//!
//! Layout:
//! - `server`: the front door: [`run`] (or [`start`], then
//!   [`Controller::serve`]) assembles one head's controller from a
//!   [`ControllerConfig`] and its control listener's connections, and stops
//!   it, every wait bounded.
//! - [`state`]: the state machine (nodes, backends, endpoints, replicas);
//!   [`scheduler`] places replicas on nodes.
//! - [`limits`]: the caps every command is checked against, where it is
//!   proposed and where it is applied.
//! - `store` (private): raft (openraft) with the log, vote, applied state
//!   and snapshots in redb under the data dir, and the [`Command`]s it
//!   applies; the durable queue of batch jobs (`store::jobs`).
//! - [`auth`]: which credential may call what (cluster token, replica
//!   token, peer key), checked before a call is decoded.
//! - [`service`]: the `Control` gRPC service and the Watch
//!   stream proxies, node agents and handles follow.
//! - [`reconciler`]: the leader's loop that notices dead nodes.
//! - `soft_state`: heartbeats and load reports, in memory: written by the
//!   service, read by the reconciler.
//! - `job_service`: the batch-job RPCs over `store::jobs`.
//!
//! Other crates reach the store through the names below only: [`Command`]
//! (a write), [`open_store`] and [`Membership`] (a head's raft member),
//! [`propose`] and [`propose_within`] (a write, committed and applied),
//! [`Raft`] and [`StateMachineStore`] (what the services are built over).
#![forbid(unsafe_code)]

pub mod auth;
pub mod autoscaler;
pub mod error;
mod job_service;
pub mod limits;
pub mod peer_service;
pub mod reconciler;
pub mod scheduler;
mod server;
pub mod service;
mod soft_state;
pub mod state;
mod store;

pub use error::{ControllerError, StateError};
pub use reconciler::{describe_metrics, DEFAULT_NODE_TIMEOUT};
pub use server::{run, start, Controller, ControllerConfig, WriteCheck};
pub use service::{ControlService, UnnamedBlobLimit, DEFAULT_MAX_UNNAMED_BLOB_BYTES};
pub use store::state_machine::StateMachineStore;
pub use store::{open as open_store, propose, propose_within, Command, Membership, Raft};
