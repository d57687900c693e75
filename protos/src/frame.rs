//! The data-plane frame stream.
//!
//! One long-lived connection per (router, replica) carries many requests at
//! once. Every frame is `[u32 len][u64 request id][bincode body]`, where `len`
//! counts the id and the body. Requests flow router -> replica, responses
//! flow back with the same id; a streamed response is a head [`Response`]
//! marked with [`STREAM_HEADER`], then [`StreamFrame`]s under the same id,
//! paced by [`Payload::Credit`] and stopped by [`Payload::Cancel`] from the
//! router. [`crate::frame_socket`] carries them: a writer
//! task per direction drains every queued frame into one write, so a busy
//! connection makes few syscalls.
//! Why not gRPC here: DESIGN.md measured ~7 µs of proxy CPU per request for
//! these frames against 16-24 µs for a pooled tonic channel.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frames above this are refused: a corrupt length must not allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 512 * 1024 * 1024;
const HEADER_LEN: usize = 4 + 8;

/// Identifies one request on one connection.
pub type RequestId = u64;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN} byte limit")]
    TooLarge(usize),
    #[error("frame shorter than its header")]
    Truncated,
    #[error("frame encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("frame decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

/// A typed path parameter, converted by the proxy from Starlette converters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PathValue {
    Str(String),
    Int(i64),
    Float(f64),
    /// `{name:uuid}`, lowercased; Python gets a `uuid.UUID` as in Starlette.
    Uuid(String),
}

/// An HTTP request as the proxy received it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpRequest {
    pub method: String,
    /// The percent-decoded path the proxy routed on (ASGI `path`).
    pub path: String,
    /// Raw query string without the `?`.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub path_params: Vec<(String, PathValue)>,
    /// The address of the client, "host:port", when known.
    pub client: String,
    /// The path as the client sent it, escapes and all (ASGI `raw_path`).
    /// Last: proxy and replica are built together, so adding a field only
    /// has to keep the order of the others.
    pub raw_path: Vec<u8>,
    /// The route prefix the request was routed by, "" for a route or the
    /// prefix "/" (ASGI `root_path`: an ingress app routes below it).
    pub root_path: String,
}

