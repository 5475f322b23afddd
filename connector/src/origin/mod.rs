//! Serving one tunnel stream: HTTP/1.1 from the relay on the stream, proxied to the
//! ingress rule's origin through a pooled client, bodies streamed both ways.

pub(crate) mod health;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_shared::assertion;
use portcullis_shared::config::{ConnectorConfig, IngressRule, Scheme};
use portcullis_shared::hop_by_hop;
use portcullis_shared::identity::{HostPattern, Hostname};
use portcullis_shared::pki;
use portcullis_shared::proto::{StreamHeader, TRAILERS_FIELD};
use portcullis_shared::pump;
use portcullis_shared::transport::{BiStream, JoinedStream};
use portcullis_shared::tunnel_body::{Fold, TunnelBody, text_response};

use crate::ops::metrics::{Metrics, OriginStats, Outcome};
use portcullis_shared::access_log::AccessLog;
use portcullis_shared::otlp::{FinishedSpan, KeyValue, SpanKind, Spans};
use portcullis_shared::trace::{TRACEPARENT, TraceContext};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type OriginClient = Client<HttpsConnector<HttpConnector>, TunnelBody<Incoming>>;

/// One origin: where to send requests and the pooled client to send them with.
struct Origin {
    rule: IngressRule,
    /// `None` for `tcp://` rules, which are dialled per CONNECT.
    client: Option<OriginClient>,
    /// This rule's figures.
    stats: Arc<OriginStats>,
    /// The rule's hostname pattern, as logged.
    name: String,
    /// Where each request is reported.
    reports: Reports,
}

/// Where the connector reports each request, both set up once at start.
#[derive(Clone, Default)]
pub(crate) struct Reports {
    /// The access log (`access_log`), or `None`: access lines go to the daemon's log.
    pub(crate) access: Option<Arc<AccessLog>>,
    /// The span exporter (`[otlp]`), when configured.
    pub(crate) spans: Option<Arc<Spans>>,
}

/// What the connector knows of one request, for its access log.
struct Exchange {
    start: Instant,
    /// Continues the relay's span (its `traceparent`) with the connector's own, which the
    /// origin gets as its parent.
    trace: TraceContext,
    /// The relay's span id, as the relay sent it.
    parent: Option<[u8; 8]>,
    /// The relay's `x-request-id`.
    request_id: String,
    host: String,
    method: String,
    path: String,
}

impl Exchange {
    /// A request from the relay: the relay's trace continued (the relay always sends one;
    /// a request without one starts a trace, sampled at `[otlp] sample_ratio`).
    fn begin<B>(req: &Request<B>, spans: Option<&Spans>) -> Self {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let caller = header(TRACEPARENT).and_then(TraceContext::parse);
        let trace = match (caller, spans) {
            (Some(caller), _) => caller.child(),
            (None, Some(spans)) => spans.new_trace(),
            (None, None) => TraceContext::root(),
        };
        Self {
            start: Instant::now(),
            trace,
            parent: caller.map(|c| c.span_id),
            request_id: header("x-request-id").unwrap_or_default().to_owned(),
            host: header(header::HOST.as_str())
                .map(ToOwned::to_owned)
                .or_else(|| req.uri().authority().map(ToString::to_string))
                .unwrap_or_default(),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        }
    }
}

/// One line of the connector's access log.
#[derive(serde::Serialize)]
struct Entry<'a> {
    time: String,
    request_id: &'a str,
    trace_id: String,
    /// The connector's span; the origin's `traceparent` names it as the parent.
    span_id: String,
    /// The relay's span.
    parent_id: Option<String>,
    hostname: &'a str,
    method: &'a str,
    path: &'a str,
    rule: &'a str,
    origin: String,
    /// The origin's status; 502 when it did not answer.
    status: u16,
    /// Time to the origin's response head (tcp://: to the connection).
    duration_ms: f64,
}

impl Origin {
    fn record(&self, x: &Exchange, outcome: Outcome) {
        let took = x.start.elapsed();
        self.stats.record(outcome, took);
        // The span is built only for a trace that is exported.
        if let Some(spans) = &self.reports.spans
            && x.trace.sampled()
        {
            spans.export(self.span(x, outcome, took));
        }
        // Nothing more to do unless the line goes somewhere.
        if self.reports.access.is_none()
            && !tracing::enabled!(target: "portcullis_connector::access", tracing::Level::INFO)
        {
            return;
        }
        let status = match outcome {
            Outcome::Status(s) => s,
            Outcome::Error => 502,
        };
        let entry = Entry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            request_id: &x.request_id,
            trace_id: x.trace.trace_id(),
            span_id: x.trace.span_id(),
            parent_id: x.parent.map(|p| pki::hex(&p)),
            hostname: &x.host,
            method: &x.method,
            path: &x.path,
            rule: &self.name,
            origin: self.rule.service.authority(),
            status,
            duration_ms: took.as_secs_f64() * 1000.0,
        };
        match &self.reports.access {
            Some(log) => log.write(&entry),
            None => tracing::info!(
                target: "portcullis_connector::access",
                request_id = entry.request_id,
                trace_id = %entry.trace_id,
                span_id = %entry.span_id,
                hostname = entry.hostname,
                method = entry.method,
                path = entry.path,
                status,
                duration_ms = entry.duration_ms,
                "request"
            ),
        }
    }
}

