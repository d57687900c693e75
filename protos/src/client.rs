//! Connecting to the controller: one place that builds a control client
//! carrying the cluster token, used by the CLI, node agents, proxies and
//! the Python SDK.

use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::control::control_client::ControlClient;
use crate::control::raft_peer_client::RaftPeerClient;
use crate::control::{ClusterSnapshot, WatchRequest};
use crate::TOKEN_METADATA_KEY;

/// Adds the cluster token to every call.
#[derive(Clone)]
pub struct WithToken {
    token: Option<AsciiMetadataValue>,
}

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert(TOKEN_METADATA_KEY, t.clone());
        }
        Ok(req)
    }
}

pub type Client = ControlClient<InterceptedService<Channel, WithToken>>;
/// Head-to-head client (raft messages, forwarded writes, joins).
pub type PeerClient = RaftPeerClient<InterceptedService<Channel, WithToken>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad controller address '{addr}': {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("the cluster token contains characters that cannot travel in gRPC metadata")]
    BadToken,
    #[error("cannot reach the controller at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
}

fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url)
        .map(|e| e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true))
        .map_err(|e| ConnectError::BadAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

fn wrap(channel: Channel, token: &str) -> Result<Client, ConnectError> {
    let token = if token.is_empty() {
        None
    } else {
        Some(
            token
                .parse::<AsciiMetadataValue>()
                .map_err(|_| ConnectError::BadToken)?,
        )
    };
    Ok(
        ControlClient::with_interceptor(channel, WithToken { token })
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024),
    )
}

fn token_value(token: &str) -> Result<Option<AsciiMetadataValue>, ConnectError> {
    if token.is_empty() {
        Ok(None)
    } else {
        token.parse::<AsciiMetadataValue>().map(Some).map_err(|_| ConnectError::BadToken)
    }
}

/// A head-to-head client that connects on first use and reconnects after
/// failures.
pub fn connect_peer_lazy(addr: &str, token: &str) -> Result<PeerClient, ConnectError> {
    let channel = endpoint(addr)?.connect_lazy();
    Ok(RaftPeerClient::with_interceptor(channel, WithToken { token: token_value(token)? })
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024))
}

/// The heads of a comma-separated address list ("h1:6390,h2:6390").
/// Every head serves every control call (writes are forwarded to the
/// leader), so clients may use any of them.
pub fn heads(addrs: &str) -> Vec<&str> {
    addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
}

/// Connects now to the first head of `addrs` that answers.
pub async fn connect(addrs: &str, token: &str) -> Result<Client, ConnectError> {
    let mut last = None;
    for addr in heads(addrs) {
        match endpoint(addr)?.connect().await {
            Ok(channel) => return wrap(channel, token),
            Err(source) => last = Some(ConnectError::Unreachable { addr: addr.to_string(), source }),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::BadAddress { addr: addrs.to_string(), reason: "no address".into() }))
}

/// A client that connects on first use and reconnects after failures;
/// with several heads, calls go to those that answer (failover).
pub fn connect_lazy(addrs: &str, token: &str) -> Result<Client, ConnectError> {
    let list = heads(addrs);
    match list.as_slice() {
        [] => Err(ConnectError::BadAddress { addr: addrs.to_string(), reason: "no address".into() }),
        [one] => wrap(endpoint(one)?.connect_lazy(), token),
        many => {
            let endpoints = many.iter().map(|a| endpoint(a)).collect::<Result<Vec<_>, _>>()?;
            wrap(Channel::balance_list(endpoints.into_iter()), token)
        }
    }
}

/// The latest snapshot, `None` until the first one arrives.
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Option<std::sync::Arc<ClusterSnapshot>>>;

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// HTTP/2 pings on the quiet watch stream: a controller host that vanished
/// without closing the connection is noticed in seconds, not never.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows the controller's Watch stream on the current tokio runtime. On
/// any error it reconnects forever with capped exponential backoff and KEEPS
/// the last snapshot, so whoever routes from it keeps serving while the
/// controller is down or electing. The task ends when every receiver is gone.
///
/// With several heads (`addrs` comma-separated) it moves to the next head
/// whenever the stream breaks.
pub fn spawn_watch(addrs: String, token: String, include_code: bool) -> SnapshotReceiver {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = WATCH_BACKOFF_MIN;
        let list: Vec<String> = heads(&addrs).into_iter().map(String::from).collect();
        let mut next = 0usize;
        loop {
            let Some(addr) = list.get(next % list.len().max(1)).cloned() else { return };
            next += 1;
            let mut received = false;
            let error = tokio::select! {
                e = stream_once(&addr, &token, include_code, &tx, &mut received) => e,
                _ = tx.closed() => return,
            };
            if received || next % list.len() != 0 {
                // The head was healthy until now, or others remain to try
                // in this round: retry quickly.
                backoff = WATCH_BACKOFF_MIN;
            }
            tracing::warn!(control = %addr, error = %error, retry_in = ?backoff, "snapshot watch interrupted; serving from cache");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    });
    rx
}

/// One watch stream, until it fails; every snapshot replaces the cached one.
async fn stream_once(
    addr: &str,
    token: &str,
    include_code: bool,
    tx: &tokio::sync::watch::Sender<Option<std::sync::Arc<ClusterSnapshot>>>,
    received: &mut bool,
) -> String {
    let result: Result<(), String> = async {
        let channel = endpoint(addr)
            .map_err(|e| e.to_string())?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut client = wrap(channel, token).map_err(|e| e.to_string())?;
        let mut stream = client
            .watch(WatchRequest { include_code })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        while let Some(snapshot) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            *received = true;
            tracing::debug!(version = snapshot.version, "snapshot received");
            tx.send_replace(Some(std::sync::Arc::new(snapshot)));
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => "the controller ended the stream".to_string(),
        Err(e) => e,
    }
}
