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
