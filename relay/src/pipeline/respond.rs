//! Every refusal the request path can give, and the one place each becomes an HTTP
//! response: status, a sentence for the person, and a short reason for the access log.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use crate::conn::RespBody;

/// Why the relay refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestError {
    /// HTTP/1.1 head with both Content-Length and Transfer-Encoding (RFC 9112 §6.1).
    ConflictingLength,
    /// No usable name: Host missing, invalid, or disagreeing with the authority.
    BadHost,
    /// A `Connection` (or `Proxy-Connection`, `Upgrade`) list that is not made of tokens:
    /// a later hop could read it differently, so nothing is forwarded.
    BadHopByHop,
    /// The connection presented no device certificate.
    NoDevice,
    /// The TLS server name is neither the requested name nor the relay's own.
    SniMismatch,
    /// An extended CONNECT `:protocol` other than `websocket`.
    UnsupportedProtocol,
    /// No connector may publish the name.
    UnknownHost,
    /// The device is revoked or unknown to the registry.
    DeviceRevoked,
    /// No policy rule allows this device here.
    Denied,
    /// No connector is online for the name.
    NoConnector,
    /// The device has `max_streams_per_device` requests in flight.
    DeviceLimit,
    /// The connector has `max_streams_per_connector` requests in flight.
    ConnectorLimit,
    /// The connector's tunnel failed before a response came back.
    TunnelFailed,
    /// The request could not be rewritten for the tunnel.
    BadRequest,
    /// `CONNECT` without a `host:port` target.
    BadConnect,
    /// Something on the relay itself failed.
    Internal,
    /// The relay is overloaded (resident memory at `overload_memory`) and takes no new
    /// requests; requests already in flight go on.
    Overloaded,
}

impl RequestError {
    /// The HTTP status the client gets.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::ConflictingLength
            | Self::BadHost
            | Self::BadHopByHop
            | Self::BadRequest
            | Self::BadConnect => StatusCode::BAD_REQUEST,
            Self::NoDevice | Self::DeviceRevoked | Self::Denied => StatusCode::FORBIDDEN,
            Self::SniMismatch => StatusCode::MISDIRECTED_REQUEST,
            Self::UnsupportedProtocol => StatusCode::NOT_IMPLEMENTED,
            Self::UnknownHost => StatusCode::NOT_FOUND,
            Self::NoConnector | Self::TunnelFailed => StatusCode::BAD_GATEWAY,
            Self::DeviceLimit => StatusCode::TOO_MANY_REQUESTS,
            Self::ConnectorLimit | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The access log's `reason` field.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ConflictingLength => "conflicting length",
            Self::BadHost => "bad host",
            Self::BadHopByHop => "malformed connection header",
            Self::NoDevice => "no device certificate",
            Self::SniMismatch => "sni mismatch",
            Self::UnsupportedProtocol => "unsupported protocol",
            Self::UnknownHost => "unknown host",
            Self::DeviceRevoked => "device revoked",
            Self::Denied => "policy",
            Self::NoConnector => "no connector",
            Self::DeviceLimit => "device stream limit",
            Self::ConnectorLimit => "connector stream limit",
            Self::TunnelFailed => "tunnel",
            Self::BadRequest => "bad request",
            Self::BadConnect => "bad connect",
            Self::Internal => "rng",
            Self::Overloaded => "overloaded",
        }
    }

    /// The sentence in the response body.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::ConflictingLength => "conflicting Content-Length and Transfer-Encoding",
            Self::BadHost => "missing, invalid or conflicting Host",
            Self::BadHopByHop => "the Connection or Upgrade header is not a list of tokens",
            Self::NoDevice => "a device certificate from your organisation is required",
            Self::SniMismatch => "the TLS server name does not match the Host header",
            Self::UnsupportedProtocol => "this extended CONNECT protocol is not supported",
            Self::UnknownHost => "not found",
            Self::DeviceRevoked => "this device is not (or no longer) enrolled",
            Self::Denied => {
                "access denied: your organisation's policy does not allow this device here"
            }
            Self::NoConnector => "the service is unavailable: no connector is online for it",
            Self::DeviceLimit => "too many concurrent requests from this device; retry shortly",
            Self::ConnectorLimit => "the service's connector is at capacity; retry shortly",
            Self::TunnelFailed => "the service's connector did not answer",
            Self::BadRequest => "malformed request",
            Self::BadConnect => "CONNECT needs a host:port target",
            Self::Internal => "internal error",
            Self::Overloaded => "the relay is overloaded; retry shortly",
        }
    }

    /// The response the client gets.
    pub(crate) fn response(self) -> Response<RespBody> {
        let mut resp = text(self.status(), self.message());
        if matches!(self, Self::ConflictingLength | Self::BadHopByHop) {
            // The framing of what follows on the connection cannot be trusted.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

pub(crate) use portcullis_shared::tunnel_body::{response as body, text_response as text};

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &str) -> Response<RespBody> {
    body(status, format!("{value}\n"), "application/json")
}

/// An empty body.
pub(crate) fn empty() -> RespBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_client_error_or_gateway_status_and_a_message() {
        use RequestError::*;
        for e in [
            ConflictingLength,
            BadHost,
            BadHopByHop,
            NoDevice,
            SniMismatch,
            UnsupportedProtocol,
            UnknownHost,
            DeviceRevoked,
            Denied,
            NoConnector,
            DeviceLimit,
            ConnectorLimit,
            TunnelFailed,
            BadRequest,
            BadConnect,
            Internal,
            Overloaded,
        ] {
            let resp = e.response();
            assert!(resp.status().is_client_error() || resp.status().is_server_error());
            assert!(!e.message().is_empty() && !e.reason().is_empty());
        }
        assert_eq!(
            ConflictingLength.response().headers()[header::CONNECTION],
            "close"
        );
        assert_eq!(SniMismatch.status(), 421);
        assert_eq!(Denied.status(), 403);
        assert_eq!(Overloaded.status(), 503);
    }
}
