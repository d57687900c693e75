//! One multiplexed frame connection from a router to one replica.
//!
//! The connection is opened lazily by the first request routed to the
//! replica: over its Unix socket when the socket file exists on this machine
//! (same node), else over TCP: with TLS when the replica's record says it
//! serves TLS, verified against this process's `--tls-ca`
//! ([`serval_protos::tls::connect_replica`]). The router then proves the
//! cluster's data-plane key and checks the replica's proof
//! ([`serval_protos::handshake`]) before any frame is sent. Many requests share it: each gets an id from
//! an atomic counter and a oneshot in the pending map; a writer task
//! coalesces outgoing frames; a reader task completes pending requests by id.
//!
//! When the connection breaks (EOF, I/O error, writer failure) the reader
//! fails every pending request at once with [`ConnError::Died`] and puts the
//! replica in a short backoff, during which [`ReplicaConn::available`] is
//! false so the router sends new requests elsewhere. After the backoff the
//! next request routed here reconnects; a failed reconnect doubles the
//! backoff (capped), so a dead replica is probed, not hammered.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use serval_protos::frame::{
    self, FrameReader, Payload, Request, RequestId, Response, StreamFrame, WsFrame, STREAM_HEADER,
    STREAM_WINDOW,
};
use serval_protos::frame_socket::{self, FrameSender, SocketReader};
use serval_protos::handshake::{self, Credential, Key, Role};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// First backoff after a connection breaks or a connect fails.
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
/// Backoff cap for a replica that keeps refusing connections.
const RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;
/// A connect that takes longer than this is treated as a failed connect.
const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Frames from the replica a WebSocket session may have waiting for its
/// client; beyond it the session ends (the client reads too slowly).
pub(crate) const WS_FRAMES_QUEUED: usize = 256;

/// `SERVAL_DATA_PLANE_TCP=1` in a router's environment (a proxy, a node, a
/// driver with handles): connect to replicas over TCP even where their Unix
/// socket is on this machine. For tests and operators checking the TCP (and
/// TLS) path on one machine; it costs the same-node speed-up otherwise.
pub const TCP_ONLY_ENV: &str = "SERVAL_DATA_PLANE_TCP";

static TCP_ONLY: LazyLock<bool> =
    LazyLock::new(|| std::env::var(TCP_ONLY_ENV).is_ok_and(|v| v.trim() == "1"));

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ConnError {
    /// No connection could be opened: the request was never sent, so the
    /// router may safely try another replica.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection was known broken before the request's frame was
    /// handed to the writer: the replica never saw it, so the router may
    /// safely try another replica.
    #[error("connection lost before the request was sent: {0}")]
    NotSent(String),
    /// The connection broke while the request was pending: the replica may
    /// or may not have run it.
    #[error("connection lost: {0}")]
    Died(String),
    #[error("no response before the deadline")]
    Timeout,
    #[error("cannot encode the request: {0}")]
    Encode(String),
    #[error("undecodable response: {0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<PendingMap>>;

/// A frame socket's reader, sender and writer task.
type Frames = (
    FrameReader<SocketReader>,
    FrameSender,
    JoinHandle<std::io::Result<()>>,
);

/// A head, with the chunks of its stream (and its request window) when
/// the replica streams.
type Answer = Result<(Response, Option<(mpsc::Receiver<StreamFrame>, Window)>), ConnError>;

/// How many more request messages of a client stream the router may send:
/// [`STREAM_WINDOW`] at first, then what the replica credits back.
type Window = Arc<Semaphore>;

/// An open stream, as the reader routes its frames.
struct OpenStream {
    chunks: mpsc::Sender<StreamFrame>,
    requests: Window,
}

#[derive(Default)]
struct PendingMap {
    waiters: HashMap<RequestId, oneshot::Sender<Answer>>,
    /// Streams whose head arrived, until their end frame or their consumer
    /// goes. Each channel holds at most the window and the end frame, so
    /// the reader never waits on a consumer.
    streams: HashMap<RequestId, OpenStream>,
    /// Open WebSocket sessions: their ids get [`WsFrame`]s, not a Response.
    sessions: HashMap<RequestId, mpsc::Sender<WsFrame>>,
    /// Set once the connection is broken, so a request registered after the
    /// reader drained the map fails at once instead of waiting for its deadline.
    closed: Option<String>,
}

/// What the router may do with the replica right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Availability {
    Available,
    /// Broken or refusing connections; try again after this instant.
    BackoffUntil(Instant),
}

