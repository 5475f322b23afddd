//! The agent's seam between what it asks of the relay (a request, a CONNECT tunnel) and
//! the protocol that carries it. A [`RelayConnection`] sends request heads and returns an
//! [`Exchange`] whose halves stream the body up and the response down: HTTP/3 over QUIC
//! ([`H3Connection`]), or where UDP is blocked HTTP/2 over TLS on TCP ([`H2Connection`]);
//! the proxy, the TCP forwards and the service list only see these types.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::client::{RequestStream, SendRequest};
use portcullis_shared::transport::{BoxFuture, TransportKind};
use portcullis_shared::tunnel_body::BoxError;

/// The upload half of one exchange with the relay.
pub(crate) trait RequestSend: Send {
    /// Sends a chunk of the request body (or tunnel bytes).
    fn send_data(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), BoxError>>;
    /// Ends the request body (half-closes a tunnel).
    fn finish(&mut self) -> BoxFuture<'_, Result<(), BoxError>>;
}

/// The download half of one exchange with the relay.
pub(crate) trait ResponseRecv: Send {
    /// The response head.
    fn recv_response(&mut self) -> BoxFuture<'_, Result<http::Response<()>, BoxError>>;
    /// The next chunk of the response body (or tunnel bytes); `None` at its end.
    fn recv_data(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, BoxError>>;
    /// The trailers, if the response has any (read after the body).
    fn recv_trailers(&mut self) -> BoxFuture<'_, Result<Option<http::HeaderMap>, BoxError>>;
}

/// One request to the relay, or one CONNECT tunnel through it.
pub(crate) struct Exchange {
    pub(crate) send: Box<dyn RequestSend>,
    pub(crate) recv: Box<dyn ResponseRecv>,
}

impl Exchange {
    pub(crate) async fn send_data(&mut self, data: Bytes) -> Result<(), BoxError> {
        self.send.send_data(data).await
    }

    pub(crate) async fn finish(&mut self) -> Result<(), BoxError> {
        self.send.finish().await
    }

    pub(crate) async fn recv_response(&mut self) -> Result<http::Response<()>, BoxError> {
        self.recv.recv_response().await
    }

    pub(crate) async fn recv_data(&mut self) -> Result<Option<Bytes>, BoxError> {
        self.recv.recv_data().await
    }

    pub(crate) async fn recv_trailers(&mut self) -> Result<Option<http::HeaderMap>, BoxError> {
        self.recv.recv_trailers().await
    }
}

/// One live connection to the relay.
pub(crate) trait RelayConnection: Send + Sync {
    /// Which transport carries it.
    fn kind(&self) -> TransportKind;
    /// Sends a request head; the body and response follow on the [`Exchange`].
    fn send_request(&self, req: http::Request<()>) -> BoxFuture<'_, Result<Exchange, BoxError>>;
    /// Whether the connection has closed (a new one must be opened).
    fn is_closed(&self) -> bool;
    /// Closes the connection (it was found broken).
    fn close(&self, reason: &str);
    /// The current round-trip time estimate.
    fn rtt(&self) -> Duration;
    /// How much has arrived from the relay so far; it grows while the relay is alive
    /// (keep-alives are answered), so a value that stops growing says it is gone.
    fn received(&self) -> u64;
    /// Where the connection goes.
    fn remote_address(&self) -> std::net::SocketAddr;
}

/// Whether a request that failed with `e` was certainly not processed by the relay, so it
/// may be sent again elsewhere: refused (`H3_REQUEST_REJECTED`), sent after the relay
/// said it was going away, or on a connection the relay closed gracefully without
/// answering it (a relay closes gracefully only once every request it accepted has been
/// answered, RFC 9114 section 5.2).
pub(crate) fn unprocessed(e: &BoxError) -> bool {
    use h3::error::{Code, StreamError};
    if let Some(e) = e.downcast_ref::<h2::Error>() {
        // HTTP/2's equivalents: REFUSED_STREAM, and streams past a GOAWAY's last id.
        return e.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR));
    }
    e.downcast_ref::<StreamError>().is_some_and(|e| {
        e.is_h3_no_error()
            || matches!(e, StreamError::RemoteTerminate { code, .. } if *code == Code::H3_REQUEST_REJECTED)
    })
}

type Sender = SendRequest<h3_quinn::OpenStreams, Bytes>;

/// HTTP/3 on a QUIC connection.
pub(crate) struct H3Connection {
    conn: quinn::Connection,
    sender: Sender,
}

impl H3Connection {
    /// Starts HTTP/3 on an established QUIC connection; its driver runs in the background
    /// until the connection closes.
    pub(crate) async fn start(conn: quinn::Connection) -> Result<Self, BoxError> {
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self { conn, sender })
    }
}

impl RelayConnection for H3Connection {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn send_request(&self, req: http::Request<()>) -> BoxFuture<'_, Result<Exchange, BoxError>> {
        let mut sender = self.sender.clone();
        Box::pin(async move {
            let (send, recv) = sender.send_request(req).await?.split();
            Ok(Exchange {
                send: Box::new(H3Send(send)),
                recv: Box::new(H3Recv(recv)),
            })
        })
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    fn close(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
    }

    fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    fn received(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    fn remote_address(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }
}

struct H3Send(RequestStream<h3_quinn::SendStream<Bytes>, Bytes>);
struct H3Recv(RequestStream<h3_quinn::RecvStream, Bytes>);

impl RequestSend for H3Send {
    fn send_data(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move { Ok(self.0.send_data(data).await?) })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move { Ok(self.0.finish().await?) })
    }
}

