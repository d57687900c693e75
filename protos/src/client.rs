//! Connecting to the controller: one place that builds a control client
//! carrying the cluster token, used by the CLI, node agents, proxies and
//! the Python SDK.

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::control::control_client::ControlClient;
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

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad controller address '{addr}': {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("the cluster token contains characters that cannot travel in gRPC metadata")]
    BadToken,
    #[error("cannot reach the controller at {addr}: {source}")]
    Unreachable { addr: String, source: tonic::transport::Error },
}

fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Endpoint::from_shared(url)
        .map(|e| e.connect_timeout(std::time::Duration::from_secs(3)).tcp_nodelay(true))
        .map_err(|e| ConnectError::BadAddress { addr: addr.to_string(), reason: e.to_string() })
}

fn wrap(channel: Channel, token: &str) -> Result<Client, ConnectError> {
    let token = if token.is_empty() {
        None
    } else {
        Some(token.parse::<AsciiMetadataValue>().map_err(|_| ConnectError::BadToken)?)
    };
    Ok(ControlClient::with_interceptor(channel, WithToken { token })
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024))
}

/// Connects now; fails if the controller does not answer.
pub async fn connect(addr: &str, token: &str) -> Result<Client, ConnectError> {
    let channel = endpoint(addr)?
        .connect()
        .await
        .map_err(|source| ConnectError::Unreachable { addr: addr.to_string(), source })?;
    wrap(channel, token)
}

/// A client that connects on first use and reconnects after failures.
pub fn connect_lazy(addr: &str, token: &str) -> Result<Client, ConnectError> {
    wrap(endpoint(addr)?.connect_lazy(), token)
}

/// Follows the controller's Watch stream forever: the receiver holds the
/// newest snapshot, `None` until the first arrives. On any error it
/// reconnects with capped backoff and KEEPS the last snapshot, so whoever
/// routes from it keeps serving while the controller is down or electing.
pub fn spawn_watch(
    addr: String,
    token: String,
    include_code: bool,
) -> tokio::sync::watch::Receiver<Option<std::sync::Arc<crate::control::ClusterSnapshot>>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        const MIN: std::time::Duration = std::time::Duration::from_millis(100);
        const MAX: std::time::Duration = std::time::Duration::from_secs(2);
        let mut backoff = MIN;
        loop {
            let result = async {
                let mut client = connect(&addr, &token).await.map_err(|e| e.to_string())?;
                let mut stream = client
                    .watch(crate::control::WatchRequest { include_code })
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(snapshot)) => {
                            backoff = MIN;
                            if tx.send(Some(std::sync::Arc::new(snapshot))).is_err() {
                                return Ok(()); // nobody listens any more
                            }
                        }
                        Ok(None) => return Err("watch stream ended".to_string()),
                        Err(s) => return Err(s.message().to_string()),
                    }
                }
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, %addr, "watch interrupted; reconnecting"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX);
        }
    });
    rx
}