enum ConnState {
    /// Never connected (or dropped cleanly): connect on first use.
    Idle,
    Live(Arc<Live>),
    Backoff {
        until: Instant,
        failures: u32,
    },
}

/// An open connection; dropping the last reference closes it.
struct Live {
    tx: FrameSender,
    pending: Pending,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // A replica that stopped answering must not keep our read half alive.
        self.reader.abort();
    }
}

impl Live {
    fn is_closed(&self) -> bool {
        lock(&self.pending).closed.is_some()
    }

    async fn send(&self, request: &Request, deadline: Instant) -> Result<Reply, ConnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(id, request).map_err(|e| ConnError::Encode(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(reason) = &pending.closed {
                return Err(ConnError::NotSent(reason.clone()));
            }
            pending.waiters.insert(id, tx);
        }
        // Removes the entry on every exit: timeout, error, or the caller's
        // future being dropped (client disconnected).
        let _entry = PendingEntry {
            pending: &self.pending,
            id,
        };
        if self.tx.send(&bytes).is_err() {
            return Err(ConnError::NotSent("writer closed".into()));
        }
        let (response, chunks) = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(ConnError::Died("connection dropped".into())),
            Err(_) => return Err(ConnError::Timeout),
        };
        let stream = chunks.map(|(rx, requests)| ChunkStream {
            id,
            rx,
            requests,
            tx: self.tx.clone(),
            pending: self.pending.clone(),
            consumed: 0,
            ended: None,
            on_end: Vec::new(),
        });
        Ok(Reply { response, stream })
    }
}

/// What a request got back: a whole response, or the head of a streamed
/// one (status and headers) and its chunks.
pub struct Reply {
    pub response: Response,
    pub stream: Option<ChunkStream>,
}

