//! The tunnel over TLS on TCP, for networks that block UDP: a [`Transport`] carried by
//! HTTP/2 (the `h2` crate) on the TLS connection the connector dialled to the relay's
//! HTTPS port, selected there by its own ALPN ([`crate::proto::TUNNEL_TCP_ALPN`]).
//!
//! HTTP/2 lets only its client open streams, and in a tunnel the relay opens one stream
//! per request, so the roles are turned round once TLS is up: the relay (the TLS server)
//! is the HTTP/2 client and the connector (the TLS client) the HTTP/2 server. The one
//! stream the connector opens on QUIC, the control stream, is opened for it: the relay
//! opens `/control` first, the connector's [`Transport::open_bi`] returns it and the
//! relay's first [`Transport::accept_bi`] does too. Every other stream is the relay's.
//! The tunnel session and the request path above are the same on both transports.
//!
//! What QUIC gives and HTTP/2 does not is made here in the smallest way:
//! - a close code: the relay sends it on a `/close` request before dropping the
//!   connection; the connector sends GOAWAY with the code in its error field
//!   ([`CODE_BASE`] + code, away from HTTP/2's own codes), or after its drain
//!   (`CloseCode::Normal`) a graceful GOAWAY that lets everything its streams wrote reach
//!   the relay first (what QUIC's `delivered()` waits for on the other transport);
//! - liveness: both ends send an HTTP/2 PING every `keep_alive`, which also gives the
//!   round-trip time; a connection from which nothing at all has arrived for
//!   `idle_timeout` is closed as timed out. [`Transport::received`] counts bytes read.

use std::fmt;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::proto::CloseCode;
use crate::transport::{
    BiStream, BoxFuture, Transport, TransportError, TransportKind, TunnelRecv, TunnelSend,
};

/// Added to a [`CloseCode`] in the HTTP/2 GOAWAY error field, so that the tunnel's codes
/// never read as HTTP/2's own (0–13).
pub const CODE_BASE: u32 = 0x5043_0000;
/// How long a closing end keeps driving the connection so its last frames (the close
/// request, GOAWAY) reach the peer before the socket is dropped.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// How long a connector closing after its drain waits for HTTP/2 to flush what its
/// streams wrote.
const GRACEFUL_LINGER: Duration = Duration::from_secs(5);
/// The largest header block either end accepts; tunnel streams carry three headers.
const MAX_HEADER_LIST: u32 = 16 * 1024;
const CONTROL_PATH: &str = "/control";
const STREAM_PATH: &str = "/stream";
const CLOSE_PATH: &str = "/close";
const CLOSE_CODE_HEADER: &str = "portcullis-close-code";
const CLOSE_REASON_HEADER: &str = "portcullis-close-reason";

/// The HTTP/2 settings of one end: flow-control windows and timers.
#[derive(Debug, Clone, Copy)]
pub struct TcpSettings {
    /// Each stream's receive window.
    pub stream_window: u32,
    /// The whole connection's receive window.
    pub connection_window: u32,
    /// How often a PING is sent.
    pub keep_alive: Duration,
    /// Nothing received for this long closes the connection as timed out.
    pub idle_timeout: Duration,
    /// Streams the peer may have open at once towards this end (the connector's side:
    /// the relay's requests).
    pub max_streams: u32,
}

/// What the TLS handshake told about the peer, kept for [`Transport`]'s accessors.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's certificate chain, leaf first.
    pub certificates: Option<Vec<CertificateDer<'static>>>,
    /// The server name the client asked for (relay side).
    pub server_name: Option<String>,
    /// The peer's address.
    pub remote: SocketAddr,
}

/// A tunnel [`Transport`] over HTTP/2 on a TLS/TCP connection. Dropping the last clone
/// closes the connection, as with a QUIC connection.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Owner>,
}

/// The users' hold on the connection (the driver tasks hold [`Inner`] alone).
struct Owner(Arc<Inner>);