impl Origin {
    /// The connector's span of a request: a client span (the connector asks the origin),
    /// by the OpenTelemetry HTTP client conventions, ending at the origin's response head
    /// (`tcp://`: at the connection).
    fn span(&self, x: &Exchange, outcome: Outcome, took: Duration) -> FinishedSpan {
        let end = std::time::SystemTime::now();
        let service = &self.rule.service;
        let mut attributes = vec![
            KeyValue::new("http.request.method", x.method.clone()),
            KeyValue::new("url.path", x.path.clone()),
            KeyValue::new("server.address", service.host.clone()),
            KeyValue::new("server.port", i64::from(service.port)),
            KeyValue::new("portcullis.hostname", x.host.clone()),
            KeyValue::new("portcullis.rule", self.name.clone()),
        ];
        let error = match outcome {
            Outcome::Status(status) => {
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                (status >= 400).then(|| format!("origin answered {status}").into())
            }
            Outcome::Error => {
                attributes.push(KeyValue::new("error.type", "origin_unreachable"));
                Some("the origin did not answer".into())
            }
        };
        FinishedSpan {
            trace: x.trace,
            parent: x.parent,
            kind: SpanKind::Client,
            name: x.method.clone().into(),
            start: end.checked_sub(took).unwrap_or(end),
            end,
            attributes,
            error,
        }
    }
}

/// The connector's origins, by ingress hostname pattern.
pub(crate) struct Origins {
    by_pattern: HashMap<HostPattern, Arc<Origin>>,
    config: ConnectorConfig,
}

pub(crate) fn tls_for(rule: &IngressRule) -> anyhow::Result<rustls::ClientConfig> {
    Ok(pki::server_verifying_client(rule.origin_ca.as_deref())?)
}

impl Origins {
    pub(crate) fn new(
        config: &ConnectorConfig,
        metrics: Arc<Metrics>,
        reports: Reports,
    ) -> anyhow::Result<Self> {
        let mut by_pattern = HashMap::new();
        for rule in &config.ingress {
            if rule.service.scheme == Scheme::Tcp {
                by_pattern.insert(
                    rule.hostname.clone(),
                    Arc::new(Origin {
                        rule: rule.clone(),
                        client: None,
                        stats: metrics.origin_stats(&rule.hostname.to_string()),
                        name: rule.hostname.to_string(),
                        reports: reports.clone(),
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
                    stats: metrics.origin_stats(&rule.hostname.to_string()),
                    name: rule.hostname.to_string(),
                    reports: reports.clone(),
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
    // Only a WebSocket upgrade is ever joined; any other is removed below and served as
    // plain HTTP, and a list the relay should have refused is refused again.
    let Ok(websocket) = hop_by_hop::is_websocket_upgrade(req.headers()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the Connection or Upgrade header is not a list of tokens",
        );
    };
    let exchange = Exchange::begin(&req, origin.reports.spans.as_deref());
    let client_side = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Hop-by-hop headers (the tunnel's trailer field among them) end here; the origin
    // hop gets `te: trailers` again where the relay asked for trailers (gRPC needs it).
    let _ = hop_by_hop::strip(&mut parts.headers, websocket);
    if te_trailers && !websocket {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Defence in depth: the origin learns who calls only from the relay's assertion.
    assertion::reassert(&mut parts.headers);
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
    // The origin's parent span is the connector's.
    if let Ok(v) = HeaderValue::from_str(&exchange.trace.header()) {
        parts.headers.insert(TRACEPARENT, v);
    }
    match client.request(Request::from_parts(parts, body)).await {
        Ok(mut resp) => {
            origin.record(&exchange, Outcome::Status(resp.status().as_u16()));
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                // Joined only for the WebSocket upgrade the relay allowed, and only when
                // the origin switched to WebSocket.
                let Some(client_side) =
                    client_side.filter(|_| hop_by_hop::response_is_websocket(resp.headers()))
                else {
                    tracing::warn!(origin = %origin.rule.service, "the origin switched protocols unasked; refused");
                    return error(StatusCode::BAD_GATEWAY, "the origin switched protocols");
                };
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
            origin.record(&exchange, Outcome::Error);
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
    let exchange = Exchange::begin(&req, origin.reports.spans.as_deref());
    let stream = match tokio::net::TcpStream::connect(service.authority()).await {
        Ok(s) => {
            origin.record(&exchange, Outcome::Status(200));
            s
        }
        Err(e) => {
            origin.record(&exchange, Outcome::Error);
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