/// Why a stream ended before its end frame.
#[derive(Debug)]
pub enum StreamError {
    /// The user code raised: what a failed call would have answered.
    Failed(Response),
    /// The connection broke, or the replica broke the protocol.
    Lost(String),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Failed(r) => write!(
                f,
                "the stream failed: {}",
                String::from_utf8_lossy(&r.body[..r.body.len().min(4096)])
            ),
            StreamError::Lost(reason) => write!(f, "the stream was cut: {reason}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// The body of a streamed reply, chunk by chunk as the replica yields
/// them. Each chunk taken is credited back to the replica (in half
/// windows), so the replica is never more than [`STREAM_WINDOW`] chunks
/// ahead of the consumer. Dropped before its end, it cancels the replica's
/// generator. What it holds (the router's slot on the replica) is released
/// when it is dropped, and `on_end` runs then with whether it completed.
pub struct ChunkStream {
    id: RequestId,
    rx: mpsc::Receiver<StreamFrame>,
    /// A client stream's request window ([`RequestSender`]).
    requests: Window,
    tx: FrameSender,
    pending: Pending,
    consumed: u32,
    /// Some(completed) once the end (or an error) was taken.
    ended: Option<bool>,
    on_end: Vec<Box<dyn FnOnce(bool) + Send>>,
}

impl ChunkStream {
    /// The next chunk; `None` after the end frame.
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<bytes::Bytes, StreamError>>> {
        use std::task::Poll;
        if self.ended.is_some() {
            return Poll::Ready(None);
        }
        let frame = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        Poll::Ready(match frame {
            Some(StreamFrame::Chunk(chunk)) => {
                self.consumed += 1;
                if self.consumed >= (STREAM_WINDOW / 2).max(1) {
                    self.control(Payload::Credit(self.consumed));
                    self.consumed = 0;
                }
                Some(Ok(chunk.into()))
            }
            Some(StreamFrame::End) => {
                self.ended = Some(true);
                None
            }
            Some(StreamFrame::Error(response)) => {
                self.ended = Some(false);
                Some(Err(StreamError::Failed(response)))
            }
            // The reader takes credits out; none reaches the consumer.
            Some(StreamFrame::Credit(_)) => {
                self.ended = Some(false);
                Some(Err(StreamError::Lost("a credit in the reply".into())))
            }
            None => {
                self.ended = Some(false);
                let reason = lock(&self.pending)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "the replica overran the stream window".into());
                Some(Err(StreamError::Lost(reason)))
            }
        })
    }

    pub async fn next(&mut self) -> Option<Result<bytes::Bytes, StreamError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Runs `f` when the stream is dropped, with whether it completed.
    pub fn on_end(&mut self, f: impl FnOnce(bool) + Send + 'static) {
        self.on_end.push(Box::new(f));
    }

    /// Keeps `guard` (a router slot) until the stream is dropped.
    pub(crate) fn hold(&mut self, guard: impl Send + 'static) {
        self.on_end(move |_| drop(guard));
    }

    /// What sends a client stream's request messages on this call's id.
    pub(crate) fn request_sender(&self) -> RequestSender {
        RequestSender {
            id: self.id,
            tx: self.tx.clone(),
            window: self.requests.clone(),
        }
    }

    fn control(&self, payload: Payload) {
        let request = Request {
            method_name: None,
            payload,
        };
        if let Ok(bytes) = frame::encode(self.id, &request) {
            let _ = self.tx.send(&bytes);
        }
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        lock(&self.pending).streams.remove(&self.id);
        if self.ended.is_none() {
            // The consumer went away mid-stream: stop the generator.
            self.control(Payload::Cancel);
        }
        let completed = self.ended == Some(true);
        for f in self.on_end.drain(..) {
            f(completed);
        }
    }
}

/// Sends a client stream's request messages ([`Payload::GrpcMessage`])
/// and its half-close on the call's id, each message waiting for room in
/// the window the replica credits.
pub(crate) struct RequestSender {
    id: RequestId,
    tx: FrameSender,
    window: Window,
}

impl RequestSender {
    /// Sends `payload`, a message once the window has room; false when the
    /// connection is gone.
    pub(crate) async fn send(&self, payload: Payload) -> bool {
        if matches!(payload, Payload::GrpcMessage(_)) {
            match self.window.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return false,
            }
        }
        let request = Request {
            method_name: None,
            payload,
        };
        frame::encode(self.id, &request).is_ok_and(|bytes| self.tx.send(&bytes).is_ok())
    }
}

/// One WebSocket session on a replica connection: `rx` yields the
/// replica's frames (it ends when the connection breaks); dropping the
/// session forgets its id.
pub(crate) struct WsSession {
    pub(crate) rx: mpsc::Receiver<WsFrame>,
    id: RequestId,
    live: Arc<Live>,
}

impl WsSession {
    /// Sends the client's message or close to the replica.
    pub(crate) fn send(&self, frame: WsFrame) -> Result<(), ConnError> {
        let request = Request {
            method_name: None,
            payload: Payload::Ws(frame),
        };
        let bytes =
            frame::encode(self.id, &request).map_err(|e| ConnError::Encode(e.to_string()))?;
        self.live
            .tx
            .send(&bytes)
            .map_err(|_| ConnError::Died("writer closed".into()))
    }
}

impl Drop for WsSession {
    fn drop(&mut self) {
        lock(&self.live.pending).sessions.remove(&self.id);
    }
}

struct PendingEntry<'a> {
    pending: &'a Pending,
    id: RequestId,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiters.remove(&self.id);
    }
}

