//! Calls the proxy terminates itself (the default; issue 25):
//! the request message is taken out of its gRPC framing and sent as a
//! [`Payload::Grpc`] frame on the replica's multiplexed connection, the
//! same connection, handshake and bounds as HTTP requests. A unary call's
//! replica answers the status and the reply message's bytes, which go back
//! as a gRPC response with trailers. A server-streaming call's replica
//! answers with a streamed reply (the machinery of HTTP streams: a head,
//! chunk frames each holding one or more whole length-prefixed reply
//! messages, credits, cancel): each chunk's bytes go to the client as they
//! come, checked to be whole messages but not decoded, and the stream's end
//! (or error frame) becomes the trailers. A client-streaming or bidirectional
//! call's replica answers a stream head at once; the client's messages then
//! go to it as [`Payload::GrpcMessage`] frames as they arrive
//! ([`send_requests`], under the idle deadline of [`super::idle`]), at most
//! [`serval_protos::frame::STREAM_WINDOW`] beyond those the replica
//! credited, then a [`Payload::GrpcHalfClose`]; the replies come back as a
//! server stream's do. Message bytes are never decoded here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, StatusCode};
use serval_protos::frame::{
    GrpcCall, Payload, Request, Response, GRPC_MESSAGE_HEADER, GRPC_STATUS_HEADER,
};
use serval_protos::handshake;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use super::idle::{self, IdleBody};
use super::table::Shape;
use super::{
    add_status, code_of, frame, internal_failure, status_response, BoxError, Code, GrpcBody,
    GrpcResponse,
};
use crate::errors;
use crate::http::read_body;
use crate::limits::Reservation as BodyReservation;
use crate::proxy::Proxy;
use crate::routing::{ChunkStream, RequestSender, StreamError};

/// Headers of the gRPC protocol itself (and the proxy's credential): not
/// the caller's metadata, so never handed to the Handler.
const NOT_METADATA: [&str; 5] = [
    "content-type",
    "content-length",
    "te",
    "user-agent",
    handshake::GRPC_AUTH_HEADER,
];

/// Calls `path` (`/package.Service/Method`, a method of that `shape`) on a
/// replica of `endpoint`.
pub(super) async fn call(
    proxy: &Proxy,
    endpoint: &str,
    path: &str,
    shape: Shape,
    req: hyper::Request<Incoming>,
) -> GrpcResponse {
    let started = Instant::now();
    let client_timeout = match grpc_timeout(req.headers()) {
        Ok(t) => t,
        Err(reason) => return status_response(Code::InvalidArgument, &reason),
    };
    let metadata = metadata(req.headers());
    // The deadline of the call's answer (a stream's head): the client's,
    // within the router's own. A stream is bounded by the client's only.
    let limit = proxy.router().config().request_timeout;
    let deadline = started + client_timeout.map_or(limit, |t| t.min(limit));
    let streams = shape.client_streaming || shape.server_streaming;
    let call_deadline = client_timeout.map(|t| started + if streams { t } else { t.min(limit) });
    // A client stream's messages follow the call; a single message is read
    // whole first (the body budget's reservation held as long as it is).
    let (message, client_stream, _budget) = if shape.client_streaming {
        (Bytes::new(), Some(req.into_body()), None)
    } else {
        match tokio::time::timeout_at(deadline, read_body(proxy, req)).await {
            Err(_) => {
                return status_response(
                    Code::DeadlineExceeded,
                    "the request did not arrive in time",
                )
            }
            Ok(Err(refused)) => {
                let (code, what) = refusal(refused.status());
                return status_response(code, what);
            }
            Ok(Ok((_, body, budget))) => match unframe(&body) {
                Ok(m) => (m, None, Some(budget)),
                Err((code, reason)) => return status_response(code, reason),
            },
        }
    };
    let reservation = match tokio::time::timeout_at(deadline, proxy.router().reserve(endpoint))
        .await
    {
        Err(_) => return status_response(Code::DeadlineExceeded, "no replica was free in time"),
        Ok(Err(e)) => {
            return status_response(code_of(&e), &errors::message(&e, proxy.debug_errors))
        }
        Ok(Ok(r)) => r,
    };
    let timeout_ms = call_deadline.map_or(0, |d| {
        // At least 1: 0 means "no deadline" to the replica.
        (d.saturating_duration_since(Instant::now()).as_millis() as u64).max(1)
    });
    let request = Request {
        method_name: None,
        payload: Payload::Grpc(GrpcCall {
            path: path.to_owned(),
            metadata,
            message: message.to_vec(),
            timeout_ms,
        }),
    };
    // The slot is held until the answer is here (the reservation's scope),
    // or, for a stream, until the stream ends.
    let reply = match reservation.request(&request, deadline).await {
        Ok(reply) => reply,
        Err(e) => return status_response(code_of(&e), &errors::message(&e, proxy.debug_errors)),
    };
    let answer = reply.response;
    if answer.status != 200 {
        let detail = format!(
            "replica {} of endpoint {endpoint} refused the call ({}): {}",
            reservation.replica_id(),
            answer.status,
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)])
        );
        let code = if answer.status == 503 {
            Code::Unavailable
        } else {
            Code::Internal
        };
        return internal_failure(proxy, code, "the replica could not take the call", detail);
    }
    if let Some(mut messages) = reply.stream {
        // The client's messages go to the replica as they come, on a task
        // that ends with the stream (MessageStream aborts it).
        let requests = client_stream.map(|body| {
            let sender = messages.request_sender();
            tokio::spawn(send_requests(
                body,
                sender,
                proxy.max_body_bytes,
                proxy.body_budget.reservation(),
            ))
        });
        messages.hold(reservation);
        let body = MessageStream {
            messages: Some(messages),
            end: None,
            requests,
            deadline: call_deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            debug_errors: proxy.debug_errors,
        };
        return grpc_response(body.boxed_unsync());
    }
    let (code, details) = replica_status(&answer);
    // (A client stream answered at once, without a stream, was refused.)
    if code != 0 || shape.client_streaming {
        return super::status_response_code(code, details);
    }
    ok_response(&answer.body)
}

