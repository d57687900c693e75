//! `serval._native.Reply`: a request's answer, sent once from any thread
//! (a whole response, or a streamed reply's head, chunks and end), and the
//! plain JSON answers the replica makes itself.

use std::sync::Mutex;

use pyo3::prelude::*;
use serval_node::replica_server::Reply;
use serval_protos::frame::{Response, StreamFrame, ERROR_TYPE_HEADER, STREAM_HEADER};

use super::outbox::deliver;

/// Answers one request, once, from any thread. Dropped unanswered (a task
/// that never finished, a bug) it answers 503, so the router never waits for
/// a response that will not come.
#[pyclass(frozen, name = "Reply", module = "serval._native")]
pub struct PyReply {
    inner: Mutex<Option<Reply>>,
    /// After `start_stream`: the reply its chunks go out on, until the
    /// stream ends. Dropped while still here, the stream ends with an error.
    stream: Mutex<Option<Reply>>,
    /// (connection, request id): what this request's Credit/Cancel frames
    /// name.
    key: (u64, u64),
}

impl PyReply {
    pub(super) fn new(reply: Reply) -> Self {
        Self {
            key: (reply.connection(), reply.id()),
            inner: Mutex::new(Some(reply)),
            stream: Mutex::new(None),
        }
    }

    fn stream_frame(&self, frame: &StreamFrame, last: bool) -> bool {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let sent = stream.as_ref().is_some_and(|r| r.send_frame(frame));
        if last {
            stream.take();
        }
        sent
    }

    /// Sends `response` unless already answered; true if this call answered.
    pub(super) fn respond(&self, response: &Response) -> bool {
        let reply = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        match reply {
            Some(reply) => {
                deliver(reply, response);
                true
            }
            None => false,
        }
    }
}

#[pymethods]
impl PyReply {
    /// Answers the request; False (and nothing sent) if it was answered before.
    fn send(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        self.respond(&Response {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    #[getter]
    fn answered(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// (connection, request id), as `on_stream` names this request.
    #[getter]
    fn stream_key(&self) -> (u64, u64) {
        self.key
    }

    /// Answers with the head of a streamed reply (status and headers; the
    /// body follows with `send_chunk`, then `end_stream` or `fail_stream`).
    /// False when already answered or the router is gone.
    fn start_stream(&self, status: u16, mut headers: Vec<(String, String)>) -> bool {
        let reply = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(reply) = reply else {
            return false;
        };
        headers.push((STREAM_HEADER.to_owned(), "1".to_owned()));
        let sent = reply.send_frame(&Response {
            status,
            headers,
            body: Vec::new(),
        });
        if sent {
            *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
        }
        sent
    }

    /// One chunk of the stream; False when the router is gone.
    fn send_chunk(&self, chunk: &[u8]) -> bool {
        self.stream_frame(&StreamFrame::Chunk(chunk.to_vec()), false)
    }

    /// Ends the stream: complete.
    fn end_stream(&self) -> bool {
        self.stream_frame(&StreamFrame::End, true)
    }

    /// Lets the router send `n` more of a client stream's request messages
    /// (the Handler took that many); False when the router is gone.
    fn grant_requests(&self, n: u32) -> bool {
        self.stream_frame(&StreamFrame::Credit(n), false)
    }

    /// Ends the stream with an error, the response a failed call would get.
    fn fail_stream(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        let error = Response {
            status,
            headers,
            body: body.to_vec(),
        };
        self.stream_frame(&StreamFrame::Error(error), true)
    }
}

impl Drop for PyReply {
    fn drop(&mut self) {
        if let Some(reply) = self
            .stream
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send_frame(&StreamFrame::Error(unavailable(
                "the replica dropped the stream before its end",
            )));
        }
        if let Some(reply) = self
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send(&unavailable(
                "the replica dropped the request without answering",
            ));
        }
    }
}

pub(super) fn plain(status: u16, error_type: Option<&str>, message: &str) -> Response {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(t) = error_type {
        headers.push((ERROR_TYPE_HEADER.to_string(), t.to_string()));
    }
    Response {
        status,
        headers,
        body: serde_json::json!({ "error": message })
            .to_string()
            .into_bytes(),
    }
}

pub(super) fn unavailable(message: &str) -> Response {
    plain(503, Some("ReplicaUnavailable"), message)
}
