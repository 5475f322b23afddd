//! The local forward proxy (loopback only): plain `http://` requests and `CONNECT`s for the
//! organisation's private names go through the relay under the device's identity; every
//! other name is refused (split tunnel: no open proxy). `/proxy.pac` serves the PAC file.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::relay::Relay;
use crate::services::Services;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

pub(crate) struct Proxy {
    pub(crate) relay: Arc<Relay>,
    pub(crate) services: Arc<Services>,
    pub(crate) addr: SocketAddr,
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
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
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
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
    match forward(&proxy, req, &host).await {
        Ok(resp) => resp,
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("portcullis: {e:#}")),
    }
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
    let mut stream = proxy.relay.send(out.body(())?).await?;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            stream.send_data(data).await?;
        }
    }
    stream.finish().await?;
    let resp = stream.recv_response().await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        loop {
            match stream.recv_data().await {
                Ok(Some(mut chunk)) => {
                    let data = chunk.copy_to_bytes(chunk.remaining());
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as BoxError)).await;
                    return;
                }
            }
        }
        if let Ok(Some(trailers)) = stream.recv_trailers().await {
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        }
    });
    let body = StreamBody::new(ReceiverStream(rx)).boxed();
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

struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

impl futures_like::Stream for ReceiverStream {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

mod futures_like {
    pub(crate) use futures_core::Stream;
}