/// A call from a ServeHandle: Python arguments pickled by the caller.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallRequest {
    /// cloudpickle of `(args, kwargs)`.
    pub args: Vec<u8>,
    /// `handle.options(http_method=...)`; "GET" by default.
    pub http_method: String,
    /// `handle.options(http_headers=...)`.
    pub http_headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Payload {
    Http(HttpRequest),
    Call(CallRequest),
    /// Liveness probe; answered by the replica runtime without user code.
    Ping,
    /// A config change applied in place (same process): the node agent sends
    /// it over the replica's Unix socket when a snapshot carries a new
    /// `user_config`, `max_concurrent_queries` or batching setting. The
    /// replica calls `reconfigure(user_config)` when that changed and
    /// answers 200, or 500 with the traceback as the body.
    Reconfigure(ReconfigureRequest),
    /// A chunk of the replica's own log (its stderr file), answered by the
    /// replica runtime without user code: 200 with the bytes as the body and
    /// [`LOG_SIZE_HEADER`], or 404 when the replica's stderr is not a file.
    /// Bincode numbers variants: new ones go last, so older peers keep theirs.
    Logs(LogsRequest),
    /// Opens a WebSocket session on this frame's id: the upgrade request
    /// (its method is GET, its body empty). The replica answers on the same
    /// id with [`WsFrame`]s (not a [`Response`]): `Accept` or `Deny` first,
    /// then messages, until either side sends `Close`.
    WsOpen(HttpRequest),
    /// A client's message or close, on the id of an open session.
    Ws(WsFrame),
    /// Router -> replica, on the id of a streamed reply: the router's
    /// consumer took this many more chunks, so the replica may send as many
    /// more (see [`STREAM_WINDOW`]). Answered with nothing.
    Credit(u32),
    /// Router -> replica, on the id of a streamed reply: its consumer went
    /// away (client disconnected, handle generator dropped); the replica
    /// stops the generator. Answered with nothing.
    Cancel,
    /// A unary or server-streaming gRPC call the proxy terminated
    /// (`SERVAL_GRPC_FRAMES`): the request message's bytes, untouched.
    /// Answered with a [`Response`] whose status is 200 and whose headers
    /// carry [`GRPC_STATUS_HEADER`] (and [`GRPC_MESSAGE_HEADER`]); its body
    /// is the reply message's bytes when that status is OK (0). Any other
    /// HTTP status is the replica's own refusal (queue full, dispatch
    /// failed). A server-streaming call may instead be answered with a
    /// streamed reply: [`StreamFrame::Chunk`]s, each one or more whole
    /// reply messages in gRPC's framing (per message: a 0 byte, its length
    /// as 4 big-endian bytes, its bytes; a burst the Handler yielded at once
    /// goes as one chunk, which the proxy passes on as it is), then
    /// `End` (status OK) or `Error` with a 200 [`Response`] carrying the
    /// final status in those headers. A client-streaming or bidirectional
    /// call's `message` is empty: the replica answers it with a stream head
    /// at once, its request messages follow as [`Payload::GrpcMessage`]s
    /// and a [`Payload::GrpcHalfClose`], paced by the replica's
    /// [`StreamFrame::Credit`]s, and its reply messages come back as above.
    Grpc(GrpcCall),
    /// Router -> replica, on the id of a client-streaming call: the
    /// client's next request message, untouched. The router sends at most
    /// [`STREAM_WINDOW`] beyond those the replica credited back.
    GrpcMessage(Vec<u8>),
    /// Router -> replica, on the id of a client-streaming call: the client
    /// half-closed (no more request messages).
    GrpcHalfClose,
}

/// One gRPC call: `/package.Service/Method`, the caller's metadata (the
/// proxy's own headers removed), the message, and the time left of the
/// client's deadline (`grpc-timeout`), 0 when it set none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrpcCall {
    pub path: String,
    pub metadata: Vec<(String, String)>,
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

/// The gRPC status code of a [`Payload::Grpc`] answer, in decimal.
pub const GRPC_STATUS_HEADER: &str = "grpc-status";
/// Its details, not yet percent-encoded.
pub const GRPC_MESSAGE_HEADER: &str = "grpc-message";

/// One event of a WebSocket session, in either direction, on the session's
/// id. Messages are whole (the proxy reassembles fragments), at most the
/// proxy's WebSocket message limit from the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WsFrame {
    /// Replica -> router: the app accepted; the subprotocol it chose and
    /// headers it adds to the 101 answer.
    Accept {
        subprotocol: Option<String>,
        headers: Vec<(String, String)>,
    },
    Text(String),
    Binary(Vec<u8>),
    /// The session ends with this close code and reason. From the router it
    /// is the client's close (or 1006 when the client vanished); from the
    /// replica, the app's.
    Close {
        code: u16,
        reason: String,
    },
    /// Replica -> router: the app closed before accepting (or failed): this
    /// HTTP answer goes to the client instead of the upgrade.
    Deny(Response),
}

/// Reads `[offset, offset + max_bytes)` of a replica's log. The replica
/// answers at most [`MAX_LOGS_CHUNK`] bytes, and none when `offset` is at or
/// beyond the end (the size header then tells the reader where it stands).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub offset: u64,
    pub max_bytes: u32,
}

/// The most bytes one `Logs` answer carries, whatever the request asks.
pub const MAX_LOGS_CHUNK: u32 = 1024 * 1024;
/// Header of a `Logs` answer: the log file's size when it was read, so a
/// reader whose offset is beyond it (the file was truncated or replaced)
/// knows to start over.
pub const LOG_SIZE_HEADER: &str = "x-serval-log-size";

