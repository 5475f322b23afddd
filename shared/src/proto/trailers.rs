//! Trailers across the HTTP/1.1 tunnel hop. HTTP/1.1 chunked encoding can carry trailers,
//! but a sender must declare their names up front (`Trailer:`), and a proxy cannot know
//! an origin's trailer names (gRPC's `grpc-status`, or anything else) before they arrive.
//! So on the tunnel, all trailers travel as one declared field, [`TRAILERS_FIELD`], whose
//! value is the base64 of `name NUL value NUL ...`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;

use super::DecodeError;

/// The single trailer field that carries all trailers on a tunnel stream.
pub const TRAILERS_FIELD: &str = "portcullis-trailers";

/// Largest encoded trailer section accepted, in bytes.
pub const MAX_TRAILERS_LEN: usize = 64 * 1024;

/// Encodes trailer fields (name, value) into the value of [`TRAILERS_FIELD`].
pub fn encode_trailers<'a>(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut raw = Vec::new();
    for (name, value) in fields {
        raw.extend_from_slice(name.as_bytes());
        raw.push(0);
        raw.extend_from_slice(value);
        raw.push(0);
    }
    B64.encode(raw)
}

/// Decodes the value of [`TRAILERS_FIELD`]. Names and values must not contain NUL (HTTP
/// forbids it), names must be non-empty.
pub fn decode_trailers(value: &[u8]) -> Result<Vec<(String, Vec<u8>)>, DecodeError> {
    if value.len() > MAX_TRAILERS_LEN {
        return Err(DecodeError::TooLong {
            len: value.len(),
            max: MAX_TRAILERS_LEN,
        });
    }
    let raw = B64
        .decode(value)
        .map_err(|e| DecodeError::Malformed(format!("trailers: {e}")))?;
    let mut parts = raw.split(|b| *b == 0);
    let mut out = Vec::new();
    while let Some(name) = parts.next() {
        if name.is_empty() {
            // The encoding ends with NUL, so the last split is empty.
            if parts.next().is_none() {
                break;
            }
            return Err(DecodeError::Malformed("trailers: empty field name".into()));
        }
        let value = parts
            .next()
            .ok_or_else(|| DecodeError::Malformed("trailers: name without value".into()))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| DecodeError::Malformed("trailers: name is not UTF-8".into()))?;
        out.push((name.to_owned(), value.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_round_trip() {
        let fields: Vec<(&str, &[u8])> = vec![
            ("grpc-status", b"0"),
            ("grpc-message", b""),
            ("x-bin", &[0xff, 0x80, b' ']),
        ];
        let enc = encode_trailers(fields.iter().copied());
        let dec = decode_trailers(enc.as_bytes()).unwrap();
        let back: Vec<(&str, &[u8])> = dec
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(back, fields);
        assert_eq!(
            decode_trailers(encode_trailers([]).as_bytes()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn malformed_trailers_are_errors() {
        assert!(decode_trailers(b"!!!").is_err());
        assert!(decode_trailers(B64.encode(b"name-without-value").as_bytes()).is_err());
        assert!(decode_trailers(B64.encode(b"\0v\0").as_bytes()).is_err());
        assert!(decode_trailers(&vec![b'A'; MAX_TRAILERS_LEN + 1]).is_err());
    }
}
