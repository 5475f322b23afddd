//! Turning the client's request into the one sent down the tunnel: origin-form HTTP/1.1,
//! hop-by-hop headers removed, client claims about identity stripped and the relay's own
//! added. Functions over `http` types without IO (a WebSocket key is the one random
//! value drawn).

use std::net::SocketAddr;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use portcullis_shared::identity::{Hostname, Identity};
use portcullis_shared::proto::TRAILERS_FIELD;
use portcullis_shared::trace::{TRACEPARENT, TraceContext};
use portcullis_shared::tunnel_body::{Fold, TunnelBody};
use portcullis_shared::{assertion, hop_by_hop};

use super::access::REQUEST_ID;
use super::respond::{RequestError, empty};
use crate::conn::ReqBody;

/// Headers in which clients or proxies state the client's address; a client could forge
/// any of them, so they are removed (compared with `_` read as `-`), as is every
/// `x-forwarded-*` and `portcullis-*` header, before the relay sets its own.
const CLIENT_ADDRESS: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-forwarded-for",
];

/// Whether `name` is a client's claim about who or where it is: `portcullis-*`,
/// `x-forwarded-*` or a client-address header, in either spelling (some origin
/// frameworks, CGI, WSGI, Rack and PHP among them, read `x_forwarded_for` as
/// `x-forwarded-for`).
fn is_spoofable(name: &HeaderName) -> bool {
    let name = name.as_str().replace('_', "-");
    name.starts_with("portcullis-")
        || name.starts_with("x-forwarded-")
        || CLIENT_ADDRESS.contains(&name.as_str())
}

/// Who the caller is, as the relay tells the origin.
pub(crate) struct Caller<'a> {
    pub(crate) device: &'a Identity,
    pub(crate) user: &'a str,
    pub(crate) groups: &'a [String],
    pub(crate) jwt: Option<&'a str>,
    pub(crate) peer: SocketAddr,
    /// The relay's span of this request's trace: the origin's `traceparent` parent, and
    /// its id the `x-request-id`.
    pub(crate) trace: &'a TraceContext,
}

/// Removes every hop-by-hop header (see [`hop_by_hop::strip`]); with `websocket`, the
/// request keeps exactly `Connection: upgrade` and `Upgrade: websocket`.
pub(crate) fn strip_hop_by_hop(
    headers: &mut HeaderMap,
    websocket: bool,
) -> Result<(), RequestError> {
    hop_by_hop::strip(headers, websocket).map_err(|_| RequestError::BadHopByHop)
}

/// Removes client claims about identity, then adds the relay's own.
fn set_identity(headers: &mut HeaderMap, host: &Hostname, id: &Caller<'_>) {
    assertion::remove_where(headers, is_spoofable);
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
    // The trace goes on with the relay's span; the request id is the relay's, never a
    // client's claim.
    set(TRACEPARENT, &id.trace.header());
    if let Ok(v) = HeaderValue::from_str(&id.trace.span_id()) {
        headers.insert(REQUEST_ID, v);
    }
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
pub(crate) fn rewrite_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
    upgrade: bool,
) -> Result<Request<ReqBody>, RequestError> {
    let bad = |_| RequestError::BadRequest;
    let (mut parts, body) = req.into_parts();
    let host_header = match client_port(&parts) {
        Some(p) => HeaderValue::from_str(&format!("{host}:{p}")),
        None => HeaderValue::from_str(host.as_str()),
    }
    .map_err(bad)?;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| RequestError::BadRequest)?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade)?;
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
pub(crate) fn connect_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
) -> Result<Request<ReqBody>, RequestError> {
    let bad = RequestError::BadConnect;
    let port = req.uri().port_u16().ok_or(bad)?;
    let target = format!("{host}:{port}");
    let mut out = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .version(Version::HTTP_11)
        .header(header::HOST, target.as_str())
        .body(empty())
        .map_err(|_| bad)?;
    set_identity(out.headers_mut(), host, id);
    drop(req);
    Ok(out)
}

/// Extended CONNECT for WebSocket (HTTP/2, HTTP/3) becomes an HTTP/1.1 upgrade on the
/// tunnel: same path and WebSocket headers, plus the handshake key HTTP/1.1 needs.
pub(crate) fn websocket_request(
    req: Request<ReqBody>,
    host: &Hostname,
    id: &Caller<'_>,
) -> Result<Request<ReqBody>, RequestError> {
    let (mut parts, body) = req.into_parts();
    parts.method = Method::GET;
    let mut key = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| RequestError::Internal)?;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut out = rewrite_request(Request::from_parts(parts, body), host, id, false)?;
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

#[cfg(test)]
mod tests {
    use portcullis_shared::identity::Role;

    use super::*;

    #[test]
    fn forwarding_and_client_address_claims_are_stripped_in_every_spelling() {
        let device = Identity::new(Role::Device, "alice_laptop").unwrap();
        let trace = TraceContext::root();
        let caller = Caller {
            device: &device,
            user: "alice",
            groups: &["eng".to_owned()],
            jwt: None,
            peer: "192.0.2.7:5555".parse().unwrap(),
            trace: &trace,
        };
        let mut headers = HeaderMap::new();
        let forged = [
            "x-forwarded-for",
            "X_Forwarded_For",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x_forwarded_port",
            "x-forwarded-prefix",
            "x-forwarded-server",
            "forwarded",
            "true-client-ip",
            "true_client_ip",
            "x-real-ip",
            "x_real_ip",
            "x-client-ip",
            "cf-connecting-ip",
            "cf_connecting_ip",
            "x-cluster-client-ip",
            "portcullis-user",
            "portcullis_groups",
        ];
        for name in forged {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("10.9.9.9"),
            );
        }
        // A client's request id and trace are claims too: the relay's replace them.
        headers.insert("x-request-id", HeaderValue::from_static("forged"));
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let host = Hostname::parse("app.internal").unwrap();
        set_identity(&mut headers, &host, &caller);

        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "portcullis-device",
                "portcullis-groups",
                "portcullis-user",
                "traceparent",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-request-id",
            ]
        );
        // One value each, the relay's own.
        let one = |n: &str| {
            let all: Vec<_> = headers.get_all(n).iter().collect();
            assert_eq!(all.len(), 1, "{n}: {all:?}");
            all[0].to_str().unwrap().to_owned()
        };
        assert_eq!(one("x-forwarded-for"), "192.0.2.7");
        assert_eq!(one("x-forwarded-host"), "app.internal");
        assert_eq!(one("x-forwarded-proto"), "https");
        assert_eq!(one("portcullis-user"), "alice");
        assert_eq!(one("portcullis-groups"), "eng");
        assert_eq!(one("x-request-id"), trace.span_id());
        assert_eq!(one("traceparent"), trace.header());
    }
}
