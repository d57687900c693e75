//! The `serve` command: wires the controller, the proxy and the node agent
//! into a head or a node process, and the CLI verbs that talk to a cluster.
//!
//! Layout:
//! - [`cli`]: argument parsing and dispatch ([`cli::main_with`]).
//! - `start`: `serve start --head` / `--address`, `--detach`.
//! - `status`: `serve status` tables.
//! - [`applications`]: Ray Serve 2.x application and deployment statuses
//!   (computed in `serval_proxy`, whose dashboard shows them too).
//! - `shutdown`: `serve shutdown`.
//! - `cluster_file`: how commands find a running head through its data dir.
//! - `control_listener`: the control listener's connection bounds.
#![forbid(unsafe_code)]

pub use serval_proxy::applications;
pub mod cli;
mod cluster_file;
mod control_listener;
mod shutdown;
mod start;
mod status;

pub use cli::{main_with, ClusterArgs};
