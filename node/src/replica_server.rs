//! The replica side of the data plane: accepts router connections on a Unix
//! socket (same node) and a TCP port (other nodes), has each peer prove it
//! belongs to the cluster ([`serval_protos::handshake`]) before it reads a
//! frame, then reads request frames and hands each to a [`Handler`], which
//! answers through a [`Reply`] from any thread. `Reconfigure` and `Logs`
//! are answered only on a connection that proved the agent's key. With a
//! TLS identity the TCP listener serves TLS only (the handshake runs inside
//! it; a peer that does not open TLS is closed with nothing decoded); the
//! Unix socket, local and in a 0700 directory, stays plaintext. Python replicas implement [`Handler`] in python-sdk by queueing to
//! their one Python thread; [`EchoHandler`] is the native Rust kind used by
//! tests and benchmarks.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serval_protos::frame::{
    self, FrameError, FrameReader, LogsRequest, Payload, Request, RequestId, Response,
    LOG_SIZE_HEADER, MAX_LOGS_CHUNK,
};
use serval_protos::frame_socket::{self, FrameSender, SocketReader};
use serval_protos::handshake::{self, Credential, ReplicaKeys, Role};
use serval_protos::tls::{DataTlsError, TlsAcceptor};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

/// Connections one replica serves at once, handshakes included; beyond it
/// a new connection is closed at once. A router keeps one connection per
/// replica, so this is the number of proxies and handle processes a
/// replica can serve.
pub const MAX_CONNECTIONS: usize = 1024;

/// Answers one request. Dropping a `Reply` without sending leaves the router
/// to time out, so every path must send.
pub struct Reply {
    id: RequestId,
    tx: FrameSender,
    /// The router connection it came on (unique in this process).
    conn: u64,
}

/// Numbers the router connections of this process, for [`Reply::connection`].
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl Reply {
    /// The request's id on its connection.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The router connection the request came on: a WebSocket session is
    /// named by (connection, id), and [`Handler::closed`] names the
    /// connection when it ends.
    pub fn connection(&self) -> u64 {
        self.conn
    }

    /// Sends one more frame on the request's id without answering it: a
    /// WebSocket session's [`frame::WsFrame`]s. False when it cannot be
    /// encoded or the connection is gone.
    pub fn send_frame<T: serde::Serialize>(&self, msg: &T) -> bool {
        match frame::encode(self.id, msg) {
            Ok(bytes) => self.tx.send(&bytes).is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a frame");
                false
            }
        }
    }

    /// Queues the response on the connection's writer; a closed connection
    /// (the router went away) is not an error for the replica.
    pub fn send(self, response: &Response) {
        let (tx, bytes) = self.into_frame(response);
        let _ = tx.send(&bytes);
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

/// User code behind a replica. `Credit` and `Cancel` frames reach `handle`
/// too, with a `Reply` naming the stream (`connection`, `id`) they are for:
/// they must not be answered.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, reply: Reply);

    /// The router connection numbered `conn` ended: the WebSocket sessions
    /// and streams opened on it are over (their client is gone).
    fn closed(&self, _conn: u64) {}
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
            // Answered by `serve_connection` before any handler sees it.
            Payload::Logs(_) => text_response(400, "logs are answered by the frame server".into()),
            Payload::WsOpen(_) => {
                reply.send_frame(&frame::WsFrame::Deny(text_response(
                    404,
                    "this replica serves no WebSocket".into(),
                )));
                return;
            }
            Payload::Ws(_) => return,
            // This handler never streams: nothing to credit, cancel or feed.
            Payload::Credit(_)
            | Payload::Cancel
            | Payload::GrpcMessage(_)
            | Payload::GrpcHalfClose => return,
            Payload::Grpc(_) => text_response(404, "this replica serves no gRPC".into()),
        };
        reply.send(&response);
    }
}

fn text_response(status: u16, text: String) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: text.into_bytes(),
    }
}

fn ok_pong() -> Response {
    Response {
        status: 200,
        headers: Vec::new(),
        body: b"pong".to_vec(),
    }
}

