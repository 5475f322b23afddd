//! The request path shared by every client listener (HTTPS and HTTP/3): authenticate,
//! route by Host, check SNI, apply policy and limits, add identity headers, and carry the
//! exchange down a connector's tunnel as HTTP/1.1 on a fresh QUIC stream.
//!
//! Plain requests stream both bodies through. `CONNECT` (raw TCP), HTTP/1.1 `Upgrade` and
//! extended `CONNECT` (WebSocket over HTTP/2 and HTTP/3) end with a [`Tunnel`] in the
//! response's extensions: the listener joins the client's side to it once the response is
//! sent, since only it knows how its own stream is upgraded.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use portcullis_shared::identity::{Hostname, Identity};
use portcullis_shared::policy::{self, Subject};
use portcullis_shared::proto::TRAILERS_FIELD;
use portcullis_shared::tunnel_body::{Fold, TunnelBody};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::access_log::Entry;
use crate::admin::now;
use crate::jwt::Claims;
use crate::server::State;

pub(crate) use portcullis_shared::tunnel_body::BoxError;
/// Request bodies, whatever the listener.
pub(crate) type ReqBody = BoxBody<Bytes, BoxError>;
/// Response bodies, whatever the listener.
pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

const JWKS_PATH: &str = "/.well-known/jwks.json";
/// On the relay's own name: the published names this device may reach (JSON), for the
/// agent's split tunnel, PAC file and DNS stub.
const SERVICES_PATH: &str = "/.well-known/portcullis/services";

fn services(state: &State, device: &Identity) -> Response<RespBody> {
    let snapshot = state.registry.snapshot();
    let Some(record) = snapshot.active(device) else {
        return text(
            StatusCode::FORBIDDEN,
            "this device is not (or no longer) enrolled",
        );
    };
    let user = record.user.clone().unwrap_or_default();
    let subject = Subject {
        device: device.id(),
        user: &user,
        groups: &record.groups,
    };
    let rules = state.policy();
    let mut names: Vec<String> = snapshot
        .records()
        .filter(|r| r.identity.role() == portcullis_shared::identity::Role::Connector)
        .filter(|r| r.revoked_at.is_none())
        .flat_map(|r| r.hostnames.iter())
        .filter(|p| policy::allows_pattern(&rules, p, subject))
        .map(ToString::to_string)
        .collect();
    names.sort();
    names.dedup();
    let body = serde_json::json!({
        "device": device.id(),
        "user": user,
        "groups": record.groups,
        "not_after": record.not_after,
        "services": names,
    });
    let mut resp = text(StatusCode::OK, &body.to_string());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

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
    "expect",
];

/// What the relay knows about the client of one connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) sni: Option<String>,
    pub(crate) device: Option<Identity>,
    /// Cancelled when the device is revoked; tunnels watch it.
    pub(crate) revoked: CancellationToken,
    /// Keeps the device registered as live for as long as the connection or any tunnel
    /// opened on it exists (an HTTP/1.1 upgrade outlives hyper's connection future).
    pub(crate) live: Option<Arc<crate::registry::LiveGuard>>,
    pub(crate) protocol: &'static str,
    /// What the connection has in flight, for its idle timeout.
    pub(crate) activity: Arc<crate::idle::Activity>,
}

/// Set by the HTTPS listener on an HTTP/1.1 request whose head carried both
/// `Content-Length` and `Transfer-Encoding` (hyper drops the length before the request
/// gets here; see `crate::h1_framing`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConflictingLength;

/// Set by a listener on an extended CONNECT request (RFC 8441 / RFC 9220): the
/// `:protocol` the client asked for, e.g. `websocket`.
#[derive(Debug, Clone)]
pub(crate) struct ExtendedConnect(pub(crate) String);

/// In the extensions of a response that opens a tunnel: the connector side's upgraded
/// stream, and what must live as long as the tunnel does.
#[derive(Clone)]
pub(crate) struct Tunnel(Arc<Mutex<Option<TunnelParts>>>);

pub(crate) struct TunnelParts {
    pub(crate) upstream: Upstream,
    pub(crate) permits: Vec<OwnedSemaphorePermit>,
    pub(crate) revoked: CancellationToken,
    pub(crate) live: Option<Arc<crate::registry::LiveGuard>>,
}

