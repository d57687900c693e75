//! The proxy follows the controller's snapshots through the shared watch in
//! `serval_protos::client` (node agents and handles use the same one).

pub use serval_protos::client::{spawn_watch, SnapshotReceiver};