/// The router's handle on one replica's connection.
pub(crate) struct ReplicaConn {
    replica_id: String,
    unix_path: String,
    tcp_addr: String,
    /// The replica serves TLS on `tcp_addr`.
    tls: bool,
    data_key: Option<Key>,
    /// std Mutex: held only to read or swap the state, never across `.await`.
    state: Arc<Mutex<ConnState>>,
    /// Serialises connects so a burst of requests opens one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl ReplicaConn {
    pub(crate) fn new(
        replica_id: &str,
        unix_path: &str,
        tcp_addr: &str,
        tls: bool,
        data_key: Option<Key>,
    ) -> Self {
        Self {
            replica_id: replica_id.to_owned(),
            unix_path: unix_path.to_owned(),
            tcp_addr: tcp_addr.to_owned(),
            tls,
            data_key,
            state: Arc::new(Mutex::new(ConnState::Idle)),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the connection targets these addresses (else a snapshot that
    /// moved the replica needs a new `ReplicaConn`).
    pub(crate) fn same_target(&self, unix_path: &str, tcp_addr: &str, tls: bool) -> bool {
        self.unix_path == unix_path && self.tcp_addr == tcp_addr && self.tls == tls
    }

    pub(crate) fn tls(&self) -> bool {
        self.tls
    }

    pub(crate) fn available(&self, now: Instant) -> Availability {
        match &*lock(&self.state) {
            ConnState::Idle => Availability::Available,
            ConnState::Live(live) if !live.is_closed() => Availability::Available,
            // Closed but the reader has not yet swapped in the backoff.
            ConnState::Live(_) => {
                Availability::BackoffUntil(now + Duration::from_millis(RECONNECT_BACKOFF_MIN_MS))
            }
            ConnState::Backoff { until, .. } if *until <= now => Availability::Available,
            ConnState::Backoff { until, .. } => Availability::BackoffUntil(*until),
        }
    }

    /// Sends `request` and waits for its response until `deadline`.
    pub(crate) async fn request(
        &self,
        request: &Request,
        deadline: Instant,
    ) -> Result<Reply, ConnError> {
        let live = self.live(deadline).await?;
        live.send(request, deadline).await
    }

    /// Opens a WebSocket session: sends `request` (a `WsOpen`) and returns
    /// at once; the replica's first frame says whether the app accepted.
    pub(crate) async fn open_websocket(
        &self,
        request: &Request,
        deadline: Instant,
    ) -> Result<WsSession, ConnError> {
        let live = self.live(deadline).await?;
        let id = live.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(id, request).map_err(|e| ConnError::Encode(e.to_string()))?;
        let (tx, rx) = mpsc::channel(WS_FRAMES_QUEUED);
        {
            let mut pending = lock(&live.pending);
            if let Some(reason) = &pending.closed {
                return Err(ConnError::Died(reason.clone()));
            }
            pending.sessions.insert(id, tx);
        }
        let session = WsSession { rx, id, live };
        if session.live.tx.send(&bytes).is_err() {
            return Err(ConnError::Died("writer closed".into()));
        }
        Ok(session)
    }

    fn current(&self) -> Option<Arc<Live>> {
        match &*lock(&self.state) {
            ConnState::Live(live) if !live.is_closed() => Some(live.clone()),
            _ => None,
        }
    }

    async fn live(&self, deadline: Instant) -> Result<Arc<Live>, ConnError> {
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let failures = match &*lock(&self.state) {
            ConnState::Backoff { until, .. } if *until > Instant::now() => {
                // Another request just failed to connect: do not pile on.
                return Err(ConnError::Connect(format!(
                    "replica {} is backing off",
                    self.replica_id
                )));
            }
            ConnState::Backoff { failures, .. } => *failures,
            _ => 0,
        };
        let connect_deadline =
            deadline.min(Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS));
        let result = match tokio::time::timeout_at(connect_deadline, self.connect()).await {
            Ok(Ok(live)) => Ok(Arc::new(live)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("connect timed out".to_owned()),
        };
        let mut state = lock(&self.state);
        match result {
            Ok(live) => {
                tracing::debug!(replica = %self.replica_id, "connected");
                *state = ConnState::Live(live.clone());
                Ok(live)
            }
            Err(e) => {
                let failures = failures.saturating_add(1);
                *state = ConnState::Backoff {
                    until: Instant::now() + backoff(failures),
                    failures,
                };
                tracing::warn!(replica = %self.replica_id, error = %e, "cannot connect to replica");
                Err(ConnError::Connect(format!(
                    "replica {}: {e}",
                    self.replica_id
                )))
            }
        }
    }

    async fn connect(&self) -> Result<Live, String> {
        let Some(key) = self.data_key else {
            return Err("this router has no data-plane key (no cluster token)".into());
        };
        let credential = Credential {
            role: Role::Router,
            key,
        };
        // The Unix socket only exists on the replica's own node.
        if !self.unix_path.is_empty() && !*TCP_ONLY && Path::new(&self.unix_path).exists() {
            match tokio::net::UnixStream::connect(&self.unix_path).await {
                Ok(mut stream) => {
                    let unix_err =
                        |e: &dyn std::fmt::Display| format!("unix {}: {e}", self.unix_path);
                    handshake::connect(&mut stream, &credential)
                        .await
                        .map_err(|e| unix_err(&e))?;
                    let socket = stream.into_std().map_err(|e| unix_err(&e))?;
                    return self.start(frame_socket::open(socket.into()));
                }
                Err(e) if self.tcp_addr.is_empty() => {
                    return Err(format!("unix {}: {e}", self.unix_path))
                }
                Err(e) => {
                    tracing::debug!(replica = %self.replica_id, error = %e, "unix connect failed; trying tcp")
                }
            }
        }
        if self.tcp_addr.is_empty() {
            return Err("replica has no reachable address".into());
        }
        let tcp_err = |e: &dyn std::fmt::Display| format!("tcp {}: {e}", self.tcp_addr);
        let mut stream = tokio::net::TcpStream::connect(&self.tcp_addr)
            .await
            .map_err(|e| tcp_err(&e))?;
        // Small request frames must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if self.tls {
            let settings = serval_protos::tls::tls();
            let mut stream =
                serval_protos::tls::connect_replica(settings.as_deref(), stream, &self.tcp_addr)
                    .await
                    .map_err(|e| e.to_string())?;
            handshake::connect(&mut stream, &credential)
                .await
                .map_err(|e| tcp_err(&e))?;
            return self.start(Ok(frame_socket::open_stream(stream)));
        }
        handshake::connect(&mut stream, &credential)
            .await
            .map_err(|e| tcp_err(&e))?;
        let socket = stream.into_std().map_err(|e| tcp_err(&e))?;
        self.start(frame_socket::open(socket.into()))
    }

    /// Starts the reader task of an opened frame socket.
    fn start(&self, opened: std::io::Result<Frames>) -> Result<Live, String> {
        let (reader, tx, writer) = opened.map_err(|e| format!("cannot use the connection: {e}"))?;
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_loop(
            reader,
            writer,
            tx.clone(),
            pending.clone(),
            self.state.clone(),
            self.replica_id.clone(),
        ));
        Ok(Live {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            reader,
        })
    }
}

/// Completes pending requests until the connection breaks, then fails the
/// rest at once and takes the replica out of rotation for a backoff.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    mut writer: JoinHandle<std::io::Result<()>>,
    tx: FrameSender,
    pending: Pending,
    state: Arc<Mutex<ConnState>>,
    replica_id: String,
) {
    let reason = loop {
        tokio::select! {
            next = reader.next() => match next {
                Ok(Some((id, body))) => on_frame(&pending, &tx, id, &body, &replica_id),
                Ok(None) => break "connection closed by the replica".to_owned(),
                Err(e) => break format!("read failed: {e}"),
            },
            done = &mut writer => break match done {
                Ok(Ok(())) => "connection closed by the router".to_owned(),
                Ok(Err(e)) => format!("write failed: {e}"),
                Err(e) => format!("writer task ended: {e}"),
            },
        }
    };
    let failed: Vec<_> = {
        let mut p = lock(&pending);
        p.closed = Some(reason.clone());
        // Their consumers see the channel end without an end frame.
        p.streams.clear();
        // Their receivers end: each session tells its client.
        p.sessions.clear();
        p.waiters.drain().map(|(_, tx)| tx).collect()
    };
    if !failed.is_empty() {
        tracing::warn!(replica = %replica_id, %reason, pending = failed.len(), "replica connection broke");
    } else {
        tracing::debug!(replica = %replica_id, %reason, "replica connection closed");
    }
    for tx in failed {
        let _ = tx.send(Err(ConnError::Died(reason.clone())));
    }
    let mut state = lock(&state);
    if let ConnState::Live(live) = &*state {
        if Arc::ptr_eq(&live.pending, &pending) {
            let until = Instant::now() + backoff(1);
            // Dropping the Live here aborts this very task, which is ending anyway.
            *state = ConnState::Backoff { until, failures: 1 };
        }
    }
}

