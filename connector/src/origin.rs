//! Serving one tunnel stream: HTTP/1.1 from the relay on the stream, proxied to the
//! ingress rule's origin through a pooled client, bodies streamed both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_shared::config::{ConnectorConfig, IngressRule, Scheme};
use portcullis_shared::identity::{HostPattern, Hostname};
use portcullis_shared::pki;
use portcullis_shared::proto::{StreamHeader, TRAILERS_FIELD};
use portcullis_shared::pump;
use portcullis_shared::transport::{BiStream, JoinedStream};
use portcullis_shared::tunnel_body::{Fold, TunnelBody, text_response};

use crate::metrics::{Metrics, Outcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type OriginClient = Client<HttpsConnector<HttpConnector>, TunnelBody<Incoming>>;

/// One origin: where to send requests and the pooled client to send them with.
struct Origin {
    rule: IngressRule,
    /// `None` for `tcp://` rules, which are dialled per CONNECT.
    client: Option<OriginClient>,
    metrics: Arc<Metrics>,
}

impl Origin {
    fn record(&self, outcome: Outcome, since: Instant) {
        self.metrics
            .origin(&self.rule.hostname.to_string(), outcome, since.elapsed());
    }
}

/// The connector's origins, by ingress hostname pattern.
pub(crate) struct Origins {
    by_pattern: HashMap<HostPattern, Arc<Origin>>,
    config: ConnectorConfig,
}

pub(crate) fn tls_for(rule: &IngressRule) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match &rule.origin_ca {
        Some(path) => {
            for cert in pki::load_certs(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs();
            roots.add_parsable_certificates(native);
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The system's CA bundle, read from the usual Linux locations.
fn rustls_native_certs() -> Vec<rustls_pki_types::CertificateDer<'static>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .find_map(|p| pki::load_certs(std::path::Path::new(p)).ok())
    .unwrap_or_default()
}

impl Origins {
    pub(crate) fn new(config: &ConnectorConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut by_pattern = HashMap::new();
        for rule in &config.ingress {
            if rule.service.scheme == Scheme::Tcp {
                by_pattern.insert(
                    rule.hostname.clone(),
                    Arc::new(Origin {
                        rule: rule.clone(),
                        client: None,
                        metrics: metrics.clone(),
                    }),
                );
                continue;
            }
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.enforce_http(false);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config(tls_for(rule)?)
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http);
            let client = Client::builder(TokioExecutor::new())
                .http2_only(rule.service.scheme == Scheme::H2c)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(connector);
            by_pattern.insert(
                rule.hostname.clone(),
                Arc::new(Origin {
                    rule: rule.clone(),
                    client: Some(client),
                    metrics: metrics.clone(),
                }),
            );
        }
        Ok(Self {
            by_pattern,
            config: config.clone(),
        })
    }

    fn origin_for(&self, hostname: &str) -> Option<Arc<Origin>> {
        let host = Hostname::parse(hostname).ok()?;
        let rule = self.config.rule_for(&host)?;
        self.by_pattern.get(&rule.hostname).cloned()
    }

    /// Serves the one HTTP/1.1 exchange on a tunnel stream.
    pub(crate) async fn serve_http(&self, header: StreamHeader, stream: BiStream) {
        let origin = self.origin_for(&header.hostname);
        let service = hyper::service::service_fn(move |req| {
            let origin = origin.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy(origin, req).await) }
        });
        let io = TokioIo::new(stream.join());
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(io, service)
            .with_upgrades()
            .await
        {
            tracing::debug!(error = %e, "tunnel stream ended with an error");
        }
    }
}

fn error(status: StatusCode, msg: &str) -> Response<BoxBody<Bytes, BoxError>> {
    let mut resp = text_response(status, msg);
    resp.headers_mut()
        .insert("portcullis-error", HeaderValue::from_static("connector"));
    resp
}

