//! Waking the Python thread's event loop: the wake socket the loop watches
//! (`ReplicaServer.wake_fd`), written once per burst of queued requests,
//! and the stop signal that wakes both the loop and `ReplicaServer.wait`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Wakes the worker's event loop: a socket pair whose read end the loop
/// watches. `pending` is set by whoever writes and cleared by `drain` before
/// it looks at the queue, so a request queued after that is never missed,
/// and a burst of requests costs one write.
pub(super) struct Wake {
    /// Held by `ReplicaServer::poll_for_job` while it polls, so the I/O
    /// thread skips the write.
    pub(super) pending: AtomicBool,
    writer: UnixStream,
    /// What the loop watches (`wake_fd`).
    pub(super) reader: UnixStream,
}

impl Wake {
    pub(super) fn new() -> std::io::Result<Self> {
        let (writer, reader) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        Ok(Self {
            pending: AtomicBool::new(false),
            writer,
            reader,
        })
    }

    /// Wakes the loop unless a wake is already pending.
    pub(super) fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.force();
        }
    }

    /// Wakes the loop. A full socket buffer (WouldBlock) already means awake.
    pub(super) fn force(&self) {
        self.pending.store(true, Ordering::Release);
        let _ = (&self.writer).write(&[1]);
    }

    /// Called by the worker before it drains the queue. The socket is
    /// emptied BEFORE `pending` is cleared: the other order could swallow
    /// the byte of a `wake` that came in between, leaving `pending` set with
    /// nothing to read, and the loop would never wake again. In this order a
    /// wake that sees `pending` still set has its request in the queue the
    /// caller is about to drain.
    pub(super) fn clear(&self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
        self.pending.store(false, Ordering::SeqCst);
    }
}

/// Set once, when the server starts stopping; wakes `wait` and the worker loop.
pub(super) struct StopSignal {
    reason: Mutex<Option<String>>,
    cond: Condvar,
    wake: Arc<Wake>,
}

impl StopSignal {
    pub(super) fn new(wake: Arc<Wake>) -> Self {
        Self {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            wake,
        }
    }

    pub(super) fn stop(&self, reason: &str) {
        let mut r = self.lock_reason();
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        self.cond.notify_all();
        drop(r);
        self.wake.force();
    }

    pub(super) fn reason(&self) -> Option<String> {
        self.lock_reason().clone()
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.lock_reason().is_some()
    }

    /// Waits up to `timeout` for a stop; returns the reason if stopped.
    pub(super) fn wait(&self, timeout: Duration) -> Option<String> {
        let r = self.lock_reason();
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        r.clone()
    }

    /// The reason, also after a panic elsewhere held the lock: it is one
    /// `Option` write, never left half done.
    fn lock_reason(&self) -> MutexGuard<'_, Option<String>> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }
}