/// The gRPC status a replica answered (in a unary answer, or the error
/// frame that ends a stream).
fn replica_status(answer: &Response) -> (u16, &str) {
    let code = answer
        .header(GRPC_STATUS_HEADER)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(Code::Unknown as u16);
    (code, answer.header(GRPC_MESSAGE_HEADER).unwrap_or(""))
}

/// The reply of a streaming call: the gRPC messages of each chunk the
/// replica sends (already length-prefixed), as they come, then trailers
/// with the stream's status.
/// Dropped before its end (the client reset the stream), or ended by the
/// client's deadline, it drops `messages`, which cancels the replica's
/// generator and frees the slot the stream holds.
struct MessageStream {
    messages: Option<ChunkStream>,
    /// The stream's end, taken with messages still to send (`Some(None)`:
    /// complete).
    end: Option<Option<StreamError>>,
    /// A client stream's [`send_requests`], until it ends; its failure
    /// (an idle client, a malformed message) ends the call.
    requests: Option<JoinHandle<Result<(), (Code, &'static str)>>>,
    deadline: Option<Pin<Box<Sleep>>>,
    debug_errors: bool,
}

impl Drop for MessageStream {
    fn drop(&mut self) {
        if let Some(requests) = self.requests.take() {
            requests.abort();
        }
    }
}

impl MessageStream {
    /// The trailers of a stream that ended with `end` (`None`: complete).
    fn trailers(&self, end: Option<StreamError>) -> HeaderMap {
        let mut trailers = HeaderMap::new();
        match end {
            None => add_status(&mut trailers, 0, ""),
            // The replica's own status (an abort, an exception, a wrong
            // reply type, set_code).
            Some(StreamError::Failed(r)) if r.status == 200 => {
                let (code, message) = replica_status(&r);
                add_status(&mut trailers, code, message);
            }
            Some(e) => {
                tracing::warn!(error = %e, "a streamed gRPC call was cut");
                let code = match &e {
                    StreamError::Failed(r) if r.status != 503 => Code::Internal,
                    _ => Code::Unavailable,
                };
                let detail = e.to_string();
                let public = "the replica ended the stream early";
                let message = if self.debug_errors { &detail } else { public };
                add_status(&mut trailers, code as u16, message);
            }
        }
        trailers
    }
}

impl Body for MessageStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(messages) = this.messages.as_mut() else {
            return Poll::Ready(None);
        };
        let mut failed = None;
        // (A stream that already ended is not failed after the fact.)
        let deadline = this.deadline.as_mut().filter(|_| this.end.is_none());
        if let Some(deadline) = deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                failed = Some((
                    Code::DeadlineExceeded,
                    "the call's deadline passed mid-stream",
                ));
            }
        }
        if let Some(requests) = this.requests.as_mut().filter(|_| this.end.is_none()) {
            if let Poll::Ready(sent) = Pin::new(requests).poll(cx) {
                this.requests = None;
                // A task that panicked or was aborted: the stream goes on.
                if let Ok(Err(e)) = sent {
                    failed = failed.or(Some(e));
                }
            }
        }
        if let Some((code, message)) = failed {
            // Dropped before its end: the replica's stream is cancelled.
            this.messages = None;
            let mut trailers = HeaderMap::new();
            add_status(&mut trailers, code as u16, message);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let end = match this.end.take() {
            Some(end) => end,
            None => {
                // The messages already here leave as one DATA frame, up to
                // GATHER_BYTES: a reader gets a burst at once, and a burst
                // costs one frame, not one per message.
                let mut data = BytesMut::new();
                let end = loop {
                    match messages.poll_next(cx) {
                        Poll::Ready(Some(Ok(chunk))) if !whole_messages(&chunk) => {
                            let detail = "the replica sent a chunk that is not whole gRPC messages";
                            tracing::warn!("{detail}");
                            break Some(Some(StreamError::Lost(detail.to_owned())));
                        }
                        Poll::Ready(Some(Ok(chunk))) => {
                            data.extend_from_slice(&chunk);
                            if data.len() >= GATHER_BYTES {
                                break None;
                            }
                        }
                        Poll::Ready(Some(Err(e))) => break Some(Some(e)),
                        Poll::Ready(None) => break Some(None),
                        Poll::Pending if data.is_empty() => return Poll::Pending,
                        Poll::Pending => break None,
                    }
                };
                if !data.is_empty() {
                    // The end, when it came with them, goes next time.
                    this.end = end;
                    return Poll::Ready(Some(Ok(Frame::data(data.freeze()))));
                }
                end.unwrap_or(None)
            }
        };
        let trailers = this.trailers(end);
        // Ended: the slot is freed now, not when hyper drops the body.
        this.messages = None;
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.messages.is_none()
    }
}

