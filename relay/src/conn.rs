//! Plain data the listeners attach to a client connection and its requests, read by the
//! request pipeline: who and where the client is, what the connection has in flight, and
//! the markers a listener puts on a request it parsed. Nothing here does IO.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use portcullis_shared::identity::Identity;
use tokio_util::sync::CancellationToken;

use crate::hardening::idle::Activity;
use crate::identity::registry::LiveGuard;

pub(crate) use portcullis_shared::tunnel_body::BoxError;
/// Request bodies, whatever the listener.
pub(crate) type ReqBody = BoxBody<Bytes, BoxError>;
/// Response bodies, whatever the listener.
pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

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
    pub(crate) live: Option<Arc<LiveGuard>>,
    pub(crate) protocol: &'static str,
    /// What the connection has in flight, for its idle timeout.
    pub(crate) activity: Arc<Activity>,
}

/// Set by the HTTPS listener on an HTTP/1.1 request whose head carried both
/// `Content-Length` and `Transfer-Encoding` (hyper drops the length before the request
/// gets here; see `crate::hardening::h1_framing`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConflictingLength;

/// Set by a listener on an extended CONNECT request (RFC 8441 / RFC 9220): the
/// `:protocol` the client asked for, e.g. `websocket`.
#[derive(Debug, Clone)]
pub(crate) struct ExtendedConnect(pub(crate) String);

/// One `CONNECT host:443` tunnel whose TLS ends at the relay: our end of its byte pipe and
/// the outer connection's identity, handed to the in-memory TLS listener.
pub(crate) type Terminated = (tokio::io::DuplexStream, Arc<ConnInfo>);
