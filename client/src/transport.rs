//! The agent's seam between what it asks of the relay (a request, a CONNECT tunnel) and
//! the protocol that carries it. A [`RelayConnection`] sends request heads and returns an
//! [`Exchange`] whose halves stream the body up and the response down; HTTP/3 over QUIC
//! ([`H3Connection`]) is the one implementation today, and another (HTTP/2 over TLS/TCP
//! where UDP is blocked) can be added beside it without touching the proxy, the TCP
//! forwards or the service list, which only see these types.

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
