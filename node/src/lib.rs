//! The node agent and the replica runtime.
//!
//! Layout:
//! - [`replica_server`]: the replica side of the data-plane frame stream and
//!   the [`replica_server::Handler`] trait that user code sits behind.
#![forbid(unsafe_code)]

pub mod replica_server;