/// Where a tunnel's bytes go.
pub(crate) enum Upstream {
    /// The connector's upgraded stream (raw TCP, WebSocket).
    Connector(OnUpgrade),
    /// `CONNECT host:443` to a published web service: TLS ends here, at the relay, with
    /// the org-CA leaf for `host`, and the requests inside are served like direct HTTPS
    /// requests under the outer connection's device identity (the agent's HTTPS proxying).
    TerminateTls(Arc<State>, Arc<ConnInfo>),
}

impl Tunnel {
    pub(crate) fn take(&self) -> Option<TunnelParts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A byte stream to join a client to.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Upstream {
    /// The stream to copy the client's bytes to.
    pub(crate) async fn open(self) -> Option<Box<dyn Io>> {
        match self {
            Self::Connector(upgrade) => match upgrade.await {
                Ok(u) => Some(Box::new(TokioIo::new(u))),
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel upgrade failed");
                    None
                }
            },
            Self::TerminateTls(state, info) => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                // Handed to the long-lived task that serves these (see `https::terminator`),
                // which keeps the request path free of a recursive future type.
                state.terminator.send((ours, info)).ok()?;
                Some(Box::new(theirs))
            }
        }
    }
}

impl TunnelParts {
    /// Copies bytes both ways between the client's upgraded stream and the upstream,
    /// honouring half-close, until both directions end or the device is revoked.
    pub(crate) async fn join_with<C>(self, mut client: C)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let Some(mut upstream) = self.upstream.open().await else {
            return;
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
            }
            () = self.revoked.cancelled() => tracing::info!("closing a revoked device's tunnel"),
        }
        drop(self.permits);
        drop(self.live);
    }
}

/// Joins a hyper-upgraded client stream (HTTP/1.1 upgrade, HTTP/2 CONNECT) to a tunnel.
pub(crate) async fn join_hyper(client: OnUpgrade, tunnel: TunnelParts) {
    match client.await {
        Ok(c) => tunnel.join_with(TokioIo::new(c)).await,
        Err(e) => tracing::debug!(error = %e, "client upgrade failed"),
    }
}

pub(crate) fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
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

/// The name the request is for: the URI's authority (`:authority` in HTTP/2 and HTTP/3,
/// absolute-form in HTTP/1.1) or else `Host`, port removed. `None` when it is missing,
/// malformed, or when an authority and a `Host` header disagree (a smuggling attempt: the
/// origin might route by the one that was not checked).
fn request_host(req: &Request<ReqBody>) -> Option<String> {
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
    permits: Vec<OwnedSemaphorePermit>,
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

/// Counts requests a client abandoned (reset) before their response finished. A client that
/// abandons more than [`ResetFlood::LIMIT`] in [`ResetFlood::WINDOW`] is flooding (the
/// HTTP/2 "rapid reset" attack, CVE-2023-44487, and its HTTP/3 twin): the listener closes
/// its connection.
#[derive(Debug, Default)]
pub(crate) struct ResetFlood {
    window: Mutex<Option<(Instant, u32)>>,
    pub(crate) tripped: CancellationToken,
}

impl ResetFlood {
    const LIMIT: u32 = 100;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    fn abandoned(&self) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (start, count) = w.get_or_insert((now, 0));
        if now.duration_since(*start) > Self::WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count > Self::LIMIT && !self.tripped.is_cancelled() {
            tracing::warn!(
                abandoned = *count,
                "client is flooding request resets: closing its connection"
            );
            self.tripped.cancel();
        }
    }

    /// A guard to hold while a request is served; dropping it unfinished counts a reset.
    pub(crate) fn guard(self: &Arc<Self>) -> ResetGuard {
        ResetGuard {
            flood: self.clone(),
            finished: false,
        }
    }
}

pub(crate) struct ResetGuard {
    flood: Arc<ResetFlood>,
    finished: bool,
}

impl ResetGuard {
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for ResetGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.flood.abandoned();
        }
    }
}

