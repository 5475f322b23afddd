//! HTTP/3 against the relay's QUIC port: [`H3Client`] (the h3 library), and [`RawH3`],
//! frames written and read by hand for what the library will not send.

use std::time::{Duration, Instant};

use crate::{RelayAddrs, World, client_tls};

/// What an HTTP/3 exchange returned.
#[derive(Debug)]
pub struct H3Response {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

/// An HTTP/3 client connection to the relay's QUIC port as device `device`.
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    /// Runs the connection; finishes when it closes.
    driver: Option<tokio::task::JoinHandle<()>>,
    /// The QUIC endpoint (its socket can be rebound to test migration).
    pub endpoint: quinn::Endpoint,
}

impl H3Client {
    /// Connects with TLS name `sni`; panics if the relay refuses.
    pub async fn connect(w: &World, relay: &RelayAddrs, device: &str, sni: &str) -> Self {
        Self::try_connect(w, relay, device, sni).await.unwrap()
    }

    /// Connects with TLS name `sni`.
    pub async fn try_connect(
        w: &World,
        relay: &RelayAddrs,
        device: &str,
        sni: &str,
    ) -> anyhow::Result<Self> {
        Self::try_connect_from(w, relay, device, sni, [127, 0, 0, 1].into()).await
    }

    /// Connects with TLS name `sni` from loopback address `source`.
    pub async fn try_connect_from(
        w: &World,
        relay: &RelayAddrs,
        device: &str,
        sni: &str,
        source: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        let tls = client_tls(w, device, &[b"h3"]);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client(std::net::SocketAddr::new(source, 0))?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        let conn = endpoint.connect(relay.quic, sni)?.await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self {
            send,
            driver: Some(driver),
            endpoint,
        })
    }

    /// Sends one request with an optional body and reads the whole response; panics on a
    /// stream error.
    pub async fn request(&mut self, req: http::Request<()>, body: Option<Vec<u8>>) -> H3Response {
        self.try_request(req, body).await.unwrap()
    }

    /// Like [`H3Client::request`], returning a stream error (e.g. a reset) as `Err`.
    pub async fn try_request(
        &mut self,
        req: http::Request<()>,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<H3Response> {
        use bytes::Buf;
        let mut stream = self.send.send_request(req).await?;
        if let Some(body) = body {
            for chunk in body.chunks(64 * 1024) {
                stream
                    .send_data(bytes::Bytes::copy_from_slice(chunk))
                    .await?;
            }
        }
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut out = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let trailers = stream.recv_trailers().await?;
        Ok(H3Response {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: out,
            trailers,
        })
    }

    /// Waits up to `timeout` for the connection to close (the relay closed it); returns
    /// whether it did.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return true;
        };
        let closed = tokio::time::timeout(timeout, driver).await.is_ok();
        if closed {
            self.driver = None;
        }
        closed
    }

    /// Another handle on the same connection, for concurrent requests.
    pub fn sender(&self) -> h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes> {
        self.send.clone()
    }

    /// GET `https://HOST/PATH`.
    pub async fn get(&mut self, host: &str, path: &str) -> H3Response {
        let req = http::Request::get(format!("https://{host}{path}"))
            .body(())
            .unwrap();
        self.request(req, None).await
    }

    /// `CONNECT target` (host:port); sends `data`, half-closes, returns status and
    /// everything received until the other side closes.
    pub async fn connect_tunnel(&mut self, target: &str, data: &[u8]) -> (u16, Vec<u8>) {
        use bytes::Buf;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target)
            .body(())
            .unwrap();
        let mut stream = self.send.send_request(req).await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        if resp.status() != 200 {
            return (resp.status().as_u16(), Vec::new());
        }
        stream
            .send_data(bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap();
        stream.finish().await.unwrap();
        let mut out = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        (200, out)
    }
}

/// HTTP/3 spoken by hand on a QUIC connection to the relay, for what the h3 library will
/// not send: RFC 9220 `websocket`, malformed or oversized header sections, odd frames.
pub struct RawH3 {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    _control: quinn::SendStream,
    _endpoint: quinn::Endpoint,
}

/// One request stream of a [`RawH3`] connection.
pub struct RawH3Stream {
    /// Sending side.
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

/// How a raw HTTP/3 read ended when it did not produce a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum RawH3End {
    /// The peer finished the stream.
    Finished,
    /// The peer reset the stream with this code.
    Reset(u64),
    /// The connection closed with this application error code.
    ConnectionClosed(u64),
    /// Anything else (timeout, transport error).
    Other(String),
}

