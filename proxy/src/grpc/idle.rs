//! The idle deadline of a call's client stream: a client that sends
//! nothing (no message, no end of stream) for `SERVAL_GRPC_STREAM_IDLE_S`
//! (default 300 s) has its call ended with DEADLINE_EXCEEDED, the upstream
//! stream reset (grpcio cancels the Handler) or, on frames, the replica's
//! stream cancelled, and the replica slot freed, so idle streams cannot
//! pin every slot. Once the client has half-closed, only its own
//! `grpc-timeout` bounds the call.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::BoxError;

/// Seconds a client stream may stay silent.
pub const STREAM_IDLE_ENV: &str = "SERVAL_GRPC_STREAM_IDLE_S";
const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(300);

static STREAM_IDLE: LazyLock<Duration> = LazyLock::new(|| {
    crate::websocket::env_number(STREAM_IDLE_ENV)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(DEFAULT_STREAM_IDLE)
});

/// Set once a call's client stream went idle: the response side then ends
/// the call with DEADLINE_EXCEEDED instead of a transport error.
pub(super) type Idled = Arc<AtomicBool>;

pub(super) fn idled(flag: &Idled) -> bool {
    flag.load(Ordering::Acquire)
}

/// A client's request body, failing once it is idle for the deadline.
pub(crate) struct IdleBody {
    inner: Incoming,
    timer: Pin<Box<Sleep>>,
    ended: bool,
    idled: Idled,
}

impl IdleBody {
    pub(super) fn new(inner: Incoming) -> (Self, Idled) {
        let idled = Idled::default();
        let body = Self {
            inner,
            timer: Box::pin(tokio::time::sleep(*STREAM_IDLE)),
            ended: false,
            idled: idled.clone(),
        };
        (body, idled)
    }
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                let deadline = tokio::time::Instant::now() + *STREAM_IDLE;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(frame.map_err(|e| -> BoxError { Box::new(e) })))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending if this.ended => Poll::Pending,
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.idled.store(true, Ordering::Release);
                    this.ended = true;
                    tracing::debug!("a gRPC client stream went idle: the call ends");
                    Poll::Ready(Some(Err("the client stream was idle too long".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
