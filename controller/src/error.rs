//! Errors of the controller. [`StateError`] is a refused command: it is
//! decided inside the replicated state machine, so every head refuses the
//! same commands and a refused command changes nothing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("backend '{0}' already exists")]
    BackendExists(String),
    #[error("backend '{0}' does not exist")]
    UnknownBackend(String),
    #[error("backend '{backend}' is still used by endpoint(s) {endpoints:?}; delete or retarget them first")]
    BackendInUse {
        backend: String,
        endpoints: Vec<String>,
    },
    #[error("endpoint '{0}' already exists")]
    EndpointExists(String),
    #[error("endpoint '{0}' does not exist")]
    UnknownEndpoint(String),
    #[error("route '{route}' is invalid: {reason}")]
    InvalidRoute { route: String, reason: String },
    #[error("route '{route}' of endpoint '{endpoint}' collides with route '{existing_route}' of endpoint '{existing}'")]
    RouteTaken {
        route: String,
        endpoint: String,
        existing_route: String,
        existing: String,
    },
    #[error("gRPC service '{service}' of endpoint '{endpoint}' is already served by endpoint '{existing}'")]
    GrpcServiceTaken {
        service: String,
        endpoint: String,
        existing: String,
    },
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("replica '{0}' does not exist")]
    UnknownReplica(String),
    #[error("node '{0}' does not exist")]
    UnknownNode(String),
    #[error("blob digest mismatch: the request names {claimed} but the data's sha256 is {actual}")]
    BlobDigestMismatch { claimed: String, actual: String },
    #[error("blob {blob} needs part {part}, which is not stored")]
    MissingBlobPart { blob: String, part: String },
    #[error("api '{0}' does not exist")]
    UnknownApi(String),
    #[error("job '{0}' does not exist")]
    UnknownJob(String),
    #[error("code_digest of backend '{backend}': blob {digest} is not stored; upload the pickled code with PutBlob first")]
    MissingCodeBlob { backend: String, digest: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("raft storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("not the leader; leader is {leader:?}")]
    NotLeader { leader: Option<String> },
    /// The leader could not get a majority of heads to commit the write in
    /// time (it is cut off from them, or they are down). Not retried: the
    /// entry may still be committed later, so the outcome is unknown.
    #[error("the write was not committed within {after:?}: the leader cannot reach a majority of heads; it may or may not take effect")]
    Uncommitted { after: std::time::Duration },
    #[error(transparent)]
    Refused(#[from] StateError),
    /// A head could not start its controller (join, election, TLS).
    #[error("{0}")]
    Start(String),
    /// Raft's core stopped on an error (its storage failed): this head can
    /// commit nothing more.
    #[error("raft stopped on an error, so this head stops: {0}")]
    RaftStopped(String),
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A backend config refused by `BackendConfig::validate` (the SDK runs the
/// same check before it sends one).
impl From<serval_protos::backend_config::ConfigError> for StateError {
    fn from(e: serval_protos::backend_config::ConfigError) -> Self {
        StateError::InvalidConfig {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<ControllerError> for tonic::Status {
    fn from(e: ControllerError) -> Self {
        use tonic::Code;
        let code = match &e {
            ControllerError::Refused(s) => match s {
                StateError::BackendExists(_)
                | StateError::EndpointExists(_)
                | StateError::RouteTaken { .. }
                | StateError::GrpcServiceTaken { .. } => Code::AlreadyExists,
                StateError::UnknownBackend(_)
                | StateError::UnknownEndpoint(_)
                | StateError::UnknownReplica(_)
                | StateError::UnknownNode(_)
                | StateError::UnknownApi(_)
                | StateError::UnknownJob(_) => Code::NotFound,
                StateError::BackendInUse { .. }
                | StateError::MissingBlobPart { .. }
                | StateError::MissingCodeBlob { .. } => Code::FailedPrecondition,
                StateError::InvalidRoute { .. }
                | StateError::InvalidConfig { .. }
                | StateError::BlobDigestMismatch { .. } => Code::InvalidArgument,
            },
            ControllerError::NotLeader { .. } => Code::Unavailable,
            ControllerError::Uncommitted { .. } => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