impl RawH3 {
    /// Connects as `device` with TLS name `sni` and opens the control stream (with an
    /// empty SETTINGS frame).
    pub async fn connect(w: &World, relay: &RelayAddrs, device: &str, sni: &str) -> Self {
        let tls = client_tls(w, device, &[b"h3"]);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Like any HTTP/3 client that holds connections open, keep this one alive.
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        let mut client = quinn::ClientConfig::new(std::sync::Arc::new(quic));
        client.transport_config(std::sync::Arc::new(transport));
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(relay.quic, sni).unwrap().await.unwrap();
        let mut control = conn.open_uni().await.unwrap();
        let mut settings = vec![0x00];
        portcullis_shared::h3wire::encode_frame(
            portcullis_shared::h3wire::FRAME_SETTINGS,
            &[],
            &mut settings,
        );
        control.write_all(&settings).await.unwrap();
        Self {
            conn,
            _control: control,
            _endpoint: endpoint,
        }
    }

    /// Opens a request stream and writes `bytes` on it (use [`headers_frame`]).
    pub async fn open(&self, bytes: &[u8]) -> RawH3Stream {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        RawH3Stream {
            send,
            recv,
            buf: Vec::new(),
        }
    }

    /// Sends one request and returns the response status, or how the stream ended.
    pub async fn status_of(&self, bytes: &[u8]) -> Result<u16, RawH3End> {
        let mut s = self.open(bytes).await;
        let _ = s.send.finish();
        s.response().await
    }
}

/// A HEADERS frame carrying `fields` as literals, in order, exactly as given.
pub fn headers_frame(fields: &[(&str, &str)]) -> Vec<u8> {
    use portcullis_shared::h3wire;
    let block =
        h3wire::encode_field_section(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut f = Vec::new();
    h3wire::encode_frame(h3wire::FRAME_HEADERS, &block, &mut f);
    f
}

/// A DATA frame carrying `payload`.
pub fn data_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    portcullis_shared::h3wire::encode_frame(portcullis_shared::h3wire::FRAME_DATA, payload, &mut f);
    f
}

impl RawH3Stream {
    /// Reads the next whole frame (type and payload), within 10 s.
    pub async fn frame(&mut self) -> Result<(u64, Vec<u8>), RawH3End> {
        use portcullis_shared::h3wire;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(h) = h3wire::decode_frame_head(&self.buf) {
                let end = h.head_len + h.len as usize;
                if self.buf.len() >= end {
                    let payload = self.buf[h.head_len..end].to_vec();
                    self.buf.drain(..end);
                    return Ok((h.ty, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline.into(), self.recv.read(&mut chunk)).await;
            match read {
                Err(_) => return Err(RawH3End::Other("timed out".into())),
                Ok(Ok(Some(n))) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Ok(None)) => return Err(RawH3End::Finished),
                Ok(Err(quinn::ReadError::Reset(code))) => {
                    return Err(RawH3End::Reset(code.into_inner()));
                }
                Ok(Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(c),
                ))) => return Err(RawH3End::ConnectionClosed(c.error_code.into_inner())),
                Ok(Err(e)) => return Err(RawH3End::Other(e.to_string())),
            }
        }
    }

    /// Reads frames up to the response's HEADERS and returns its `:status`.
    pub async fn response(&mut self) -> Result<u16, RawH3End> {
        loop {
            let (ty, payload) = self.frame().await?;
            if ty != portcullis_shared::h3wire::FRAME_HEADERS {
                continue;
            }
            let fields = portcullis_shared::h3wire::decode_field_section(&payload)
                .map_err(|e| RawH3End::Other(format!("bad response section: {e}")))?;
            let status = fields
                .iter()
                .find(|f| f.name == b":status")
                .and_then(|f| std::str::from_utf8(&f.value).ok()?.parse().ok())
                .ok_or_else(|| RawH3End::Other("no :status".into()))?;
            return Ok(status);
        }
    }

    /// Reads DATA frames until `n` payload bytes have arrived.
    pub async fn data(&mut self, n: usize) -> Result<Vec<u8>, RawH3End> {
        let mut out = Vec::new();
        while out.len() < n {
            let (ty, payload) = self.frame().await?;
            if ty == portcullis_shared::h3wire::FRAME_DATA {
                out.extend_from_slice(&payload);
            }
        }
        Ok(out)
    }
}
