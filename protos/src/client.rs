//! Connecting to the controller: one place that builds a control client
//! carrying the cluster token, used by the CLI, node agents, proxies and
//! the Python SDK.

use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::channel::Change;
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

pub type Client = ControlClient<InterceptedService<Explained, WithToken>>;
/// Head-to-head client (raft messages, forwarded writes, joins).
pub type PeerClient = RaftPeerClient<InterceptedService<Explained, WithToken>>;

/// A channel whose transport errors say what went wrong: tonic reports a
/// plaintext client talking to a TLS head (or the reverse, or a refused
/// certificate) as a bare "transport error". The status code stays the one
/// tonic would give; only the message gains the error's sources and, for a
/// TLS mismatch, a sentence saying so.
#[derive(Clone, Debug)]
pub struct Explained {
    inner: Channel,
    addr: std::sync::Arc<str>,
}

impl Explained {
    fn new(inner: Channel, addr: &str) -> Self {
        Explained {
            inner,
            addr: addr.into(),
        }
    }

    async fn status(addr: &str, e: tonic::transport::Error) -> tonic::codegen::StdError {
        let chain = crate::tls::error_chain(&e);
        // A plaintext call that failed on an established connection: ask
        // whether the head speaks TLS (the symptom alone can be a mere
        // broken pipe).
        let serves_tls = crate::tls::tls().is_none()
            && !chain.contains("tcp connect error")
            && ["broken pipe", "reset", "closed", "connection error"]
                .iter()
                .any(|s| chain.contains(s))
            && crate::tls::probe_serves_tls(addr).await;
        let message = match crate::tls::tls_hint(addr, &chain, serves_tls) {
            Some(hint) => format!("{chain} ({hint})"),
            None => chain,
        };
        let code = tonic::Status::from_error(Box::new(e)).code();
        Box::new(tonic::Status::new(code, message))
    }
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Explained {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::codegen::StdError;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            let message = explain(&self.addr, &e);
            let code = tonic::Status::from_error(Box::new(e)).code();
            Box::new(tonic::Status::new(code, message)) as tonic::codegen::StdError
        })
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.inner.call(request);
        let addr = self.addr.clone();
        Box::pin(async move {
            match response.await {
                Ok(r) => Ok(r),
                Err(e) => Err(Self::status(&addr, e).await),
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad controller address '{addr}': {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("the cluster token contains characters that cannot travel in gRPC metadata")]
    BadToken,
    #[error("cannot reach the controller at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
}

/// The endpoint for one head: `https://` verified against the process's
/// CA when [`crate::tls::set_tls`] was given one, `http://` otherwise. An
/// explicit `http://` prefix is ignored (TLS is a process-wide choice).
fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    let bad = |reason: String| ConnectError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    let tls = crate::tls::tls();
    let bare = match addr.split_once("://") {
        Some(("https", _)) if tls.is_none() => {
            return Err(bad(format!(
                "an https:// address needs the cluster's CA (--tls-ca or {})",
                crate::tls::ENV_TLS_CA
            )))
        }
        Some(("http" | "https", rest)) => rest,
        Some((scheme, _)) => return Err(bad(format!("unknown scheme {scheme}://"))),
        None => addr,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .map_err(|e| bad(format!("TLS: {}", crate::tls::error_chain(&e))))?;
    }
    Ok(endpoint)
}

fn wrap(channel: Explained, token: &str) -> Result<Client, ConnectError> {
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
        token
            .parse::<AsciiMetadataValue>()
            .map(Some)
            .map_err(|_| ConnectError::BadToken)
    }
}

/// A head-to-head client that connects on first use and reconnects after
/// failures.
pub fn connect_peer_lazy(addr: &str, token: &str) -> Result<PeerClient, ConnectError> {
    let channel = Explained::new(endpoint(addr)?.connect_lazy(), addr);
    Ok(RaftPeerClient::with_interceptor(
        channel,
        WithToken {
            token: token_value(token)?,
        },
    )
    .max_decoding_message_size(256 * 1024 * 1024)
    .max_encoding_message_size(256 * 1024 * 1024))
}

/// A transport error with its sources and, when it looks like one side
/// speaks TLS and the other does not (or the certificate is refused), a
/// sentence saying so.
pub fn explain(addr: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let chain = crate::tls::error_chain(e);
    match crate::tls::tls_hint(addr, &chain, false) {
        Some(hint) => format!("{chain} ({hint})"),
        None => chain,
    }
}

