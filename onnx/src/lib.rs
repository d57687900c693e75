//! ONNX models run by Serval itself (issue 10.6): `handler.runtime: native`
//! on an ONNX API without a request handler.
//!
//! The replica process still hosts Python (it loads the project and answers
//! handle calls), but HTTP `POST`s never reach it: [`NativeHandler`] sits in
//! front of the replica's Python queue, parses the JSON body into tensors,
//! runs the model with [tract](https://github.com/sonos/tract) on its own
//! threads and answers, all in Rust. Everything else (other methods, custom
//! methods, handle calls, reconfigure) goes on to Python.
//!
//! * [`model`]: loading a model (unknown dimensions become a batch symbol)
//!   and one prediction: JSON body -> input tensors -> outputs -> JSON.
//! * [`json`]: the JSON <-> tensor conversions and their error messages,
//!   the same as the onnxruntime path's.
//! * [`runner`]: the inference threads, server-side batching (requests
//!   stacked along the batch axis into one model run) and the handler.
#![forbid(unsafe_code)]

pub mod json;
pub mod model;
pub mod runner;

pub use model::{InputSpec, Model, ModelError, PredictError};
pub use runner::{predict_once, NativeHandler, RunnerConfig};
