//! The local forward proxy (loopback, and only for the user running the agent, see
//! [`crate::peer`]): plain `http://` requests (WebSocket upgrades
//! included) and `CONNECT`s for the organisation's private names go through the relay
//! under the device's identity; every other name is refused (split tunnel: no open proxy).
//! `/proxy.pac` serves the PAC file.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use portcullis_shared::tunnel_body::{BoxError, ChannelBody, text_response};

use crate::relay::Relay;
use crate::services::Services;

type Body = BoxBody<Bytes, BoxError>;

pub(crate) struct Proxy {
    pub(crate) relay: Arc<Relay>,
    pub(crate) services: Arc<Services>,
    pub(crate) addr: SocketAddr,
    /// TLS to the relay inside a `CONNECT host:443` tunnel (trusting the org CA), for
    /// upgrades that cannot ride an HTTP/3 request.
    pub(crate) inner_tls: Arc<rustls::ClientConfig>,
}

impl Proxy {
    /// The client TLS configuration for tunnels whose TLS ends at the relay.
    pub(crate) fn inner_tls(
        roots: rustls::RootCertStore,
    ) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    text_response(status, &msg)
}

fn not_private(host: &str) -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        format!(
            "portcullis: no permission for {host}: it is not one of your organisation's private names that this device may reach; ask your administrator if you need it"
        ),
    )
}

/// Accepts proxy clients until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            // The proxy carries this device's identity: for this user only.
            if !crate::peer::allowed(peer, proxy.addr).await {
                return;
            }
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(proxy, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(proxy: Arc<Proxy>, mut req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        let Some(authority) = req.uri().authority().cloned() else {
            return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
        };
        if !proxy.services.is_private(authority.host()) {
            return not_private(authority.host());
        }
        let stream = match proxy.relay.connect(authority.as_str()).await {
            Ok(s) => s,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("portcullis: {e:#}")),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                crate::pump::join(r, w, stream).await;
            }
        });
        return Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        );
    }
    let Some(host) = req.uri().host().map(str::to_owned) else {
        // Origin-form: a request to the proxy itself.
        if req.uri().path() == "/proxy.pac" {
            let mut resp = text(StatusCode::OK, proxy.services.pac(&proxy.addr.to_string()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ns-proxy-autoconfig"),
            );
            return resp;
        }
        return text(
            StatusCode::BAD_REQUEST,
            "portcullis: this is a proxy; set http_proxy/https_proxy to it, or load /proxy.pac"
                .into(),
        );
    };
    if !proxy.services.is_private(&host) {
        return not_private(&host);
    }
    if wants_upgrade(&req) {
        return match upgrade(&proxy, req, &host).await {
            Ok(resp) => resp,
            Err(e) => text(StatusCode::BAD_GATEWAY, format!("portcullis: {e:#}")),
        };
    }
    match forward(&proxy, req, &host).await {
        Ok(resp) => resp,
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("portcullis: {e:#}")),
    }
}

/// An HTTP/1.1 upgrade request: `Connection: upgrade` with an `Upgrade` field (`ws://`).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An upgrade (a `ws://` WebSocket) cannot ride an HTTP/3 request through this h3 client
/// (it cannot send RFC 9220's `:protocol`), so it goes the way a browser's `wss://` does:
/// `CONNECT host:443` to the relay, which ends TLS there with its org-CA leaf, and the
/// upgrade request inside, under the same device identity.
async fn upgrade(
    proxy: &Proxy,
    mut req: Request<Incoming>,
    host: &str,
) -> anyhow::Result<Response<Body>> {
    use anyhow::Context as _;
    let stream = proxy.relay.connect(&format!("{host}:443")).await?;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(theirs);
    tokio::spawn(crate::pump::join(r, w, stream));
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(proxy.inner_tls.clone())
        .connect(name, ours)
        .await
        .context("TLS with the relay inside the tunnel")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn.with_upgrades());
    let client_side = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::builder().method(parts.method).uri(path);
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "proxy-connection" | "proxy-authorization") {
            out = out.header(name, value);
        }
    }
    let body = http_body_util::Empty::<Bytes>::new();
    let mut resp = send.send_request(out.body(body)?).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let relay_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(client), Ok(relay)) = (client_side.await, relay_side.await) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(relay),
                )
                .await;
            }
        });
    }
    let (head, body) = resp.into_parts();
    Ok(Response::from_parts(
        head,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// Sends a plain `http://` request to the relay as HTTP/3 (`https://` to the relay: the
/// hop is encrypted and the relay adds the device's identity).
async fn forward(
    proxy: &Proxy,
    req: Request<Incoming>,
    host: &str,
) -> anyhow::Result<Response<Body>> {
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = match parts.uri.port_u16() {
        Some(p) if p != 80 => format!("{host}:{p}"),
        _ => host.to_owned(),
    };
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(format!("https://{authority}{path}"));
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if !matches!(
            n,
            "host"
                | "connection"
                | "proxy-connection"
                | "proxy-authorization"
                | "keep-alive"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
        ) {
            out = out.header(name, value);
        }
    }
    let out = out.body(())?;
    // A request without a body that the relay did not process (it was going away) is
    // sent once more, on another connection: nothing of it reached an origin.
    let bodiless = hyper::body::Body::is_end_stream(&body);
    let mut again = bodiless;
    let (mut stream, resp) = loop {
        let mut stream = proxy.relay.send(out.clone()).await?;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                stream
                    .send_data(data)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
        }
        stream.finish().await.map_err(|e| anyhow::anyhow!(e))?;
        match stream.recv_response().await {
            Ok(resp) => break (stream, resp),
            Err(e) if again && crate::transport::unprocessed(&e) => {
                tracing::debug!(error = %e, "the relay did not process the request; sending it again");
                again = false;
            }
            Err(e) => return Err(anyhow::anyhow!(e)),
        }
    };
    let (tx, body) = ChannelBody::channel(4);
    tokio::spawn(async move {
        loop {
            match stream.recv_data().await {
                Ok(Some(data)) => {
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if let Ok(Some(trailers)) = stream.recv_trailers().await {
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        }
    });
    let body = body.boxed();
    let (mut head, ()) = resp.into_parts();
    // The client speaks HTTP/1.1 to us, whatever the relay hop was.
    head.version = http::Version::HTTP_11;
    if head.status == StatusCode::FORBIDDEN && !head.headers.contains_key("portcullis-error") {
        return Ok(text(
            StatusCode::FORBIDDEN,
            format!("portcullis: no permission for {host}: ask your administrator for access"),
        ));
    }
    Ok(Response::from_parts(head, body))
}
