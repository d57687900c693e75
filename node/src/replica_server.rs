//! The replica side of the data plane: accepts router connections on a Unix
//! socket (same node) and a TCP port (other nodes), reads request frames and
//! hands each to a [`Handler`], which answers through a [`Reply`] from any
//! thread. Python replicas implement [`Handler`] in python-sdk by queueing to
//! their one Python thread; [`EchoHandler`] is the native Rust kind used by
//! tests and benchmarks.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serval_protos::frame::{self, FrameReader, FrameSender, Payload, Request, RequestId, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// Answers one request. Dropping a `Reply` without sending leaves the router
/// to time out, so every path must send.
pub struct Reply {
    id: RequestId,
    tx: FrameSender,
}

impl Reply {
    /// Queues the response on the connection's writer; a closed connection
    /// (the router went away) is not an error for the replica.
    pub fn send(self, response: &Response) {
        let (tx, bytes) = self.into_frame(response);
        let _ = tx.send(bytes);
    }

    /// The encoded response frame and the connection writer it belongs to,
    /// for a caller that gathers several replies into one write (frames are
    /// self-delimiting, so concatenated frames may be sent as one message).
    pub fn into_frame(self, response: &Response) -> (FrameSender, Bytes) {
        let bytes = frame::encode(self.id, response).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode response");
            let fallback = Response {
                status: 500,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: format!("response could not be encoded: {e}").into_bytes(),
            };
            // A plain-text 500 always encodes; an empty frame body would
            // only make the router report a protocol error.
            frame::encode(self.id, &fallback).unwrap_or_default()
        });
        (self.tx, bytes)
    }
}

/// User code behind a replica.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, reply: Reply);
}

/// The native replica kind: answers every request with what it received.
/// HTTP requests get a JSON echo of method, path, path params and body length;
/// handle calls get their pickled arguments back unchanged.
pub struct EchoHandler;

impl Handler for EchoHandler {
    fn handle(&self, request: Request, reply: Reply) {
        let response = match request.payload {
            Payload::Http(http) => {
                let params: Vec<String> = http
                    .path_params
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}"))
                    .collect();
                let body = serde_json::json!({
                    "method": http.method,
                    "path": http.path,
                    "query": http.query,
                    "path_params": params,
                    "body_len": http.body.len(),
                    "call_method": request.method_name,
                });
                Response {
                    status: 200,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: body.to_string().into_bytes(),
                }
            }
            Payload::Call(call) => Response {
                status: 200,
                headers: vec![("content-type".into(), frame::PICKLE_CONTENT_TYPE.into())],
                body: call.args,
            },
            Payload::Ping => ok_pong(),
            Payload::Reconfigure(_) => Response {
                status: 200,
                headers: Vec::new(),
                body: b"reconfigured".to_vec(),
            },
        };
        reply.send(&response);
    }
}

fn ok_pong() -> Response {
    Response {
        status: 200,
        headers: Vec::new(),
        body: b"pong".to_vec(),
    }
}

/// Serves connections from `unix` and `tcp` until `shutdown` resolves.
pub async fn serve(
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    handler: Arc<dyn Handler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let unix_loop = {
        let handler = handler.clone();
        async move {
            let Some(listener) = unix else {
                return std::future::pending().await;
            };
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_connection(stream, handler.clone()));
                    }
                    Err(e) => tracing::warn!(error = %e, "unix accept failed"),
                }
            }
        }
    };
    let tcp_loop = async move {
        let Some(listener) = tcp else {
            return std::future::pending().await;
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(stream, handler.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "tcp accept failed"),
            }
        }
    };
    tokio::select! {
        _ = unix_loop => {}
        _ = tcp_loop => {}
        _ = shutdown => {}
    }
}

/// Binds the Unix socket at `path`, replacing a stale file from a dead replica.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}

async fn serve_connection<S>(stream: S, handler: Arc<dyn Handler>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let (tx, _writer) = frame::spawn_writer(write);
    let mut reader = FrameReader::new(read);
    loop {
        match reader.next().await {
            Ok(Some((id, body))) => {
                let reply = Reply { id, tx: tx.clone() };
                match frame::decode::<Request>(&body) {
                    Ok(Request {
                        payload: Payload::Ping,
                        ..
                    }) => reply.send(&ok_pong()),
                    Ok(request) => handler.handle(request, reply),
                    Err(e) => reply.send(&Response {
                        status: 400,
                        headers: vec![("content-type".into(), "text/plain".into())],
                        body: format!("malformed request frame: {e}").into_bytes(),
                    }),
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "router connection closed");
                break;
            }
        }
    }
}