impl std::ops::Deref for Owner {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Nobody can use the connection any more: nothing is left to deliver.
        self.0.close(CloseCode::Normal, "", false);
    }
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("remote", &self.inner.peer.remote)
            .finish_non_exhaustive()
    }
}

struct Inner {
    peer: PeerInfo,
    /// The relay's handle for opening streams (`None` on the connector).
    opener: Option<Mutex<h2::client::SendRequest<Bytes>>>,
    /// Streams the peer opened (the connector's side), after the control stream.
    accepted: tokio::sync::Mutex<mpsc::Receiver<BiStream>>,
    /// The control stream, handed out once: by `open_bi` on the connector, by the first
    /// `accept_bi` on the relay.
    control: tokio::sync::Mutex<Option<oneshot::Receiver<BiStream>>>,
    /// Set once, when the connection ends, with why.
    reason: OnceLock<TransportError>,
    /// Flips to true when `reason` is set.
    closed: watch::Sender<bool>,
    /// Asks the driver to close with a code.
    close_tx: Mutex<Option<oneshot::Sender<Close>>>,
    rtt_micros: AtomicU64,
    received: Arc<AtomicU64>,
}

impl Inner {
    fn new(
        peer: PeerInfo,
        opener: Option<h2::client::SendRequest<Bytes>>,
        received: Arc<AtomicU64>,
    ) -> (Self, Channels) {
        let (accepted_tx, accepted_rx) = mpsc::channel(64);
        let (control_tx, control_rx) = oneshot::channel();
        let (close_tx, close_rx) = oneshot::channel();
        let inner = Self {
            peer,
            opener: opener.map(Mutex::new),
            accepted: tokio::sync::Mutex::new(accepted_rx),
            control: tokio::sync::Mutex::new(Some(control_rx)),
            reason: OnceLock::new(),
            closed: watch::channel(false).0,
            close_tx: Mutex::new(Some(close_tx)),
            rtt_micros: AtomicU64::new(0),
            received,
        };
        let channels = Channels {
            accepted: accepted_tx,
            control: Some(control_tx),
            close: close_rx,
        };
        (inner, channels)
    }

    /// Records why the connection ended (the first reason wins) and wakes `closed()`.
    fn end(&self, why: TransportError) {
        if self.reason.set(why).is_ok() {
            self.closed.send_replace(true);
        }
    }

    /// Closes the connection with `code`: the driver tells the peer and drops the socket;
    /// with `flush`, once what the streams wrote has gone out.
    fn close(&self, code: CloseCode, reason: &str, flush: bool) {
        self.end(TransportError::LocallyClosed);
        if let Some(tx) = self
            .close_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(Close {
                code,
                reason: reason.to_owned(),
                flush,
            });
        }
    }

    fn reason(&self) -> TransportError {
        self.reason
            .get()
            .cloned()
            .unwrap_or(TransportError::LocallyClosed)
    }
}

/// A request to close: the code, the reason, and whether what is queued must be flushed
/// first (an orderly close after a drain) or may be dropped (the last user went away, or
/// an error or revocation).
struct Close {
    code: CloseCode,
    reason: String,
    flush: bool,
}

/// The driver's ends of [`Inner`]'s channels.
struct Channels {
    accepted: mpsc::Sender<BiStream>,
    control: Option<oneshot::Sender<BiStream>>,
    close: oneshot::Receiver<Close>,
}

