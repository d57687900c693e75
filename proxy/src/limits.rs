//! What one client may hold of a proxy (issue 19): connections, time and
//! buffered bytes. [`Limits`] is the configuration (`serve start`'s
//! `--http-*` flags); [`ConnIo`] bounds one connection's idle time,
//! [`BodyBudget`] the bytes of request bodies buffered across all requests.
//!
//! Who enforces what:
//! - the request head (HTTP/1.1): hyper's `header_read_timeout`, from the
//!   moment the connection waits for a head, so it also bounds an idle
//!   keep-alive connection; the first bytes (before hyper knows HTTP/1.1
//!   from HTTP/2) by [`ConnIo`]'s handshake deadline (the same duration);
//! - idle connections (both versions): [`ConnIo`] ends a connection that
//!   moved no byte for `keep_alive_timeout` while no request was in flight;
//! - the body: `http::read_body` (`body_read_timeout`, [`BodyBudget`]);
//! - connections: a semaphore in `http::serve` (`max_connections`);
//! - HTTP/2: hyper's stream, header-list, ping and reset-stream limits.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The proxy's bounds on clients. Defaults are sized for a busy public
/// endpoint on one machine; every one is a `serve start` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The whole request head must arrive within this (HTTP/1.1), counted
    /// from when the connection starts waiting for it.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight that moves no byte for this
    /// long is closed.
    pub keep_alive_timeout: Duration,
    /// The whole request body must arrive within this, else 408.
    pub body_read_timeout: Duration,
    /// Open connections per proxy; beyond it a new one gets 503 and is closed.
    pub max_connections: usize,
    /// Bytes of request bodies buffered at once across every request;
    /// beyond it 503 with Retry-After.
    pub max_buffered_body_bytes: usize,
    /// HTTP/2: streams one connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: bytes of one request's header list (HPACK-decoded).
    pub http2_max_header_list_size: u32,
    /// HTTP/2: a ping every this long; no answer within
    /// `http2_keep_alive_timeout` closes the connection.
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    /// HTTP/2: streams reset by the client before the proxy saw them that
    /// may be pending at once (the "rapid reset" attack); beyond it the
    /// connection is closed.
    pub http2_max_pending_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_buffered_body_bytes: 1 << 30,
            http2_max_concurrent_streams: 200,
            http2_max_header_list_size: 64 * 1024,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
            http2_max_pending_reset_streams: 20,
        }
    }
}

impl Limits {
    /// The first field that is zero (none of them may be), by name.
    pub(crate) fn zero_field(&self) -> Option<&'static str> {
        let durations = [
            ("header_read_timeout", self.header_read_timeout),
            ("keep_alive_timeout", self.keep_alive_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("http2_keep_alive_interval", self.http2_keep_alive_interval),
            ("http2_keep_alive_timeout", self.http2_keep_alive_timeout),
        ];
        let counts = [
            ("max_connections", self.max_connections),
            ("max_buffered_body_bytes", self.max_buffered_body_bytes),
            (
                "http2_max_concurrent_streams",
                self.http2_max_concurrent_streams as usize,
            ),
            (
                "http2_max_header_list_size",
                self.http2_max_header_list_size as usize,
            ),
            (
                "http2_max_pending_reset_streams",
                self.http2_max_pending_reset_streams,
            ),
        ];
        durations
            .iter()
            .find(|(_, d)| d.is_zero())
            .map(|(n, _)| *n)
            .or_else(|| counts.iter().find(|(_, c)| *c == 0).map(|(n, _)| *n))
    }
}

/// Requests being served on one connection; a response body that streams
/// (gRPC) holds its [`InFlight`] until it ends.
#[derive(Default)]
pub(crate) struct ConnActivity {
    in_flight: AtomicUsize,
}

