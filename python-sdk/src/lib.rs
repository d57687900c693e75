//! `serval._native`: the Rust half of the Python SDK.
//!
//! Layout:
//! - `replica`: hosts a user's Python object behind the data-plane frame
//!   server (`python -m serval.replica`), with one Python thread that drains
//!   queued requests per GIL acquisition.
//! - `client`: the control-plane client and the ServeHandle router used by
//!   `serval.serve`.
//! - `error`: the exception classes `serval` exports and the mapping of
//!   the control plane's status codes onto them.
//! - `onnx`: ONNX models run by tract, which a replica can answer HTTP
//!   requests with in Rust (`handler.runtime: native`).
//!
//! pyo3 appears nowhere else in the workspace.
#![forbid(unsafe_code)]

use pyo3::prelude::*;

/// Rust's allocations in every Serval process that loads this module (the
/// head, replicas, drivers): the proxy's request path allocates and frees
/// small buffers per request, where glibc's malloc cost about 7 % of the
/// head's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod error;
mod jobs;
mod onnx;
mod poll;
mod replica;

/// Checks `http_options["middlewares"]` in its JSON form exactly as the
/// proxies will build it; raises ValueError naming the middleware/option.
#[pyfunction]
fn validate_middlewares(json: &str) -> PyResult<()> {
    serval_protos::middleware::validate(json)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The runtime of handles and control clients, sized as every Serval
    // process (with a worker per core, a handle call woke a second worker on
    // every hop).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(serval_protos::default_worker_threads())
        .enable_all();
    pyo3_async_runtimes::tokio::init(builder);
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(validate_middlewares, m)?)?;
    // The backend config defaults the controller and the routers use, for
    // the Python API's own defaults.
    m.add(
        "DEFAULT_MAX_CONCURRENT_QUERIES",
        serval_protos::backend_config::DEFAULT_MAX_CONCURRENT_QUERIES,
    )?;
    m.add(
        "DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S",
        serval_protos::backend_config::DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    )?;
    error::register(m)?;
    replica::register(m)?;
    client::register(m)?;
    onnx::register(m)?;
    m.add_class::<jobs::Jobs>()?;
    Ok(())
}
