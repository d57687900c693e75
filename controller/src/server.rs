//! The controller's front door: one head's controller assembled from a
//! [`ControllerConfig`] and the connections of its control listener. It
//! opens the raft store, serves the `Control` and `RaftPeer` services (with
//! TLS when configured), joins the other heads or starts a cluster, runs
//! the reconciler, and stops it all, each wait bounded, when told to.
//!
//! [`start`] returns once this head is a raft member that knows a leader
//! (what a head's node agent and proxy need before they start);
//! [`Controller::serve`] then runs until its shutdown future resolves or
//! raft stops on an error. [`run`] is the two in one.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serval_protos::control::{HttpOptions, JoinHeadRequest};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::ServerTlsConfig;

use crate::error::ControllerError;
use crate::peer_service::PeerService;
use crate::reconciler::Reconciler;
use crate::service::{ControlService, UnnamedBlobLimit};
use crate::store::{self, forward::propose_via_leader, Command, Raft};

/// HTTP/2 streams (calls) one control connection may have open; a `Watch`
/// is one. The control plane's clients are few and known: these are
/// defaults, not flags.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Bytes of one call's header list.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams a client may reset before they were handled, pending at once.
const MAX_PENDING_RESET_STREAMS: usize = 20;
/// The server pings every connection this often, so only a dead or silent
/// peer reaches the listener's idle timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a joining head keeps asking to be added, and then waits to
/// become a voter.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a starting head waits for a leader to be elected.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping controller waits for its gRPC server: `Watch`
/// streams of other processes keep it open, so not long.
const GRPC_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stopping controller waits for raft's core: it may be stuck on
/// peers that are going away at the same moment.
const RAFT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What one head's controller is.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where the raft store lives (created, private to this user).
    pub raft_dir: PathBuf,
    /// This head's raft member id, kept across restarts.
    pub raft_id: u64,
    /// The control address other heads dial (raft, forwarded writes);
    /// recorded in the raft membership when the head first starts or joins.
    pub advertised_address: String,
    /// The cluster token: clients present it; heads speak raft with a key
    /// derived from it ([`crate::auth::peer_key`]).
    pub token: String,
    /// Join the heads at this control address (HOST:PORT) as another raft
    /// member instead of starting a new cluster.
    pub join: Option<String>,
    /// The cluster-wide HTTP options a new cluster starts with; a joining
    /// head takes the cluster's as they are.
    pub http_options: HttpOptions,
    /// TLS of the control listener (clients and other heads).
    pub tls: Option<ServerTlsConfig>,
    /// A node that sent no heartbeat for this long is declared dead.
    pub node_timeout: Duration,
    /// Filled once the store is open; the caller keeps a clone to answer
    /// `/-/readyz`, from before this head joins a cluster.
    pub write_check: WriteCheck,
    /// What blobs nothing names may hold ([`UnnamedBlobLimit`]).
    pub unnamed_blob_limit: UnnamedBlobLimit,
}

/// Whether this head can commit writes now (its `/-/readyz`): see
/// `store::can_write`. Clones share it.
#[derive(Clone, Default)]
pub struct WriteCheck(Arc<OnceLock<Raft>>);

impl WriteCheck {
    pub fn check(&self) -> Result<(), String> {
        match self.0.get() {
            Some(raft) => store::can_write(raft),
            None => Err("the controller's store is not open yet".into()),
        }
    }
}

impl std::fmt::Debug for WriteCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "WriteCheck(open)"
        } else {
            "WriteCheck(not open)"
        })
    }
}

/// A started controller: a raft member that knows a leader, serving its
/// gRPC services and running its reconciler.
pub struct Controller {
    raft: Raft,
    grpc: JoinHandle<()>,
    stop_grpc: watch::Sender<bool>,
    /// Started once this head is a member that knows a leader.
    reconciler: Option<JoinHandle<()>>,
}

/// [`start`], then [`Controller::serve`] until `shutdown` resolves.
pub async fn run<I, IO, IE>(
    config: ControllerConfig,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    start(config, incoming).await?.serve(shutdown).await
}