/// Counts the bytes read from the socket, for [`Transport::received`] (and the agent's
/// liveness watch over HTTP/2).
pub struct Counted<T> {
    io: T,
    read: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// Wraps `io`, adding every byte read to `read`.
    pub fn new(io: T, read: Arc<AtomicU64>) -> Self {
        Self { io, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The close code a GOAWAY or reset carried, if it is one of ours.
fn our_code(reason: Reason) -> Option<CloseCode> {
    u32::from(reason)
        .checked_sub(CODE_BASE)
        .and_then(|c| CloseCode::from_code(u64::from(c)))
}

/// Why an HTTP/2 connection ended, as the tunnel sees it.
fn h2_error(e: &h2::Error) -> TransportError {
    if e.is_go_away() && e.is_remote() {
        let reason = e.reason().unwrap_or(Reason::NO_ERROR);
        return TransportError::ClosedByPeer {
            code: if reason == Reason::NO_ERROR {
                Some(CloseCode::Normal)
            } else {
                our_code(reason)
            },
            reason: String::new(),
        };
    }
    TransportError::Failed(e.to_string())
}

fn stream_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| std::io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_reset() {
        std::io::ErrorKind::ConnectionReset
    } else {
        std::io::ErrorKind::BrokenPipe
    };
    std::io::Error::new(kind, e)
}

impl TcpTransport {
    /// The users' handle on a connection whose driver runs; starts its keep-alive.
    fn start(inner: Arc<Inner>, ping: Option<PingPong>, settings: TcpSettings) -> Self {
        if let Some(ping) = ping {
            tokio::spawn(keep_alive(ping, Arc::downgrade(&inner), settings));
        }
        Self {
            inner: Arc::new(Owner(inner)),
        }
    }

    /// The relay's end: `io` is the TLS connection a connector dialled, already
    /// authenticated. Opens the control stream at once.
    pub async fn relay<T>(
        io: T,
        peer: PeerInfo,
        settings: TcpSettings,
    ) -> Result<Self, TransportError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let received = Arc::new(AtomicU64::new(0));
        let io = Counted::new(io, received.clone());
        let (send_request, mut conn) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(0)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| TransportError::Failed(format!("HTTP/2 handshake: {e}")))?;
        let ping = conn.ping_pong();
        let (inner, mut channels) = Inner::new(peer, Some(send_request.clone()), received);
        let inner = Arc::new(inner);
        let control = open(send_request, CONTROL_PATH);
        if let Some(tx) = channels.control.take() {
            let _ = tx.send(control);
        }
        tokio::spawn(drive_client(conn, inner.clone(), channels.close));
        Ok(Self::start(inner, ping, settings))
    }

    /// The connector's end: `io` is the TLS connection it dialled to the relay's HTTPS
    /// port with the tunnel's TCP ALPN.
    pub async fn connector<T>(
        io: T,
        peer: PeerInfo,
        settings: TcpSettings,
    ) -> Result<Self, TransportError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let received = Arc::new(AtomicU64::new(0));
        let io = Counted::new(io, received.clone());
        let mut conn = h2::server::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(settings.max_streams)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| TransportError::Failed(format!("HTTP/2 handshake: {e}")))?;
        let ping = conn.ping_pong();
        let (inner, channels) = Inner::new(peer, None, received);
        let inner = Arc::new(inner);
        tokio::spawn(drive_server(conn, inner.clone(), channels));
        Ok(Self::start(inner, ping, settings))
    }
}

/// Opens one stream from the relay; its response (the connector's half) arrives later.
fn open(mut send_request: h2::client::SendRequest<Bytes>, path: &str) -> BiStream {
    let request = http::Request::post(format!("https://tunnel{path}"))
        .body(())
        .unwrap_or_default();
    match send_request.send_request(request, false) {
        Ok((response, send)) => BiStream {
            send: Box::new(H2Send::new(send)),
            recv: Box::new(H2Recv::Response(response)),
        },
        Err(e) => {
            let error = std::io::Error::new(std::io::ErrorKind::NotConnected, e);
            BiStream {
                send: Box::new(Broken(Some(error.kind()))),
                recv: Box::new(Broken(Some(error.kind()))),
            }
        }
    }
}