/// One frame from the replica: a response (or a stream's head) for a
/// waiting request, the next frame of an open stream, or a WebSocket
/// session's frame (one lock per frame).
fn on_frame(pending: &Pending, tx: &FrameSender, id: RequestId, body: &[u8], replica_id: &str) {
    let mut p = lock(pending);
    if let Some(session) = p.sessions.get(&id) {
        let session = session.clone();
        drop(p);
        deliver_ws(pending, id, session, body, replica_id);
        return;
    }
    if let Some(stream) = p.streams.get(&id) {
        let frame = frame::decode::<StreamFrame>(body);
        if let Ok(StreamFrame::Credit(n)) = frame {
            // Never more room than the window, whatever the replica says.
            let room = (STREAM_WINDOW as usize).saturating_sub(stream.requests.available_permits());
            stream.requests.add_permits((n as usize).min(room));
            return;
        }
        let last = !matches!(frame, Ok(StreamFrame::Chunk(_)));
        // A full channel: the replica sent beyond its window. Dropping the
        // sender ends the stream with an error for its consumer.
        let refused = match frame {
            Ok(frame) => stream.chunks.try_send(frame).is_err(),
            Err(_) => true,
        };
        if last || refused {
            p.streams.remove(&id);
        }
        return;
    }
    // No entry: the request timed out or its caller went away; a stream
    // it started is cancelled.
    let Some(waiter) = p.waiters.remove(&id) else {
        drop(p);
        if frame::decode::<Response>(body).is_ok_and(|r| r.header(STREAM_HEADER).is_some()) {
            send_cancel(tx, id);
        }
        return;
    };
    let answer = match frame::decode::<Response>(body) {
        Ok(mut response) => {
            let before = response.headers.len();
            response
                .headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case(STREAM_HEADER));
            if response.headers.len() == before {
                Ok((response, None))
            } else {
                // The window's chunks and the end frame.
                let (chunks, rx) = mpsc::channel(STREAM_WINDOW as usize + 1);
                let requests = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
                let stream = OpenStream {
                    chunks,
                    requests: requests.clone(),
                };
                p.streams.insert(id, stream);
                Ok((response, Some((rx, requests))))
            }
        }
        Err(e) => Err(ConnError::Protocol(e.to_string())),
    };
    if let Err(Ok((_, Some(_)))) = waiter.send(answer) {
        // The caller went away between our look and the send.
        p.streams.remove(&id);
        send_cancel(tx, id);
    }
}