/// The backend config a running replica should apply, as JSON:
/// `{"user_config": ..., "max_concurrent_queries": N, "max_batch_size": N,
/// "batch_wait_timeout": S}` (the same keys as the replica's `--config-json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconfigureRequest {
    pub config_json: String,
}

/// Router -> replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The method to call instead of `__call__` (`X-SERVE-CALL-METHOD`).
    pub method_name: Option<String>,
    pub payload: Payload,
}

/// Content type of a handle call's pickled result.
pub const PICKLE_CONTENT_TYPE: &str = "application/x-python-pickle";
/// Header a replica sets when user code raised: the exception's type name.
pub const ERROR_TYPE_HEADER: &str = "x-serval-error";

/// Header of a head frame (a [`Response`] with status and headers, its
/// body empty) whose body follows as [`StreamFrame`]s under the same id.
pub const STREAM_HEADER: &str = "x-serval-stream";

/// Chunks a replica may send on one stream beyond those its router has
/// granted back with [`Payload::Credit`]: the per-stream window that keeps
/// a slow consumer from making either side buffer without bound. The
/// replica does not advance the generator while the window is full. The
/// same window bounds a client stream's request messages the other way
/// ([`Payload::GrpcMessage`], credited by [`StreamFrame::Credit`]).
pub const STREAM_WINDOW: u32 = 16;

/// Replica -> router, after a head frame carrying [`STREAM_HEADER`]: the
/// body of a streamed reply, in chunks: of an HTTP body, body bytes (one
/// or more of the chunks the user code yielded); of a gRPC call's reply
/// ([`Payload::Grpc`]), one or more whole length-prefixed messages; of a
/// streaming handle call, one pickled item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamFrame {
    Chunk(Vec<u8>),
    /// The generator finished: the stream is complete.
    End,
    /// The generator raised: the stream ends with this error (the same
    /// response a unary call that raised would get).
    Error(Response),
    /// Not part of the reply: the replica took this many more of a client
    /// stream's request messages, so the router may send as many more.
    Credit(u32),
}

/// Replica -> router.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Room reserved up front for a frame: a small request or reply fits, so
/// encoding it neither reallocates nor copies.
const TYPICAL_FRAME: usize = 512;

/// Appends one frame carrying `msg` under `id` to `out`, serialised in
/// place behind a length prefix filled in afterwards.
pub fn encode_into<T: Serialize>(
    id: RequestId,
    msg: &T,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = out.len();
    out.reserve(HEADER_LEN + TYPICAL_FRAME);
    out.put_u32(0);
    out.put_u64(id);
    let written =
        bincode::serde::encode_into_std_write(msg, &mut (&mut *out).writer(), bincode_config());
    let len = out.len() - start - 4;
    if let Err(e) = written {
        out.truncate(start);
        return Err(e.into());
    }
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// One frame as its own buffer, ready for a [`crate::frame_socket::FrameSender`].
pub fn encode<T: Serialize>(id: RequestId, msg: &T) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::new();
    encode_into(id, msg, &mut out)?;
    Ok(out.freeze())
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, _) = bincode::serde::decode_from_slice(body, bincode_config())?;
    Ok(value)
}

