//! WebSocket sessions: their events handed to the host's callables, and
//! `serval._native.WebSocket`, one session's way back to its router.

use std::sync::Mutex;

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serval_node::replica_server::Reply;
use serval_protos::frame::{HttpRequest, Response, WsFrame};

use super::asgi::websocket_scope;
use super::reply::plain;

/// The host's WebSocket callables, when it has them: `on_ws_open(method_name,
/// scope, ws)` and `on_ws_event(connection, id, kind, data)`.
pub(super) type WsDispatch<'a, 'py> =
    (Option<&'a Bound<'py, PyAny>>, Option<&'a Bound<'py, PyAny>>);

pub(super) enum WsJob {
    Open(Option<String>, HttpRequest, Reply),
    Frame(Reply, WsFrame),
    Closed(u64),
}

/// Hands one WebSocket event to Python: a session opened (with its
/// [`PyWebSocket`]), a client's message or close, or the end of a router
/// connection (kind "gone": its sessions are over). A session the host
/// cannot take is denied 404; a callable that raised is logged (an open
/// then answers 500). `Err` only for KeyboardInterrupt / SystemExit.
pub(super) fn run_ws(
    py: Python<'_>,
    (on_open, on_event): WsDispatch<'_, '_>,
    job: WsJob,
) -> PyResult<()> {
    let result = match job {
        WsJob::Open(method_name, http, reply) => {
            let Some(on_open) = on_open else {
                reply.send_frame(&WsFrame::Deny(plain(
                    404,
                    None,
                    "this replica serves no WebSocket",
                )));
                return Ok(());
            };
            let ws = Bound::new(py, PyWebSocket::new(reply))?;
            let called = websocket_scope(py, http)
                .and_then(|scope| on_open.call1((method_name, scope, &ws)));
            if called.is_err() {
                ws.get().finish(WsFrame::Deny(plain(
                    500,
                    None,
                    "the replica could not open the WebSocket",
                )));
            }
            called.map(|_| ())
        }
        WsJob::Frame(reply, frame) => {
            let Some(on_event) = on_event else {
                return Ok(());
            };
            let (conn, id) = (reply.connection(), reply.id());
            match frame {
                WsFrame::Text(text) => on_event.call1((conn, id, intern!(py, "text"), text)),
                WsFrame::Binary(data) => {
                    on_event.call1((conn, id, intern!(py, "bytes"), PyBytes::new(py, &data)))
                }
                WsFrame::Close { code, reason } => {
                    on_event.call1((conn, id, intern!(py, "close"), (code, reason)))
                }
                // Only a replica sends these.
                WsFrame::Accept { .. } | WsFrame::Deny(_) => return Ok(()),
            }
            .map(|_| ())
        }
        WsJob::Closed(conn) => match on_event {
            Some(on_event) => on_event
                .call1((conn, 0u64, intern!(py, "gone"), py.None()))
                .map(|_| ()),
            None => Ok(()),
        },
    };
    match result {
        Ok(()) => Ok(()),
        Err(err)
            if err.is_instance_of::<PyKeyboardInterrupt>(py)
                || err.is_instance_of::<PySystemExit>(py) =>
        {
            Err(err)
        }
        Err(err) => {
            tracing::error!("websocket dispatch failed: {}", err.value(py));
            err.display(py);
            Ok(())
        }
    }
}

/// One WebSocket session's way back to its router: the app's accept,
/// messages and close (or the HTTP answer that refuses it), each sent at
/// once. After a close or a deny it sends nothing more.
#[pyclass(frozen, name = "WebSocket", module = "serval._native")]
pub struct PyWebSocket {
    reply: Mutex<Option<Reply>>,
    /// `(connection, id)`: the key the host keeps the session under.
    key: (u64, u64),
}

impl PyWebSocket {
    fn new(reply: Reply) -> Self {
        Self {
            key: (reply.connection(), reply.id()),
            reply: Mutex::new(Some(reply)),
        }
    }

    fn send(&self, frame: &WsFrame) -> bool {
        let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        reply.as_ref().is_some_and(|r| r.send_frame(frame))
    }

    /// Sends the last frame of the session.
    fn finish(&self, frame: WsFrame) -> bool {
        let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        reply.is_some_and(|r| r.send_frame(&frame))
    }
}

#[pymethods]
impl PyWebSocket {
    #[getter]
    fn key(&self) -> (u64, u64) {
        self.key
    }

    /// Whether the session still sends (no close or deny yet).
    #[getter]
    fn open(&self) -> bool {
        self.reply
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    #[pyo3(signature = (subprotocol = None, headers = Vec::new()))]
    fn accept(&self, subprotocol: Option<String>, headers: Vec<(String, String)>) -> bool {
        self.send(&WsFrame::Accept {
            subprotocol,
            headers,
        })
    }

    fn text(&self, text: String) -> bool {
        self.send(&WsFrame::Text(text))
    }

    fn binary(&self, data: &[u8]) -> bool {
        self.send(&WsFrame::Binary(data.to_vec()))
    }

    #[pyo3(signature = (code = 1000, reason = String::new()))]
    fn close(&self, code: u16, reason: String) -> bool {
        self.finish(WsFrame::Close { code, reason })
    }

    /// Refuses the session before it was accepted with this HTTP answer.
    fn deny(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        self.finish(WsFrame::Deny(Response {
            status,
            headers,
            body: body.to_vec(),
        }))
    }
}

impl Drop for PyWebSocket {
    fn drop(&mut self) {
        // A session dropped by the host without an end still ends.
        if let Some(reply) = self
            .reply
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send_frame(&WsFrame::Close {
                code: 1011,
                reason: "the replica dropped the session".into(),
            });
        }
    }
}