/// Handles one request from any listener.
pub(crate) async fn handle(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    req: Request<ReqBody>,
) -> Response<RespBody> {
    let path =
        if req.method() == Method::CONNECT && req.extensions().get::<ExtendedConnect>().is_none() {
            req.uri()
                .authority()
                .map_or_else(String::new, |a| a.to_string())
        } else {
            req.uri().path().to_owned()
        };
    let mut access = Access {
        start: Instant::now(),
        client: info.peer,
        device: info.device.as_ref().map(|d| d.id().to_owned()),
        user: None,
        hostname: request_host(&req).unwrap_or_default(),
        method: req.method().to_string(),
        path,
        protocol: info.protocol,
        reason: None,
        // The connection stays busy for as long as this request, its response body or its
        // tunnel holds the permits.
        permits: info.activity.begin().into_iter().collect(),
    };
    // RFC 9112 §6.1: a request with both is a smuggling vector; refuse it and close. Only
    // HTTP/1.1 can carry both (HTTP/2 and HTTP/3 refuse Transfer-Encoding as malformed),
    // and hyper drops the Content-Length, so the listener marks such requests.
    if req.extensions().get::<ConflictingLength>().is_some() {
        access.reason = Some("conflicting length");
        let mut resp = text(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding",
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        access.write(&state, 400, 0);
        return resp;
    }
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

/// What kind of exchange the client asked for.
enum Kind {
    Plain,
    /// `CONNECT host:port`: raw TCP to a `tcp://` service.
    Connect,
    /// HTTP/1.1 `Upgrade` (WebSocket): passed through as is.
    Upgrade,
    /// Extended CONNECT with `:protocol` websocket: becomes an HTTP/1.1 upgrade on the
    /// tunnel, and a 200 to the client.
    WebSocketConnect,
}

fn kind(req: &Request<ReqBody>) -> Result<Kind, Refusal> {
    if req.method() == Method::CONNECT {
        return match req.extensions().get::<ExtendedConnect>() {
            None => Ok(Kind::Connect),
            Some(p) if p.0.eq_ignore_ascii_case("websocket") => Ok(Kind::WebSocketConnect),
            Some(_) => Err((
                StatusCode::NOT_IMPLEMENTED,
                "unsupported protocol",
                "this extended CONNECT protocol is not supported",
            )),
        };
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade && req.headers().contains_key(header::UPGRADE) {
        Ok(Kind::Upgrade)
    } else {
        Ok(Kind::Plain)
    }
}

fn acquire(
    state: &State,
    device: &Identity,
    connector: &crate::tunnel::ConnectorHandle,
) -> Result<Vec<OwnedSemaphorePermit>, Refusal> {
    let device_permit = state
        .device_slots(device.id())
        .try_acquire_owned()
        .map_err(|_| {
            (
                StatusCode::TOO_MANY_REQUESTS,
                "device stream limit",
                "too many concurrent requests from this device; retry shortly",
            )
        })?;
    let connector_permit = connector.slots.clone().try_acquire_owned().map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "connector stream limit",
            "the service's connector is at capacity; retry shortly",
        )
    })?;
    Ok(vec![device_permit, connector_permit])
}

