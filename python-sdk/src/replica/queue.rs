//! The queue between the replica's I/O thread and its Python thread: what
//! the frame server hands over (`Job`), the bounded channel it goes into
//! (`SERVAL_REPLICA_MAX_QUEUED`), and the answers of a request that cannot
//! be queued.

use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serval_node::replica_server::{Handler, Reply};
use serval_protos::frame::{Payload, Request, Response, StreamFrame, WsFrame};

use super::reply::unavailable;
use super::wake::Wake;

// The big variant is the common one: boxing it would cost an allocation
// per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    Request {
        request: Request,
        reply: Reply,
    },
    /// A router connection ended: the WebSocket sessions and streams on it
    /// are over.
    Closed(u64),
}

impl Job {
    /// Refuses a queued request (a connection's end needs no answer). A
    /// WebSocket open is denied with `response`; a client message that
    /// cannot be queued ends its session with 1013 (try again later), since
    /// a session that lost a message cannot go on.
    pub(super) fn refuse(self, response: &Response) {
        let Job::Request { reply, request } = self else {
            return;
        };
        match request.payload {
            Payload::WsOpen(_) => {
                reply.send_frame(&WsFrame::Deny(response.clone()));
            }
            Payload::Ws(WsFrame::Close { .. }) => {}
            // A stream's Credit or Cancel is never answered: dropped, the
            // stream waits for the connection's end, which also cancels it.
            Payload::Credit(_) | Payload::Cancel => {
                tracing::warn!("replica queue full: a stream credit or cancel was dropped")
            }
            // A client stream that lost a message cannot go on: it ends
            // (its Python side waits for the connection's end or its
            // deadline, as a stream whose cancel was dropped does).
            Payload::GrpcMessage(_) | Payload::GrpcHalfClose => {
                tracing::warn!("replica queue full: a gRPC client stream was ended");
                reply.send_frame(&StreamFrame::Error(response.clone()));
            }
            Payload::Ws(_) => {
                reply.send_frame(&WsFrame::Close {
                    code: 1013,
                    reason: "the replica is overloaded".into(),
                });
            }
            _ => reply.send(response),
        }
    }
}

/// Queues every request for the Python thread.
pub(super) struct QueueHandler {
    pub(super) tx: Sender<Job>,
    pub(super) wake: Arc<Wake>,
}

impl Handler for QueueHandler {
    fn handle(&self, request: Request, reply: Reply) {
        match self.tx.try_send(Job::Request { request, reply }) {
            Ok(()) => self.wake.wake(),
            Err(TrySendError::Full(job)) => job.refuse(&queue_full()),
            Err(TrySendError::Disconnected(job)) => {
                job.refuse(&unavailable("replica is shutting down"))
            }
        }
    }

    fn closed(&self, conn: u64) {
        // Blocking send: the end of a connection must not be lost to a full
        // queue (its sessions and streams would wait forever); the Python
        // thread drains it.
        if self.tx.send(Job::Closed(conn)).is_ok() {
            self.wake.wake();
        }
    }
}

/// Requests the replica's I/O thread queues for its Python thread, and (in
/// `serval._host`) requests waiting there beyond `max_concurrent_queries`:
/// `SERVAL_REPLICA_MAX_QUEUED`, default [`DEFAULT_MAX_QUEUED`]. A router
/// sends one replica no more than its limit, but every proxy and handle
/// process is a router of its own, and a sync method can hold the Python
/// thread for long: without a bound the queue grew with them. Beyond it a
/// request gets 503 with `Retry-After` at once.
const DEFAULT_MAX_QUEUED: usize = 10_000;
const MAX_QUEUED_ENV: &str = "SERVAL_REPLICA_MAX_QUEUED";

pub(super) fn max_queued() -> PyResult<usize> {
    match std::env::var(MAX_QUEUED_ENV) {
        Err(_) => Ok(DEFAULT_MAX_QUEUED),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(PyValueError::new_err(format!(
                "{MAX_QUEUED_ENV} must be a positive whole number, not {v:?}"
            ))),
        },
    }
}

fn queue_full() -> Response {
    let mut response = unavailable("the replica's request queue is full; retry later");
    response.headers.push(("retry-after".into(), "1".into()));
    response
}
