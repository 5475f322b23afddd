//! The HTTPS listener: TLS with device certificates, HTTP/1.1 and HTTP/2, and the request
//! path: authenticate, route by Host, check SNI, apply policy, add identity headers and
//! carry the request down a connector's tunnel as HTTP/1.1 on a fresh QUIC stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_shared::identity::{Hostname, Identity, Role};
use portcullis_shared::pki;
use portcullis_shared::policy::{self, Subject};
use portcullis_shared::shutdown::Shutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::access_log::Entry;
use crate::admin::now;
use crate::jwt::Claims;
use crate::server::State;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What the relay knows about the client of one TLS connection.
#[derive(Debug, Clone)]
struct ConnInfo {
    peer: SocketAddr,
    sni: Option<String>,
    device: Option<Identity>,
}

/// Accepts HTTPS connections until shutdown; each runs until done, revoked or drained.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    shutdown: Shutdown,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let _ = tcp.set_nodelay(true);
        let span =
            tracing::debug_span!("https", client.addr = %peer, device.id = tracing::field::Empty);
        shutdown.tracker().spawn(
            serve_connection(tcp, peer, acceptor.clone(), state.clone(), shutdown.clone())
                .instrument(span),
        );
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    shutdown: Shutdown,
) {
    let limits = &state.config.limits;
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            state
                .metrics
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(client.addr = %peer, reason = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            state
                .metrics
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client.addr = %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let cert = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| pki::inspect(leaf).ok());
    let serial = cert.as_ref().map(|c| c.serial.clone()).unwrap_or_default();
    let device = cert
        .and_then(|info| info.identity)
        .filter(|id| id.role() == Role::Device);
    if let Some(d) = &device {
        tracing::Span::current().record("device.id", d.id());
    }
    let info = Arc::new(ConnInfo {
        peer,
        sni: session.server_name().map(str::to_owned),
        device: device.clone(),
    });
    let live = device.as_ref().map(|d| state.registry.track(d, &serial));
    state
        .metrics
        .https_connections
        .fetch_add(1, Ordering::Relaxed);

    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = svc_state.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(state, info, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(250);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let revoked = async {
        match &live {
            Some(l) => l.revoked().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = revoked => {
            tracing::info!(client.addr = %peer, "closing a revoked device's connection");
        }
        () = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(state.config.drain_grace, conn.as_mut()).await;
        }
    }
    state
        .metrics
        .https_connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// The name the request is for: the URI's authority (`:authority` in HTTP/2, absolute-form
/// in HTTP/1.1) or else `Host`, port removed. `None` when it is missing, malformed, or when
/// an authority and a `Host` header disagree (a smuggling attempt: the origin might route
/// by the one that was not checked).
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let host_header = match req.headers().get(header::HOST) {
        Some(v) => Some(v.to_str().ok()?.parse::<http::uri::Authority>().ok()?),
        None => None,
    };
    let raw = match (req.uri().authority(), host_header) {
        (Some(a), Some(h)) if !a.host().eq_ignore_ascii_case(h.host()) => return None,
        (Some(a), _) => a.host().to_owned(),
        (None, Some(h)) => h.host().to_owned(),
        (None, None) => return None,
    };
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Per-request facts for the access log, filled in as the request proceeds.
struct Access {
    start: Instant,
    client: SocketAddr,
    device: Option<String>,
    user: Option<String>,
    hostname: String,
    method: String,
    path: String,
    protocol: &'static str,
    reason: Option<&'static str>,
}

impl Access {
    fn write(&self, state: &State, status: u16, bytes: u64) {
        state.metrics.response(status);
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        state.access_log.write(&Entry {
            time,
            client: self.client.ip().to_string(),
            device: self.device.as_deref(),
            user: self.user.as_deref(),
            hostname: &self.hostname,
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            status,
            bytes,
            duration_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            reason: self.reason,
        });
    }
}

async fn handle(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let mut access = Access {
        start: Instant::now(),
        client: info.peer,
        device: info.device.as_ref().map(|d| d.id().to_owned()),
        user: None,
        hostname: request_host(&req).unwrap_or_default(),
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        protocol: protocol(req.version()),
        reason: None,
    };
    let resp = match route(&state, &info, req, &mut access).await {
        Ok(resp) => resp,
        Err((status, reason, msg)) => {
            access.reason = Some(reason);
            text(status, msg)
        }
    };
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    // The line is written when the body has been sent (or abandoned), with its size.
    Response::from_parts(
        parts,
        LoggedBody {
            inner: body,
            bytes: 0,
            done: Some((access, state, status)),
        }
        .boxed(),
    )
}

type Refusal = (StatusCode, &'static str, &'static str);

async fn route(
    state: &Arc<State>,
    info: &ConnInfo,
    req: Request<Incoming>,
    access: &mut Access,
) -> Result<Response<RespBody>, Refusal> {
    let host = Hostname::parse(&access.hostname).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "bad host",
            "missing or invalid Host",
        )
    })?;
    if host == state.config.server_name && req.uri().path() == JWKS_PATH {
        let mut resp = text(StatusCode::OK, state.jwt.jwks());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let device = info.device.as_ref().ok_or((
        StatusCode::FORBIDDEN,
        "no device certificate",
        "a device certificate from your organisation is required",
    ))?;
    let sni_matches = info
        .sni
        .as_deref()
        .and_then(|s| Hostname::parse(s).ok())
        .is_some_and(|s| s == host);
    if !sni_matches {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            "sni mismatch",
            "the TLS server name does not match the Host header",
        ));
    }
    let snapshot = state.registry.snapshot();
    if !snapshot.is_published_name(&host) {
        return Err((StatusCode::NOT_FOUND, "unknown host", "not found"));
    }
    let record = snapshot.active(device).ok_or((
        StatusCode::FORBIDDEN,
        "device revoked",
        "this device is not (or no longer) enrolled",
    ))?;
    let user = record.user.clone().unwrap_or_default();
    access.user = Some(user.clone());
    let subject = Subject {
        device: device.id(),
        user: &user,
        groups: &record.groups,
    };
    let decision = policy::evaluate(&state.config.policy, &host, subject);
    if !decision.is_allowed() {
        state.metrics.denied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(device.id = device.id(), hostname = %host, "denied by policy");
        return Err((
            StatusCode::FORBIDDEN,
            "policy",
            "access denied: your organisation's policy does not allow this device here",
        ));
    }
    let Some(connector) = state.router.pick(&host) else {
        return Err((
            StatusCode::BAD_GATEWAY,
            "no connector",
            "the service is unavailable: no connector is online for it",
        ));
    };

    let jwt = state.jwt.sign(&Claims {
        user: &user,
        device: device.id(),
        groups: &record.groups,
        hostname: host.as_str(),
        now: now(),
    });
    let outgoing = rewrite_request(
        req,
        &host,
        info,
        device,
        &user,
        &record.groups,
        jwt.as_deref(),
    )
    .map_err(|_| (StatusCode::BAD_REQUEST, "bad request", "malformed request"))?;

    let io = connector.open_http(&host).await.map_err(|e| {
        tracing::info!(connector.name = %connector.name, error = %format!("{e:#}"), "tunnel stream failed");
        (StatusCode::BAD_GATEWAY, "tunnel", "the service's connector did not answer")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Incoming>(TokioIo::new(io))
        .await
        .map_err(|_| {
            (
                StatusCode::BAD_GATEWAY,
                "tunnel",
                "the service's connector did not answer",
            )
        })?;
    let metrics = state.metrics.clone();
    metrics.tunnel_streams.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "tunnel stream ended with an error");
        }
        metrics.tunnel_streams.fetch_sub(1, Ordering::Relaxed);
    });
    let resp = sender.send_request(outgoing).await.map_err(|e| {
        tracing::info!(connector.name = %connector.name, error = %e, "tunnel exchange failed");
        (
            StatusCode::BAD_GATEWAY,
            "tunnel",
            "the service's connector did not answer",
        )
    })?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    for h in named {
        headers.remove(h);
    }
}

