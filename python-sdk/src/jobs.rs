//! `Client.jobs()`: the control RPCs of batch jobs (BatchAPI, seed 001),
//! used by `serval.cortex.batch` (the job gateway and the workers).
//!
//! ```text
//! Jobs
//!   .create(api, workers, timeout_s, config_json, max_receive_count) -> str   the Job as JSON
//!   .enqueue(job_id, first_index, batches: list[bytes]) -> None
//!   .finish_enqueue(job_id, total, error="") -> str
//!   .lease(job_id, worker_id, max, visibility_s)
//!        -> (status, done, run_on_complete, [(index, batch_id, payload, receive_count)])
//!   .ack(job_id, worker_id, [(index, ok, seconds, error)]) -> None
//!   .complete(job_id, worker_id, error="") -> str
//!   .finish_job(job_id, worker_id, index, result="", error="", seconds=0.0) -> str
//!   .release_worker(job_id, worker_id) -> None
//!   .get(job_id) -> str ; .list(api) -> str (JSON list) ; .stop(job_id, status="", error="") -> str
//!   .dead_letters(job_id) -> [(index, batch_id, payload, receive_count, error)]
//! ```
//! Errors are the controller's, through `crate::error::status_err` (an
//! unknown job is `NotFound`, a refused value `InvalidArgument`).

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serval_protos::client::Client as ControlClient;
use serval_protos::control::{
    AckRequest, BatchResult, CompleteJobRequest, EnqueueRequest, FinishEnqueueRequest,
    FinishJobRequest, Job, JobRequest, JobSpec, LeaseRequest, ListJobsRequest,
    ReleaseWorkerRequest, StopJobRequest,
};

use crate::client::block_on;
use crate::error::{status_err, ServeError};

#[pyclass(module = "serval._native")]
pub struct Jobs {
    pub(crate) client: ControlClient,
}

type Leased<'py> = Vec<(u64, String, Bound<'py, PyBytes>, u32)>;
/// (index, batch_id, payload, receive_count, last error)
type DeadLettered<'py> = Vec<(u64, String, Bound<'py, PyBytes>, u32, String)>;

fn to_json(job: &Job) -> PyResult<String> {
    serde_json::to_string(job).map_err(|e| ServeError::new_err(e.to_string()))
}

#[pymethods]
impl Jobs {
    // The Python signature is the JobSpec's fields, one argument each.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (api, workers, timeout_s, config_json, max_receive_count, enqueuer = String::new(), retention_s = 0.0))]
    fn create(
        &self,
        py: Python<'_>,
        api: String,
        workers: u32,
        timeout_s: f64,
        config_json: String,
        max_receive_count: u32,
        enqueuer: String,
        retention_s: f64,
    ) -> PyResult<String> {
        let mut c = self.client.clone();
        let spec = JobSpec {
            api,
            workers,
            timeout_s,
            config_json,
            max_receive_count,
            enqueuer,
            retention_s,
        };
        let job = block_on(py, async move { c.create_job(spec).await }).map_err(status_err)?;
        to_json(&job.into_inner())
    }

    fn enqueue(
        &self,
        py: Python<'_>,
        job_id: String,
        first_index: u64,
        batches: Vec<Vec<u8>>,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        let request = EnqueueRequest {
            job_id,
            first_index,
            batches,
        };
        block_on(py, async move { c.enqueue_batches(request).await }).map_err(status_err)?;
        Ok(())
    }

    #[pyo3(signature = (job_id, total, error = String::new()))]
    fn finish_enqueue(
        &self,
        py: Python<'_>,
        job_id: String,
        total: u64,
        error: String,
    ) -> PyResult<String> {
        let mut c = self.client.clone();
        let request = FinishEnqueueRequest {
            job_id,
            total,
            error,
        };
        let job =
            block_on(py, async move { c.finish_enqueue(request).await }).map_err(status_err)?;
        to_json(&job.into_inner())
    }

