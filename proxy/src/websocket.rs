//! WebSocket sessions through the proxy (RFC 6455, server side).
//!
//! An HTTP/1.1 upgrade request is routed like any request (its path, the
//! same route table), then takes one replica slot with
//! [`Router::reserve_now`](crate::routing::Router::reserve_now): a backend
//! whose replicas are all at their limit refuses the upgrade at once with
//! 503 and Retry-After, as does a proxy at its cap of open sessions. The
//! proxy opens the session on the replica's frame connection (`WsOpen`) and
//! answers 101 only once the app accepted (an app that closes first, or
//! fails, answers the HTTP response it sent, 403 by default). Then
//! [`relay`] carries whole messages both ways until either side closes:
//! the client's close code reaches the app, the app's reaches the client.
//! The slot, the session's place under the cap and the client connection's
//! in-flight mark are held until the session ends.
//!
//! Bounds: a client message over `max_message_bytes` (fragments counted
//! together) closes the session with 1009; no message either way for
//! `idle_timeout` closes it with 1001; a client that reads too slowly for
//! the replica's frames (`WS_FRAMES_QUEUED` in `routing::replica_conn`) ends it
//! with 1011. Set by `SERVAL_WS_MAX_MESSAGE_BYTES`, `SERVAL_WS_IDLE_TIMEOUT_S`
//! and `SERVAL_WS_MAX_SESSIONS` in the proxy's environment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use serval_protos::frame::{HttpRequest, Payload, Request, WsFrame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::errors::{self, HttpResponse};
use crate::limits::ConnActivity;
use crate::proxy::Proxy;
use crate::route::RouteMatch;
use crate::routing::WsSession;

const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// How long the client's upgraded connection may take to appear.
const UPGRADE_WAIT: Duration = Duration::from_secs(10);
/// Client events read ahead of the relay.
const CLIENT_EVENTS_QUEUED: usize = 16;

/// Close codes (RFC 6455 section 7.4.1).
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const PROTOCOL_ERROR: u16 = 1002;
const NO_STATUS: u16 = 1005;
const ABNORMAL: u16 = 1006;
const INVALID_DATA: u16 = 1007;
const TOO_BIG: u16 = 1009;
const INTERNAL_ERROR: u16 = 1011;

/// The proxy's WebSocket bounds, and its count of open sessions.
#[derive(Debug)]
pub(crate) struct Sessions {
    max_message_bytes: usize,
    idle_timeout: Duration,
    max_sessions: usize,
    open: AtomicUsize,
}

impl Sessions {
    /// Bounds from the environment (defaults: 1 MiB, 300 s, 10,000); a
    /// value that is not a positive number is refused with a warning
    /// naming it, and the default used.
    pub(crate) fn from_env() -> Self {
        Self {
            max_message_bytes: env_number("SERVAL_WS_MAX_MESSAGE_BYTES")
                .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            idle_timeout: env_number("SERVAL_WS_IDLE_TIMEOUT_S")
                .map(|s| Duration::from_secs(s as u64))
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            max_sessions: env_number("SERVAL_WS_MAX_SESSIONS").unwrap_or(DEFAULT_MAX_SESSIONS),
            open: AtomicUsize::new(0),
        }
    }

    fn enter(self: &Arc<Self>) -> Option<SessionPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionPermit(self.clone()))
    }
}

pub(crate) fn env_number(name: &str) -> Option<usize> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            tracing::warn!(%name, %value, "not a positive whole number; using the default");
            None
        }
    }
}

struct SessionPermit(Arc<Sessions>);

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether `req` asks to become a WebSocket (an HTTP/1.1 upgrade).
pub(crate) fn is_upgrade(req: &hyper::Request<Incoming>) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    req.method() == hyper::Method::GET
        && has_token(UPGRADE, "websocket")
        && has_token(CONNECTION, "upgrade")
}

fn refuse(status: StatusCode, message: &str) -> HttpResponse {
    errors::json_error(status, message)
}

