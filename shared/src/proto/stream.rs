//! The header the relay writes at the start of each tunnel stream:
//! `[version u8][kind u8][hostname length u8][hostname]`, then the exchange itself.

use super::{DecodeError, VERSION};

/// What the rest of the stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// One HTTP/1.1 request and response.
    Http = 1,
}

/// The per-stream header: which kind of exchange, for which published hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The exchange that follows.
    pub kind: StreamKind,
    /// The hostname the client asked for; the connector picks its ingress rule by it.
    pub hostname: String,
}

impl StreamHeader {
    /// Largest possible encoded header, so a reader can bound its buffer.
    pub const MAX_LEN: usize = 3 + 255;

    /// Encodes the header. Hostnames are at most 253 bytes, so this cannot overflow.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.hostname.as_bytes();
        let len = name.len().min(255);
        let mut out = Vec::with_capacity(3 + len);
        out.extend_from_slice(&[VERSION, self.kind as u8, len as u8]);
        out.extend_from_slice(&name[..len]);
        out
    }

    /// Given the first three bytes, how many hostname bytes follow.
    pub fn body_len(prefix: [u8; 3]) -> Result<usize, DecodeError> {
        if prefix[0] != VERSION {
            return Err(DecodeError::Version(prefix[0]));
        }
        if prefix[1] != StreamKind::Http as u8 {
            return Err(DecodeError::UnknownType(prefix[1]));
        }
        Ok(prefix[2] as usize)
    }

    /// Decodes a whole header (prefix and hostname).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let prefix: [u8; 3] = bytes
            .get(..3)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| DecodeError::Malformed("short stream header".into()))?;
        let len = Self::body_len(prefix)?;
        let name = bytes
            .get(3..3 + len)
            .ok_or_else(|| DecodeError::Malformed("short stream header".into()))?;
        if bytes.len() != 3 + len {
            return Err(DecodeError::Malformed(
                "trailing bytes in stream header".into(),
            ));
        }
        let hostname = std::str::from_utf8(name)
            .map_err(|_| DecodeError::Malformed("hostname is not UTF-8".into()))?
            .to_owned();
        Ok(Self {
            kind: StreamKind::Http,
            hostname,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = StreamHeader {
            kind: StreamKind::Http,
            hostname: "grafana.internal".into(),
        };
        assert_eq!(StreamHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(StreamHeader::decode(&[]).is_err());
        assert_eq!(
            StreamHeader::decode(&[2, 1, 0]),
            Err(DecodeError::Version(2))
        );
        assert_eq!(
            StreamHeader::decode(&[1, 9, 0]),
            Err(DecodeError::UnknownType(9))
        );
        assert!(StreamHeader::decode(&[1, 1, 5, b'a']).is_err());
        assert!(StreamHeader::decode(&[1, 1, 1, 0xff]).is_err());
        assert!(StreamHeader::decode(&[1, 1, 1, b'a', b'b']).is_err());
    }
}
