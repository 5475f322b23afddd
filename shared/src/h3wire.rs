//! The parts of the HTTP/3 wire format (RFC 9114) and QPACK (RFC 9204) that Portcullis
//! reads itself: QUIC variable-length integers, frame heads, and field sections encoded
//! without the dynamic table.
//!
//! The relay's HTTP/3 guard uses this to look at request header sections before the h3
//! library buffers them; the tests use it to speak HTTP/3 by hand. Nothing here does IO.

use std::ops::Range;

/// The HTTP/3 error codes Portcullis sends (RFC 9114 §8.1), in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum H3Code {
    /// H3_NO_ERROR: an orderly close (idle, revoked, shutdown).
    NoError = 0x100,
    /// H3_INTERNAL_ERROR: the upstream failed mid-response.
    InternalError = 0x102,
    /// H3_FRAME_UNEXPECTED: a frame where it is not allowed.
    FrameUnexpected = 0x105,
    /// H3_FRAME_ERROR: a frame that violates its layout, or a stream that ends inside one.
    FrameError = 0x106,
    /// H3_EXCESSIVE_LOAD: a peer generating excessive load (floods, oversized trailers).
    ExcessiveLoad = 0x107,
    /// H3_MESSAGE_ERROR: a malformed request.
    MessageError = 0x10e,
}

impl H3Code {
    /// The numeric code on the wire.
    pub const fn code(self) -> u64 {
        self as u64
    }
}

/// Frame type of DATA frames.
pub const FRAME_DATA: u64 = 0x0;
/// Frame type of HEADERS frames.
pub const FRAME_HEADERS: u64 = 0x1;
/// Frame type of SETTINGS frames.
pub const FRAME_SETTINGS: u64 = 0x4;

/// Why bytes are not a valid varint, frame head or field section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ends before the item does (more bytes may complete it).
    #[error("truncated")]
    Truncated,
    /// A prefixed integer does not fit in 62 bits.
    #[error("integer overflow")]
    Overflow,
    /// The section refers to the QPACK dynamic table, which Portcullis never enables.
    #[error("reference to the QPACK dynamic table")]
    DynamicReference,
    /// A static-table index beyond the table (RFC 9204 Appendix A has 99 entries).
    #[error("static table index {0} out of range")]
    StaticIndex(u64),
    /// A Huffman-coded string that does not decode (RFC 7541 §5.2).
    #[error("invalid Huffman coding")]
    Huffman,
}

/// Decodes a QUIC variable-length integer (RFC 9000 §16) from the start of `buf`,
/// returning it and its encoded length.
pub fn decode_varint(buf: &[u8]) -> Result<(u64, usize), WireError> {
    let first = *buf.first().ok_or(WireError::Truncated)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len).ok_or(WireError::Truncated)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Ok((v, len))
}

/// Appends `v` (below 2^62) as a QUIC variable-length integer, in its shortest form.
pub fn encode_varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=0x3f => out.push(v as u8),
        0x40..=0x3fff => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// A frame head: type, declared payload length, and the head's own encoded length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Frame type.
    pub ty: u64,
    /// Declared payload length.
    pub len: u64,
    /// Bytes the head itself took.
    pub head_len: usize,
}

/// Decodes a frame head (type and length varints) from the start of `buf`.
pub fn decode_frame_head(buf: &[u8]) -> Result<FrameHead, WireError> {
    let (ty, a) = decode_varint(buf)?;
    let (len, b) = decode_varint(&buf[a..])?;
    Ok(FrameHead {
        ty,
        len,
        head_len: a + b,
    })
}

