//! The inference threads and the replica [`Handler`] in front of Python.
//!
//! Predictions run on their own threads (`threads_per_process` of them),
//! not on the replica's one io thread, so a long model run never delays
//! reading or answering other connections. With server-side batching a
//! thread takes the first queued request, gathers more until
//! `max_batch_size` or `batch_interval`, stacks their inputs along the batch
//! axis and runs the model once; requests that cannot be stacked run one
//! by one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serval_node::replica_server::{Handler, Reply};
use serval_protos::frame::{Payload, Request, Response};
use tract_onnx::prelude::Tensor;

use crate::model::{Model, PredictError};

#[derive(Debug, Clone, PartialEq)]
pub struct RunnerConfig {
    /// Inference threads (at least 1).
    pub threads: usize,
    /// Requests per model run; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long a batch waits to fill.
    pub batch_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            max_batch_size: 1,
            batch_interval: Duration::ZERO,
        }
    }
}

struct Job {
    body: Vec<u8>,
    reply: Reply,
}

/// Answers `POST`s with the model; hands everything else to `fallback` (the
/// replica's Python queue). Dropping it stops the inference threads once
/// they have answered what was queued.
pub struct NativeHandler {
    tx: Sender<Job>,
    fallback: Arc<dyn Handler>,
}

impl NativeHandler {
    pub fn start(
        model: Arc<Model>,
        config: RunnerConfig,
        fallback: Arc<dyn Handler>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..config.threads.max(1) {
            let (model, rx, config) = (model.clone(), rx.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("serval-onnx-{i}"))
                .spawn(move || work(&model, &rx, &config))?;
        }
        Ok(Self { tx, fallback })
    }
}

/// A prediction is a plain `POST` (no custom method asked for).
fn is_prediction(request: &Request) -> bool {
    request.method_name.is_none()
        && matches!(&request.payload, Payload::Http(http) if http.method == "POST")
}

impl Handler for NativeHandler {
    fn handle(&self, request: Request, reply: Reply) {
        if !is_prediction(&request) {
            return self.fallback.handle(request, reply);
        }
        let Payload::Http(http) = request.payload else {
            return;
        };
        if let Err(e) = self.tx.send(Job {
            body: http.body,
            reply,
        }) {
            e.into_inner()
                .reply
                .send(&error_response(503, "replica is shutting down"));
        }
    }

    fn closed(&self, conn: u64) {
        self.fallback.closed(conn);
    }
}

fn work(model: &Model, rx: &Receiver<Job>, config: &RunnerConfig) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        if config.max_batch_size > 1 {
            let deadline = Instant::now() + config.batch_interval;
            while batch.len() < config.max_batch_size {
                match rx.recv_deadline(deadline) {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        answer(model, batch);
    }
}

/// Answers every job of a batch: one stacked run when it can be made,
/// else one run each.
fn answer(model: &Model, batch: Vec<Job>) {
    let mut parsed: Vec<(Reply, Vec<Tensor>)> = Vec::with_capacity(batch.len());
    for job in batch {
        match model.parse(&job.body) {
            Ok(inputs) => parsed.push((job.reply, inputs)),
            Err(e) => job.reply.send(&prediction_response(Err(e))),
        }
    }
    if parsed.len() > 1 && model.stackable() {
        let inputs: Vec<&[Tensor]> = parsed.iter().map(|(_, i)| i.as_slice()).collect();
        if let Some(predictions) = run_stacked(model, &inputs) {
            for ((reply, _), outputs) in parsed.into_iter().zip(predictions) {
                reply.send(&prediction_response(model.respond(&outputs)));
            }
            return;
        }
    }
    for (reply, inputs) in parsed {
        let result = model
            .run(inputs)
            .and_then(|outputs| model.respond(&outputs));
        reply.send(&prediction_response(result));
    }
}

/// The outputs of each request from one run on the inputs concatenated
/// along axis 0; None when that cannot be done (row counts that differ
/// between a request's inputs, shapes that do not stack, an output that is
/// not one row per input row, a failed run).
fn run_stacked(model: &Model, batch: &[&[Tensor]]) -> Option<Vec<Vec<Tensor>>> {
    let rows: Vec<usize> = batch
        .iter()
        .map(|inputs| {
            let n = inputs.first()?.shape().first().copied()?;
            inputs
                .iter()
                .all(|t| t.shape().first() == Some(&n))
                .then_some(n)
        })
        .collect::<Option<_>>()?;
    let stacked: Vec<Tensor> = (0..model.inputs().len())
        .map(|i| {
            let parts: Vec<&Tensor> = batch.iter().map(|inputs| &inputs[i]).collect();
            Tensor::stack_tensors(0, &parts)
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let outputs = match model.run(stacked) {
        Ok(outputs) => outputs,
        Err(e) => {
            tracing::debug!(error = %e, "a stacked batch failed; running its requests one by one");
            return None;
        }
    };
    let total: usize = rows.iter().sum();
    if outputs.iter().any(|o| o.shape().first() != Some(&total)) {
        return None;
    }
    let mut start = 0;
    let mut split = Vec::with_capacity(rows.len());
    for n in rows {
        let part = outputs
            .iter()
            .map(|o| o.slice(0, start, start + n))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        split.push(part);
        start += n;
    }
    tracing::debug!(
        requests = split.len(),
        rows = total,
        "one model run for a batch"
    );
    Some(split)
}

fn prediction_response(result: Result<Vec<u8>, PredictError>) -> Response {
    match result {
        Ok(body) => Response {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        },
        Err(e) => {
            if e.status() >= 500 {
                tracing::error!(error = %e, "native prediction failed");
            }
            error_response(e.status(), &e.to_string())
        }
    }
}

/// `{"error": message}`, the shape Serval's Python host answers errors with.
pub fn error_response(status: u16, message: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::json!({ "error": message })
            .to_string()
            .into_bytes(),
    }
}

/// The status and body of one prediction, for callers outside the replica
/// data plane (the Python side's handle calls).
pub fn predict_once(model: &Model, body: &[u8]) -> (u16, Vec<u8>) {
    let response = prediction_response(model.predict(body));
    (response.status, response.body)
}
