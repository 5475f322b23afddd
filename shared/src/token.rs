//! Enrolment tokens: one string an admin hands to a device or connector, carrying
//! everything it needs to enrol safely: which relay to dial, the relay's TLS name, the
//! SHA-256 of the organisation CA (so a fake relay cannot enrol it), and a one-time secret.
//!
//! Format: `pct1_` followed by base64url (no padding) of JSON. The relay stores only a
//! hash of the secret. Pure: no IO, no clock, no randomness (callers pass the secret).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "pct1_";
/// Longest token accepted, in bytes, before any decoding.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Random bytes in a token id (base64url: [`ID_LEN`] characters).
pub const ID_BYTES: usize = 6;
/// Characters in a token id.
pub const ID_LEN: usize = 8;
/// Random bytes in a token secret (base64url: [`SECRET_LEN`] characters).
pub const SECRET_BYTES: usize = 32;
/// Characters in a token secret.
pub const SECRET_LEN: usize = 43;

fn is_b64url(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `id` has a token id's shape ([`ID_LEN`] base64url characters): the relay
/// checks this before anything else, so nothing else a stranger sends as an id is ever
/// looked up, logged or stored.
pub fn is_token_id(id: &str) -> bool {
    is_b64url(id, ID_LEN)
}

/// Whether `secret` has a token secret's shape ([`SECRET_LEN`] base64url characters).
pub fn is_token_secret(secret: &str) -> bool {
    is_b64url(secret, SECRET_LEN)
}

/// Why a token string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a Portcullis enrolment token (wrong prefix, encoding or fields).
    #[error("this is not a Portcullis enrolment token (it should start with pct1_)")]
    Malformed,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the token is too long")]
    TooLong,
}

/// The decoded content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollToken {
    /// The token's id (public; names it in `token list` and `token revoke`).
    pub id: String,
    /// The one-time secret, base64url.
    pub secret: String,
    /// The relay's QUIC address, `host:port`.
    pub relay: String,
    /// More relays (`host:port`), tried in order when `relay` cannot be reached; left out
    /// of single-relay tokens, so agents that predate it read those as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_relays: Vec<String>,
    /// The relay's TLS name.
    pub server_name: String,
    /// The relays' HTTPS port, for the fallback over TLS on TCP where UDP is blocked;
    /// absent: the QUIC port. Omitted when absent, so older agents read the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// SHA-256 of the organisation CA certificate (DER), lower-case hex.
    pub ca_sha256: String,
}

impl EnrollToken {
    /// Every relay the token names, `relay` first.
    pub fn relays(&self) -> Vec<String> {
        std::iter::once(self.relay.clone())
            .chain(self.more_relays.iter().cloned())
            .collect()
    }

    /// The token as handed to a person.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", B64.encode(json))
    }

    /// Parses a token string (surrounding whitespace ignored).
    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let json = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        let token: Self = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        let hex64 = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        if token.id.is_empty() || token.secret.is_empty() || !hex64(&token.ca_sha256) {
            return Err(TokenError::Malformed);
        }
        Ok(token)
    }
}

/// SHA-256 of `bytes`, lower-case hex: for CA fingerprints and token secret hashes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::pki::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> EnrollToken {
        EnrollToken {
            id: "t1".into(),
            secret: "c2VjcmV0".into(),
            relay: "relay.example.com:4433".into(),
            more_relays: vec![],
            server_name: "relay.example.com".into(),
            tcp_port: None,
            ca_sha256: "a".repeat(64),
        }
    }

    #[test]
    fn tokens_round_trip() {
        let t = token();
        assert_eq!(
            EnrollToken::decode(&format!(" {}\n", t.encode())).unwrap(),
            t
        );
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        assert_eq!(EnrollToken::decode("hello"), Err(TokenError::Malformed));
        assert_eq!(EnrollToken::decode("pct1_!!!"), Err(TokenError::Malformed));
        let mut t = token();
        t.ca_sha256 = "zz".into();
        assert_eq!(EnrollToken::decode(&t.encode()), Err(TokenError::Malformed));
        let long = format!("pct1_{}", "a".repeat(MAX_TOKEN_LEN));
        assert_eq!(EnrollToken::decode(&long), Err(TokenError::TooLong));
    }
}