/// Drives the relay's (HTTP/2 client) connection until it ends or is closed.
async fn drive_client(
    mut conn: h2::client::Connection<Counted<impl AsyncRead + AsyncWrite + Unpin>, Bytes>,
    inner: Arc<Inner>,
    close: oneshot::Receiver<Close>,
) {
    tokio::select! {
        r = &mut conn => {
            inner.end(match r {
                Ok(()) => TransportError::ClosedByPeer { code: Some(CloseCode::Normal), reason: String::new() },
                Err(e) => h2_error(&e),
            });
            return;
        }
        Ok(Close { code, reason, .. }) = close => {
            // The connector learns the code from a request of its own, then the socket goes.
            if let Some(opener) = &inner.opener {
                let sender = opener.lock().unwrap_or_else(|p| p.into_inner()).clone();
                send_close(sender, code, &reason);
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, conn).await;
}

fn send_close(mut sender: h2::client::SendRequest<Bytes>, code: CloseCode, reason: &str) {
    let reason: String = reason
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect();
    let request = http::Request::post(format!("https://tunnel{CLOSE_PATH}"))
        .header(CLOSE_CODE_HEADER, code.code())
        .header(CLOSE_REASON_HEADER, reason)
        .body(())
        .unwrap_or_default();
    let _ = sender.send_request(request, true);
}

/// Drives the connector's (HTTP/2 server) connection: hands out the relay's streams,
/// takes its close request, until the connection ends or is closed.
async fn drive_server(
    mut conn: h2::server::Connection<Counted<impl AsyncRead + AsyncWrite + Unpin>, Bytes>,
    inner: Arc<Inner>,
    mut channels: Channels,
) {
    let mut linger = CLOSE_LINGER;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            Ok(Close { code, flush, .. }) = &mut channels.close => {
                if code == CloseCode::Normal && flush {
                    // The tunnel drained: what the streams wrote must still reach the
                    // relay, so GOAWAY lets HTTP/2 flush it before the socket goes.
                    conn.graceful_shutdown();
                    linger = GRACEFUL_LINGER;
                } else {
                    conn.abrupt_shutdown(Reason::from(CODE_BASE + code.code()));
                }
                break;
            }
        };
        let (request, mut respond) = match next {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                inner.end(h2_error(&e));
                return;
            }
            None => {
                inner.end(TransportError::ClosedByPeer {
                    code: Some(CloseCode::Normal),
                    reason: String::new(),
                });
                return;
            }
        };
        let path = request.uri().path().to_owned();
        if path == CLOSE_PATH {
            let header = |name| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
                    .map(str::to_owned)
            };
            let code = header(CLOSE_CODE_HEADER)
                .and_then(|c| c.parse::<u64>().ok())
                .and_then(CloseCode::from_code);
            inner.end(TransportError::ClosedByPeer {
                code,
                reason: header(CLOSE_REASON_HEADER).unwrap_or_default(),
            });
            conn.abrupt_shutdown(Reason::NO_ERROR);
            break;
        }
        let Ok(send) = respond.send_response(http::Response::new(()), false) else {
            continue;
        };
        let stream = BiStream {
            send: Box::new(H2Send::new(send)),
            recv: Box::new(H2Recv::body(request.into_body())),
        };
        if path == CONTROL_PATH
            && let Some(tx) = channels.control.take()
        {
            let _ = tx.send(stream);
        } else {
            // Nobody accepting any more means the tunnel is going: the stream is dropped.
            let _ = channels.accepted.send(stream).await;
        }
    }
    // Let GOAWAY (and, closing gracefully, what is queued) reach the relay, then drop the
    // socket.
    let _ = tokio::time::timeout(linger, async {
        while let Some(Ok(_)) = conn.accept().await {}
    })
    .await;
    inner.end(TransportError::LocallyClosed);
}