/// The heads of a comma-separated address list ("h1:6390,h2:6390").
/// Every head serves every control call (writes are forwarded to the
/// leader), so clients may use any of them.
pub fn heads(addrs: &str) -> Vec<&str> {
    addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// Connects now to the first head of `addrs` that answers.
pub async fn connect(addrs: &str, token: &str) -> Result<Client, ConnectError> {
    let mut last = None;
    for addr in heads(addrs) {
        match endpoint(addr)?.connect().await {
            Ok(channel) => return wrap(Explained::new(channel, addr), token),
            Err(e) => {
                last = Some(ConnectError::Unreachable {
                    addr: addr.to_string(),
                    reason: explain(addr, &e),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::BadAddress {
        addr: addrs.to_string(),
        reason: "no address".into(),
    }))
}

/// A client that connects on first use and reconnects after failures;
/// with several heads, calls go to those that answer (failover).
pub fn connect_lazy(addrs: &str, token: &str) -> Result<Client, ConnectError> {
    let list = heads(addrs);
    match list.as_slice() {
        [] => Err(ConnectError::BadAddress {
            addr: addrs.to_string(),
            reason: "no address".into(),
        }),
        [one] => wrap(Explained::new(endpoint(one)?.connect_lazy(), one), token),
        many => wrap(Explained::new(balanced(many)?, addrs), token),
    }
}

/// How often a client of several heads checks which of them accept
/// connections.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A channel balancing calls over the heads that accept connections. A
/// head that refuses them (killed, restarting) leaves the pool at the next
/// probe and comes back once it accepts again; until the probe sees it, a
/// call sent there fails with the connect error, and a caller that retries
/// goes on to a live head. When no head answers, all stay in the pool, so
/// calls fail at once with the reason instead of waiting.
fn balanced(addrs: &[&str]) -> Result<Channel, ConnectError> {
    let heads = addrs
        .iter()
        .map(|a| Ok((a.to_string(), endpoint(a)?)))
        .collect::<Result<Vec<(String, Endpoint)>, ConnectError>>()?;
    let (channel, changes) = Channel::balance_channel::<String>(heads.len());
    for (key, endpoint) in &heads {
        // The capacity is one per head: these cannot be refused.
        let _ = changes.try_send(Change::Insert(key.clone(), endpoint.clone()));
    }
    tokio::spawn(async move {
        let mut in_pool: Vec<bool> = vec![true; heads.len()];
        // Ends once the channel (every clone of the client) is gone.
        while !changes.is_closed() {
            tokio::time::sleep(PROBE_EVERY).await;
            let mut up = Vec::with_capacity(heads.len());
            for (_, endpoint) in &heads {
                let authority = endpoint.uri().authority().map(|a| a.to_string());
                up.push(match authority {
                    Some(a) => matches!(
                        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(a))
                            .await,
                        Ok(Ok(_))
                    ),
                    None => true,
                });
            }
            let none_up = !up.contains(&true);
            for (i, (key, endpoint)) in heads.iter().enumerate() {
                let want = up[i] || none_up;
                if want == in_pool[i] {
                    continue;
                }
                let change = if want {
                    tracing::info!(head = %key, "head accepts connections again");
                    Change::Insert(key.clone(), endpoint.clone())
                } else {
                    tracing::info!(head = %key, "head refuses connections; calls go to the others");
                    Change::Remove(key.clone())
                };
                if changes.send(change).await.is_err() {
                    return;
                }
                in_pool[i] = want;
            }
        }
    });
    Ok(channel)
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
pub fn spawn_watch(addrs: String, token: String) -> SnapshotReceiver {
    let (tx, rx) = tokio::sync::watch::channel::<Option<std::sync::Arc<ClusterSnapshot>>>(None);
    tokio::spawn(async move {
        let mut backoff = WATCH_BACKOFF_MIN;
        let mut list: Vec<String> = heads(&addrs).into_iter().map(String::from).collect();
        let mut next = 0usize;
        loop {
            // Heads learned from the last snapshot join the list, so a
            // client given one head fails over to the others it joined.
            if let Some(snapshot) = tx.borrow().as_ref() {
                for head in &snapshot.heads {
                    if !head.address.is_empty() && !list.contains(&head.address) {
                        list.push(head.address.clone());
                    }
                }
            }
            let Some(addr) = list.get(next % list.len().max(1)).cloned() else {
                return;
            };
            next += 1;
            let mut received = false;
            let error = tokio::select! {
                e = stream_once(&addr, &token, &tx, &mut received) => e,
                _ = tx.closed() => return,
            };
            if received || !next.is_multiple_of(list.len()) {
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
            .map_err(|e| format!("connect to {addr}: {}", explain(addr, &e)))?;
        let mut client = wrap(Explained::new(channel, addr), token).map_err(|e| e.to_string())?;
        let mut stream = client
            .watch(WatchRequest::default())
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