/// Turns the client's request into the one sent down the tunnel: origin-form URI,
/// HTTP/1.1, hop-by-hop and client-supplied `portcullis-*` headers removed, identity
/// headers added.
#[allow(clippy::too_many_arguments)]
fn rewrite_request(
    req: Request<Incoming>,
    host: &Hostname,
    info: &ConnInfo,
    device: &Identity,
    user: &str,
    groups: &[String],
    jwt: Option<&str>,
) -> Result<Request<Incoming>, http::Error> {
    let (mut parts, body) = req.into_parts();
    // The origin sees exactly the name that was checked (and the client's port, if any).
    let port = parts.uri.port_u16().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .and_then(|a| a.port_u16())
    });
    let host_header = match port {
        Some(p) => HeaderValue::from_str(&format!("{host}:{p}")),
        None => HeaderValue::from_str(host.as_str()),
    }?;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::builder().path_and_query(path).build()?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // Some origin frameworks (CGI, WSGI, Rack, PHP) read `portcullis_user` as
    // `portcullis-user`, so both spellings are stripped, as are other client claims about
    // who or where the caller is.
    let spoofed: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| {
            let name = k.as_str().replace('_', "-");
            name.starts_with("portcullis-") || name == "x-real-ip" || name == "forwarded"
        })
        .cloned()
        .collect();
    for k in spoofed {
        parts.headers.remove(k);
    }
    let h = &mut parts.headers;
    h.insert(header::HOST, host_header);
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set("portcullis-user", user);
    set("portcullis-device", device.id());
    set("portcullis-groups", &groups.join(","));
    if let Some(jwt) = jwt {
        set("portcullis-jwt-assertion", jwt);
    }
    // The relay is the edge: what a client claims about forwarding is not trusted.
    set("x-forwarded-for", &info.peer.ip().to_string());
    set("x-forwarded-proto", "https");
    set("x-forwarded-host", host.as_str());
    Ok(Request::from_parts(parts, body))
}

/// Counts response bytes and writes the access-log line when the body ends or is dropped.
struct LoggedBody {
    inner: RespBody,
    bytes: u64,
    done: Option<(Access, Arc<State>, u16)>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some((access, state, status)) = self.done.take() {
            access.write(&state, status, self.bytes);
        }
    }
}
