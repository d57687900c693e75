//! The control listener's bounds (issue 19): tonic serves every head's
//! control gRPC (CLI, SDK, node agents, proxies, other heads) on
//! connections from here. Defaults, not flags: the control plane's clients
//! are few and known.
//!
//! - at most [`MAX_CONNECTIONS`] open; one more is closed at once (counted
//!   in `serval_control_connections_refused_total`);
//! - the HTTP/2 preface (the first bytes) within [`HANDSHAKE_TIMEOUT`], and
//!   a connection that moves no byte for [`IDLE_TIMEOUT`] is closed
//!   ([`serval_proxy::ConnIo`]); the server pings every connection, so
//!   only a dead or silent peer gets there;
//! - TCP keep-alive and TCP_NODELAY on every connection.
//!
//! The per-connection HTTP/2 limits and the message sizes are set where the
//! tonic server is built (`serval_controller`'s front door and services).
//! No request timeout: `Watch` is a stream that lives as long as its
//! client.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serval_proxy::ConnIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub const MAX_CONNECTIONS: usize = 4096;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
pub const REFUSED_TOTAL: &str = "serval_control_connections_refused_total";

/// One accepted control connection: bounded I/O, and its place under
/// [`MAX_CONNECTIONS`] until dropped.
pub struct ControlConn {
    io: ConnIo<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

/// Accepts on `listener` under the bounds above, as tonic's incoming.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<ControlConn>> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio_stream::StreamExt::filter_map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |accepted| match accepted {
            Err(e) => Some(Err(e)),
            Ok(stream) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    metrics::counter!(REFUSED_TOTAL).increment(1);
                    tracing::debug!("control connection refused: {MAX_CONNECTIONS} open");
                    return None; // dropped: closed
                };
                // Small replies (a lease, an ack) must not wait on the
                // client's delayed ACK.
                let _ = stream.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                Some(Ok(ControlConn {
                    io: ConnIo::without_requests(stream, IDLE_TIMEOUT, HANDSHAKE_TIMEOUT),
                    _permit: permit,
                }))
            }
        },
    )
}

impl Connected for ControlConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.get_ref().connect_info()
    }
}

impl AsyncRead for ControlConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
