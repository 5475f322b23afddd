//! The tunnel wire format between relay and connector, without IO.
//!
//! One QUIC connection per connector and relay, opened by the connector with ALPN
//! [`TUNNEL_ALPN`]. Its first bidirectional stream, opened by the connector, is the
//! *control stream*, carrying [`ControlFrame`]s. Every other bidirectional stream is opened
//! by the relay for one exchange: a [`StreamHeader`] followed by one HTTP/1.1 exchange
//! (hyper on both ends). See `docs/protocol.md`.
//!
//! This module only turns bytes into values and back; the binaries own the sockets.

mod control;
mod stream;
mod trailers;

pub use control::{ControlFrame, FrameDecoder, Rejection, encode_frame};
pub use stream::{StreamHeader, StreamKind};
pub use trailers::{MAX_TRAILERS_LEN, TRAILERS_FIELD, decode_trailers, encode_trailers};

/// ALPN protocol id a connector offers on its QUIC connection to the relay. The `1` is the
/// tunnel protocol version; a relay that does not speak it fails the handshake.
pub const TUNNEL_ALPN: &[u8] = b"portcullis-tunnel/1";

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
