//! Who may call what on a head's control port. Three credentials, all from
//! the cluster token (`serval_protos::auth`):
//!
//! - the cluster token itself: the admin credential (CLI, SDK, node
//!   agents, proxies); every `Control` call.
//! - the replica token of a backend (`serval_protos::auth::replica_token`):
//!   what the node agent gives each replica of that backend as
//!   `SERVAL_TOKEN`; only the `Control` calls in [`REPLICA_CALLS`], and of
//!   those only its own API's packages and jobs ([`Credential::api`]).
//! - the peer key, `derive(token, PURPOSE_PEER)`: what heads present to
//!   each other; every `RaftPeer` call and nothing else. The cluster token
//!   is refused there, so no client ever speaks raft by mistake.
//!
//! The peer key is derived, not a separate random secret handed over when
//! a head joins: a holder of the cluster token can run code on every node
//! (a backend with `num_cpus: 0` may be placed on a head) and read any
//! secret in a head's data dir, so a separate secret would keep nothing
//! from it, and deriving needs no exchange, no extra file and no upgrade
//! path. What the split buys is that neither narrower credential works
//! where the other is needed, and neither yields the cluster token.
//!
//! The check runs before tonic decodes anything ([`Authenticated`] sees the
//! HTTP/2 request: its path names the method), and compares in constant
//! time. A refused call is UNAUTHENTICATED (no or an unknown credential)
//! or PERMISSION_DENIED (a replica token outside its allow-list).

use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use serval_protos::auth::{
    constant_time_eq, derive_hex, replica_token_backend, validate_token, TokenError,
};
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

/// The `Control` methods a replica token may call: what code running in a
/// replica needs, found by reading what the SDK calls from a replica:
/// - handles and `serve.status()`/`serval.client()` reads: `Watch`,
///   `GetSnapshot`, and `ReportLoad` (handles count towards autoscaling
///   like proxies do);
/// - Cortex project packages, fetched by each replica: `GetBlob`, `HasBlob`
///   (only the blobs its backend lists, [`Credential::may_read_blob`]);
/// - the BatchAPI gateway and its workers (`cortex/batch.py`, through
///   `python-sdk/src/jobs.rs`): every job call, on the jobs of their own
///   API ([`Credential::api`]);
/// - the gateway starts and removes the worker backend of a job:
///   `CreateBackend`/`DeleteBackend`, only for a backend named
///   `<api>--job-<id>` of an existing job of its own api
///   ([`Credential::may_manage_backend`]), and `PutBlob` for that
///   backend's code, which the state names by digest (a blob nothing
///   names is collected after a grace: see `store::blobs`).
///
/// A replica token reads the routing table, which names the backends' code
/// only by digest; the code blobs themselves are not on its backend's list,
/// so it cannot fetch them: another backend's code may hold its secrets.
/// Node agents fetch code with the cluster token.
///
/// Everything else (deploying, routing, package uploads, node registration,
/// shutdown) needs the cluster token. Calls to the replica's own data plane
/// do not go through this service.
pub const REPLICA_CALLS: &[&str] = &[
    "Watch",
    "GetSnapshot",
    "ReportLoad",
    "ReportReplicaModels",
    "GetBlob",
    "HasBlob",
    "PutBlob",
    "CreateJob",
    "EnqueueBatches",
    "FinishEnqueue",
    "LeaseBatches",
    "AckBatches",
    "CompleteJob",
    "FinishJob",
    "ReleaseWorker",
    "GetJob",
    "ListJobs",
    "StopJob",
    "GetDeadLetters",
    "CreateBackend",
    "DeleteBackend",
];

/// The infix of a BatchAPI job's worker backend, `<api>--job-<job id>`
/// (`worker_backend` in `cortex/batch.py`).
pub const JOB_WORKER_INFIX: &str = "--job-";

/// The key heads present to each other's `RaftPeer` service.
pub fn peer_key(cluster_token: &str) -> String {
    derive_hex(cluster_token.as_bytes(), serval_protos::auth::PURPOSE_PEER)
}

/// The credential a call was accepted with, in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Admin,
    /// A replica of this backend.
    Replica(String),
    Peer,
}

impl Credential {
    /// The credential of an accepted request (the check put it there).
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Credential> {
        req.extensions().get::<Credential>().cloned()
    }