/// Appends a whole frame: head, then `payload`.
pub fn encode_frame(ty: u64, payload: &[u8], out: &mut Vec<u8>) {
    encode_varint(ty, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// One field line of a decoded section, with where it sits in the encoded block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldLine {
    /// Field name as sent (not lower-cased or checked).
    pub name: Vec<u8>,
    /// Field value as sent.
    pub value: Vec<u8>,
    /// The encoded bytes of this line within the block.
    pub span: Range<usize>,
}

impl FieldLine {
    /// Whether this is a pseudo-header field (its name starts with `:`).
    pub fn is_pseudo(&self) -> bool {
        self.name.first() == Some(&b':')
    }
}

/// Decodes a QPACK encoded field section that uses only the static table and literals,
/// as every section must when the decoder advertised a table capacity of zero (the h3
/// library's and Portcullis's setting). Decoded names and values are capped in total by
/// the caller through the block's length: nothing here allocates more than the Huffman
/// expansion of the input (at most 8/5 of it).
pub fn decode_field_section(block: &[u8]) -> Result<Vec<FieldLine>, WireError> {
    let mut at = 0;
    // Encoded field section prefix (RFC 9204 §4.5.1): Required Insert Count, then the
    // sign bit and Delta Base. Without the dynamic table the count must be zero.
    let (required, n) = decode_prefixed(block, 8)?;
    at += n;
    if required != 0 {
        return Err(WireError::DynamicReference);
    }
    let (_delta_base, n) = decode_prefixed(&block[at..], 7)?;
    at += n;
    let mut fields = Vec::new();
    while at < block.len() {
        let start = at;
        let first = block[at];
        let (name, value) = if first & 0x80 != 0 {
            // Indexed field line: 1 T index(6).
            if first & 0x40 == 0 {
                return Err(WireError::DynamicReference);
            }
            let (index, n) = decode_prefixed(&block[at..], 6)?;
            at += n;
            let (name, value) = static_entry(index)?;
            (name.to_vec(), value.to_vec())
        } else if first & 0x40 != 0 {
            // Literal field line with name reference: 01 N T index(4), then the value.
            if first & 0x10 == 0 {
                return Err(WireError::DynamicReference);
            }
            let (index, n) = decode_prefixed(&block[at..], 4)?;
            at += n;
            let (name, _) = static_entry(index)?;
            let (value, n) = decode_string(&block[at..], 7)?;
            at += n;
            (name.to_vec(), value)
        } else if first & 0x20 != 0 {
            // Literal field line with literal name: 001 N H len(3), name, then the value.
            let (name, n) = decode_string(&block[at..], 3)?;
            at += n;
            let (value, n) = decode_string(&block[at..], 7)?;
            at += n;
            (name, value)
        } else {
            // Post-base forms (0001xxxx and 0000xxxx) address the dynamic table.
            return Err(WireError::DynamicReference);
        };
        fields.push(FieldLine {
            name,
            value,
            span: start..at,
        });
    }
    Ok(fields)
}

/// Encodes a field section without the dynamic table or Huffman coding: the prefix, then
/// each field as a literal with a literal name. Any QPACK decoder accepts it.
pub fn encode_field_section<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = vec![0, 0];
    for (name, value) in fields {
        encode_literal(name, value, &mut out);
    }
    out
}

/// Appends one literal field line with a literal name (RFC 9204 §4.5.6), no Huffman.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    encode_prefixed(name.len() as u64, 3, 0x20, out);
    out.extend_from_slice(name);
    encode_prefixed(value.len() as u64, 7, 0x00, out);
    out.extend_from_slice(value);
}

/// Decodes an integer with an `n`-bit prefix (RFC 7541 §5.1), returning it and the bytes
/// it took.
fn decode_prefixed(buf: &[u8], n: u32) -> Result<(u64, usize), WireError> {
    let mask = (1u16 << n) as u64 - 1;
    let first = *buf.first().ok_or(WireError::Truncated)?;
    let mut v = u64::from(first) & mask;
    if v < mask {
        return Ok((v, 1));
    }
    let mut shift = 0u32;
    for (i, b) in buf.iter().enumerate().skip(1) {
        let add = u64::from(b & 0x7f)
            .checked_shl(shift)
            .filter(|a| a >> shift == u64::from(b & 0x7f))
            .ok_or(WireError::Overflow)?;
        v = v.checked_add(add).ok_or(WireError::Overflow)?;
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
        shift += 7;
        if shift > 62 {
            return Err(WireError::Overflow);
        }
    }
    Err(WireError::Truncated)
}