async fn route(
    state: &Arc<State>,
    info: &ConnInfo,
    req: Request<ReqBody>,
    access: &mut Access,
) -> Result<Response<RespBody>, Refusal> {
    let host = Hostname::parse(&access.hostname).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "bad host",
            "missing, invalid or conflicting Host",
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
    if host == state.config.server_name && req.uri().path() == SERVICES_PATH {
        return Ok(services(state, device));
    }
    // The TLS name must be the requested one, or the relay's own name (a client that
    // connected to "the relay" may reach any name it is allowed on that one connection).
    let sni_ok = info
        .sni
        .as_deref()
        .and_then(|s| Hostname::parse(s).ok())
        .is_some_and(|s| s == host || s == state.config.server_name);
    if !sni_ok {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            "sni mismatch",
            "the TLS server name does not match the Host header",
        ));
    }
    let kind = kind(&req)?;
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
    if !policy::evaluate(&state.policy(), &host, subject).is_allowed() {
        state.metrics.denied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(device.id = device.id(), hostname = %host, "denied by policy");
        return Err((
            StatusCode::FORBIDDEN,
            "policy",
            "access denied: your organisation's policy does not allow this device here",
        ));
    }
    let no_connector = (
        StatusCode::BAD_GATEWAY,
        "no connector",
        "the service is unavailable: no connector is online for it",
    );
    // Pick a connector and open the stream; a connection that turns out to be gone (a
    // connector that just exited) is dropped from routing and the next one is tried,
    // which is safe because nothing of the request has been sent yet.
    let mut attempts = 0;
    let (connector, io) = loop {
        let connector = state.router.pick(&host).ok_or(no_connector)?;
        let slots = acquire(state, device, &connector)?;
        match connector.open_http(&host).await {
            Ok(io) => {
                access.permits.extend(slots);
                break (connector, io);
            }
            Err(e) if attempts < 2 => {
                attempts += 1;
                tracing::info!(connector.name = %connector.name, error = %format!("{e:#}"), "connector gone; trying another");
                connector.retire();
            }
            Err(e) => {
                tracing::info!(connector.name = %connector.name, error = %format!("{e:#}"), "tunnel stream failed");
                return Err((
                    StatusCode::BAD_GATEWAY,
                    "tunnel",
                    "the service's connector did not answer",
                ));
            }
        }
    };

    let jwt = state.jwt.token(&Claims {
        user: &user,
        device: device.id(),
        groups: &record.groups,
        hostname: host.as_str(),
        now: now(),
    });
    let identity = Caller {
        device,
        user: &user,
        groups: &record.groups,
        jwt: jwt.as_deref(),
        peer: info.peer,
    };
    let upgrade_protocol = req.headers().get(header::UPGRADE).cloned();
    let connect_port = req.uri().port_u16();
    let outgoing = match kind {
        Kind::Connect => connect_request(req, &host, &identity)?,
        Kind::WebSocketConnect => websocket_request(req, &host, &identity)?,
        Kind::Plain | Kind::Upgrade => {
            rewrite_request(req, &host, &identity, matches!(kind, Kind::Upgrade))
                .map_err(|_| (StatusCode::BAD_REQUEST, "bad request", "malformed request"))?
        }
    };

    let tunnel_failed = |e: &dyn std::fmt::Display| {
        tracing::info!(connector.name = %connector.name, error = %e, "tunnel stream failed");
        (
            StatusCode::BAD_GATEWAY,
            "tunnel",
            "the service's connector did not answer",
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ReqBody>(TokioIo::new(io))
        .await
        .map_err(|e| tunnel_failed(&e))?;
    let metrics = state.metrics.clone();
    metrics.tunnel_streams.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel stream ended with an error");
        }
        metrics.tunnel_streams.fetch_sub(1, Ordering::Relaxed);
    });
    let mut resp = sender
        .send_request(outgoing)
        .await
        .map_err(|e| tunnel_failed(&e))?;

    if matches!(kind, Kind::Connect)
        && connect_port == Some(443)
        && resp.status() == StatusCode::NOT_FOUND
    {
        // No TCP service on 443 under this name, but a web service: terminate TLS here.
        let mut permits = std::mem::take(&mut access.permits);
        // Keep the device's slot; the connector that answered 404 (its slot was acquired
        // last) is not used.
        permits.pop();
        let parts = TunnelParts {
            upstream: Upstream::TerminateTls(state.clone(), Arc::new(info.clone())),
            permits,
            revoked: info.revoked.clone(),
            live: info.live.clone(),
        };
        let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        resp.extensions_mut()
            .insert(Tunnel(Arc::new(Mutex::new(Some(parts)))));
        return Ok(resp);
    }
    let opened = match kind {
        Kind::Connect => resp.status().is_success(),
        Kind::Upgrade | Kind::WebSocketConnect => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
        Kind::Plain => false,
    };
    if opened {
        let parts = TunnelParts {
            upstream: Upstream::Connector(hyper::upgrade::on(&mut resp)),
            permits: std::mem::take(&mut access.permits),
            revoked: info.revoked.clone(),
            live: info.live.clone(),
        };
        let (mut head, _) = resp.into_parts();
        if matches!(kind, Kind::WebSocketConnect) {
            // RFC 8441: the 101 of HTTP/1.1 becomes a 200 on the extended CONNECT stream.
            head.status = StatusCode::OK;
            for h in ["upgrade", "connection", "sec-websocket-accept"] {
                head.headers.remove(h);
            }
        } else if matches!(kind, Kind::Connect) {
            head.headers.clear();
        } else {
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(proto) = &upgrade_protocol {
                head.headers.insert(header::UPGRADE, proto.clone());
            }
        }
        head.extensions
            .insert(Tunnel(Arc::new(Mutex::new(Some(parts)))));
        return Ok(Response::from_parts(
            head,
            Empty::new().map_err(|never| match never {}).boxed(),
        ));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let body = TunnelBody::new(body, Fold::Unfold);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

struct Caller<'a> {
    device: &'a Identity,
    user: &'a str,
    groups: &'a [String],
    jwt: Option<&'a str>,
    peer: SocketAddr,
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|h| !(keep_upgrade && h == header::UPGRADE))
        .collect();
    for h in HOP_BY_HOP {
        if keep_upgrade && (*h == "upgrade" || *h == "connection") {
            continue;
        }
        headers.remove(*h);
    }
    for h in named {
        headers.remove(h);
    }
}

