//! The HTTP/2 streams of one connection, run inside that connection's task
//! instead of a tokio task each.
//!
//! hyper runs each HTTP/2 stream's service future through its executor.
//! With a tokio task per stream, a replica's batch of replies woke each
//! stream's task, and each stream, as it answered, woke the connection's
//! task, which tokio's LIFO slot then ran at once: the connection flushed
//! (a `writev`, and a wake-up of the client) once per response. On the gRPC
//! no-op at c=64 that was exactly one `writev` per call, and a quarter of
//! the proxy's time.
//!
//! Polled by the connection's own task, the streams one wake-up finds ready
//! answer before the connection polls, which writes their responses in one
//! flush. Not all of them, though: with every ready response in one flush
//! (64 a write at c=64), client, proxy and replica took turns instead of
//! working at once, and calls/s fell by a sixth. The connection flushes
//! after each quarter of its open streams has answered ([`GROUPS`]), which
//! keeps about four groups of calls moving through the stages.
//!
//! The cost: one connection's streams share its task, so they never run on
//! two worker threads at once (the connection itself never did).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream};
use futures::task::AtomicWaker;

/// A connection flushes once this share of its open streams answered:
/// a quarter. Measured on the gRPC no-op over one connection (calls/s
/// against a task per stream): c=16 +20 %, c=64 +42 %; a third did as
/// well, a sixth (and a fixed 8) less at c=64.
const GROUPS: usize = 4;

/// Rounds of streams and connection in one poll before the task lets
/// others run (a client opening streams without pause).
const ROUNDS: usize = 8;

/// What hyper's executor hands over, until the connection's task polls.
#[derive(Default)]
struct Shared {
    /// Started streams not yet moved into the task's set. hyper starts at
    /// most `http2_max_concurrent_streams` at once, which bounds it.
    started: Mutex<Vec<BoxFuture<'static, ()>>>,
    /// The connection's task.
    task: AtomicWaker,
    /// The task is polling, and looks at `started` before it returns: a
    /// stream hyper starts then (from within the connection's poll, as it
    /// does) needs no wake-up, which would only cost a poll for nothing.
    polling: AtomicBool,
}

impl Shared {
    fn started(&self) -> MutexGuard<'_, Vec<BoxFuture<'static, ()>>> {
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// hyper's executor for one connection: the futures it is given run in
/// that connection's [`Driven`] future.
#[derive(Clone, Default)]
pub(crate) struct ConnExecutor(Arc<Shared>);

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.0.started().push(Box::pin(stream));
        if !self.0.polling.load(Ordering::Acquire) {
            self.0.task.wake();
        }
    }
}

/// A connection future and the streams its executor started, polled as one.
/// It ends with the connection; streams still running then (their client
/// is gone) are dropped, which cancels their calls.
pub(crate) struct Driven<C> {
    conn: Pin<Box<C>>,
    shared: Arc<Shared>,
    streams: FuturesUnordered<BoxFuture<'static, ()>>,
}

impl<C: Future> Driven<C> {
    /// Runs `conn`, served with `executor`, and its streams.
    pub(crate) fn new(conn: C, executor: &ConnExecutor) -> Self {
        Self {
            conn: Box::pin(conn),
            shared: executor.0.clone(),
            streams: FuturesUnordered::new(),
        }
    }

    /// The connection (to ask it to shut down gracefully).
    pub(crate) fn conn(&mut self) -> Pin<&mut C> {
        self.conn.as_mut()
    }

    /// Polls the streams that were woken (and the new ones) until `group`
    /// of them ended (true: more may be ready) or none is ready (false).
    fn poll_streams(&mut self, cx: &mut Context<'_>, group: usize) -> bool {
        let started = std::mem::take(&mut *self.shared.started());
        self.streams.extend(started);
        let mut ended = 0;
        // Ready(Some): a stream ended. Pending or None: every woken stream
        // was polled (FuturesUnordered also stops, waking this task, once
        // it polled as many as it holds).
        while let Poll::Ready(Some(())) = Pin::new(&mut self.streams).poll_next(cx) {
            ended += 1;
            if ended == group {
                return true;
            }
        }
        false
    }

    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<C::Output> {
        let open = self.streams.len() + self.shared.started().len();
        let group = (open / GROUPS).max(1);
        // The streams first: what they answer, the connection's poll below
        // writes in one flush. The streams it accepts start in the next
        // round, and what they answer at once is flushed there.
        for _ in 0..ROUNDS {
            let more = self.poll_streams(cx, group);
            if let Poll::Ready(out) = self.conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if !more && self.shared.started().is_empty() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<C> Drop for Driven<C> {
    /// Streams started but never polled go with the connection too (the
    /// executor's clones, which hyper's connection holds, share the list).
    fn drop(&mut self) {
        self.shared.started().clear();
    }
}

impl<C: Future> Future for Driven<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.shared.task.register(cx.waker());
        this.shared.polling.store(true, Ordering::Release);
        let polled = this.poll_both(cx);
        this.shared.polling.store(false, Ordering::Release);
        // (A stream started from another thread meanwhile.)
        if polled.is_pending() && !this.shared.started().is_empty() {
            cx.waker().wake_by_ref();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    /// A connection stand-in: runs until told to end, starting one stream
    /// through the executor when first polled.
    async fn conn(executor: ConnExecutor, end: oneshot::Receiver<()>, ran: Arc<AtomicUsize>) {
        let counted = ran.clone();
        executor.execute(async move {
            tokio::task::yield_now().await;
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let _ = end.await;
    }

    #[tokio::test]
    async fn streams_run_in_the_connections_future_and_end_with_it() {
        let executor = ConnExecutor::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (end_tx, end_rx) = oneshot::channel();
        let driven = Driven::new(conn(executor.clone(), end_rx, ran.clone()), &executor);
        let task = tokio::spawn(driven);
        // The stream ran with no task of its own (none was spawned).
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while ran.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the stream ran");
        // A stream started from outside, later, runs too.
        let (done_tx, done_rx) = oneshot::channel();
        executor.execute(async move {
            let _ = done_tx.send(());
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), done_rx)
            .await
            .expect("a stream started later ran")
            .expect("sent");
        // A stream still running when the connection ends is dropped.
        let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
        executor.execute(async move {
            let _held = dropped_tx;
            std::future::pending::<()>().await;
        });
        end_tx.send(()).expect("the connection runs");
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the connection ended")
            .expect("no panic");
        assert!(dropped_rx.await.is_err(), "the pending stream was dropped");
    }
}