/// Answers an upgrade request routed to `matched`: 101 and a relay task
/// once the app accepted, else the refusal.
pub(crate) async fn serve(
    proxy: &Proxy,
    matched: &RouteMatch,
    mut req: hyper::Request<Incoming>,
    path: String,
    client: &str,
) -> HttpResponse {
    let headers = req.headers();
    if headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is served",
        );
        response
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .filter(|k| !k.is_empty() && k.len() <= 64)
    else {
        return refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing");
    };
    let Some(permit) = proxy.websockets.enter() else {
        metrics::counter!(crate::metrics::REFUSED_TOTAL, "reason" => "websocket_sessions")
            .increment(1);
        let mut response = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket sessions are open on this proxy; retry",
        );
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return response;
    };
    let reservation = match proxy.router().reserve_now(&matched.endpoint).await {
        Ok(r) => r,
        Err(e) => return errors::from_router_error(&e, proxy.debug_errors),
    };
    let open = Request {
        method_name: None,
        payload: Payload::WsOpen(HttpRequest {
            method: "GET".into(),
            path,
            query: req.uri().query().unwrap_or("").to_owned(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: Vec::new(),
            path_params: matched.path_params.clone(),
            client: client.to_owned(),
            raw_path: req.uri().path().as_bytes().to_vec(),
            root_path: matched.root_path.clone(),
        }),
    };
    let timeout = proxy.router().config().request_timeout;
    let mut session = match reservation.open_websocket(&open, timeout).await {
        Ok(s) => s,
        Err(e) => return errors::from_router_error(&e, proxy.debug_errors),
    };
    let (subprotocol, extra) = match tokio::time::timeout(timeout, session.rx.recv()).await {
        Ok(Some(WsFrame::Accept {
            subprotocol,
            headers,
        })) => (subprotocol, headers),
        Ok(Some(WsFrame::Deny(response))) => return crate::http::to_http(response),
        Ok(Some(_)) => return refuse(StatusCode::FORBIDDEN, "the app closed the WebSocket"),
        Ok(None) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                "the replica went away before answering the WebSocket",
            )
        }
        Err(_) => {
            // The app still runs the session: end it there too.
            let _ = session.send(WsFrame::Close {
                code: ABNORMAL,
                reason: "not accepted in time".into(),
            });
            return refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "the app did not accept the WebSocket in time",
            );
        }
    };
    reservation.websocket_opened();
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            out.append(name, value);
        }
    }
    out.insert(UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key(&key)) {
        out.insert("sec-websocket-accept", accept);
    }
    if let Some(value) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        out.insert("sec-websocket-protocol", value);
    }
    // The client connection is busy while the session lives: its idle
    // bound must not end it.
    let busy = req
        .extensions()
        .get::<Arc<ConnActivity>>()
        .map(|a| a.start());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let limits = proxy.websockets.clone();
    tokio::spawn(async move {
        let _held = (permit, reservation, busy);
        match tokio::time::timeout(UPGRADE_WAIT, on_upgrade).await {
            Ok(Ok(upgraded)) => relay(TokioIo::new(upgraded), session, &limits).await,
            _ => {
                let _ = session.send(WsFrame::Close {
                    code: ABNORMAL,
                    reason: "the client connection was not upgraded".into(),
                });
            }
        }
    });
    response
}

/// `Sec-WebSocket-Accept` for the client's key.
fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// What the client did, as the relay sees it.
#[derive(Debug)]
enum ClientEvent {
    Message(WsFrame),
    Ping(Vec<u8>),
    Close {
        code: u16,
        reason: String,
    },
    /// The client broke the protocol (or sent too much): close with this.
    Fail {
        code: u16,
        reason: &'static str,
    },
}