/// Whether `chunk` is one or more whole, uncompressed length-prefixed gRPC
/// messages (what a replica's stream chunk must be): a walk over the
/// prefixes, the messages themselves untouched.
fn whole_messages(mut chunk: &[u8]) -> bool {
    if chunk.is_empty() {
        return false;
    }
    while !chunk.is_empty() {
        let Some(&[0, a, b, c, d]) = chunk.get(..5) else {
            return false;
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        let Some(rest) = chunk.get(5 + len..) else {
            return false;
        };
        chunk = rest;
    }
    true
}

/// The most message bytes [`MessageStream`] gathers into one DATA frame.
const GATHER_BYTES: usize = 64 * 1024;

/// A gRPC response: its headers now, `body` (messages, then trailers) as
/// it comes.
fn grpc_response(body: GrpcBody) -> GrpcResponse {
    let mut response = hyper::Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// Sends a client stream's request messages to the replica as they come
/// (each at most `max_message` bytes, the proxy's body limit, and within
/// the body budget), then its half-close. The status the call ends with
/// when the client's stream fails: idle too long ([`super::idle`]),
/// compressed, oversized or cut inside a message.
async fn send_requests(
    body: Incoming,
    sender: RequestSender,
    max_message: usize,
    mut budget: BodyReservation,
) -> Result<(), (Code, &'static str)> {
    let (mut body, idled) = IdleBody::new(body);
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: nothing to send
            },
            Err(_) if idle::idled(&idled) => {
                return Err((Code::DeadlineExceeded, super::IDLE_MESSAGE))
            }
            Err(_) => return Err((Code::Unavailable, "the client stream broke")),
        };
        if !budget.cover(buffer.len() + data.len()) {
            return Err((
                Code::Unavailable,
                "the proxy is out of room for request bodies",
            ));
        }
        buffer.extend_from_slice(&data);
        while let Some(message) = next_message(&mut buffer, max_message)? {
            if !sender.send(Payload::GrpcMessage(message.to_vec())).await {
                return Err((Code::Unavailable, "the replica connection closed"));
            }
        }
    }
    if !buffer.is_empty() {
        return Err((Code::Internal, "the client stream ended inside a message"));
    }
    sender.send(Payload::GrpcHalfClose).await;
    Ok(())
}

