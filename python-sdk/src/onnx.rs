//! `serval._native.OnnxModel`: an ONNX model run by tract in Rust
//! (`handler.runtime: native`, crate serval-onnx).
//!
//! ```text
//! OnnxModel(path: str, threads: int = 1, max_batch_size: int = 1,
//!           batch_interval: float = 0.0)      raises ValueError naming the cause
//!   .inputs -> list[tuple[str, str, list[int | None]]]   name, type, shape
//!   .outputs -> list[str]
//!   .predict(body: bytes) -> tuple[int, bytes]   status and JSON body
//! ```
//!
//! Given to `ReplicaServer(..., native=model)`, the replica answers HTTP
//! `POST`s with it on its own threads without taking the GIL; `predict`
//! serves the Python side's handle calls with the same model.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serval_onnx::{runner, Model, RunnerConfig};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OnnxModel>()
}

#[pyclass(frozen, module = "serval._native")]
pub struct OnnxModel {
    pub(crate) model: Arc<Model>,
    pub(crate) config: RunnerConfig,
}

#[pymethods]
impl OnnxModel {
    #[new]
    #[pyo3(signature = (path, threads = 1, max_batch_size = 1, batch_interval = 0.0))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: usize,
        max_batch_size: usize,
        batch_interval: f64,
    ) -> PyResult<Self> {
        let batch_interval = Duration::try_from_secs_f64(batch_interval)
            .map_err(|e| PyValueError::new_err(format!("batch_interval: {e}")))?;
        let model = py
            .detach(|| Model::load(&path))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Self {
            model: Arc::new(model),
            config: RunnerConfig {
                threads: threads.max(1),
                max_batch_size: max_batch_size.max(1),
                batch_interval,
            },
        })
    }

    #[getter]
    fn inputs(&self) -> Vec<(String, String, Vec<Option<usize>>)> {
        self.model
            .inputs()
            .iter()
            .map(|i| (i.name.clone(), i.type_name(), i.shape.clone()))
            .collect()
    }

    #[getter]
    fn outputs(&self) -> Vec<String> {
        self.model.outputs().to_vec()
    }

    fn predict(&self, py: Python<'_>, body: &[u8]) -> (u16, Vec<u8>) {
        py.detach(|| runner::predict_once(&self.model, body))
    }
}