/// Sends a PING every `keep_alive` (which keeps the peer's idle check fed and measures
/// the RTT) and closes the connection as timed out once nothing has arrived for
/// `idle_timeout`.
async fn keep_alive(mut ping: PingPong, inner: std::sync::Weak<Inner>, settings: TcpSettings) {
    let mut heard_at = Instant::now();
    let mut heard = 0;
    let mut sent: Option<Instant> = None;
    let mut tick = tokio::time::interval(settings.keep_alive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            pong = std::future::poll_fn(|cx| ping.poll_pong(cx)), if sent.is_some() => {
                let Some(inner) = inner.upgrade() else { return };
                match (pong, sent.take()) {
                    (Ok(_), Some(at)) => {
                        let micros = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                        inner.rtt_micros.store(micros.max(1), Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
            _ = tick.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                if inner.reason.get().is_some() {
                    return;
                }
                let now = inner.received.load(Ordering::Relaxed);
                if now != heard {
                    heard = now;
                    heard_at = Instant::now();
                } else if heard_at.elapsed() >= settings.idle_timeout {
                    inner.end(TransportError::TimedOut);
                    inner.close(CloseCode::Normal, "idle timeout", false);
                    return;
                }
                if sent.is_none() && ping.send_ping(Ping::opaque()).is_ok() {
                    sent = Some(Instant::now());
                }
            }
        }
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move {
            let Some(opener) = &self.inner.opener else {
                // The connector's one stream, the control stream, is opened for it.
                let control = self.inner.control.lock().await.take();
                return match control {
                    Some(rx) => {
                        let mut closed = self.inner.closed.subscribe();
                        tokio::select! {
                            stream = rx => stream.map_err(|_| self.inner.reason()),
                            _ = closed.wait_for(|c| *c) => Err(self.inner.reason()),
                        }
                    }
                    None => Err(TransportError::Failed(
                        "over TCP the connector opens only its control stream".into(),
                    )),
                };
            };
            let sender = opener.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut closed = self.inner.closed.subscribe();
            let ready = tokio::select! {
                r = sender.ready() => r,
                _ = closed.wait_for(|c| *c) => return Err(self.inner.reason()),
            };
            match ready {
                Ok(sender) => Ok(open(sender, STREAM_PATH)),
                Err(e) => {
                    let why = h2_error(&e);
                    Err(self.inner.reason.get().cloned().unwrap_or(why))
                }
            }
        })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move {
            if self.inner.opener.is_some() {
                // The relay accepts one stream: the control stream it opened itself.
                let control = self.inner.control.lock().await.take();
                if let Some(rx) = control
                    && let Ok(stream) = rx.await
                {
                    return Ok(stream);
                }
                let mut closed = self.inner.closed.subscribe();
                let _ = closed.wait_for(|c| *c).await;
                return Err(self.inner.reason());
            }
            let mut accepted = self.inner.accepted.lock().await;
            let mut closed = self.inner.closed.subscribe();
            tokio::select! {
                stream = accepted.recv() => stream.ok_or_else(|| self.inner.reason()),
                _ = closed.wait_for(|c| *c) => Err(self.inner.reason()),
            }
        })
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.inner.close(code, reason, true);
    }

    fn closed(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(async move {
            let mut closed = self.inner.closed.subscribe();
            let _ = closed.wait_for(|c| *c).await;
            self.inner.reason()
        })
    }

    fn close_reason(&self) -> Option<TransportError> {
        self.inner.reason.get().cloned()
    }

    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.inner.peer.certificates.clone()
    }

    fn server_name(&self) -> Option<String> {
        self.inner.peer.server_name.clone()
    }

    fn remote_address(&self) -> SocketAddr {
        self.inner.peer.remote
    }

    fn rtt(&self) -> Duration {
        Duration::from_micros(self.inner.rtt_micros.load(Ordering::Relaxed))
    }

    fn received(&self) -> u64 {
        self.inner.received.load(Ordering::Relaxed)
    }
}

/// The sending half of an HTTP/2 stream as a byte stream: each write waits for
/// flow-control capacity and hands at most that much to `h2`.
struct H2Send {
    stream: h2::SendStream<Bytes>,
    finished: bool,
}