impl ResponseRecv for H3Recv {
    fn recv_response(&mut self) -> BoxFuture<'_, Result<http::Response<()>, BoxError>> {
        Box::pin(async move { Ok(self.0.recv_response().await?) })
    }

    fn recv_data(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, BoxError>> {
        Box::pin(async move {
            Ok(self
                .0
                .recv_data()
                .await?
                .map(|mut chunk| chunk.copy_to_bytes(chunk.remaining())))
        })
    }

    fn recv_trailers(&mut self) -> BoxFuture<'_, Result<Option<http::HeaderMap>, BoxError>> {
        Box::pin(async move { Ok(self.0.recv_trailers().await?) })
    }
}

/// HTTP/2 over TLS on TCP, to the relay's HTTPS port, where UDP is blocked.
pub(crate) struct H2Connection {
    sender: h2::client::SendRequest<Bytes>,
    remote: std::net::SocketAddr,
    /// Set when the connection has ended (or was closed here).
    closed: Arc<AtomicBool>,
    /// Tells the driver to drop the connection.
    stop: tokio_util::sync::CancellationToken,
    received: Arc<AtomicU64>,
    rtt_micros: Arc<AtomicU64>,
}

/// The HTTP/2 windows the agent offers the relay: as QUIC's defaults.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

impl H2Connection {
    /// Starts HTTP/2 on an established TLS connection (ALPN `h2`); its driver and a PING
    /// every `keep_alive` (the relay answers each, which the liveness watch counts, and
    /// which measures the RTT) run in the background until the connection ends.
    pub(crate) async fn start<T>(
        tls: T,
        remote: std::net::SocketAddr,
        keep_alive: Duration,
    ) -> Result<Self, BoxError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let received = Arc::new(AtomicU64::new(0));
        let io = portcullis_shared::tcp_transport::Counted::new(tls, received.clone());
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let rtt_micros = Arc::new(AtomicU64::new(0));
        if let Some(mut ping) = conn.ping_pong() {
            let rtt = rtt_micros.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let sent = std::time::Instant::now();
                    if ping.send_ping(h2::Ping::opaque()).is_err() {
                        return;
                    }
                    tokio::select! {
                        pong = std::future::poll_fn(|cx| ping.poll_pong(cx)) => {
                            if pong.is_err() {
                                return;
                            }
                            let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                            rtt.store(micros.max(1), Ordering::Relaxed);
                        }
                        () = stop.cancelled() => return,
                    }
                    tokio::select! {
                        () = tokio::time::sleep(keep_alive) => {}
                        () = stop.cancelled() => return,
                    }
                }
            });
        }
        {
            let closed = closed.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = &mut conn => {}
                    () = stop.cancelled() => {}
                }
                closed.store(true, Ordering::Relaxed);
                stop.cancel();
            });
        }
        Ok(Self {
            sender,
            remote,
            closed,
            stop,
            received,
            rtt_micros,
        })
    }
}

impl RelayConnection for H2Connection {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn send_request(&self, req: http::Request<()>) -> BoxFuture<'_, Result<Exchange, BoxError>> {
        let sender = self.sender.clone();
        Box::pin(async move {
            let mut sender = sender.ready().await?;
            let (response, send) = sender.send_request(req, false)?;
            Ok(Exchange {
                send: Box::new(H2RequestSend(send)),
                recv: Box::new(H2ResponseRecv::Waiting(Some(response))),
            })
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn close(&self, _reason: &str) {
        self.closed.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }

    fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_micros.load(Ordering::Relaxed))
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn remote_address(&self) -> std::net::SocketAddr {
        self.remote
    }
}

struct H2RequestSend(h2::SendStream<Bytes>);

impl RequestSend for H2RequestSend {
    fn send_data(&mut self, mut data: Bytes) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            // Hands the chunk on as the relay's flow-control window allows.
            while !data.is_empty() {
                self.0.reserve_capacity(data.len());
                let available = match std::future::poll_fn(|cx| self.0.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("the relay closed the stream".into()),
                };
                let n = available.min(data.len());
                if n > 0 {
                    self.0.send_data(data.split_to(n), false)?;
                }
            }
            Ok(())
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move { Ok(self.0.send_data(Bytes::new(), true)?) })
    }
}

enum H2ResponseRecv {
    Waiting(Option<h2::client::ResponseFuture>),
    Body(h2::RecvStream),
}

impl H2ResponseRecv {
    fn body(&mut self) -> Result<&mut h2::RecvStream, BoxError> {
        match self {
            Self::Body(body) => Ok(body),
            Self::Waiting(_) => Err("the response head has not been read".into()),
        }
    }
}

impl ResponseRecv for H2ResponseRecv {
    fn recv_response(&mut self) -> BoxFuture<'_, Result<http::Response<()>, BoxError>> {
        Box::pin(async move {
            let Self::Waiting(pending) = self else {
                return Err("the response head was already read".into());
            };
            let response = pending.take().ok_or("no response pending")?.await?;
            let (parts, body) = response.into_parts();
            *self = Self::Body(body);
            Ok(http::Response::from_parts(parts, ()))
        })
    }

    fn recv_data(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, BoxError>> {
        Box::pin(async move {
            let body = self.body()?;
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    Ok(Some(chunk))
                }
                Some(Err(e)) => Err(e.into()),
                None => Ok(None),
            }
        })
    }

    fn recv_trailers(&mut self) -> BoxFuture<'_, Result<Option<http::HeaderMap>, BoxError>> {
        Box::pin(async move { Ok(self.body()?.trailers().await?) })
    }
}