/// The next whole message at the front of `buffer`, taken out of it.
fn next_message(
    buffer: &mut BytesMut,
    max_message: usize,
) -> Result<Option<BytesMut>, (Code, &'static str)> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    if buffer[0] != 0 {
        return Err((Code::Unimplemented, "compressed messages are not supported"));
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if len > max_message {
        return Err((
            Code::ResourceExhausted,
            "a request message exceeds the proxy's body limit",
        ));
    }
    if buffer.len() < 5 + len {
        return Ok(None);
    }
    buffer.advance(5);
    Ok(Some(buffer.split_to(len)))
}

/// The gRPC code and message of a body the proxy would not read.
fn refusal(status: StatusCode) -> (Code, &'static str) {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            Code::ResourceExhausted,
            "the request message exceeds the proxy's body limit",
        ),
        StatusCode::REQUEST_TIMEOUT => {
            (Code::DeadlineExceeded, "the request did not arrive in time")
        }
        StatusCode::SERVICE_UNAVAILABLE => (
            Code::Unavailable,
            "the proxy is out of room for request bodies",
        ),
        _ => (Code::Internal, "the request could not be read"),
    }
}

/// A unary call's one message out of its length-prefixed framing.
fn unframe(body: &Bytes) -> Result<Bytes, (Code, &'static str)> {
    let malformed = (
        Code::Internal,
        "a unary call carries exactly one length-prefixed message",
    );
    if body.len() < 5 {
        return Err(malformed);
    }
    if body[0] != 0 {
        return Err((Code::Unimplemented, "compressed messages are not supported"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - 5 != len {
        return Err(malformed);
    }
    Ok(body.slice(5..))
}

/// `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`), or None when absent.
fn grpc_timeout(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || format!("malformed grpc-timeout {value:?}");
    let text = value.to_str().map_err(|_| bad())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// The caller's metadata: every header but the protocol's own (`grpc-*`
/// and [`NOT_METADATA`]), in the order sent. hyper bounds their size.
fn metadata(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("grpc-") && !NOT_METADATA.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// An OK answer: the reply message, then trailers with status 0.
fn ok_response(message: &[u8]) -> GrpcResponse {
    let mut trailers = HeaderMap::new();
    add_status(&mut trailers, 0, "");
    let body = Full::new(frame(message))
        .map_err(|never| -> BoxError { match never {} })
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed_unsync();
    grpc_response(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_refused() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_timeout(&h), Ok(None));
        for (text, want) in [
            ("500m", Duration::from_millis(500)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(text));
            assert_eq!(grpc_timeout(&h), Ok(Some(want)), "{text}");
        }
        for text in ["5", "m", "123456789S", "5x", "-5S"] {
            h.insert("grpc-timeout", HeaderValue::from_static(text));
            assert!(grpc_timeout(&h).is_err(), "{text}");
        }
    }

    #[test]
    fn a_unary_body_holds_exactly_one_uncompressed_message() {
        assert_eq!(unframe(&frame(b"hi")).unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(unframe(&frame(b"")).unwrap(), Bytes::new());
        let two = [frame(b"a"), frame(b"b")].concat();
        assert_eq!(unframe(&two.into()).unwrap_err().0, Code::Internal);
        assert_eq!(
            unframe(&Bytes::from_static(&[0, 0, 0])).unwrap_err().0,
            Code::Internal
        );
        let compressed = Bytes::from_static(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(unframe(&compressed).unwrap_err().0, Code::Unimplemented);
    }

    #[test]
    fn a_stream_chunk_is_one_or_more_whole_uncompressed_messages() {
        assert!(whole_messages(&frame(b"one")));
        assert!(whole_messages(&frame(b"")));
        assert!(whole_messages(
            &[frame(b"a"), frame(b""), frame(b"ccc")].concat()
        ));
        assert!(!whole_messages(b""));
        assert!(!whole_messages(b"raw"));
        let cut = [frame(b"a"), frame(b"bb")].concat();
        assert!(!whole_messages(&cut[..cut.len() - 1]));
        assert!(!whole_messages(
            &[frame(b"a").to_vec(), vec![0, 0]].concat()
        ));
        assert!(!whole_messages(&[1, 0, 0, 0, 1, b'x']));
    }

    #[test]
    fn metadata_leaves_out_the_protocols_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "1S"),
            ("grpc-accept-encoding", "gzip"),
            ("x-serval-data-auth", "secret"),
            ("x-user", "alice"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        assert_eq!(
            metadata(&h),
            vec![("x-user".to_owned(), "alice".to_owned())]
        );
    }
}