/// Carries messages both ways until either side closes, the client goes
/// away or nothing moves for the idle timeout.
async fn relay<S>(io: S, mut session: WsSession, limits: &Sessions)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let (events_tx, mut events) = mpsc::channel(CLIENT_EVENTS_QUEUED);
    let max = limits.max_message_bytes;
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        let mut partial = None;
        loop {
            let event = read_message(&mut rd, max, &mut partial).await;
            let last = !matches!(event, Ok(ClientEvent::Message(_) | ClientEvent::Ping(_)));
            if events_tx.send(event).await.is_err() || last {
                break;
            }
        }
    });
    let idle = limits.idle_timeout;
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Ok(ClientEvent::Message(message))) => {
                    if session.send(message).is_err() {
                        let _ = write_close(&mut wr, INTERNAL_ERROR, "backend connection lost", idle).await;
                        break;
                    }
                }
                Some(Ok(ClientEvent::Ping(payload))) => {
                    if write_frame(&mut wr, 0xA, &payload, idle).await.is_err() {
                        let _ = session.send(closed_by_client(ABNORMAL, ""));
                        break;
                    }
                }
                Some(Ok(ClientEvent::Close { code, reason })) => {
                    let _ = session.send(closed_by_client(code, &reason));
                    let echo = if code == NO_STATUS { NORMAL } else { code };
                    let _ = write_close(&mut wr, echo, "", idle).await;
                    break;
                }
                Some(Ok(ClientEvent::Fail { code, reason })) => {
                    let _ = session.send(closed_by_client(code, reason));
                    let _ = write_close(&mut wr, code, reason, idle).await;
                    break;
                }
                // The connection ended without a close frame.
                Some(Err(_)) | None => {
                    let _ = session.send(closed_by_client(ABNORMAL, "the client went away"));
                    break;
                }
            },
            frame = session.rx.recv() => match frame {
                Some(WsFrame::Text(text)) => {
                    if write_frame(&mut wr, 0x1, text.as_bytes(), idle).await.is_err() {
                        let _ = session.send(closed_by_client(ABNORMAL, "the client went away"));
                        break;
                    }
                }
                Some(WsFrame::Binary(data)) => {
                    if write_frame(&mut wr, 0x2, &data, idle).await.is_err() {
                        let _ = session.send(closed_by_client(ABNORMAL, "the client went away"));
                        break;
                    }
                }
                Some(WsFrame::Close { code, reason }) => {
                    let _ = write_close(&mut wr, code, &reason, idle).await;
                    break;
                }
                Some(WsFrame::Accept { .. } | WsFrame::Deny(_)) => {}
                None => {
                    let _ = write_close(&mut wr, INTERNAL_ERROR, "backend connection lost", idle).await;
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                let _ = session.send(closed_by_client(GOING_AWAY, "idle timeout"));
                let _ = write_close(&mut wr, GOING_AWAY, "idle timeout", idle).await;
                break;
            }
        }
        deadline = Instant::now() + idle;
    }
    reader.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

