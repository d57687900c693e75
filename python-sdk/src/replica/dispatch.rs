//! One drain's hand-over of queued requests to the host's Python
//! callables (`on_http`, `on_call`, `on_reconfigure`, gRPC and stream
//! signals; WebSocket events go on to `websocket`), and the answer made of
//! what they return.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use serval_protos::frame::{
    CallRequest, GrpcCall, Payload, Request, Response, GRPC_MESSAGE_HEADER, GRPC_STATUS_HEADER,
};

use super::asgi::{http_args, method_str};
use super::outbox::deliver;
use super::queue::Job;
use super::reply::{plain, PyReply};
use super::websocket::{run_ws, WsDispatch, WsJob};

/// The host's callables one drain hands requests to.
pub(super) struct Dispatch<'a, 'py> {
    pub(super) on_http: &'a Bound<'py, PyAny>,
    pub(super) on_call: &'a Bound<'py, PyAny>,
    pub(super) on_reconfigure: &'a Bound<'py, PyAny>,
    pub(super) ws: WsDispatch<'a, 'py>,
    pub(super) on_stream: Option<&'a Bound<'py, PyAny>>,
    pub(super) on_grpc: Option<&'a Bound<'py, PyAny>>,
    pub(super) on_grpc_message: Option<&'a Bound<'py, PyAny>>,
}

/// Hands one request to Python. The request is always answered: by the
/// returned tuple, later through its `Reply`, or here with a 500 when the
/// dispatch itself raised. `Err` only for KeyboardInterrupt / SystemExit:
/// those end the worker.
pub(super) fn run_job(py: Python<'_>, job: Job, d: &Dispatch<'_, '_>) -> PyResult<()> {
    let (request, reply) = match job {
        Job::Request { request, reply } => (request, reply),
        Job::Closed(conn) => {
            stream_signal(py, d.on_stream, (conn, None, -1));
            return run_ws(py, d.ws, WsJob::Closed(conn));
        }
    };
    let request = match request.payload {
        Payload::WsOpen(http) => {
            return run_ws(py, d.ws, WsJob::Open(request.method_name, http, reply))
        }
        Payload::Ws(frame) => return run_ws(py, d.ws, WsJob::Frame(reply, frame)),
        // Stream signals, never answered.
        Payload::Credit(n) => {
            let key = (reply.connection(), Some(reply.id()), i64::from(n));
            stream_signal(py, d.on_stream, key);
            return Ok(());
        }
        Payload::Cancel => {
            stream_signal(py, d.on_stream, (reply.connection(), Some(reply.id()), -1));
            return Ok(());
        }
        // A client stream's next request message, or its end (None).
        Payload::GrpcMessage(message) => {
            let message = PyBytes::new(py, &message);
            grpc_message(
                py,
                d.on_grpc_message,
                (reply.connection(), reply.id(), Some(message)),
            );
            return Ok(());
        }
        Payload::GrpcHalfClose => {
            grpc_message(
                py,
                d.on_grpc_message,
                (reply.connection(), reply.id(), None),
            );
            return Ok(());
        }
        payload => Request {
            method_name: request.method_name,
            payload,
        },
    };
    let method_name = request.method_name;
    if let Payload::Ping = request.payload {
        deliver(
            reply,
            &Response {
                status: 200,
                headers: Vec::new(),
                body: b"pong".to_vec(),
            },
        );
        return Ok(());
    }
    let reply = Bound::new(py, PyReply::new(reply))?;
    let result = match request.payload {
        Payload::Http(http) => http_args(py, http)
            .and_then(|(scope, body)| d.on_http.call1((method_name, scope, body, &reply))),
        Payload::Call(call) => call_args(py, call).and_then(|(args, method, headers)| {
            d.on_call
                .call1((method_name, args, method, headers, &reply))
        }),
        Payload::Reconfigure(r) => d.on_reconfigure.call1((r.config_json, &reply)),
        Payload::Grpc(call) => match d.on_grpc {
            Some(on_grpc) => grpc_args(py, call).and_then(|(path, message, metadata, timeout)| {
                on_grpc.call1((path, message, metadata, timeout, &reply))
            }),
            None => Ok(grpc_unimplemented(py, &call.path)?.into_any()),
        },
        // The frame server answers these itself; they never reach Python.
        Payload::Ping | Payload::Logs(_) => unreachable!("answered by the frame server"),
        Payload::WsOpen(_) | Payload::Ws(_) => unreachable!("dispatched by run_ws"),
        Payload::Credit(_) | Payload::Cancel | Payload::GrpcMessage(_) | Payload::GrpcHalfClose => {
            unreachable!("taken as stream signals above")
        }
    };
    let result = result.and_then(|r| {
        if r.is_none() {
            Ok(None)
        } else {
            to_response(&r).map(Some)
        }
    });
    match result {
        Ok(Some(response)) => {
            reply.get().respond(&response);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(err) => {
            let fatal = err.is_instance_of::<PyKeyboardInterrupt>(py)
                || err.is_instance_of::<PySystemExit>(py);
            let kind = err
                .get_type(py)
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "Exception".into());
            let message = format!("replica dispatch failed: {kind}: {}", err.value(py));
            reply.get().respond(&plain(500, Some(&kind), &message));
            if fatal {
                return Err(err);
            }
            tracing::error!("{message}");
            err.display(py);
            Ok(())
        }
    }
}