/// Opens the store, serves the control services on the connections of
/// `incoming` (the control listener's, under its own bounds), joins the
/// cluster or starts one, and starts the reconciler. Returns once a leader
/// is known and, on a new cluster, its options are set.
pub async fn start<I, IO, IE>(
    config: ControllerConfig,
    incoming: I,
) -> Result<Controller, ControllerError>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let peer_key = crate::auth::peer_key(&config.token);
    let membership = store::Membership {
        raft_id: config.raft_id,
        address: config.advertised_address.clone(),
        peer_key: peer_key.clone(),
        bootstrap: config.join.is_none(),
    };
    let (raft, sm) = store::open(&config.raft_dir, &membership).await?;
    let _ = config.write_check.0.set(raft.clone());
    let service = ControlService::new(
        raft.clone(),
        sm.clone(),
        config.raft_id,
        config.advertised_address.clone(),
        config.token.clone(),
    )
    .map_err(|e| ControllerError::Start(e.to_string()))?
    .with_unnamed_blob_limit(config.unnamed_blob_limit);
    let soft = service.soft_state();
    let peers = PeerService::new(raft.clone(), &config.token)
        .map_err(|e| ControllerError::Start(e.to_string()))?;
    // Bounds per connection (the listener sets the rest); no request
    // timeout: Watch streams live as long as their clients.
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS));
    if let Some(tls) = config.tls {
        builder = builder.tls_config(tls).map_err(|e| {
            ControllerError::Start(format!(
                "--tls-cert/--tls-key: {}",
                serval_protos::tls::error_chain(&e)
            ))
        })?;
    }
    let (stop_grpc, mut stopped) = watch::channel(false);
    // Served before joining: the leader replicates to this head through it.
    let grpc = tokio::spawn(async move {
        let result = builder
            .add_service(service.into_server())
            .add_service(peers.into_server())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "control service stopped");
        }
    });
    let mut controller = Controller {
        raft: raft.clone(),
        grpc,
        stop_grpc,
        reconciler: None,
    };
    // A failed start stops what it started, as a stop does.
    let joined = async {
        if let Some(join) = &config.join {
            join_cluster(
                &raft,
                join,
                &peer_key,
                config.raft_id,
                &config.advertised_address,
            )
            .await?;
        }
        wait_for_leader(&raft).await?;
        // The first head sets the cluster-wide options.
        if config.join.is_none() {
            propose_via_leader(&raft, &peer_key, Command::SetShuttingDown(false)).await?;
            propose_via_leader(
                &raft,
                &peer_key,
                Command::SetHttpOptions(config.http_options),
            )
            .await?;
        }
        Ok::<_, ControllerError>(())
    };
    if let Err(e) = joined.await {
        controller.stop().await;
        return Err(e);
    }
    controller.reconciler = Some(tokio::spawn(
        Reconciler {
            raft: raft.clone(),
            sm,
            soft,
            node_timeout: config.node_timeout,
        }
        .run(),
    ));
    Ok(controller)
}

impl Controller {
    /// Serves until `shutdown` resolves, then stops. A head whose raft
    /// storage failed (a full disk) cannot commit: the controller stops
    /// then too, with [`ControllerError::RaftStopped`], so its process can
    /// exit non-zero and be restarted rather than serve reads and refuse
    /// every write.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        let failure = tokio::select! {
            () = shutdown => None,
            error = raft_failed(&self.raft) => Some(error),
        };
        self.stop().await;
        match failure {
            Some(error) => Err(ControllerError::RaftStopped(error)),
            None => Ok(()),
        }
    }

    /// Stops the reconciler, the gRPC server and raft; every wait bounded.
    async fn stop(self) {
        if let Some(reconciler) = &self.reconciler {
            reconciler.abort();
        }
        let _ = self.stop_grpc.send(true);
        if tokio::time::timeout(GRPC_STOP_TIMEOUT, self.grpc)
            .await
            .is_err()
        {
            tracing::debug!("control service still had open streams when it stopped");
        }
        if tokio::time::timeout(RAFT_STOP_TIMEOUT, self.raft.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("raft did not stop within {RAFT_STOP_TIMEOUT:?}");
        }
    }
}

/// Resolves with the error once this head's raft core stops on one (its
/// storage failed: openraft stops the core on any storage error).
async fn raft_failed(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            tracing::error!(error = %fatal, "raft stopped");
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the raft core ended".into();
        }
    }
}

/// Asks the cluster at `join` to add this head to the raft group, unless it
/// is a member already (a restarted head), and waits until it is a voter.
async fn join_cluster(
    raft: &Raft,
    join: &str,
    peer_key: &str,
    raft_id: u64,
    address: &str,
) -> Result<(), ControllerError> {
    let is_member = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
        m.membership_config
            .membership()
            .voter_ids()
            .any(|id| id == raft_id)
    };
    if is_member(&raft.metrics().borrow()) {
        return Ok(());
    }
    let mut peer = serval_protos::client::connect_peer_lazy(join, peer_key)
        .map_err(|e| ControllerError::Start(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let request = JoinHeadRequest {
            raft_id,
            address: address.to_string(),
        };
        match peer.join_head(request).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return Err(ControllerError::Start(format!(
                    "the head at {join} refused the token"
                )))
            }
            Err(s) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %s.message(), "joining {join}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => {
                return Err(ControllerError::Start(format!(
                    "joining the head at {join}: {}",
                    s.message()
                )))
            }
        }
    }
    wait_for_raft(
        raft,
        JOIN_TIMEOUT,
        "this head did not become a raft voter",
        is_member,
    )
    .await
}

async fn wait_for_leader(raft: &Raft) -> Result<(), ControllerError> {
    wait_for_raft(raft, LEADER_TIMEOUT, "no raft leader was elected", |m| {
        m.current_leader.is_some()
    })
    .await
}

/// Waits until raft's metrics satisfy `ready`, at most `timeout`;
/// `failed` says what did not happen.
async fn wait_for_raft(
    raft: &Raft,
    timeout: Duration,
    failed: &str,
    ready: impl Fn(&openraft::RaftMetrics<u64, openraft::BasicNode>) -> bool,
) -> Result<(), ControllerError> {
    let mut metrics = raft.metrics();
    let waited = tokio::time::timeout(timeout, metrics.wait_for(ready))
        .await
        .map(|r| r.map(|_| ()));
    match waited {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(ControllerError::Start(format!("{failed}: raft stopped"))),
        Err(_) => Err(ControllerError::Start(format!(
            "{failed} within {} s",
            timeout.as_secs()
        ))),
    }
}
