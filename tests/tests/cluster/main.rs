//! The cluster tests: ONE test binary (one link of the workspace's
//! dependencies instead of one per file), a module per subject. Run one
//! subject with `cargo test -p serval-tests --test cluster multihost::`.
//!
//! The tests run in one process, two at a time: what they share is in
//! `serval_tests` (`tests/src/`), and a test that needs the machine to
//! itself says so with `serval_tests::machine::alone`.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

mod batch_failover;
mod blobs;
mod cli;
mod code_by_digest;
mod heads;
mod jobs;
mod limits;
mod multihost;
mod partition;
mod pki;
mod recovery;
mod replica_python;
mod tls;