/// A router's signal for a stream: `on_stream(conn, id, credit)`, credit
/// -1 to cancel, id None for every stream of a closed connection.
fn stream_signal(
    py: Python<'_>,
    on_stream: Option<&Bound<'_, PyAny>>,
    signal: (u64, Option<u64>, i64),
) {
    if let Some(on_stream) = on_stream {
        if let Err(err) = on_stream.call1(signal) {
            tracing::error!("stream signal failed: {}", err.value(py));
        }
    }
}

/// A client stream's request message (or its end, None) for
/// `on_grpc_message(conn, id, message)`.
fn grpc_message(
    py: Python<'_>,
    on_grpc_message: Option<&Bound<'_, PyAny>>,
    message: (u64, u64, Option<Bound<'_, PyBytes>>),
) {
    if let Some(on_grpc_message) = on_grpc_message {
        if let Err(err) = on_grpc_message.call1(message) {
            tracing::error!(
                "a gRPC request message could not be delivered: {}",
                err.value(py)
            );
        }
    }
}

fn to_response(result: &Bound<'_, PyAny>) -> PyResult<Response> {
    let (status, headers, body): (u16, Vec<(String, String)>, Bound<'_, PyBytes>) =
        result.extract()?;
    Ok(Response {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    })
}

/// `(path, message, metadata, timeout)` for `on_grpc`: the message's
/// bytes as they came, metadata as `(key, value)` tuples (grpcio's
/// `invocation_metadata`), the seconds left of the client's deadline or None.
#[allow(clippy::type_complexity)]
fn grpc_args(
    py: Python<'_>,
    call: GrpcCall,
) -> PyResult<(
    Bound<'_, PyString>,
    Bound<'_, PyBytes>,
    Bound<'_, PyTuple>,
    Option<f64>,
)> {
    let metadata = PyTuple::new(
        py,
        call.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )?;
    let timeout = (call.timeout_ms > 0).then(|| call.timeout_ms as f64 / 1000.0);
    Ok((
        PyString::new(py, &call.path),
        PyBytes::new(py, &call.message),
        metadata,
        timeout,
    ))
}

/// The answer of a gRPC call to a replica whose object serves no gRPC.
fn grpc_unimplemented<'py>(py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyTuple>> {
    let headers = vec![
        (GRPC_STATUS_HEADER.to_owned(), "12".to_owned()),
        (
            GRPC_MESSAGE_HEADER.to_owned(),
            format!("this replica serves no gRPC method {path}"),
        ),
    ];
    (200u16, headers, PyBytes::new(py, b"")).into_pyobject(py)
}

/// `(args, http_method, headers)` for `on_call`.
fn call_args(
    py: Python<'_>,
    call: CallRequest,
) -> PyResult<(Bound<'_, PyBytes>, Bound<'_, PyString>, Bound<'_, PyList>)> {
    let method = if call.http_method.is_empty() {
        "GET"
    } else {
        call.http_method.as_str()
    };
    let headers = PyList::empty(py);
    for (k, v) in &call.http_headers {
        headers.append((k.as_str(), v.as_str()))?;
    }
    Ok((
        PyBytes::new(py, &call.args),
        method_str(py, method),
        headers,
    ))
}