/// Serves connections from `unix` and `tcp` until `shutdown` resolves. Each
/// connection first passes the handshake with `keys`; with `tls`, a TCP
/// connection first opens TLS, and the handshake runs inside it.
pub async fn serve(
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    keys: ReplicaKeys,
    handler: Arc<dyn Handler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let unix_loop = {
        let handler = handler.clone();
        let slots = slots.clone();
        async move {
            let Some(listener) = unix else {
                return std::future::pending().await;
            };
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => admit(stream, keys, handler.clone(), &slots),
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
                    match &tls {
                        Some(acceptor) => {
                            admit(Tls(stream, acceptor.clone()), keys, handler.clone(), &slots)
                        }
                        None => admit(stream, keys, handler.clone(), &slots),
                    }
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

/// The frame reader, sender and writer task of a connection.
type Frames = (
    FrameReader<SocketReader>,
    FrameSender,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// A connection the replica may serve: Unix, TCP or TLS over TCP. `open`
/// makes the stream the handshake runs on (a TLS accept for TLS), and
/// `frames` hands it to the frame socket once the handshake passed: a
/// plain socket as its descriptor (the fast path), TLS as a stream.
trait Accepted: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn open(self) -> impl std::future::Future<Output = Result<Self::Stream, String>> + Send;
    fn frames(stream: Self::Stream) -> std::io::Result<Frames>;
}

impl Accepted for tokio::net::UnixStream {
    type Stream = Self;
    async fn open(self) -> Result<Self, String> {
        Ok(self)
    }
    fn frames(stream: Self) -> std::io::Result<Frames> {
        frame_socket::open(stream.into_std()?.into())
    }
}

impl Accepted for tokio::net::TcpStream {
    type Stream = Self;
    async fn open(self) -> Result<Self, String> {
        Ok(self)
    }
    fn frames(stream: Self) -> std::io::Result<Frames> {
        frame_socket::open(stream.into_std()?.into())
    }
}

/// A TCP connection to a replica that serves TLS.
struct Tls(tokio::net::TcpStream, TlsAcceptor);

impl Accepted for Tls {
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    async fn open(self) -> Result<Self::Stream, String> {
        // Bounded like the handshake: a peer that never finishes the TLS
        // handshake (a plaintext one waiting for our challenge) holds a
        // connection slot for no longer.
        match tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, self.1.accept(self.0)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("TLS: {e}")),
            Err(_) => Err(format!(
                "TLS: no handshake within {:?}",
                handshake::HANDSHAKE_TIMEOUT
            )),
        }
    }
    fn frames(stream: Self::Stream) -> std::io::Result<Frames> {
        Ok(frame_socket::open_stream(stream))
    }
}

/// Takes a connection slot (or closes the connection when none is free),
/// then runs the handshake and serves the connection on its own task.
fn admit<S: Accepted>(
    accepted: S,
    keys: ReplicaKeys,
    handler: Arc<dyn Handler>,
    slots: &Arc<Semaphore>,
) {
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!(
            limit = MAX_CONNECTIONS,
            "connection limit reached; closing a new connection"
        );
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut stream = match accepted.open().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "refused a data-plane connection");
                return;
            }
        };
        let role = match handshake::accept(&mut stream, &keys).await {
            Ok(role) => role,
            Err(e) => {
                tracing::warn!(error = %e, "refused a data-plane connection");
                return;
            }
        };
        match S::frames(stream) {
            Ok(frames) => serve_connection(frames, handler, role).await,
            Err(e) => tracing::warn!(error = %e, "cannot serve a router connection"),
        }
    });
}

/// Binds the Unix socket at `path`, in a directory only this user may enter
/// (created 0700, or checked: see [`serval_protos::private_files::private_dir`]),
/// replacing a stale file from a dead replica.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        serval_protos::private_files::private_dir(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

async fn serve_connection(frames: Frames, handler: Arc<dyn Handler>, role: Role) {
    let (mut reader, tx, _writer) = frames;
    let conn = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    loop {
        match reader.next().await {
            Ok(Some((id, body))) => {
                let reply = Reply {
                    id,
                    tx: tx.clone(),
                    conn,
                };
                match frame::decode::<Request>(&body) {
                    Ok(Request {
                        payload: Payload::Ping,
                        ..
                    }) => reply.send(&ok_pong()),
                    Ok(Request {
                        payload: Payload::Logs(_) | Payload::Reconfigure(_),
                        ..
                    }) if role != Role::Agent => reply.send(&text_response(
                        403,
                        "reconfiguring a replica and reading its log need its node agent's credential".into(),
                    )),
                    // On its own task: the file read must not hold up the
                    // frames behind it, and never waits for user code.
                    Ok(Request {
                        payload: Payload::Logs(logs),
                        ..
                    }) => {
                        tokio::spawn(async move { reply.send(&answer_logs(logs).await) });
                    }
                    Ok(request) => handler.handle(request, reply),
                    Err(e) => {
                        reply.send(&text_response(400, format!("malformed request frame: {e}")))
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "router connection closed");
                break;
            }
        }
    }
    handler.closed(conn);
}

/// Where a process finds its own stderr: the link names the file behind fd 2.
const OWN_STDERR: &str = "/proc/self/fd/2";

/// Why a replica could not answer a `Logs` request.
#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    /// stderr is a pipe, a terminal or gone: there is no file to read.
    #[error("this replica's stderr is not a file")]
    NotAFile,
    #[error("cannot read the replica log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LogReadError {
    fn into_response(self) -> Response {
        let status = match self {
            LogReadError::NotAFile => 404,
            LogReadError::Io { .. } => 500,
        };
        text_response(status, self.to_string())
    }
}

