//! The transport seam under a tunnel: what the relay's and the connector's drivers need
//! from a connection, whatever carries it. A [`Transport`] opens and accepts
//! bidirectional byte streams, closes with a [`CloseCode`], and tells who the peer is and
//! how far away. QUIC ([`QuicTransport`]) is the transport of choice; where UDP is blocked,
//! HTTP/2 over TLS on TCP ([`crate::tcp_transport::TcpTransport`]) carries the same tunnel
//! session ([`crate::proto`]) and request path, which only ever see this trait.
//!
//! The trait is object-safe so that one routing table can hold tunnels of several
//! transports; each stream costs one extra box, which is nothing beside its TLS records.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::proto::CloseCode;

/// A boxed future, as the object-safe [`Transport`] returns them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which transport a tunnel runs on, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 over TLS on TCP, where UDP is blocked ([`crate::tcp_transport`]).
    Tcp,
}

impl TransportKind {
    /// The name used in logs, metrics and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

/// Why a connection or stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection with an application code: one of ours (`Some`) or
    /// an unknown one (`None`), with the peer's reason text.
    #[error("closed by the peer ({}): {reason}", code_name(*code))]
    ClosedByPeer {
        /// The peer's close code, if it is one of ours.
        code: Option<CloseCode>,
        /// The peer's reason text.
        reason: String,
    },
    /// This side closed the connection.
    #[error("closed locally")]
    LocallyClosed,
    /// The peer stopped answering within the idle timeout.
    #[error("timed out")]
    TimedOut,
    /// The connection failed for another reason (reset, transport error, version
    /// mismatch); the text says which.
    #[error("{0}")]
    Failed(String),
}

fn code_name(code: Option<CloseCode>) -> &'static str {
    match code {
        Some(CloseCode::Normal) => "normal",
        Some(CloseCode::Protocol) => "protocol error",
        Some(CloseCode::Revoked) => "revoked",
        Some(CloseCode::WrongRole) => "wrong role",
        Some(CloseCode::Shutdown) => "shutting down",
        None => "unknown code",
    }
}

impl TransportError {
    /// The peer's close code, when the peer closed the connection with one of ours.
    pub fn peer_code(&self) -> Option<CloseCode> {
        match self {
            Self::ClosedByPeer { code, .. } => *code,
            _ => None,
        }
    }
}

/// The sending half of a tunnel stream.
pub trait TunnelSend: AsyncWrite + Send + Unpin + 'static {
    /// A future that resolves once the peer has received everything written on this
    /// stream (or stopped reading it). Take it before handing the stream on; awaiting it
    /// after a response is written keeps a closing connection from dropping the response.
    fn delivered(&self) -> BoxFuture<'static, ()>;

    /// Writes every chunk whole, in one call: QUIC takes them as they are, without a copy
    /// and with one wake-up of the connection for all of them; by default each is written
    /// through [`AsyncWrite`].
    fn write_chunks<'a>(&'a mut self, chunks: &'a mut [Bytes]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            for chunk in chunks.iter() {
                self.write_all(chunk).await?;
            }
            Ok(())
        })
    }
}

/// The receiving half of a tunnel stream.
pub trait TunnelRecv: AsyncRead + Send + Unpin + 'static {
    /// The next bytes, at most `max`, as they arrived: QUIC hands over the received
    /// packet's bytes without a copy; by default they are read through [`AsyncRead`].
    /// `None` at the end of the stream.
    fn read_chunk(&mut self, max: usize) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let mut buf = BytesMut::with_capacity(max.min(DEFAULT_CHUNK));
            let n = self.read_buf(&mut buf).await?;
            Ok((n > 0).then(|| buf.freeze()))
        })
    }
}

/// What [`TunnelRecv::read_chunk`] reads at most at a time by default.
const DEFAULT_CHUNK: usize = 64 * 1024;

/// One bidirectional stream of a [`Transport`].
pub struct BiStream {
    /// Bytes to the peer.
    pub send: Box<dyn TunnelSend>,
    /// Bytes from the peer.
    pub recv: Box<dyn TunnelRecv>,
}

impl fmt::Debug for BiStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BiStream").finish_non_exhaustive()
    }
}

/// Any byte reader as a [`TunnelRecv`] (chunks are read through [`AsyncRead`]).
pub struct IoRecv<R>(pub R);

/// Any byte writer as a [`TunnelSend`] (delivered once written).
pub struct IoSend<W>(pub W);

impl<R: AsyncRead + Send + Unpin + 'static> AsyncRead for IoRecv<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> TunnelRecv for IoRecv<R> {}

impl<W: AsyncWrite + Send + Unpin + 'static> AsyncWrite for IoSend<W> {
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

