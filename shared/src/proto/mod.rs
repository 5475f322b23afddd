//! The tunnel wire format between relay and connector, without IO.
//!
//! One QUIC connection per connector and relay, opened by the connector with ALPN
//! [`TUNNEL_ALPN`]. Its first bidirectional stream, opened by the connector, is the
//! *control stream*, carrying [`ControlFrame`]s. Every other bidirectional stream is opened
//! by the relay for one exchange: a [`StreamHeader`] followed by one HTTP/1.1 exchange
//! (hyper on both ends). See `docs/protocol.md`.
//!
//! This module turns bytes into values and back, and runs the control stream's session
//! logic ([`RelaySession`], [`ConnectorSession`]) on values and a caller-supplied clock;
//! the binaries own the sockets, the timers and the tasks.

use std::time::Duration;

mod control;
mod session;
mod stream;
mod trailers;

pub use control::{ControlFrame, FrameDecoder, Rejection, encode_frame};
pub use session::{
    ConnectorEvent, ConnectorSession, ConnectorSessionConfig, DRAIN_ACK_TIMEOUT, OpenError,
    REGISTER_TIMEOUT, RelayEvent, RelaySession, RelaySessionConfig,
};
pub use stream::{StreamHeader, StreamKind};
pub use trailers::{MAX_TRAILERS_LEN, TRAILERS_FIELD, decode_trailers, encode_trailers};

/// ALPN protocol id a connector offers on its QUIC connection to the relay. The `1` is the
/// tunnel protocol version; a relay that does not speak it fails the handshake.
pub const TUNNEL_ALPN: &[u8] = b"portcullis-tunnel/1";

/// ALPN protocol id of the same tunnel over TLS on TCP, to the relay's HTTPS port, where
/// UDP is blocked: HTTP/2 with the relay as its client (see [`crate::tcp_transport`]).
pub const TUNNEL_TCP_ALPN: &[u8] = b"portcullis-tunnel-h2/1";

/// ALPN protocol id for enrolment and renewal: one request per QUIC stream, JSON, see
/// [`EnrollRequest`].
pub const ENROLL_ALPN: &[u8] = b"portcullis-enroll/1";

/// Largest enrolment request or response, in bytes.
pub const MAX_ENROLL_LEN: usize = 64 * 1024;

/// A request on the enrolment ALPN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EnrollRequest {
    /// Redeem a token: the CA signs `csr` for the identity the token grants.
    Enroll {
        /// Token id.
        token_id: String,
        /// Token secret.
        secret: String,
        /// PEM certificate signing request (its names, if any, are ignored but must not
        /// conflict).
        csr: String,
        /// For devices: a preferred device id (else one is made from the user's name).
        #[serde(default)]
        name: Option<String>,
    },
    /// Renew the caller's own certificate (the connection presents it) for `csr`'s key.
    Renew {
        /// PEM certificate signing request.
        csr: String,
    },
}

/// The answer to an [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollResponse {
    /// Issued.
    Issued {
        /// `device:<id>` or `connector:<name>`.
        identity: String,
        /// The certificate, PEM.
        cert: String,
        /// The organisation CA, PEM.
        ca: String,
        /// Expiry, Unix seconds.
        not_after: i64,
        /// Connectors: the hostnames they may publish.
        #[serde(default)]
        hostnames: Vec<String>,
    },
    /// Refused, with a sentence for the person.
    Refused {
        /// Why.
        reason: String,
    },
}

/// The version byte at the start of every control frame and stream header.
pub const VERSION: u8 = 1;

/// Largest control frame payload accepted, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Why decoding a frame or header failed. Any of these closes the stream or connection
/// with [`CloseCode::Protocol`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The peer speaks a version of the tunnel protocol this build does not.
    #[error("unsupported tunnel protocol version {0}")]
    Version(u8),
    /// A length field exceeds the maximum for its kind.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame type byte is unknown.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The payload is not valid for its type.
    #[error("malformed frame payload: {0}")]
    Malformed(String),
}

/// How a peer broke the control-stream protocol. The session that detects one closes: it
/// queues a `Close` event carrying the error, and the driver closes the QUIC connection
/// with [`ProtocolError::close_code`] and the error's text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Relay side: the connector's first control frame was not `Register`.
    #[error("expected Register as the first control frame, got {frame}")]
    NotRegister {
        /// The frame that came instead.
        frame: &'static str,
    },
    /// Relay side: the connector did not send `Register` within the register timeout of
    /// its handshake.
    #[error("no registration within {timeout:?}")]
    RegisterTimeout {
        /// The timeout that passed.
        timeout: Duration,
    },
    /// Either side: a frame that the peer may not send in the session's current state: a
    /// second `Register`, anything but `Drain` after it, anything after `Drain`; on the
    /// connector a second `Registered`, or `Drained` that answers no `Drain`.
    #[error("unexpected control frame {frame}")]
    UnexpectedFrame {
        /// The frame that came.
        frame: &'static str,
    },
    /// Either side: the peer finished its control stream when it may not. The connector
    /// keeps it open for the tunnel's life unless it drains (so a tunnel cannot linger
    /// outside revocation's reach); the relay never finishes it.
    #[error("control stream closed")]
    ControlStreamClosed,
    /// Connector side: the relay did not answer `Register` within the register timeout.
    #[error("the relay did not answer the registration within {timeout:?}")]
    RegistrationNotAnswered {
        /// The timeout that passed.
        timeout: Duration,
    },
    /// Connector side: the relay's first frame was not `Registered`.
    #[error("unexpected registration reply {frame}")]
    UnexpectedReply {
        /// The frame that came instead.
        frame: &'static str,
    },
    /// Relay side: `Publish` named a hostname the relay did not accept at registration.
    #[error("Publish names {hostname}, which was not accepted at registration")]
    NotRegistered {
        /// The hostname.
        hostname: String,
    },
    /// Either side: the peer's bytes on the control stream are not a valid frame.
    #[error("control stream: {0}")]
    Decode(#[from] DecodeError),
}

impl ProtocolError {
    /// The QUIC application close code to close the connection with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::NotRegister { .. }
            | Self::RegisterTimeout { .. }
            | Self::UnexpectedFrame { .. }
            | Self::ControlStreamClosed
            | Self::RegistrationNotAnswered { .. }
            | Self::UnexpectedReply { .. }
            | Self::NotRegistered { .. }
            | Self::Decode(_) => CloseCode::Protocol,
        }
    }
}

/// QUIC application close codes used on tunnel connections, and their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close: shutdown or drain finished.
    Normal = 0,
    /// The peer broke the tunnel protocol.
    Protocol = 1,
    /// The peer's certificate has been revoked.
    Revoked = 2,
    /// The peer's certificate is not of the role this endpoint needs.
    WrongRole = 3,
    /// The relay is shutting down.
    Shutdown = 4,
}

impl CloseCode {
    /// The numeric code carried in QUIC `CONNECTION_CLOSE`.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a received code back; unknown codes are `None`.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::Protocol,
            2 => Self::Revoked,
            3 => Self::WrongRole,
            4 => Self::Shutdown,
            _ => return None,
        })
    }
}
