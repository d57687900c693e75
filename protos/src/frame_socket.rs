//! A frame connection's socket: one reader task, many senders.
//!
//! [`open`] splits a connected socket (Unix or TCP) into a [`FrameReader`]
//! and a [`FrameSender`]. Two things here exist only to save thread wake-ups,
//! which on small (virtual) machines cost more than the work of a request:
//!
//! - **Readable-only registration.** tokio's own socket types register for
//!   readable AND writable events. A Unix socket reports "writable" every time
//!   the peer consumes data, so each batch one side read woke the other
//!   side's runtime for nothing. Here the socket is registered for readable
//!   events only; a writer registers for writability (on a duplicate of the
//!   descriptor) only while the socket buffer is full, which a frame stream
//!   almost never sees.
//! - **Writes from the sending thread.** [`FrameSender::send`] called from a
//!   thread outside any tokio runtime (a replica's Python thread answering,
//!   say) writes the frames itself when no write is in progress, instead of
//!   waking the runtime's thread to do it. Inside a runtime, frames queue for
//!   the connection's writer task, which lets the other runnable tasks add
//!   theirs and sends them all in one write.
//!
//! Frames are never interleaved: whoever writes holds the socket (the
//! `writing` flag, or the state lock for a direct write), and a direct write
//! only happens when nothing is queued, so frames leave in the order sent.
//!
//! [`open_stream`] serves the same reader and sender over any byte stream
//! (a TLS stream: its records are framed and encrypted in user space, so
//! the descriptor cannot be written directly). There the writer task does
//! every write, and the reader and writer use tokio's own readiness.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::frame::FrameReader;

/// A batch the writer task sends in one go; more waits for the next write.
const MAX_BATCH: usize = 4 * 1024 * 1024;

/// The socket a connection's descriptor is used through. `TcpStream` is only
/// the wrapper: its `read`/`write` are `recv`/`send(MSG_NOSIGNAL)`, which is
/// what a Unix stream socket needs as well, and it keeps this crate free of
/// `unsafe`.
type Socket = TcpStream;

/// The frame sender is closed: the connection failed or was shut down.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the frame connection is closed")]
pub struct Closed;

/// Splits a connected socket into its frame reader, a sender, and the writer
/// task (which ends when every sender is dropped, after sending what was
/// queued, or with the error that broke the connection). Must be called
/// within a tokio runtime; the descriptor is made non-blocking.
pub fn open(
    fd: OwnedFd,
) -> io::Result<(
    FrameReader<SocketReader>,
    FrameSender,
    JoinHandle<io::Result<()>>,
)> {
    let socket = Socket::from(fd);
    socket.set_nonblocking(true)?;
    let writer_socket = socket.try_clone()?;
    let reader = SocketReader::Fd(register(socket, Interest::READABLE)?);
    let out = Outgoing::new(Some(writer_socket));
    let task = tokio::spawn(write_loop(out.clone(), Sink::Fd));
    Ok((FrameReader::new(reader), FrameSender { out }, task))
}

/// [`open`] over a byte stream that is not a plain socket (TLS): the same
/// reader, sender and writer task, with every write made by the task.
pub fn open_stream<S>(
    stream: S,
) -> (
    FrameReader<SocketReader>,
    FrameSender,
    JoinHandle<io::Result<()>>,
)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let out = Outgoing::new(None);
    let task = tokio::spawn(write_loop(out.clone(), Sink::Stream(Box::new(write))));
    (
        FrameReader::new(SocketReader::Stream(Box::new(read))),
        FrameSender { out },
        task,
    )
}

/// Registers `socket` with the runtime for `interest` only.
// `with_interest` is deprecated because an arbitrary `AsRawFd` value may
// close or swap its descriptor while registered; a `TcpStream` owns its
// descriptor for as long as the `AsyncFd` owns it, which is exactly the
// condition the `unsafe` replacement asks its caller to promise.
#[allow(deprecated)]
fn register(socket: Socket, interest: Interest) -> io::Result<AsyncFd<Socket>> {
    AsyncFd::with_interest(socket, interest)
}

/// The read half: a socket registered for readable events only, or the
/// read half of a stream.
pub enum SocketReader {
    Fd(AsyncFd<Socket>),
    Stream(Box<dyn AsyncRead + Send + Unpin>),
}

