//! The relay's listeners, each owning its sockets and connection lifecycle and handing
//! requests to [`crate::pipeline`]: HTTPS (HTTP/1.1 and HTTP/2 over TLS/TCP), QUIC
//! (dispatching tunnels, HTTP/3 and enrolment, see [`enroll`]), the in-memory TLS listener for CONNECT
//! tunnels whose TLS ends at the relay, and the admin HTTP listener.

pub(crate) mod admin_http;
pub(crate) mod enroll;
pub(crate) mod http3;
pub(crate) mod https;
pub(crate) mod quic;
pub(crate) mod terminate;
pub(crate) mod tunnel;

/// When the certificate the peer presented expires (Unix seconds); 0, so that the
/// connection is cut at once, if there is none to read.
pub(crate) fn peer_not_after(transport: &dyn portcullis_shared::transport::Transport) -> i64 {
    transport
        .peer_certificates()
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| portcullis_shared::pki::inspect(c).ok())
        })
        .map_or(0, |info| info.not_after)
}