    /// The API whose jobs and packages a replica credential reaches: its
    /// backend's name, or `<api>` for a job's worker backend
    /// `<api>--job-<id>`. `None` for any other credential (the admin
    /// reaches every API; the peer key no `Control` call).
    pub fn api(credential: Option<&Credential>) -> Option<&str> {
        match credential {
            Some(Credential::Replica(backend)) => Some(
                backend
                    .rsplit_once(JOB_WORKER_INFIX)
                    .map_or(backend.as_str(), |(api, _)| api),
            ),
            _ => None,
        }
    }

    /// Refuses a replica credential the jobs of an API other than its own.
    pub fn may_use_jobs_of(credential: Option<&Credential>, api: &str) -> Result<(), Status> {
        match Self::api(credential) {
            Some(own) if own != api => Err(Status::permission_denied(format!(
                "the replica credential of API '{own}' may not use the jobs of API '{api}'"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a replica credential a blob its backend does not list
    /// (`Backend.blobs`; a job's worker also reads its API's).
    /// `blobs_of(backend)` gives a backend's list.
    pub fn may_read_blob(
        credential: Option<&Credential>,
        digest: &str,
        blobs_of: impl Fn(&str) -> Vec<String>,
    ) -> Result<(), Status> {
        let Some(Credential::Replica(backend)) = credential else {
            return Ok(());
        };
        let api = Self::api(credential).unwrap_or(backend);
        if blobs_of(backend)
            .iter()
            .chain(&blobs_of(api))
            .any(|d| d == digest)
        {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "the replica credential of backend '{backend}' may read only its own API's blobs"
        )))
    }

    /// Refuses a replica token a backend that is not the worker backend of
    /// job `<id>` of api `<api>`, its own API; `job_api` looks a job's api
    /// up.
    pub fn may_manage_backend(
        credential: Option<&Credential>,
        backend: &str,
        job_api: impl FnOnce(&str) -> Option<String>,
    ) -> Result<(), Status> {
        if credential == Some(&Credential::Admin) {
            return Ok(());
        }
        let own = Self::api(credential);
        let allowed = backend
            .rsplit_once(JOB_WORKER_INFIX)
            .is_some_and(|(api, job)| own == Some(api) && job_api(job).as_deref() == Some(api));
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "the replica credential (a replica's SERVAL_TOKEN) may create and delete only \
                 the worker backends of batch jobs, not '{backend}'; to deploy from a replica, \
                 give it the cluster token (SERVAL_TOKEN in the API's env)"
            )))
        }
    }
}

/// What one service accepts.
#[derive(Clone)]
pub struct TokenCheck {
    /// (credential, its value) pairs tried in turn.
    accepted: Vec<(Credential, String)>,
    /// The cluster token, when replica tokens (derived from it per
    /// backend) are accepted too.
    replicas_of: Option<String>,
}

impl TokenCheck {
    /// The `Control` service: the cluster token, and the replica token for
    /// [`REPLICA_CALLS`]. Refuses to exist without a valid token, so a head
    /// never runs with authentication off.
    pub fn control(cluster_token: &str) -> Result<Self, TokenError> {
        validate_token(cluster_token)?;
        Ok(Self {
            accepted: vec![(Credential::Admin, cluster_token.to_string())],
            replicas_of: Some(cluster_token.to_string()),
        })
    }

    /// The `RaftPeer` service: the peer key only.
    pub fn peer(cluster_token: &str) -> Result<Self, TokenError> {
        validate_token(cluster_token)?;
        Ok(Self {
            accepted: vec![(Credential::Peer, peer_key(cluster_token))],
            replicas_of: None,
        })
    }

    /// The credential `presented` proves for the method at `path`
    /// (`/package.Service/Method`), or why the call is refused.
    pub fn check(&self, path: &str, presented: Option<&[u8]>) -> Result<Credential, Status> {
        let Some(presented) = presented else {
            return Err(Status::unauthenticated("missing cluster token"));
        };
        // Every candidate is compared, so the time taken does not say
        // which one matched.
        let mut found = None;
        for (credential, value) in &self.accepted {
            if constant_time_eq(presented, value.as_bytes()) {
                found = Some(credential.clone());
            }
        }
        if let Some(token) = &self.replicas_of {
            if let Some(backend) = replica_token_backend(token, presented) {
                found = Some(Credential::Replica(backend));
            }
        }
        let method = path.rsplit('/').next().unwrap_or_default();
        match found {
            None => Err(Status::unauthenticated(
                "wrong cluster token (or a credential this service does not take)",
            )),
            Some(Credential::Replica(_)) if !REPLICA_CALLS.contains(&method) => {
                Err(Status::permission_denied(format!(
                    "the replica credential (a replica's SERVAL_TOKEN) may not call {method}; \
                     give the replica the cluster token to allow it (SERVAL_TOKEN in the API's env)"
                )))
            }
            Some(credential) => Ok(credential),
        }
    }
}