/// Removes client claims about identity, then adds the relay's own.
fn set_identity(headers: &mut HeaderMap, host: &Hostname, id: &Caller<'_>) {
    // Some origin frameworks (CGI, WSGI, Rack, PHP) read `portcullis_user` as
    // `portcullis-user`, so both spellings are stripped, as are other client claims about
    // who or where the caller is.
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let name = k.as_str().replace('_', "-");
            name.starts_with("portcullis-") || name == "x-real-ip" || name == "forwarded"
        })
        .cloned()
        .collect();
    for k in spoofed {
        headers.remove(k);
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set("portcullis-user", id.user);
    set("portcullis-device", id.device.id());
    set("portcullis-groups", &id.groups.join(","));
    if let Some(jwt) = id.jwt {
        set("portcullis-jwt-assertion", jwt);
    }
    // The relay is the edge: what a client claims about forwarding is not trusted.
    set("x-forwarded-for", &id.peer.ip().to_string());
    set("x-forwarded-proto", "https");
    set("x-forwarded-host", host.as_str());
}

fn client_port(parts: &http::request::Parts) -> Option<u16> {
    parts.uri.port_u16().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .and_then(|a| a.port_u16())
    })
}

/// Turns the client's request into the one sent down the tunnel: origin-form URI,
/// HTTP/1.1, hop-by-hop and client-supplied identity headers removed (upgrade headers kept
/// for an upgrade), identity headers added, `Host` set to the checked name.
fn rewrite_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
    upgrade: bool,
) -> Result<Request<ReqBody>, http::Error> {
    let (mut parts, body) = req.into_parts();
    let host_header = match client_port(&parts) {
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
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.insert(header::HOST, host_header);
    // Our own hop understands trailers (gRPC needs them carried through).
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
    set_identity(&mut parts.headers, host, id);
    if !upgrade && !parts.headers.contains_key(header::CONTENT_LENGTH) && !body.is_end_stream() {
        // A streamed body may end in trailers (gRPC): declare the one tunnel field that
        // carries them, which HTTP/1.1 requires before the body.
        parts
            .headers
            .insert(header::TRAILER, HeaderValue::from_static(TRAILERS_FIELD));
        let body = TunnelBody::new(body, Fold::Fold).boxed();
        return Ok(Request::from_parts(parts, body));
    }
    Ok(Request::from_parts(parts, body))
}

/// `CONNECT host:port` for a raw TCP service; the connector checks the port against its rule.
fn connect_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
) -> Result<Request<ReqBody>, Refusal> {
    let bad = (
        StatusCode::BAD_REQUEST,
        "bad connect",
        "CONNECT needs a host:port target",
    );
    let port = req.uri().port_u16().ok_or(bad)?;
    let target = format!("{host}:{port}");
    let mut out = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .version(Version::HTTP_11)
        .header(header::HOST, target.as_str())
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .map_err(|_| bad)?;
    set_identity(out.headers_mut(), host, id);
    drop(req);
    Ok(out)
}

/// Extended CONNECT for WebSocket (HTTP/2, HTTP/3) becomes an HTTP/1.1 upgrade on the
/// tunnel: same path and WebSocket headers, plus the handshake key HTTP/1.1 needs.
fn websocket_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
) -> Result<Request<ReqBody>, Refusal> {
    let (mut parts, body) = req.into_parts();
    parts.method = Method::GET;
    let mut key = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "rng", "internal error"))?;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut out = rewrite_request(Request::from_parts(parts, body), host, id, false)
        .map_err(|_| (StatusCode::BAD_REQUEST, "bad request", "malformed request"))?;
    let h = out.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    h.entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    h.remove(header::TE);
    Ok(out)
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