/// Answers a `Logs` request from this process's own stderr file.
async fn answer_logs(request: LogsRequest) -> Response {
    let read = tokio::task::spawn_blocking(move || read_log_chunk(Path::new(OWN_STDERR), request));
    match read.await {
        Ok(Ok((bytes, size))) => Response {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/octet-stream".into()),
                (LOG_SIZE_HEADER.into(), size.to_string()),
            ],
            body: bytes,
        },
        Ok(Err(e)) => e.into_response(),
        Err(e) => text_response(500, format!("the log read failed: {e}")),
    }
}

/// Reads the chunk `request` asks for from the regular file that `link`
/// (a `/proc/<pid>/fd/<n>` link) points at; returns it and the file's size.
/// Blocking: run it off the runtime's worker.
pub fn read_log_chunk(link: &Path, request: LogsRequest) -> Result<(Vec<u8>, u64), LogReadError> {
    // A pipe's link reads "pipe:[N]", a deleted file's "<path> (deleted)":
    // neither resolves to a path, and a FIFO must not be opened (that
    // blocks until a writer comes), so only a regular file is opened.
    let path = std::fs::read_link(link).map_err(|_| LogReadError::NotAFile)?;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => {}
        _ => return Err(LogReadError::NotAFile),
    }
    let io = |source| LogReadError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    // Never past the size just read, so the size header and the bytes agree.
    let want =
        u64::from(request.max_bytes.min(MAX_LOGS_CHUNK)).min(size.saturating_sub(request.offset));
    let mut bytes = Vec::with_capacity(want as usize);
    if want > 0 {
        file.seek(SeekFrom::Start(request.offset)).map_err(io)?;
        file.take(want).read_to_end(&mut bytes).map_err(io)?;
    }
    Ok((bytes, size))
}

/// A chunk of a replica's log as [`fetch_logs`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub bytes: Vec<u8>,
    /// The log file's size when the replica read it.
    pub size: u64,
}