impl H2Send {
    fn new(stream: h2::SendStream<Bytes>) -> Self {
        Self {
            stream,
            finished: false,
        }
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.finished {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        self.stream.reserve_capacity(buf.len());
        loop {
            let available = self.stream.capacity();
            if available > 0 {
                let n = available.min(buf.len());
                return Poll::Ready(
                    self.stream
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map(|()| n)
                        .map_err(stream_error),
                );
            }
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The connection's task writes what `h2` holds.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.stream.reserve_capacity(0);
            self.stream
                .send_data(Bytes::new(), true)
                .map_err(stream_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl TunnelSend for H2Send {
    fn delivered(&self) -> BoxFuture<'static, ()> {
        // TCP delivers in order what was written before the connection's orderly close,
        // and a closing end drives its connection until `h2` has written everything
        // queued (a graceful GOAWAY after a drain, see `GRACEFUL_LINGER`), so there is
        // nothing more to wait for here.
        Box::pin(std::future::ready(()))
    }
}

impl Drop for H2Send {
    fn drop(&mut self) {
        if !self.finished {
            // As a QUIC send stream does when dropped: finish it. The tunnel's code relies
            // on that (a CONNECT stream's half ends when its copy ends); a reset here would
            // also cut what the peer has yet to read the other way.
            let _ = self.stream.send_data(Bytes::new(), true);
        }
    }
}

/// The receiving half of an HTTP/2 stream as a byte stream. Flow-control capacity is
/// given back as the reader takes the bytes, so a slow reader holds the sender back.
enum H2Recv {
    /// The relay's side of a stream it opened: the connector's answer has not come yet.
    Response(h2::client::ResponseFuture),
    Body {
        body: h2::RecvStream,
        pending: Bytes,
    },
}

impl H2Recv {
    fn body(body: h2::RecvStream) -> Self {
        Self::Body {
            body,
            pending: Bytes::new(),
        }
    }
}

impl TunnelRecv for H2Recv {}

impl AsyncRead for H2Recv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match &mut *self {
                Self::Response(response) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(stream_error)?;
                    if response.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(std::io::Error::other(format!(
                            "tunnel stream refused with {}",
                            response.status()
                        ))));
                    }
                    *self = Self::body(response.into_body());
                }
                Self::Body { body, pending } => {
                    if !pending.is_empty() {
                        let n = pending.len().min(buf.remaining());
                        buf.put_slice(&pending[..n]);
                        pending.advance(n);
                        let _ = body.flow_control().release_capacity(n);
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => *pending = data,
                        Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                        None => return Poll::Ready(Ok(())),
                    }
                }
            }
        }
    }
}

/// A stream that could not be opened: every operation fails with its error.
struct Broken(Option<std::io::ErrorKind>);

impl Broken {
    fn error(&self) -> std::io::Error {
        self.0.unwrap_or(std::io::ErrorKind::NotConnected).into()
    }
}

impl AsyncWrite for Broken {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(self.error()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(self.error()))
    }
}

impl AsyncRead for Broken {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(self.error()))
    }
}

