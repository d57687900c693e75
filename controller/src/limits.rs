//! Caps on what one command may make the cluster build or store.
//!
//! Every raft command is checked twice against these caps: where it is
//! proposed ([`crate::store::propose_within`], so the caller gets
//! `INVALID_ARGUMENT` naming the field and the cap and nothing is
//! committed), and again when it is applied ([`ClusterState::apply`],
//! `store::jobs::apply`, the blob tables), so an entry already in a log
//! that breaks a cap is refused on every head before any record is built.
//!
//! **Architecture Invariant:** the caps are compiled in, not flags: every
//! head must refuse exactly the same commands or their states diverge.
//! [`check`] is stateless (sizes, counts and ranges inside the command);
//! the caps that depend on the state (replicas in total, numbers of nodes,
//! backends, endpoints, APIs, batches of a job) are checked by `apply`.
//!
//! [`ClusterState::apply`]: crate::state::ClusterState::apply

use serval_protos::blob::{BLOB_CHUNK_BYTES, MAX_BLOB_BYTES};
use serval_protos::control::{Api, Backend, BackendConfig, Endpoint, HttpOptions, Node};

use crate::error::StateError;
use crate::state::ReplicaState;
use crate::store::jobs::JobCommand;
use crate::store::Command;

/// Replicas of one backend (`num_replicas`, `autoscaling.max_replicas`).
pub const MAX_REPLICAS_PER_BACKEND: u32 = 1_000;
/// Replicas the cluster may want at once: the sum of every backend's
/// `num_replicas` (a rolling update may add up to that many again).
pub const MAX_REPLICAS_TOTAL: u64 = 10_000;
/// Workers of one batch job (each is a replica of the job's worker backend).
pub const MAX_JOB_WORKERS: u32 = 256;
/// CPUs one node may offer, and one replica may ask for.
pub const MAX_NODE_CPUS: f64 = 1024.0;
/// GPUs one node may offer, and one replica may ask for.
pub const MAX_NODE_GPUS: f64 = 64.0;
/// Nodes the state holds; at the cap a new node takes the place of a dead
/// one (which holds no replicas), and is refused when every node lives.
pub const MAX_NODES: usize = 1_024;
pub const MAX_BACKENDS: usize = 2_048;
pub const MAX_ENDPOINTS: usize = 2_048;
pub const MAX_APIS: usize = 1_024;
/// Names and ids: backends, endpoints, APIs, nodes, replicas, jobs, workers.
pub const MAX_NAME_BYTES: usize = 256;
/// Routes, addresses, socket paths, host names, states, digests.
pub const MAX_TEXT_BYTES: usize = 4_096;
/// Error texts (tracebacks). Clipped to this where proposed ([`clip`]).
pub const MAX_ERROR_BYTES: usize = 64 * 1024;
/// JSON documents carried in a command: `user_config`, an API's spec, the
/// HTTP middlewares, a job's config.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// An endpoint's compiled gRPC descriptor set.
pub const MAX_DESCRIPTOR_BYTES: usize = 4 * 1024 * 1024;
/// HTTP methods of one endpoint.
pub const MAX_METHODS: usize = 16;
pub const MAX_CONCURRENT_QUERIES: u32 = 100_000;
pub const MAX_BATCH_SIZE: u32 = 100_000;
/// A backend's `max_queued_requests` (per router, as a handle's own bound).
pub const MAX_QUEUED_REQUESTS: u32 = 1_000_000;
/// Seconds: `batch_wait_timeout`, a job's timeout (a year).
/// Blobs one backend's replicas may fetch (a package and a `.env`).
pub const MAX_BACKEND_BLOBS: usize = 16;
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// The longest a stopping replica may keep its requests in flight: its node
/// agent holds the process (and its resources) that long.
pub const MAX_GRACEFUL_SHUTDOWN_S: f64 = 3600.0;
/// The longest an ended job may be kept (`jobs.retention`): its record and
/// dead letters stay on every head's disk that long.
pub const MAX_JOB_RETENTION_S: f64 = 30.0 * 24.0 * 3600.0;
/// Batches of one job.
pub const MAX_JOB_BATCHES: u64 = 1_000_000;
/// One batch's bytes (Cortex's 256 KiB).
pub const MAX_JOB_BATCH_BYTES: usize = 256 * 1024;
/// A job's result (`Finish`: an AsyncAPI submission's answer), in bytes.
pub const MAX_JOB_RESULT_BYTES: usize = 1024 * 1024;
/// Batches, and their bytes, in one `EnqueueBatches` write.
pub const MAX_ENQUEUE_BATCHES: usize = 10_000;
pub const MAX_ENQUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Batches one lease hands out, and results one ack carries.
pub const MAX_LEASE_BATCHES: u32 = 1_000;
/// A job's `max_receive_count` (SQS's cap).
pub const MAX_RECEIVE_COUNT: u32 = 1_000;
/// How long a leased batch may stay hidden (a day).
pub const MAX_VISIBILITY_MS: i64 = 24 * 3600 * 1000;
/// Model ids one replica reports holding, and the bytes of each (client
/// input names them; the routers keep no more either).
pub const MAX_REPLICA_MODELS: usize = 64;
pub const MAX_MODEL_ID_BYTES: usize = 256;