fn send_cancel(tx: &FrameSender, id: RequestId) {
    let cancel = Request {
        method_name: None,
        payload: Payload::Cancel,
    };
    if let Ok(bytes) = frame::encode(id, &cancel) {
        let _ = tx.send(&bytes);
    }
}

/// Hands a replica's frame to its WebSocket session. An undecodable frame,
/// or a session whose client has fallen [`WS_FRAMES_QUEUED`] frames behind,
/// ends the session (its receiver then ends).
fn deliver_ws(
    pending: &Pending,
    id: RequestId,
    session: mpsc::Sender<WsFrame>,
    body: &[u8],
    replica_id: &str,
) {
    let delivered = match frame::decode::<WsFrame>(body) {
        Ok(ws) => session.try_send(ws).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(reason) = delivered {
        tracing::debug!(replica = %replica_id, %reason, "websocket session ended");
        lock(pending).sessions.remove(&id);
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis((RECONNECT_BACKOFF_MIN_MS << exp).min(RECONNECT_BACKOFF_MAX_MS))
}

/// Locks a std mutex, recovering from poisoning: every critical section here
/// leaves the data consistent, so a panic elsewhere must not wedge routing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(6), Duration::from_millis(2000));
        assert_eq!(backoff(u32::MAX), Duration::from_millis(2000));
    }

    #[tokio::test]
    async fn unreachable_replica_backs_off() {
        let conn = ReplicaConn::new("r1", "/nonexistent/serval.sock", "", false, None);
        let req = Request {
            method_name: None,
            payload: frame::Payload::Ping,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            conn.request(&req, deadline).await,
            Err(ConnError::Connect(_))
        ));
        assert!(matches!(
            conn.available(Instant::now()),
            Availability::BackoffUntil(_)
        ));
        // While backing off, a second request fails at once without connecting.
        assert!(matches!(
            conn.request(&req, deadline).await,
            Err(ConnError::Connect(_))
        ));
    }
}