impl ConnActivity {
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

pub(crate) struct InFlight(Arc<ConnActivity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Length of the HTTP/2 client preface: until this many bytes arrived,
/// hyper cannot tell HTTP/1.1 from HTTP/2 and no hyper timeout runs yet.
const PREFACE_LEN: usize = 24;

/// A connection's socket that reads as closed once the connection is idle
/// (no byte either way for `keep_alive`, nothing in flight), or once its
/// first [`PREFACE_LEN`] bytes took longer than `handshake` to arrive.
/// hyper then ends the connection as if the client had closed it. Checked
/// lazily: a timer fires at most once per `keep_alive` and is re-armed from
/// the last activity, so a busy connection only stores an `Instant` per I/O.
pub struct ConnIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    keep_alive: Duration,
    last_activity: Instant,
    /// Until the preface length was read: when it must have been.
    handshake_until: Option<Instant>,
    read_bytes: usize,
    timer: Pin<Box<Sleep>>,
}

impl<T> ConnIo<T> {
    /// For a server that does not report its requests (the control
    /// listener): idle means no byte either way, so the server's own
    /// keep-alive pings must come more often than `keep_alive`.
    pub fn without_requests(inner: T, keep_alive: Duration, handshake: Duration) -> Self {
        Self::new(inner, Arc::default(), keep_alive, handshake)
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub(crate) fn new(
        inner: T,
        activity: Arc<ConnActivity>,
        keep_alive: Duration,
        handshake: Duration,
    ) -> Self {
        let now = Instant::now();
        let handshake_until = now + handshake;
        Self {
            inner,
            activity,
            keep_alive,
            last_activity: now,
            handshake_until: Some(handshake_until),
            read_bytes: 0,
            timer: Box::pin(tokio::time::sleep_until(
                handshake_until.min(now + keep_alive),
            )),
        }
    }

    /// When the connection is due to end if nothing happens, or `None`
    /// when a request is in flight (the router's deadline bounds it).
    fn deadline(&self) -> Option<Instant> {
        let idle = (!self.activity.busy()).then_some(self.last_activity + self.keep_alive);
        match (idle, self.handshake_until) {
            (Some(i), Some(h)) => Some(i.min(h)),
            (i, h) => i.or(h),
        }
    }

    /// Ready(true) when the connection must end now.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            match self.deadline() {
                Some(deadline) if deadline <= now => return true,
                Some(deadline) => self.timer.as_mut().reset(deadline),
                None => self.timer.as_mut().reset(now + self.keep_alive),
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if read > 0 {
                    this.last_activity = Instant::now();
                    this.read_bytes += read;
                    if this.read_bytes >= PREFACE_LEN {
                        this.handshake_until = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.poll_expired(cx) => {
                tracing::debug!("closing an idle or silent connection");
                // Nothing put in `buf`: end of stream.
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The bytes of request bodies buffered at once, across every request of
/// one proxy, bounded by `max_buffered_body_bytes`.
pub(crate) struct BodyBudget {
    used: AtomicUsize,
    max: usize,
}

impl BodyBudget {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// An empty reservation that grows as the body arrives.
    pub(crate) fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

/// Bytes taken from a [`BodyBudget`], given back on drop.
pub(crate) struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    /// Makes the reservation at least `total` bytes; false (and no change)
    /// when the budget cannot give them.
    pub(crate) fn cover(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return true;
        };
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|&u| u <= self.budget.max)
            });
        if taken.is_ok() {
            self.bytes = total;
        }
        taken.is_ok()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.cover(60));
        assert!(!b.cover(50), "60 + 50 is over 100");
        assert!(b.cover(40));
        assert!(a.cover(60), "already covered");
        drop(a);
        assert!(b.cover(100));
        drop(b);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[test]
    fn zero_limits_are_named() {
        assert_eq!(Limits::default().zero_field(), None);
        let l = Limits {
            max_connections: 0,
            ..Default::default()
        };
        assert_eq!(l.zero_field(), Some("max_connections"));
    }
}