    fn lease<'py>(
        &self,
        py: Python<'py>,
        job_id: String,
        worker_id: String,
        max: u32,
        visibility_s: f64,
    ) -> PyResult<(String, bool, bool, Leased<'py>)> {
        let mut c = self.client.clone();
        let request = LeaseRequest {
            job_id,
            worker_id,
            max,
            visibility_s,
        };
        let reply = block_on(py, async move { c.lease_batches(request).await })
            .map_err(status_err)?
            .into_inner();
        let batches = reply
            .batches
            .into_iter()
            .map(|b| {
                (
                    b.index,
                    b.batch_id,
                    PyBytes::new(py, &b.payload),
                    b.receive_count,
                )
            })
            .collect();
        Ok((reply.status, reply.done, reply.run_on_complete, batches))
    }

    fn ack(
        &self,
        py: Python<'_>,
        job_id: String,
        worker_id: String,
        results: Vec<(u64, bool, f64, String)>,
    ) -> PyResult<()> {
        let mut c = self.client.clone();
        let request = AckRequest {
            job_id,
            worker_id,
            results: results
                .into_iter()
                .map(|(index, ok, seconds, error)| BatchResult {
                    index,
                    ok,
                    seconds,
                    error,
                })
                .collect(),
        };
        block_on(py, async move { c.ack_batches(request).await }).map_err(status_err)?;
        Ok(())
    }

    #[pyo3(signature = (job_id, worker_id, error = String::new()))]
    fn complete(
        &self,
        py: Python<'_>,
        job_id: String,
        worker_id: String,
        error: String,
    ) -> PyResult<String> {
        let mut c = self.client.clone();
        let request = CompleteJobRequest {
            job_id,
            worker_id,
            error,
        };
        let job = block_on(py, async move { c.complete_job(request).await }).map_err(status_err)?;
        to_json(&job.into_inner())
    }

    /// The lease holder of batch `index` ends the job: succeeded with
    /// `result` (JSON text), or "worker error" with `error`.
    // The Python signature is the request's fields, one argument each.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (job_id, worker_id, index, result = String::new(), error = String::new(), seconds = 0.0))]
    fn finish_job(
        &self,
        py: Python<'_>,
        job_id: String,
        worker_id: String,
        index: u64,
        result: String,
        error: String,
        seconds: f64,
    ) -> PyResult<String> {
        let mut c = self.client.clone();
        let request = FinishJobRequest {
            job_id,
            worker_id,
            index,
            error,
            result,
            seconds,
        };
        let job = block_on(py, async move { c.finish_job(request).await }).map_err(status_err)?;
        to_json(&job.into_inner())
    }

    fn release_worker(&self, py: Python<'_>, job_id: String, worker_id: String) -> PyResult<()> {
        let mut c = self.client.clone();
        let request = ReleaseWorkerRequest { job_id, worker_id };
        block_on(py, async move { c.release_worker(request).await }).map_err(status_err)?;
        Ok(())
    }

    fn get(&self, py: Python<'_>, job_id: String) -> PyResult<String> {
        let mut c = self.client.clone();
        let job = block_on(py, async move { c.get_job(JobRequest { job_id }).await })
            .map_err(status_err)?;
        to_json(&job.into_inner())
    }

    fn list(&self, py: Python<'_>, api: String) -> PyResult<String> {
        let mut c = self.client.clone();
        let jobs = block_on(
            py,
            async move { c.list_jobs(ListJobsRequest { api }).await },
        )
        .map_err(status_err)?
        .into_inner();
        serde_json::to_string(&jobs.jobs).map_err(|e| ServeError::new_err(e.to_string()))
    }

    #[pyo3(signature = (job_id, status = String::new(), error = String::new()))]
    fn stop(
        &self,
        py: Python<'_>,
        job_id: String,
        status: String,
        error: String,
    ) -> PyResult<String> {
        let mut c = self.client.clone();
        let request = StopJobRequest {
            job_id,
            status,
            error,
        };
        let job = block_on(py, async move { c.stop_job(request).await }).map_err(status_err)?;
        to_json(&job.into_inner())
    }

    fn dead_letters<'py>(&self, py: Python<'py>, job_id: String) -> PyResult<DeadLettered<'py>> {
        let mut c = self.client.clone();
        let letters = block_on(py, async move {
            c.get_dead_letters(JobRequest { job_id }).await
        })
        .map_err(status_err)?
        .into_inner();
        Ok(letters
            .batches
            .into_iter()
            .map(|b| {
                (
                    b.index,
                    b.batch_id,
                    PyBytes::new(py, &b.payload),
                    b.receive_count,
                    b.error,
                )
            })
            .collect())
    }
}
