//! The forwarding client for replicas whose gRPC server serves TLS (their
//! node has `--tls-cert/--tls-key`): HTTP/2 over TLS, the replica verified
//! against this process's `--tls-ca` for the host of its address (or
//! `--tls-domain`), as frame connections are
//! ([`serval_protos::tls::connect_replica_h2`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serval_protos::tls::ClientTlsStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 client over TLS for every TLS replica, a connection each.
pub(super) fn client() -> &'static Client<TlsConnector, super::idle::IdleBody> {
    static CLIENT: OnceLock<Client<TlsConnector, super::idle::IdleBody>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(TlsConnector)
    })
}

/// Connects TCP, then TLS, to the `host:port` of a request's URI.
#[derive(Clone)]
pub(super) struct TlsConnector;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or("the replica's gRPC address has no host")?;
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let settings = serval_protos::tls::tls();
            let tls =
                serval_protos::tls::connect_replica_h2(settings.as_deref(), tcp, &addr).await?;
            Ok(TokioIo::new(TlsConn(tls)))
        })
    }
}

/// A TLS stream as hyper's client pool wants its connections.
pub(super) struct TlsConn(ClientTlsStream<TcpStream>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new().negotiated_h2()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