impl TunnelSend for Broken {
    fn delivered(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

impl TunnelRecv for Broken {}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TcpSettings {
        TcpSettings {
            stream_window: 64 * 1024,
            connection_window: 256 * 1024,
            keep_alive: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(400),
            max_streams: 16,
        }
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            certificates: None,
            server_name: Some("relay.test".into()),
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    /// A relay end and a connector end joined by an in-memory pipe.
    async fn pair() -> (TcpTransport, TcpTransport) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (relay, connector) = tokio::join!(
            TcpTransport::relay(a, peer(), settings()),
            TcpTransport::connector(b, peer(), settings())
        );
        (relay.unwrap(), connector.unwrap())
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_control_stream_is_opened_for_the_connector_and_the_relay_opens_the_rest() {
        let (relay, connector) = pair().await;
        let mut control = connector.open_bi().await.unwrap();
        control.send.write_all(b"register").await.unwrap();
        let mut at_relay = relay.accept_bi().await.unwrap();
        let mut buf = [0u8; 8];
        at_relay.recv.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"register");
        assert!(
            connector.open_bi().await.is_err(),
            "one connector stream only"
        );

        // A relay stream of 1 MiB, beyond every window: flow control lets it through.
        let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut out = relay.open_bi().await.unwrap();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            out.send.write_all(&sent).await.unwrap();
            out.send.shutdown().await.unwrap();
            let mut answer = Vec::new();
            out.recv.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut incoming = connector.accept_bi().await.unwrap();
        let mut got = Vec::new();
        incoming.recv.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, body);
        incoming.send.write_all(b"ok").await.unwrap();
        incoming.send.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"ok");
        assert!(relay.rtt() > Duration::ZERO || connector.received() > 0);
    }

    #[tokio::test]
    async fn an_orderly_close_delivers_what_was_written_before_it() {
        let (relay, connector) = pair().await;
        let _control = connector.open_bi().await.unwrap();
        let _at_relay = relay.accept_bi().await.unwrap();
        let mut out = relay.open_bi().await.unwrap();
        out.send.write_all(b"GET").await.unwrap();
        out.send.shutdown().await.unwrap();
        let mut incoming = connector.accept_bi().await.unwrap();
        // Four times the stream window: most of it is still queued when the close comes.
        let body: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            incoming.send.write_all(&sent).await.unwrap();
            incoming.send.shutdown().await.unwrap();
            drop(incoming);
            connector.close(CloseCode::Normal, "drained");
        });
        let mut got = Vec::new();
        out.recv.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), body.len());
        assert!(got == body);
    }

    #[tokio::test]
    async fn the_relay_s_close_code_reaches_the_connector() {
        let (relay, connector) = pair().await;
        relay.close(CloseCode::Revoked, "certificate revoked");
        let why = connector.closed().await;
        assert_eq!(why.peer_code(), Some(CloseCode::Revoked), "{why:?}");
        assert!(matches!(
            relay.close_reason(),
            Some(TransportError::LocallyClosed)
        ));
    }

    #[tokio::test]
    async fn the_connector_s_close_code_reaches_the_relay() {
        let (relay, connector) = pair().await;
        connector.close(CloseCode::Shutdown, "bye");
        let why = relay.closed().await;
        assert_eq!(why.peer_code(), Some(CloseCode::Shutdown), "{why:?}");
    }

    /// Copies `from` to `to`, discarding everything once `silent` is set.
    async fn pump(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        silent: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                return;
            }
            if !silent.load(Ordering::Relaxed) && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    #[tokio::test]
    async fn a_path_gone_silent_times_out_at_both_ends() {
        let (relay_io, a) = tokio::io::duplex(64 * 1024);
        let (b, connector_io) = tokio::io::duplex(64 * 1024);
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        tokio::spawn(pump(ar, bw, silent.clone()));
        tokio::spawn(pump(br, aw, silent.clone()));
        let (relay, connector) = tokio::join!(
            TcpTransport::relay(relay_io, peer(), settings()),
            TcpTransport::connector(connector_io, peer(), settings())
        );
        let (relay, connector) = (relay.unwrap(), connector.unwrap());
        let mut control = connector.open_bi().await.unwrap();
        control.send.write_all(b"x").await.unwrap();
        let mut at_relay = relay.accept_bi().await.unwrap();
        let mut one = [0u8; 1];
        at_relay.recv.read_exact(&mut one).await.unwrap();
        // Alive for several idle timeouts while keep-alives flow.
        tokio::time::sleep(settings().idle_timeout * 3).await;
        assert!(relay.close_reason().is_none() && connector.close_reason().is_none());
        silent.store(true, Ordering::Relaxed);
        let (r, c) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(relay.closed(), connector.closed())
        })
        .await
        .expect("both ends notice within their idle timeout");
        assert_eq!(r, TransportError::TimedOut);
        assert_eq!(c, TransportError::TimedOut);
    }

    #[tokio::test]
    async fn dropping_one_end_closes_the_other() {
        let (relay, connector) = pair().await;
        drop(connector);
        let why = tokio::time::timeout(Duration::from_secs(5), relay.closed())
            .await
            .expect("the relay notices at once");
        assert!(
            !matches!(
                why,
                TransportError::LocallyClosed | TransportError::TimedOut
            ),
            "{why:?}"
        );
    }
}