/// A gRPC service behind a [`TokenCheck`]: refused calls are answered here,
/// accepted ones reach the service with their [`Credential`] attached.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    check: TokenCheck,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, check: TokenCheck) -> Self {
        Self { inner, check }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let presented = req
            .headers()
            .get(serval_protos::TOKEN_METADATA_KEY)
            .map(|v| v.as_bytes());
        match self.check.check(req.uri().path(), presented) {
            Ok(credential) => {
                req.extensions_mut().insert(credential);
                Either::Right(self.inner.call(req))
            }
            Err(status) => Either::Left(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_protos::auth::replica_token;

    const TOKEN: &str = "0123456789abcdef";

    #[test]
    fn each_credential_opens_only_its_calls() {
        assert_eq!(TokenCheck::control("").err(), Some(TokenError::Empty));
        assert!(TokenCheck::peer("short").is_err());
        let control = TokenCheck::control(TOKEN).unwrap();
        let peer = TokenCheck::peer(TOKEN).unwrap();
        let replica = replica_token(TOKEN, "api");
        let key = peer_key(TOKEN);
        let call = |check: &TokenCheck, method: &str, token: &str| {
            check
                .check(
                    &format!("/serval.control.Control/{method}"),
                    Some(token.as_bytes()),
                )
                .map_err(|s| s.code())
        };
        assert_eq!(call(&control, "Shutdown", TOKEN), Ok(Credential::Admin));
        assert_eq!(
            call(&control, "Watch", &replica),
            Ok(Credential::Replica("api".into()))
        );
        assert_eq!(
            call(
                &control,
                "Watch",
                &replica_token("another cluster's", "api")
            ),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&control, "Shutdown", &replica),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            call(&control, "Watch", &key),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&peer, "Vote", &key), Ok(Credential::Peer));
        assert_eq!(
            call(&peer, "Vote", TOKEN),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            control.check("/x/Watch", None).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
    }

    #[test]
    fn a_replica_manages_only_job_workers_of_existing_jobs_of_its_api() {
        let jobs = |id: &str| match id {
            "j1" => Some("api".to_string()),
            "j9" => Some("other".to_string()),
            _ => None,
        };
        let gateway = Credential::Replica("api".into());
        let replica = Some(&gateway);
        assert!(Credential::may_manage_backend(replica, "api--job-j1", jobs).is_ok());
        assert!(Credential::may_manage_backend(replica, "other--job-j1", jobs).is_err());
        assert!(Credential::may_manage_backend(replica, "api--job-j2", jobs).is_err());
        assert!(Credential::may_manage_backend(replica, "api", jobs).is_err());
        // Another API's job, real as it is, is not this gateway's.
        assert!(Credential::may_manage_backend(replica, "other--job-j9", jobs).is_err());
        assert!(Credential::may_manage_backend(Some(&Credential::Admin), "api", jobs).is_ok());
    }

    #[test]
    fn a_replica_reads_only_its_api_s_blobs_and_jobs() {
        let blobs = |backend: &str| match backend {
            "api" => vec!["pkg".to_string(), "env".to_string()],
            "api--job-j1" => vec![],
            "other" => vec!["other-pkg".to_string()],
            _ => vec![],
        };
        let gateway = Credential::Replica("api".into());
        let worker = Credential::Replica("api--job-j1".into());
        for own in [&gateway, &worker] {
            assert!(Credential::may_read_blob(Some(own), "pkg", blobs).is_ok());
            assert!(Credential::may_read_blob(Some(own), "env", blobs).is_ok());
            assert!(Credential::may_read_blob(Some(own), "other-pkg", blobs).is_err());
            assert!(Credential::may_use_jobs_of(Some(own), "api").is_ok());
            assert!(Credential::may_use_jobs_of(Some(own), "other").is_err());
        }
        assert!(Credential::may_read_blob(Some(&Credential::Admin), "other-pkg", blobs).is_ok());
        assert!(Credential::may_use_jobs_of(Some(&Credential::Admin), "other").is_ok());
    }
}