fn closed_by_client(code: u16, reason: &str) -> WsFrame {
    WsFrame::Close {
        code,
        reason: reason.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

/// The client's next whole message (fragments joined) or control event.
/// `message` holds a fragmented message across calls: control frames may
/// come between its fragments.
async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
    message: &mut Option<(u8, Vec<u8>)>,
) -> Result<ClientEvent, ReadError> {
    loop {
        let mut head = [0u8; 2];
        rd.read_exact(&mut head).await?;
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0F;
        if head[0] & 0x70 != 0 || head[1] & 0x80 == 0 {
            // Extension bits (none negotiated), or an unmasked client frame.
            return Ok(fail(PROTOCOL_ERROR, "protocol error"));
        }
        let len = match head[1] & 0x7F {
            126 => rd.read_u16().await? as u64,
            127 => rd.read_u64().await?,
            n => n as u64,
        };
        if opcode >= 8 && (len > 125 || !fin) {
            return Ok(fail(PROTOCOL_ERROR, "protocol error"));
        }
        let held = message.as_ref().map_or(0, |(_, m)| m.len()) as u64;
        if opcode < 8 && held.saturating_add(len) > max as u64 {
            return Ok(fail(TOO_BIG, "message too big"));
        }
        let mut mask = [0u8; 4];
        rd.read_exact(&mut mask).await?;
        let mut payload = vec![0u8; len as usize];
        rd.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match opcode {
            0x0 => {
                let Some((_, data)) = message.as_mut() else {
                    return Ok(fail(PROTOCOL_ERROR, "protocol error"));
                };
                data.extend_from_slice(&payload);
            }
            0x1 | 0x2 => {
                if message.is_some() {
                    return Ok(fail(PROTOCOL_ERROR, "protocol error"));
                }
                *message = Some((opcode, payload));
            }
            0x8 => {
                let (code, reason) = match payload.len() {
                    0 => (NO_STATUS, String::new()),
                    1 => return Ok(fail(PROTOCOL_ERROR, "protocol error")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        match String::from_utf8(payload[2..].to_vec()) {
                            Ok(reason) => (code, reason),
                            Err(_) => return Ok(fail(INVALID_DATA, "invalid close reason")),
                        }
                    }
                };
                return Ok(ClientEvent::Close { code, reason });
            }
            0x9 => return Ok(ClientEvent::Ping(payload)),
            0xA => continue,
            _ => return Ok(fail(PROTOCOL_ERROR, "protocol error")),
        }
        if fin {
            let Some((kind, data)) = message.take() else {
                continue;
            };
            return Ok(ClientEvent::Message(if kind == 0x1 {
                match String::from_utf8(data) {
                    Ok(text) => WsFrame::Text(text),
                    Err(_) => return Ok(fail(INVALID_DATA, "text is not UTF-8")),
                }
            } else {
                WsFrame::Binary(data)
            }));
        }
    }
}

fn fail(code: u16, reason: &'static str) -> ClientEvent {
    ClientEvent::Fail { code, reason }
}

/// Writes one unmasked, unfragmented frame, within `timeout`.
async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opcode: u8,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(10);
    head.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => head.push(n as u8),
        n if n <= u16::MAX as usize => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let write = async {
        wr.write_all(&head).await?;
        wr.write_all(payload).await?;
        wr.flush().await
    };
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client write timed out"))?
}

/// Sends a close frame. Codes that must not travel (1005, 1006, 1015, or
/// out of range) go as 1000; the reason is cut to the 123 bytes allowed.
async fn write_close<W: AsyncWrite + Unpin>(
    wr: &mut W,
    code: u16,
    reason: &str,
    timeout: Duration,
) -> std::io::Result<()> {
    let code = match code {
        1005 | 1006 | 1015 => NORMAL,
        c if (1000..5000).contains(&c) => c,
        _ => NORMAL,
    };
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    write_frame(wr, 0x8, &payload, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[tokio::test]
    async fn fragments_join_and_oversize_messages_fail_with_1009() {
        let mut bytes = masked(0x01, b"hel");
        bytes.extend(masked(0x89, b"ping"));
        bytes.extend(masked(0x80, b"lo"));
        let mut rd = &bytes[..];
        let mut partial = None;
        assert!(
            matches!(read_message(&mut rd, 16, &mut partial).await.unwrap(), ClientEvent::Ping(p) if p == b"ping")
        );
        // The ping came between fragments; the text goes on after it.
        assert!(
            matches!(read_message(&mut rd, 16, &mut partial).await.unwrap(), ClientEvent::Message(WsFrame::Text(t)) if t == "hello")
        );
        // Fragments count together against the limit.
        let mut bytes = masked(0x02, &[0u8; 60]);
        bytes.extend(masked(0x80, &[0u8; 60]));
        let mut rd = &bytes[..];
        assert!(matches!(
            read_message(&mut rd, 100, &mut None).await.unwrap(),
            ClientEvent::Fail { code: TOO_BIG, .. }
        ));
        let big = masked(0x82, &[0u8; 200]);
        let mut rd = &big[..];
        assert!(matches!(
            read_message(&mut rd, 100, &mut None).await.unwrap(),
            ClientEvent::Fail { code: TOO_BIG, .. }
        ));
        // An unmasked client frame is a protocol error.
        let mut rd = &[0x81u8, 0x01, b'a'][..];
        assert!(matches!(
            read_message(&mut rd, 100, &mut None).await.unwrap(),
            ClientEvent::Fail {
                code: PROTOCOL_ERROR,
                ..
            }
        ));
    }
}