/// Appends `v` with an `n`-bit prefix, OR-ing `flags` into the first byte.
fn encode_prefixed(v: u64, n: u32, flags: u8, out: &mut Vec<u8>) {
    let mask = (1u64 << n) - 1;
    if v < mask {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = v - mask;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Decodes a string literal whose Huffman flag sits just above an `n`-bit length prefix.
fn decode_string(buf: &[u8], n: u32) -> Result<(Vec<u8>, usize), WireError> {
    let first = *buf.first().ok_or(WireError::Truncated)?;
    let huffman = first & (1 << n) != 0;
    let (len, at) = decode_prefixed(buf, n)?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| at.checked_add(l))
        .ok_or(WireError::Truncated)?;
    let raw = buf.get(at..end).ok_or(WireError::Truncated)?;
    let s = if huffman {
        let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
        httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FourBits)
            .map_err(|_| WireError::Huffman)?;
        out
    } else {
        raw.to_vec()
    };
    Ok((s, end))
}

fn static_entry(index: u64) -> Result<(&'static [u8], &'static [u8]), WireError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| STATIC_TABLE.get(i))
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .ok_or(WireError::StaticIndex(index))
}

/// The QPACK static table (RFC 9204 Appendix A).
const STATIC_TABLE: [(&str, &str); 99] = [
    (":authority", ""),
    (":path", "/"),
    ("age", "0"),
    ("content-disposition", ""),
    ("content-length", "0"),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("referer", ""),
    ("set-cookie", ""),
    (":method", "CONNECT"),
    (":method", "DELETE"),
    (":method", "GET"),
    (":method", "HEAD"),
    (":method", "OPTIONS"),
    (":method", "POST"),
    (":method", "PUT"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "103"),
    (":status", "200"),
    (":status", "304"),
    (":status", "404"),
    (":status", "503"),
    ("accept", "*/*"),
    ("accept", "application/dns-message"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-ranges", "bytes"),
    ("access-control-allow-headers", "cache-control"),
    ("access-control-allow-headers", "content-type"),
    ("access-control-allow-origin", "*"),
    ("cache-control", "max-age=0"),
    ("cache-control", "max-age=2592000"),
    ("cache-control", "max-age=604800"),
    ("cache-control", "no-cache"),
    ("cache-control", "no-store"),
    ("cache-control", "public, max-age=31536000"),
    ("content-encoding", "br"),
    ("content-encoding", "gzip"),
    ("content-type", "application/dns-message"),
    ("content-type", "application/javascript"),
    ("content-type", "application/json"),
    ("content-type", "application/x-www-form-urlencoded"),
    ("content-type", "image/gif"),
    ("content-type", "image/jpeg"),
    ("content-type", "image/png"),
    ("content-type", "text/css"),
    ("content-type", "text/html; charset=utf-8"),
    ("content-type", "text/plain"),
    ("content-type", "text/plain;charset=utf-8"),
    ("range", "bytes=0-"),
    ("strict-transport-security", "max-age=31536000"),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains",
    ),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains; preload",
    ),
    ("vary", "accept-encoding"),
    ("vary", "origin"),
    ("x-content-type-options", "nosniff"),
    ("x-xss-protection", "1; mode=block"),
    (":status", "100"),
    (":status", "204"),
    (":status", "206"),
    (":status", "302"),
    (":status", "400"),
    (":status", "403"),
    (":status", "421"),
    (":status", "425"),
    (":status", "500"),
    ("accept-language", ""),
    ("access-control-allow-credentials", "FALSE"),
    ("access-control-allow-credentials", "TRUE"),
    ("access-control-allow-headers", "*"),
    ("access-control-allow-methods", "get"),
    ("access-control-allow-methods", "get, post, options"),
    ("access-control-allow-methods", "options"),
    ("access-control-expose-headers", "content-length"),
    ("access-control-request-headers", "content-type"),
    ("access-control-request-method", "get"),
    ("access-control-request-method", "post"),
    ("alt-svc", "clear"),
    ("authorization", ""),
    (
        "content-security-policy",
        "script-src 'none'; object-src 'none'; base-uri 'none'",
    ),
    ("early-data", "1"),
    ("expect-ct", ""),
    ("forwarded", ""),
    ("if-range", ""),
    ("origin", ""),
    ("purpose", "prefetch"),
    ("server", ""),
    ("timing-allow-origin", "*"),
    ("upgrade-insecure-requests", "1"),
    ("user-agent", ""),
    ("x-forwarded-for", ""),
    ("x-frame-options", "deny"),
    ("x-frame-options", "sameorigin"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_each_width() {
        for v in [
            0,
            63,
            64,
            16383,
            16384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut out = Vec::new();
            encode_varint(v, &mut out);
            assert_eq!(decode_varint(&out), Ok((v, out.len())));
            assert_eq!(
                decode_varint(&out[..out.len() - 1]),
                Err(WireError::Truncated)
            );
        }
        // RFC 9000 §A.1 examples.
        assert_eq!(
            decode_varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Ok((151_288_809_941_952_652, 8))
        );
        assert_eq!(decode_varint(&[0x7b, 0xbd]), Ok((15_293, 2)));
    }

    #[test]
    fn static_and_huffman_fields_decode() {
        // :method GET (indexed 17), :scheme https (23), :authority with a Huffman value
        // "www.example.com" (RFC 7541 §C.4.1), :path "/" (1), and a plain literal.
        let mut block = vec![0x00, 0x00, 0xc0 | 17, 0xc0 | 23];
        block.extend_from_slice(&[0x50, 0x80 | 12]);
        block.extend_from_slice(&[
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ]);
        block.push(0xc1);
        encode_literal(b"x-trace", b"abc", &mut block);
        let fields = decode_field_section(&block).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|f| (f.name.as_slice(), f.value.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"https"),
                (b":authority", b"www.example.com"),
                (b":path", b"/"),
                (b"x-trace", b"abc"),
            ]
        );
        assert!(fields[0].is_pseudo() && !fields[4].is_pseudo());
        assert!(block[fields[4].span.clone()].ends_with(b"x-trace\x03abc"));
    }

    #[test]
    fn encoded_sections_decode_to_what_was_encoded() {
        let long = vec![b'v'; 300];
        let block = encode_field_section([(&b":status"[..], &b"200"[..]), (b"x-long", &long)]);
        let fields = decode_field_section(&block).unwrap();
        assert_eq!(fields[0].value, b"200");
        assert_eq!(fields[1].value, long);
    }

    #[test]
    fn dynamic_references_and_bad_input_are_errors() {
        assert_eq!(
            decode_field_section(&[0x01, 0x00]),
            Err(WireError::DynamicReference)
        );
        assert_eq!(
            decode_field_section(&[0, 0, 0x80]),
            Err(WireError::DynamicReference)
        );
        assert_eq!(
            decode_field_section(&[0, 0, 0x10]),
            Err(WireError::DynamicReference)
        );
        assert_eq!(
            decode_field_section(&[0, 0, 0xff, 0x40]),
            Err(WireError::StaticIndex(127))
        );
        assert_eq!(
            decode_field_section(&[0, 0, 0x23, b'a']),
            Err(WireError::Truncated)
        );
        let huge = [
            0, 0, 0x27, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode_field_section(&huge).is_err());
        // A Huffman string holding the EOS symbol is not valid (RFC 7541 §5.2).
        assert_eq!(
            decode_field_section(&[0, 0, 0x21, b'a', 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::Huffman)
        );
    }

    #[test]
    fn frame_heads_decode() {
        let mut f = Vec::new();
        encode_frame(FRAME_HEADERS, &[1, 2, 3], &mut f);
        assert_eq!(
            decode_frame_head(&f),
            Ok(FrameHead {
                ty: FRAME_HEADERS,
                len: 3,
                head_len: 2
            })
        );
        assert_eq!(decode_frame_head(&[0x40]), Err(WireError::Truncated));
    }
}