/// Why [`fetch_logs`] got no chunk.
#[derive(Debug, thiserror::Error)]
pub enum FetchLogsError {
    #[error("cannot connect to the replica: {0}")]
    Connect(String),
    #[error("no answer from the replica within {0:?}")]
    Timeout(Duration),
    #[error("replica connection: {0}")]
    Frame(#[from] FrameError),
    #[error("the replica closed the connection without answering")]
    Closed,
    #[error("the replica answered a request it was not asked (id {0})")]
    WrongId(RequestId),
    #[error("the replica answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the replica's answer has no valid {LOG_SIZE_HEADER} header")]
    NoSize,
    #[error("replica handshake: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("{0}")]
    Tls(#[from] DataTlsError),
}

/// Reads one chunk of a replica's log over a one-shot frame connection:
/// its Unix socket when that exists on this machine (same node), else TCP
/// (TLS when `tls`, the replica record's flag, verified against this
/// process's `--tls-ca`), as a router connects. Logs are read rarely, so no
/// connection is kept.
pub async fn fetch_logs(
    unix_path: &str,
    tcp_addr: &str,
    tls: bool,
    credential: &Credential,
    request: LogsRequest,
    timeout: Duration,
) -> Result<LogChunk, FetchLogsError> {
    let exchange = async {
        if !unix_path.is_empty() && Path::new(unix_path).exists() {
            match tokio::net::UnixStream::connect(unix_path).await {
                Ok(stream) => return exchange_logs(stream, credential, request).await,
                Err(e) if tcp_addr.is_empty() => {
                    return Err(FetchLogsError::Connect(format!("unix {unix_path}: {e}")))
                }
                Err(e) => tracing::debug!(error = %e, "unix connect failed; trying tcp"),
            }
        }
        if tcp_addr.is_empty() {
            return Err(FetchLogsError::Connect(
                "the replica has no reachable address".into(),
            ));
        }
        let stream = tokio::net::TcpStream::connect(tcp_addr)
            .await
            .map_err(|e| FetchLogsError::Connect(format!("tcp {tcp_addr}: {e}")))?;
        if tls {
            let settings = serval_protos::tls::tls();
            let stream =
                serval_protos::tls::connect_replica(settings.as_deref(), stream, tcp_addr).await?;
            return exchange_logs(stream, credential, request).await;
        }
        exchange_logs(stream, credential, request).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| FetchLogsError::Timeout(timeout))?
}

/// The handshake, one request frame out, one answer frame back.
async fn exchange_logs<S>(
    mut stream: S,
    credential: &Credential,
    request: LogsRequest,
) -> Result<LogChunk, FetchLogsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const ID: RequestId = 1;
    handshake::connect(&mut stream, credential).await?;
    let (read, mut write) = tokio::io::split(stream);
    let frame = frame::encode(
        ID,
        &Request {
            method_name: None,
            payload: Payload::Logs(request),
        },
    )?;
    write.write_all(&frame).await.map_err(FrameError::from)?;
    let (id, body) = FrameReader::new(read)
        .next()
        .await?
        .ok_or(FetchLogsError::Closed)?;
    if id != ID {
        return Err(FetchLogsError::WrongId(id));
    }
    let response: Response = frame::decode(&body)?;
    if response.status != 200 {
        return Err(FetchLogsError::Refused {
            status: response.status,
            message: String::from_utf8_lossy(&response.body).into_owned(),
        });
    }
    let size = response
        .header(LOG_SIZE_HEADER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(FetchLogsError::NoSize)?;
    Ok(LogChunk {
        bytes: response.body,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_protos::handshake::Key;

    fn logs(offset: u64, max_bytes: u32) -> LogsRequest {
        LogsRequest { offset, max_bytes }
    }

    /// A log file and a symlink to it, standing in for `/proc/self/fd/2`.
    fn log_with_link(dir: &Path, text: &[u8]) -> PathBuf {
        let file = dir.join("replica.log");
        std::fs::write(&file, text).unwrap();
        let link = dir.join("fd2");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        link
    }

    #[test]
    fn a_chunk_is_read_from_the_offset_up_to_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let link = log_with_link(dir.path(), b"line one\nline two\n");
        assert_eq!(
            read_log_chunk(&link, logs(5, 3)).unwrap(),
            (b"one".to_vec(), 18)
        );
        assert_eq!(
            read_log_chunk(&link, logs(9, 1000)).unwrap(),
            (b"line two\n".to_vec(), 18)
        );
        // At or past the end (a truncated file): nothing, and the size.
        assert_eq!(read_log_chunk(&link, logs(18, 10)).unwrap(), (vec![], 18));
        assert_eq!(
            read_log_chunk(&link, logs(u64::MAX, 10)).unwrap(),
            (vec![], 18)
        );
    }

    #[test]
    fn a_chunk_is_capped_at_one_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let link = log_with_link(dir.path(), &vec![b'x'; 3 * 1024 * 1024]);
        let (bytes, size) = read_log_chunk(&link, logs(0, u32::MAX)).unwrap();
        assert_eq!(bytes.len(), MAX_LOGS_CHUNK as usize);
        assert_eq!(size, 3 * 1024 * 1024);
    }

    #[test]
    fn a_stderr_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A directory, and a link to nothing (a pipe's "pipe:[N]").
        let to_dir = dir.path().join("to-dir");
        std::os::unix::fs::symlink(dir.path(), &to_dir).unwrap();
        let to_pipe = dir.path().join("to-pipe");
        std::os::unix::fs::symlink("pipe:[1234]", &to_pipe).unwrap();
        for link in [to_dir, to_pipe, dir.path().join("no-link")] {
            let err = read_log_chunk(&link, logs(0, 10)).unwrap_err();
            assert!(matches!(err, LogReadError::NotAFile), "{err}");
            let response = err.into_response();
            assert_eq!(response.status, 404);
            assert_eq!(response.body, b"this replica's stderr is not a file");
        }
    }

    /// A handler that fails the test if a request reaches it.
    struct NoHandler;

    impl Handler for NoHandler {
        fn handle(&self, request: Request, _reply: Reply) {
            panic!("the handler got {:?}", request.payload);
        }
    }

    const TOKEN: &str = "replica-server-test-token";

    fn keys() -> ReplicaKeys {
        ReplicaKeys {
            data: Key::data_plane(TOKEN),
            agent: Key::replica_agent(&Key::agents(TOKEN), "r1"),
        }
    }

    fn agent() -> Credential {
        Credential {
            role: Role::Agent,
            key: keys().agent,
        }
    }

    #[tokio::test]
    async fn logs_are_answered_over_the_frames_without_the_handler() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("r.sock");
        let unix = bind_unix(&socket).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            Some(unix),
            None,
            None,
            keys(),
            Arc::new(NoHandler),
            async {
                let _ = stopped.await;
            },
        ));
        let socket = socket.to_str().unwrap();
        let timeout = Duration::from_secs(10);
        // The test binary's stderr may be a file, a pipe or a terminal:
        // compare with what this process reads from its own fd 2.
        let answer = fetch_logs(socket, "", false, &agent(), logs(0, 16), timeout).await;
        match read_log_chunk(Path::new(OWN_STDERR), logs(0, 16)) {
            Ok((bytes, _)) => assert_eq!(answer.unwrap().bytes, bytes),
            Err(LogReadError::NotAFile) => match answer {
                Err(FetchLogsError::Refused { status, message }) => {
                    assert_eq!(status, 404);
                    assert_eq!(message, "this replica's stderr is not a file");
                }
                other => panic!("expected a 404, got {other:?}"),
            },
            Err(e) => panic!("{e}"),
        }
        // No socket file here and no TCP address: a clear connect error.
        let missing = dir.path().join("gone.sock");
        let err = fetch_logs(
            missing.to_str().unwrap(),
            "",
            false,
            &agent(),
            logs(0, 1),
            timeout,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, FetchLogsError::Connect(_)), "{err}");
        // A router's credential is a data-plane member, not the agent.
        let router = Credential {
            role: Role::Router,
            key: keys().data,
        };
        match fetch_logs(socket, "", false, &router, logs(0, 16), timeout).await {
            Err(FetchLogsError::Refused { status: 403, .. }) => {}
            other => panic!("expected a 403, got {other:?}"),
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_without_the_key_gets_nothing_decoded() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("r.sock");
        let unix = bind_unix(&socket).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The handler panics if any request reaches it.
        let server = tokio::spawn(serve(
            Some(unix),
            Some(tcp),
            None,
            keys(),
            Arc::new(NoHandler),
            async {
                let _ = stopped.await;
            },
        ));
        let frame = frame::encode(
            1,
            &Request {
                method_name: None,
                payload: Payload::Call(frame::CallRequest {
                    args: b"not a pickle the replica should ever see".to_vec(),
                    ..Default::default()
                }),
            },
        )
        .unwrap();
        // Frames sent straight away, on both listeners: closed unanswered.
        let unix_stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let tcp_stream = tokio::net::TcpStream::connect(&tcp_addr).await.unwrap();
        for mut stream in [
            Box::new(unix_stream) as Box<dyn Stream>,
            Box::new(tcp_stream) as Box<dyn Stream>,
        ] {
            // Exactly a proof's length, so no unread bytes make TCP reset
            // the connection before the challenge is read.
            let mut bytes = frame.to_vec();
            bytes.resize(70, 0);
            stream.write_all(&bytes).await.unwrap();
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got));
            // Only the replica's 37-byte challenge came back, then the end.
            read.await.expect("the replica closes the connection").ok();
            assert_eq!(got.len(), 37, "{got:?}");
            assert_eq!(&got[..4], b"SRVL");
        }
        // Another cluster's key: refused, nothing decoded.
        let stranger = Credential {
            role: Role::Router,
            key: Key::data_plane("another-cluster-token"),
        };
        let err = fetch_logs(
            socket.to_str().unwrap(),
            "",
            false,
            &stranger,
            logs(0, 1),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                FetchLogsError::Handshake(handshake::HandshakeError::Refused)
            ),
            "{err}"
        );
        let _ = stop.send(());
        server.await.unwrap();
    }

    trait Stream: AsyncRead + AsyncWrite + Unpin {}
    impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}
}