/// Reads whole frames from one half of a connection.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The next frame's id and body, or `None` on a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<(RequestId, Bytes)>, FrameError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge(len));
                }
                if len < 8 {
                    return Err(FrameError::Truncated);
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let id = self.buf.get_u64();
                    let body = self.buf.split_to(len - 8).freeze();
                    return Ok(Some((id, body)));
                }
                self.buf.reserve(4 + len - self.buf.len());
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_logs_request_round_trips_and_keeps_the_older_variants_numbers() {
        let req = Request {
            method_name: None,
            payload: Payload::Logs(LogsRequest {
                offset: u64::MAX - 1,
                max_bytes: MAX_LOGS_CHUNK,
            }),
        };
        let bytes = encode(42, &req).unwrap();
        let body = &bytes[HEADER_LEN..];
        match decode::<Request>(body).unwrap().payload {
            Payload::Logs(l) => assert_eq!(l.offset, u64::MAX - 1),
            other => panic!("unexpected payload {other:?}"),
        }
        // A Ping encoded now decodes as a Ping: appending Logs did not
        // renumber the variants routers and replicas already exchange.
        let ping = encode(
            1,
            &Request {
                method_name: None,
                payload: Payload::Ping,
            },
        )
        .unwrap();
        // Option None (0), then the variant index of Ping (2).
        assert_eq!(&ping[HEADER_LEN..], &[0, 2]);
    }

    #[test]
    fn stream_frames_round_trip_and_the_stream_signals_come_after_logs() {
        let chunk = encode(7, &StreamFrame::Chunk(b"tok".to_vec())).unwrap();
        match decode::<StreamFrame>(&chunk[HEADER_LEN..]).unwrap() {
            StreamFrame::Chunk(c) => assert_eq!(c, b"tok"),
            other => panic!("unexpected frame {other:?}"),
        }
        let failed = StreamFrame::Error(Response {
            status: 500,
            headers: vec![(ERROR_TYPE_HEADER.into(), "ValueError".into())],
            body: b"boom".to_vec(),
        });
        let bytes = encode(7, &failed).unwrap();
        match decode::<StreamFrame>(&bytes[HEADER_LEN..]).unwrap() {
            StreamFrame::Error(r) => assert_eq!(r.header(ERROR_TYPE_HEADER), Some("ValueError")),
            other => panic!("unexpected frame {other:?}"),
        }
        // Credit and Cancel were appended: Logs keeps 4, the WebSocket
        // variants 5 and 6, they take 7 and 8.
        let cancel = encode(
            7,
            &Request {
                method_name: None,
                payload: Payload::Cancel,
            },
        )
        .unwrap();
        assert_eq!(&cancel[HEADER_LEN..], &[0, 8]);
    }

    #[test]
    fn a_grpc_call_round_trips_and_comes_after_cancel() {
        let call = Request {
            method_name: None,
            payload: Payload::Grpc(GrpcCall {
                path: "/p.S/M".into(),
                metadata: vec![("x-user".into(), "alice".into())],
                message: vec![0x0a, 0x02, b'h', b'i'],
                timeout_ms: 500,
            }),
        };
        let bytes = encode(3, &call).unwrap();
        // Option None, then Grpc's variant index: 9, after Cancel's 8.
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 2], &[0, 9]);
        match decode::<Request>(&bytes[HEADER_LEN..]).unwrap().payload {
            Payload::Grpc(c) => {
                assert_eq!((c.path.as_str(), c.timeout_ms), ("/p.S/M", 500));
                assert_eq!(c.message, [0x0a, 0x02, b'h', b'i']);
            }
            other => panic!("unexpected payload {other:?}"),
        }
    }

    #[test]
    fn client_stream_frames_come_after_the_grpc_call() {
        let message = encode(
            3,
            &Request {
                method_name: None,
                payload: Payload::GrpcMessage(vec![1, 2]),
            },
        )
        .unwrap();
        assert_eq!(&message[HEADER_LEN..], &[0, 10, 2, 1, 2]);
        let half_close = encode(
            3,
            &Request {
                method_name: None,
                payload: Payload::GrpcHalfClose,
            },
        )
        .unwrap();
        assert_eq!(&half_close[HEADER_LEN..], &[0, 11]);
        // Credit comes after Error: Chunk, End and Error keep 0, 1 and 2.
        let credit = encode(3, &StreamFrame::Credit(8)).unwrap();
        assert_eq!(&credit[HEADER_LEN..], &[3, 8]);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_not_allocated() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(b);
        assert!(matches!(reader.next().await, Err(FrameError::TooLarge(_))));
    }
}