impl AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = match self.get_mut() {
            SocketReader::Fd(fd) => fd,
            SocketReader::Stream(stream) => return Pin::new(stream).poll_read(cx, buf),
        };
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket buffer (as tokio's own
                    // streams assume): wait for the next edge instead of
                    // paying a read that would only say WouldBlock. Data
                    // that arrived since is a newer event the clear keeps.
                    if n > 0 && n < unfilled.len() {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness was cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Frames waiting for the writer task.
    queue: BytesMut,
    /// The writer task is writing a batch (outside the lock).
    writing: bool,
    /// Why the connection can take no more frames.
    closed: Option<io::ErrorKind>,
}

struct Outgoing {
    /// The socket for direct writes; `None` for a stream, which only the
    /// writer task writes.
    socket: Option<Socket>,
    state: Mutex<State>,
    /// Wakes the writer task: frames queued, or the last sender gone.
    notify: Notify,
    senders: AtomicUsize,
}

/// Where the writer task's batches go.
enum Sink {
    /// `Outgoing::socket`.
    Fd,
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl Sink {
    async fn write_all(&mut self, out: &Outgoing, bytes: &[u8]) -> io::Result<()> {
        match (self, &out.socket) {
            (Sink::Fd, Some(socket)) => write_all(socket, bytes).await,
            (Sink::Stream(stream), _) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            (Sink::Fd, None) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Ends the sending direction once every sender is gone.
    async fn shutdown(&mut self, out: &Outgoing) {
        match (self, &out.socket) {
            (Sink::Fd, Some(socket)) => {
                let _ = socket.shutdown(std::net::Shutdown::Write);
            }
            (Sink::Stream(stream), _) => {
                let _ = stream.shutdown().await;
            }
            (Sink::Fd, None) => {}
        }
    }
}

impl Outgoing {
    fn new(socket: Option<Socket>) -> Arc<Self> {
        Arc::new(Outgoing {
            socket,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            senders: AtomicUsize::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends frames on one connection; cheap to clone.
pub struct FrameSender {
    out: Arc<Outgoing>,
}

impl Clone for FrameSender {
    fn clone(&self) -> Self {
        self.out.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            out: self.out.clone(),
        }
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        if self.out.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.out.notify.notify_one();
        }
    }
}

impl FrameSender {
    /// Sends one or more whole frames: written by this thread when it is
    /// outside a tokio runtime and the socket is free, else queued for the
    /// writer task. `Err` once the connection is closed.
    pub fn send(&self, frames: &[u8]) -> Result<(), Closed> {
        let mut state = self.out.lock();
        if state.closed.is_some() {
            return Err(Closed);
        }
        let direct = self.out.socket.as_ref().filter(|_| {
            !state.writing
                && state.queue.is_empty()
                && tokio::runtime::Handle::try_current().is_err()
        });
        let rest = if let Some(socket) = direct {
            // Written under the lock, so the writer task cannot start a
            // batch in between and frames keep their order.
            match write_some(socket, frames) {
                Ok(written) => &frames[written..],
                Err(e) => {
                    state.closed = Some(e.kind());
                    drop(state);
                    // The writer task ends with the error; the reader sees it.
                    self.out.notify.notify_one();
                    return Err(Closed);
                }
            }
        } else {
            frames
        };
        if !rest.is_empty() {
            state.queue.extend_from_slice(rest);
            drop(state);
            self.out.notify.notify_one();
        }
        Ok(())
    }

    /// Whether `other` sends on the same connection.
    pub fn same_connection(&self, other: &FrameSender) -> bool {
        Arc::ptr_eq(&self.out, &other.out)
    }
}

/// Writes what the socket takes now; stops at a full buffer.
fn write_some(mut socket: &Socket, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match socket.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes all of `bytes`, waiting for writability while the buffer is full.
/// The wait registers a duplicate of the descriptor for writable events and
/// drops it afterwards, so a socket with room never wakes anyone for it.
async fn write_all(socket: &Socket, bytes: &[u8]) -> io::Result<()> {
    let mut written = write_some(socket, bytes)?;
    while written < bytes.len() {
        let waiter = register(socket.try_clone()?, Interest::WRITABLE)?;
        loop {
            let mut guard = waiter.writable().await?;
            // A write that took nothing reports WouldBlock, so `try_io`
            // clears the readiness and the next wait really waits.
            let wrote = guard.try_io(|fd| match write_some(fd.get_ref(), &bytes[written..]) {
                Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
                other => other,
            });
            match wrote {
                Ok(result) => written += result?,
                Err(_would_block) => continue,
            }
            if written == bytes.len() {
                break;
            }
        }
    }
    Ok(())
}

/// Closes the connection when the writer task goes away without having
/// closed it itself (its runtime shut down, or it was aborted): like a
/// dropped socket, even while replies still hold senders. (A stream's write
/// half goes with the task; its read half ends with its reader.)
struct CloseOnDrop(Arc<Outgoing>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.closed.is_none() {
            state.closed = Some(io::ErrorKind::BrokenPipe);
            if let Some(socket) = &self.0.socket {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

async fn write_loop(out: Arc<Outgoing>, mut sink: Sink) -> io::Result<()> {
    let _close = CloseOnDrop(out.clone());
    let mut batch = BytesMut::with_capacity(64 * 1024);
    loop {
        out.notify.notified().await;
        // Let the other tasks already runnable on this worker (requests of
        // other HTTP connections, replies being produced) queue their frames
        // first: under load one write then carries many frames instead of
        // one. With nothing else runnable this returns at once.
        tokio::task::yield_now().await;
        loop {
            let last_sender_gone = {
                let mut state = out.lock();
                if let Some(kind) = state.closed {
                    return Err(kind.into());
                }
                if state.queue.is_empty() {
                    state.writing = false;
                    if out.senders.load(Ordering::Acquire) != 0 {
                        break;
                    }
                    state.closed = Some(io::ErrorKind::NotConnected);
                    true
                } else {
                    state.writing = true;
                    let take = state.queue.len().min(MAX_BATCH);
                    batch.extend_from_slice(&state.queue.split_to(take));
                    false
                }
            };
            if last_sender_gone {
                sink.shutdown(&out).await;
                return Ok(());
            }
            if let Err(e) = sink.write_all(&out, &batch).await {
                out.lock().closed = Some(e.kind());
                return Err(e);
            }
            batch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, HttpRequest, Payload, Request};
    use std::os::unix::net::UnixStream;

    fn request(i: usize) -> Request {
        Request {
            method_name: Some(format!("m{i}")),
            payload: Payload::Http(HttpRequest {
                body: vec![7; i * 37 % 5000],
                ..Default::default()
            }),
        }
    }

    /// Frames sent from runtime tasks and from plain threads at once arrive
    /// whole and, per sender, in order; the writer ends when the senders go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_from_tasks_and_threads_arrive_whole_and_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_, tx, writer) = open(a.into()).unwrap();
        let (reader, _, _) = open(b.into()).unwrap();
        arrive_whole_and_in_order(tx, writer, reader).await;
    }

    /// The same over a stream (what TLS connections use): threads queue
    /// their frames for the writer task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_over_a_stream_arrive_whole_and_in_order() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (_, tx, writer) = open_stream(a);
        let (reader, _, _) = open_stream(b);
        arrive_whole_and_in_order(tx, writer, reader).await;
    }

    async fn arrive_whole_and_in_order(
        tx: FrameSender,
        writer: JoinHandle<io::Result<()>>,
        mut reader: FrameReader<SocketReader>,
    ) {
        let mut threads = Vec::new();
        for t in 0..3u64 {
            let tx = tx.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..500u64 {
                    let id = (t << 32) | i;
                    tx.send(&encode(id, &request(i as usize)).unwrap()).unwrap();
                }
            }));
        }
        let task_tx = tx.clone();
        let task = tokio::spawn(async move {
            for i in 0..500u64 {
                let id = (9 << 32) | i;
                task_tx
                    .send(&encode(id, &request(i as usize)).unwrap())
                    .unwrap();
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        drop(tx);
        let mut next = [0u64; 10];
        for _ in 0..2000 {
            let (id, body) = reader.next().await.unwrap().unwrap();
            let (sender, i) = ((id >> 32) as usize, id & 0xffff_ffff);
            assert_eq!(i, next[sender], "frames of sender {sender} out of order");
            next[sender] += 1;
            let back: Request = decode(&body).unwrap();
            assert_eq!(back.method_name, Some(format!("m{i}")));
        }
        for t in threads {
            t.join().unwrap();
        }
        task.await.unwrap();
        writer.await.unwrap().unwrap();
        assert!(reader.next().await.unwrap().is_none());
    }

    /// A peer that reads nothing fills the socket buffer: direct writes
    /// queue the rest, and the writer sends it all once the peer reads.
    #[tokio::test]
    async fn a_full_socket_buffer_queues_and_loses_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_, tx, writer) = open(a.into()).unwrap();
        let big = encode(1, &request(4999)).unwrap();
        let count = 2000; // ~10 MB, far above a socket buffer
        let frame_len = big.len();
        let sender = std::thread::spawn(move || {
            for _ in 0..count {
                tx.send(&big).unwrap();
            }
        });
        sender.join().unwrap();
        let (mut reader, _, _) = open(b.into()).unwrap();
        for _ in 0..count {
            let (id, body) = reader.next().await.unwrap().unwrap();
            assert_eq!(id, 1);
            assert_eq!(body.len(), frame_len - 12);
        }
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn sending_on_a_broken_connection_fails() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_, tx, writer) = open(a.into()).unwrap();
        drop(b);
        let frame = encode(1, &request(1)).unwrap();
        let mut failed = false;
        for _ in 0..100 {
            let outcome = std::thread::scope(|s| s.spawn(|| tx.send(&frame)).join().unwrap());
            if outcome.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "sends kept succeeding on a closed socket");
        assert!(writer.await.unwrap().is_err());
    }
}