fn refuse(field: &str, reason: String) -> StateError {
    StateError::InvalidConfig {
        field: field.into(),
        reason,
    }
}

fn text(field: &str, value: &str, cap: usize) -> Result<(), StateError> {
    if value.len() > cap {
        return Err(refuse(
            field,
            format!("{} bytes; the cap is {cap}", value.len()),
        ));
    }
    Ok(())
}

fn name(field: &str, value: &str) -> Result<(), StateError> {
    text(field, value, MAX_NAME_BYTES)
}

fn count(field: &str, n: u64, cap: u64) -> Result<(), StateError> {
    if n > cap {
        return Err(refuse(field, format!("{n} is over the cap of {cap}")));
    }
    Ok(())
}

/// A finite number in `[0, cap]`.
fn amount(field: &str, v: f64, cap: f64) -> Result<(), StateError> {
    if !(v.is_finite() && (0.0..=cap).contains(&v)) {
        return Err(refuse(
            field,
            format!("{v} is not a number from 0 to the cap of {cap}"),
        ));
    }
    Ok(())
}

/// Truncates the error texts of `cmd` to [`MAX_ERROR_BYTES`] (at a
/// character boundary): a long traceback is cut, not refused, so the report
/// or ack that carries it is not lost.
pub fn clip(cmd: Command) -> Command {
    let mut cmd = match cmd {
        Command::Once { id, command } => {
            return Command::Once {
                id,
                command: Box::new(clip(*command)),
            }
        }
        other => other,
    };
    fn cut(s: &mut String) {
        if s.len() > MAX_ERROR_BYTES {
            let mut end = MAX_ERROR_BYTES;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    }
    match &mut cmd {
        Command::ReportReplica(r) => cut(&mut r.error),
        Command::Job(JobCommand::FinishEnqueue { error, .. })
        | Command::Job(JobCommand::Complete { error, .. })
        | Command::Job(JobCommand::Stop { error, .. })
        | Command::Job(JobCommand::Finish { error, .. }) => cut(error),
        Command::Job(JobCommand::Ack { results, .. }) => {
            results.iter_mut().for_each(|r| cut(&mut r.error))
        }
        _ => {}
    }
    cmd
}

/// Refuses a command that breaks a cap it can be checked against alone,
/// naming the field and the cap.
pub fn check(cmd: &Command) -> Result<(), StateError> {
    match cmd {
        Command::Once { command, .. } => match **command {
            Command::Once { .. } => Err(refuse("command", "a Once inside a Once".into())),
            ref inner => check(inner),
        },
        Command::RegisterNode(node) => check_node(node),
        Command::MarkNodeDead { node_id } => name("node_id", node_id),
        Command::ReportReplica(r) => {
            name("replica_id", &r.replica_id)?;
            let states = [
                ReplicaState::Starting.as_str(),
                ReplicaState::Running.as_str(),
                ReplicaState::Failed.as_str(),
            ];
            if !states.contains(&r.state.as_str()) {
                return Err(refuse(
                    "state",
                    format!("'{}' is not one of {states:?}", r.state.escape_debug()),
                ));
            }
            text("error", &r.error, MAX_ERROR_BYTES)?;
            text("unix_path", &r.unix_path, MAX_TEXT_BYTES)?;
            text("tcp_addr", &r.tcp_addr, MAX_TEXT_BYTES)?;
            text("grpc_addr", &r.grpc_addr, MAX_TEXT_BYTES)
        }
        Command::CreateBackend(b) => check_backend(b),
        Command::UpdateBackendConfig { name: n, config } => {
            name("backend name", n)?;
            check_config(config)
        }
        Command::Autoscale {
            name: n,
            num_replicas,
        } => {
            name("backend name", n)?;
            count(
                "num_replicas",
                u64::from(*num_replicas),
                u64::from(MAX_REPLICAS_PER_BACKEND),
            )
        }
        Command::UpdateBackendCode {
            name: n,
            code_digest,
            blobs,
        } => {
            name("backend name", n)?;
            name("code_digest", code_digest)?;
            check_blobs(blobs)
        }
        Command::DeleteBackend { name: n, .. } => name("backend name", n),
        Command::CreateEndpoint(e) => check_endpoint(e),
        Command::DeleteEndpoint { name: n } => name("endpoint name", n),
        Command::SetTraffic { endpoint, traffic } => {
            name("endpoint name", endpoint)?;
            count(
                "traffic (backends)",
                traffic.len() as u64,
                MAX_BACKENDS as u64,
            )?;
            traffic.keys().try_for_each(|b| name("traffic backend", b))
        }
        Command::SetShadow {
            endpoint, backend, ..
        } => {
            name("endpoint name", endpoint)?;
            name("shadow backend", backend)
        }
        Command::SetHttpOptions(o) => check_http_options(o),
        Command::SetShuttingDown(_) | Command::CollectCodeBlobs { .. } => Ok(()),
        Command::PutBlob { digest, data } => {
            name("blob digest", digest)?;
            count(
                "blob part bytes",
                data.len() as u64,
                BLOB_CHUNK_BYTES as u64,
            )
        }
        Command::PutBlobParts { digest, parts } => {
            name("blob digest", digest)?;
            let cap = MAX_BLOB_BYTES.div_ceil(BLOB_CHUNK_BYTES) as u64;
            count("blob parts", parts.len() as u64, cap)?;
            parts.iter().try_for_each(|p| name("blob part digest", p))
        }
        Command::Job(job) => check_job(job),
        Command::PutApi(api) => check_api(api),
        Command::DeleteApi { name: n } => name("api name", n),
        Command::SetReplicaModels {
            replica_id,
            model_ids,
        } => {
            name("replica_id", replica_id)?;
            count(
                "model_ids",
                model_ids.len() as u64,
                MAX_REPLICA_MODELS as u64,
            )?;
            model_ids
                .iter()
                .try_for_each(|id| text("model_id", id, MAX_MODEL_ID_BYTES))
        }
    }
}

fn check_node(n: &Node) -> Result<(), StateError> {
    name("node_id", &n.id)?;
    text("hostname", &n.hostname, MAX_TEXT_BYTES)?;
    text("http_address", &n.http_address, MAX_TEXT_BYTES)?;
    amount("num_cpus", n.num_cpus, MAX_NODE_CPUS)?;
    amount("num_gpus", n.num_gpus, MAX_NODE_GPUS)
}

fn check_backend(b: &Backend) -> Result<(), StateError> {
    name("backend name", &b.name)?;
    name("code_digest", &b.code_digest)?;
    text("state", &b.state, MAX_TEXT_BYTES)?;
    text("error", &b.error, MAX_ERROR_BYTES)?;
    check_blobs(&b.blobs)?;
    match &b.config {
        Some(c) => check_config(c),
        None => Ok(()),
    }
}

fn check_blobs(blobs: &[String]) -> Result<(), StateError> {
    count("blobs", blobs.len() as u64, MAX_BACKEND_BLOBS as u64)?;
    blobs.iter().try_for_each(|d| name("blob digest", d))
}

fn check_config(c: &BackendConfig) -> Result<(), StateError> {
    let per_backend = u64::from(MAX_REPLICAS_PER_BACKEND);
    count("num_replicas", u64::from(c.num_replicas), per_backend)?;
    if let Some(a) = &c.autoscaling {
        count(
            "autoscaling.max_replicas",
            u64::from(a.max_replicas),
            per_backend,
        )?;
    }
    count(
        "max_concurrent_queries",
        u64::from(c.max_concurrent_queries),
        u64::from(MAX_CONCURRENT_QUERIES),
    )?;
    count(
        "max_batch_size",
        u64::from(c.max_batch_size),
        u64::from(MAX_BATCH_SIZE),
    )?;
    count(
        "max_queued_requests",
        u64::from(c.max_queued_requests),
        u64::from(MAX_QUEUED_REQUESTS),
    )?;
    amount("num_cpus", c.num_cpus, MAX_NODE_CPUS)?;
    amount("num_gpus", c.num_gpus, MAX_NODE_GPUS)?;
    amount("batch_wait_timeout", c.batch_wait_timeout, MAX_SECONDS)?;
    amount(
        "experimental_graceful_shutdown_timeout_s",
        c.graceful_shutdown_timeout_s,
        MAX_GRACEFUL_SHUTDOWN_S,
    )?;
    text("user_config", &c.user_config_json, MAX_CONFIG_BYTES)?;
    name("max_surge", &c.max_surge)?;
    name("max_unavailable", &c.max_unavailable)
}

fn check_endpoint(e: &Endpoint) -> Result<(), StateError> {
    name("endpoint name", &e.name)?;
    text("route", &e.route, MAX_TEXT_BYTES)?;
    count("methods", e.methods.len() as u64, MAX_METHODS as u64)?;
    e.methods.iter().try_for_each(|m| name("methods", m))?;
    count(
        "traffic (backends)",
        e.traffic.len() as u64,
        MAX_BACKENDS as u64,
    )?;
    count(
        "shadow (backends)",
        e.shadow.len() as u64,
        MAX_BACKENDS as u64,
    )?;
    e.traffic
        .keys()
        .chain(e.shadow.keys())
        .try_for_each(|b| name("traffic backend", b))?;
    text("grpc_service", &e.grpc_service, MAX_TEXT_BYTES)?;
    count(
        "grpc_descriptor (bytes)",
        e.grpc_descriptor.len() as u64,
        MAX_DESCRIPTOR_BYTES as u64,
    )
}

fn check_http_options(o: &HttpOptions) -> Result<(), StateError> {
    name("http_options.location", &o.location)?;
    text("http_options.host", &o.host, MAX_TEXT_BYTES)?;
    count("http_options.port", u64::from(o.port), u64::from(u16::MAX))?;
    text(
        "http_options.middlewares",
        &o.middlewares_json,
        MAX_CONFIG_BYTES,
    )
}

fn check_api(a: &Api) -> Result<(), StateError> {
    name("api name", &a.name)?;
    name("api kind", &a.kind)?;
    text("api spec", &a.spec_json, MAX_CONFIG_BYTES)?;
    name("api package_digest", &a.package_digest)?;
    text("api fingerprint", &a.fingerprint, MAX_TEXT_BYTES)
}

fn check_job(cmd: &JobCommand) -> Result<(), StateError> {
    match cmd {
        JobCommand::Create { id, spec, .. } => {
            name("job id", id)?;
            name("api", &spec.api)?;
            name("enqueuer", &spec.enqueuer)?;
            count(
                "workers",
                u64::from(spec.workers),
                u64::from(MAX_JOB_WORKERS),
            )?;
            count(
                "max_receive_count",
                u64::from(spec.max_receive_count),
                u64::from(MAX_RECEIVE_COUNT),
            )?;
            amount("timeout", spec.timeout_s, MAX_SECONDS)?;
            amount("retention", spec.retention_s, MAX_JOB_RETENTION_S)?;
            text("config", &spec.config_json, MAX_CONFIG_BYTES)
        }
        JobCommand::Enqueue {
            id,
            first_index,
            batches,
        } => {
            name("job id", id)?;
            count("first_index", *first_index, MAX_JOB_BATCHES)?;
            count(
                "batches (in one write)",
                batches.len() as u64,
                MAX_ENQUEUE_BATCHES as u64,
            )?;
            let mut bytes = 0usize;
            for (i, b) in batches.iter().enumerate() {
                count(
                    &format!("batch {} (bytes)", *first_index + i as u64),
                    b.len() as u64,
                    MAX_JOB_BATCH_BYTES as u64,
                )?;
                bytes += b.len();
            }
            count(
                "batches (bytes in one write)",
                bytes as u64,
                MAX_ENQUEUE_BYTES as u64,
            )
        }
        JobCommand::FinishEnqueue {
            id, total, error, ..
        } => {
            name("job id", id)?;
            count("total", *total, MAX_JOB_BATCHES)?;
            text("error", error, MAX_ERROR_BYTES)
        }
        JobCommand::Lease {
            id,
            worker,
            max,
            visibility_ms,
            ..
        } => {
            name("job id", id)?;
            name("worker_id", worker)?;
            count("max", u64::from(*max), u64::from(MAX_LEASE_BATCHES))?;
            if !(0..=MAX_VISIBILITY_MS).contains(visibility_ms) {
                return Err(refuse(
                    "visibility_s",
                    format!(
                        "{} s is not from 0 to {} s",
                        *visibility_ms as f64 / 1000.0,
                        MAX_VISIBILITY_MS / 1000
                    ),
                ));
            }
            Ok(())
        }
        JobCommand::Ack {
            id,
            worker,
            results,
            ..
        } => {
            name("job id", id)?;
            name("worker_id", worker)?;
            count(
                "results",
                results.len() as u64,
                u64::from(MAX_LEASE_BATCHES),
            )?;
            results
                .iter()
                .try_for_each(|r| text("error", &r.error, MAX_ERROR_BYTES))
        }
        JobCommand::Complete {
            id, worker, error, ..
        } => {
            name("job id", id)?;
            name("worker_id", worker)?;
            text("error", error, MAX_ERROR_BYTES)
        }
        JobCommand::ReleaseWorker { id, worker } => {
            name("job id", id)?;
            name("worker_id", worker)
        }
        JobCommand::Stop {
            id, status, error, ..
        } => {
            name("job id", id)?;
            name("status", status)?;
            text("error", error, MAX_ERROR_BYTES)
        }
        JobCommand::Finish {
            id,
            worker,
            error,
            result,
            ..
        } => {
            name("job id", id)?;
            name("worker_id", worker)?;
            text("error", error, MAX_ERROR_BYTES)?;
            text("result", result, MAX_JOB_RESULT_BYTES)
        }
        JobCommand::Expire { id, leases } => {
            name("job id", id)?;
            count(
                "leases (in one expiry)",
                leases.len() as u64,
                u64::from(MAX_LEASE_BATCHES),
            )
        }
    }
}