impl<W: AsyncWrite + Send + Unpin + 'static> TunnelSend for IoSend<W> {
    fn delivered(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// Both halves of a [`BiStream`] as one `AsyncRead + AsyncWrite` value.
pub type JoinedStream = tokio::io::Join<Box<dyn TunnelRecv>, Box<dyn TunnelSend>>;

impl BiStream {
    /// One `AsyncRead + AsyncWrite` value over both halves, for codecs such as hyper's
    /// (which hand it back on an upgrade, so the halves can be taken apart again).
    pub fn join(self) -> JoinedStream {
        tokio::io::join(self.recv, self.send)
    }
}

/// A connection carrying a tunnel: the seam between the tunnel drivers and QUIC (or any
/// later transport).
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;

    /// Opens a bidirectional stream. Waits while the peer's stream limit is reached.
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>>;

    /// Accepts the next bidirectional stream the peer opened.
    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>>;

    /// Closes the connection at once with `code`; streams in flight are cut.
    fn close(&self, code: CloseCode, reason: &str);

    /// Resolves when the connection has closed, with why.
    fn closed(&self) -> BoxFuture<'_, TransportError>;

    /// Why the connection closed, if it has.
    fn close_reason(&self) -> Option<TransportError>;

    /// The peer's certificate chain, leaf first, if it presented one.
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>>;

    /// The TLS server name the client asked for (server side only).
    fn server_name(&self) -> Option<String>;

    /// The peer's address.
    fn remote_address(&self) -> SocketAddr;

    /// The current round-trip time estimate.
    fn rtt(&self) -> Duration;

    /// How much has arrived from the peer so far (datagrams for QUIC). It grows while the
    /// peer is alive, so a value that stops growing for longer than the peer's keep-alive
    /// interval says the peer has gone silent.
    fn received(&self) -> u64;
}

/// [`Transport`] over a quinn connection.
#[derive(Debug, Clone)]
pub struct QuicTransport(quinn::Connection);

impl QuicTransport {
    /// Wraps an established QUIC connection.
    pub fn new(conn: quinn::Connection) -> Self {
        Self(conn)
    }

    /// The QUIC connection, for what only QUIC offers (HTTP/3, migration).
    pub fn connection(&self) -> &quinn::Connection {
        &self.0
    }
}

fn quic_error(e: quinn::ConnectionError) -> TransportError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => TransportError::ClosedByPeer {
            code: CloseCode::from_code(c.error_code.into_inner()),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        quinn::ConnectionError::LocallyClosed => TransportError::LocallyClosed,
        quinn::ConnectionError::TimedOut => TransportError::TimedOut,
        other => TransportError::Failed(other.to_string()),
    }
}

fn quic_stream((send, recv): (quinn::SendStream, quinn::RecvStream)) -> BiStream {
    BiStream {
        send: Box::new(QuicSend(send)),
        recv: Box::new(QuicRecv(recv)),
    }
}

impl Transport for QuicTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move { self.0.open_bi().await.map(quic_stream).map_err(quic_error) })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move {
            self.0
                .accept_bi()
                .await
                .map(quic_stream)
                .map_err(quic_error)
        })
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.0
            .close(quinn::VarInt::from_u32(code.code()), reason.as_bytes());
    }

    fn closed(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(async move { quic_error(self.0.closed().await) })
    }

    fn close_reason(&self) -> Option<TransportError> {
        self.0.close_reason().map(quic_error)
    }

    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.0
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| *b)
    }

    fn server_name(&self) -> Option<String> {
        self.0
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.server_name)
    }

    fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    fn received(&self) -> u64 {
        self.0.stats().udp_rx.datagrams
    }
}

/// The ALPN protocol a QUIC connection negotiated.
pub fn quic_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
}

struct QuicSend(quinn::SendStream);
struct QuicRecv(quinn::RecvStream);

impl TunnelSend for QuicSend {
    fn delivered(&self) -> BoxFuture<'static, ()> {
        let stopped = self.0.stopped();
        Box::pin(async move {
            let _ = stopped.await;
        })
    }

    fn write_chunks<'a>(&'a mut self, chunks: &'a mut [Bytes]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { Ok(self.0.write_all_chunks(chunks).await?) })
    }
}

impl TunnelRecv for QuicRecv {
    fn read_chunk(&mut self, max: usize) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move { Ok(self.0.read_chunk(max, true).await?.map(|c| c.bytes)) })
    }
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write_vectored(Pin::new(&mut self.0), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        AsyncWrite::is_write_vectored(&self.0)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}

impl AsyncRead for QuicRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.0), cx, buf)
    }
}
