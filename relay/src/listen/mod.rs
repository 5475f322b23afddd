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