async fn proxy(
    origin: Option<Arc<Origin>>,
    mut req: Request<Incoming>,
) -> Response<BoxBody<Bytes, BoxError>> {
    let Some(origin) = origin else {
        return error(
            StatusCode::NOT_FOUND,
            "this connector does not publish that hostname",
        );
    };
    if req.method() == Method::CONNECT {
        return connect(&origin, req).await;
    }
    let Some(client) = &origin.client else {
        return error(
            StatusCode::BAD_REQUEST,
            "this hostname is a TCP service: use CONNECT hostname:port",
        );
    };
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The tunnel's trailer field is ours: unfold it, and do not tell the origin about it.
    parts.headers.remove(header::TRAILER);
    let body = TunnelBody::new(body, Fold::Unfold);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = match origin.rule.service.scheme {
        Scheme::Https => "https",
        _ => "http",
    };
    let uri = format!("{scheme}://{}{path}", origin.rule.service.authority());
    parts.uri = match uri.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return error(StatusCode::BAD_REQUEST, "malformed request target"),
    };
    if origin.rule.service.scheme == Scheme::H2c {
        parts.version = http::Version::HTTP_2;
        // HTTP/2 carries the name in :authority; a Host header beside it is not allowed.
        parts.headers.remove(header::HOST);
    }
    let method = parts.method.clone();
    let since = Instant::now();
    match client.request(Request::from_parts(parts, body)).await {
        Ok(mut resp) => {
            origin.record(Outcome::Status(resp.status().as_u16()), since);
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client_side) = client_side
            {
                let origin_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    match tokio::try_join!(client_side, origin_side) {
                        Ok((c, o)) => {
                            let _ = tokio::io::copy_bidirectional(
                                &mut TokioIo::new(c),
                                &mut TokioIo::new(o),
                            )
                            .await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
            }
            let (mut head, body) = resp.into_parts();
            head.headers.remove(header::TRAILER);
            if head.headers.contains_key(header::CONTENT_LENGTH) {
                return Response::from_parts(head, body.map_err(BoxError::from).boxed());
            }
            // Streamed: declare the tunnel's trailer field and fold any trailers into it.
            head.headers
                .insert(header::TRAILER, HeaderValue::from_static(TRAILERS_FIELD));
            let body = TunnelBody::new(body, Fold::Fold);
            Response::from_parts(head, body.map_err(BoxError::from).boxed())
        }
        Err(e) => {
            origin.record(Outcome::Error, since);
            tracing::warn!(origin = %origin.rule.service, %method, error = %e, "origin request failed");
            error(StatusCode::BAD_GATEWAY, "the origin did not answer")
        }
    }
}

/// `CONNECT host:port` to a `tcp://` rule: the port must be the rule's; the origin is
/// dialled before answering, so a dead origin is a 502, not a tunnel that closes at once.
async fn connect(
    origin: &Origin,
    mut req: Request<Incoming>,
) -> Response<BoxBody<Bytes, BoxError>> {
    let service = &origin.rule.service;
    if service.scheme != Scheme::Tcp {
        return error(
            StatusCode::NOT_FOUND,
            "no TCP service is published under this hostname",
        );
    }
    if req.uri().port_u16() != Some(service.port) {
        return error(
            StatusCode::FORBIDDEN,
            "that port is not published for this hostname",
        );
    }
    let since = Instant::now();
    let stream = match tokio::net::TcpStream::connect(service.authority()).await {
        Ok(s) => {
            origin.record(Outcome::Status(200), since);
            s
        }
        Err(e) => {
            origin.record(Outcome::Error, since);
            tracing::warn!(origin = %service, error = %e, "TCP origin unreachable");
            return error(StatusCode::BAD_GATEWAY, "the origin did not answer");
        }
    };
    let _ = stream.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            // The tunnel stream as the transport gave it: bytes move in batches, QUIC's
            // received buffers straight to TCP (see portcullis_shared::pump).
            Ok(tunnel) => match tunnel.downcast::<TokioIo<JoinedStream>>() {
                Ok(parts) => {
                    let (mut recv, mut send) = parts.io.into_inner().into_inner();
                    let (mut tcp_read, mut tcp_write) = stream.into_split();
                    let _ = tokio::try_join!(
                        pump::tunnel_to_tcp(parts.read_buf, &mut *recv, &mut tcp_write),
                        pump::tcp_to_tunnel(&mut tcp_read, &mut *send),
                    );
                }
                Err(tunnel) => {
                    let mut stream = stream;
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(tunnel), &mut stream).await;
                }
            },
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}
