//! Hop-by-hop headers, read strictly: the `Connection` lists (and `Proxy-Connection`), the
//! `Upgrade` list, and what the relay and the connector remove before a request moves on.
//!
//! Both ends of the tunnel use this one reading, so a header line the relay could not
//! parse can never mean something else further on: a list that is not made of tokens is
//! an error (the caller answers 400), and the only upgrade that is ever kept is a
//! WebSocket one (`Connection: upgrade` with `Upgrade: websocket`). An `h2c` or any other
//! upgrade, and `HTTP2-Settings`, are removed, so such a request is served as plain
//! HTTP/1.1 and nothing a client sends after it is read as another protocol. Functions
//! over `http` types without IO.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1, plus
/// `HTTP2-Settings` of RFC 7540 §3.2.1, which only means something with an h2c upgrade).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "http2-settings",
];

/// A hop-by-hop list that is not a comma-separated list of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HopByHopError {
    /// A `Connection` or `Proxy-Connection` value holds something other than header-name
    /// tokens (RFC 9110 §7.6.1): bytes outside visible ASCII, spaces inside a name, `;`,
    /// quotes.
    #[error("the Connection header is not a list of header names")]
    Connection,
    /// An `Upgrade` value holds something other than `protocol[/version]` tokens
    /// (RFC 9110 §7.8).
    #[error("the Upgrade header is not a list of protocols")]
    Upgrade,
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// The non-empty elements of every value of `name`, trimmed of optional white space;
/// `None` when a value is not visible ASCII (RFC 9110 §5.6.1 allows empty elements).
fn list_elements<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Vec<&'a str>> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let text = value.to_str().ok()?;
        out.extend(
            text.split(',')
                .map(|e| e.trim_matches([' ', '\t']))
                .filter(|e| !e.is_empty()),
        );
    }
    Some(out)
}

/// The header names listed in `Connection` and `Proxy-Connection`, lower-cased.
///
/// # Errors
/// [`HopByHopError::Connection`] when an element is not a token: the request must be
/// refused, since a later hop could read the line differently.
pub fn connection_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, HopByHopError> {
    let mut names = Vec::new();
    for list in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
    ] {
        for element in list_elements(headers, &list).ok_or(HopByHopError::Connection)? {
            if !is_token(element) {
                return Err(HopByHopError::Connection);
            }
            names.push(
                HeaderName::from_bytes(element.as_bytes())
                    .map_err(|_| HopByHopError::Connection)?,
            );
        }
    }
    Ok(names)
}

/// The protocols an `Upgrade` header asks for, each `name` or `name/version`.
///
/// # Errors
/// [`HopByHopError::Upgrade`] when an element is not of that form.
pub fn upgrade_protocols(headers: &HeaderMap) -> Result<Vec<&str>, HopByHopError> {
    let elements = list_elements(headers, &header::UPGRADE).ok_or(HopByHopError::Upgrade)?;
    for element in &elements {
        let ok = match element.split_once('/') {
            Some((name, version)) => is_token(name) && is_token(version),
            None => is_token(element),
        };
        if !ok {
            return Err(HopByHopError::Upgrade);
        }
    }
    Ok(elements)
}

/// Whether a request is a WebSocket upgrade: `Connection` names `upgrade` and `Upgrade`
/// asks for `websocket` and nothing else. Any other upgrade (h2c, TLS, …) is not one the
/// relay carries: [`strip`] removes it and the request is served as plain HTTP.
///
/// # Errors
/// As [`connection_names`] and [`upgrade_protocols`]: the request must be refused.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> Result<bool, HopByHopError> {
    let connection = connection_names(headers)?;
    let protocols = upgrade_protocols(headers)?;
    Ok(connection.contains(&header::UPGRADE)
        && matches!(protocols.as_slice(), [p] if p.eq_ignore_ascii_case("websocket")))
}

/// Removes every hop-by-hop header and every header `Connection` names. With
/// `websocket`, the request is one [`is_websocket_upgrade`] accepted, and it leaves with
/// exactly `Connection: upgrade` and `Upgrade: websocket`.
///
/// # Errors
/// As [`connection_names`]: a request must then be refused. The fixed hop-by-hop headers
/// (`Connection` among them) are removed all the same, which is what a response from an
/// origin gets.
pub fn strip(headers: &mut HeaderMap, websocket: bool) -> Result<(), HopByHopError> {
    let named = connection_names(headers);
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    for h in named.as_deref().unwrap_or_default() {
        headers.remove(h);
    }
    if websocket && named.is_ok() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    named.map(drop)
}

/// Whether a response's head accepts a WebSocket upgrade: `Upgrade: websocket` and
/// nothing else. A `101` for anything else is never joined.
pub fn response_is_websocket(headers: &HeaderMap) -> bool {
    matches!(upgrade_protocols(headers).as_deref(), Ok([p]) if p.eq_ignore_ascii_case("websocket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        let ws = headers(&[
            ("connection", b"keep-alive, Upgrade"),
            ("upgrade", b"WebSocket"),
        ]);
        assert_eq!(is_websocket_upgrade(&ws), Ok(true));
        for upgrade in [
            &b"h2c"[..],
            b"TLS/1.2",
            b"websocket, h2c",
            b"h2c, websocket",
        ] {
            let h = headers(&[
                ("connection", b"Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
            ]);
            assert_eq!(is_websocket_upgrade(&h), Ok(false), "{upgrade:?}");
        }
        // Upgrade without Connection naming it is no upgrade either.
        let h = headers(&[("connection", b"close"), ("upgrade", b"websocket")]);
        assert_eq!(is_websocket_upgrade(&h), Ok(false));
    }

    #[test]
    fn a_list_that_is_not_tokens_is_an_error() {
        for bad in [
            &b"Upgrade, HTTP2-Settings\x80"[..],
            b"Upgrade HTTP2-Settings",
            b"upgrade; q=1",
            b"\"upgrade\"",
            b"up\tgrade",
        ] {
            let h = headers(&[("connection", bad), ("upgrade", b"h2c")]);
            assert_eq!(
                connection_names(&h),
                Err(HopByHopError::Connection),
                "{bad:?}"
            );
            assert_eq!(is_websocket_upgrade(&h), Err(HopByHopError::Connection));
            let mut stripped = h.clone();
            assert_eq!(strip(&mut stripped, true), Err(HopByHopError::Connection));
            assert!(stripped.is_empty(), "{stripped:?}");
        }
        let h = headers(&[("proxy-connection", b"keep alive")]);
        assert_eq!(connection_names(&h), Err(HopByHopError::Connection));
        let h = headers(&[("connection", b"upgrade"), ("upgrade", b"web socket")]);
        assert_eq!(upgrade_protocols(&h), Err(HopByHopError::Upgrade));
        // Empty list elements are allowed (RFC 9110 §5.6.1).
        let h = headers(&[("connection", b" , upgrade ,, "), ("upgrade", b"websocket")]);
        assert_eq!(is_websocket_upgrade(&h), Ok(true));
    }

    #[test]
    fn strip_removes_h2c_and_everything_connection_names() {
        let mut h = headers(&[
            ("connection", b"Upgrade, HTTP2-Settings, x-secret"),
            ("upgrade", b"h2c"),
            ("http2-settings", b"AAMAAABkAAQAAP__"),
            ("x-secret", b"1"),
            ("te", b"gzip"),
            ("accept", b"*/*"),
        ]);
        strip(&mut h, false).unwrap();
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept"]);
        // HTTP2-Settings goes even when Connection does not name it.
        let mut h = headers(&[("http2-settings", b"AAMAAABkAAQAAP__")]);
        strip(&mut h, false).unwrap();
        assert!(h.is_empty());
    }

    #[test]
    fn a_kept_websocket_upgrade_leaves_with_exactly_its_own_headers() {
        let mut h = headers(&[
            ("connection", b"keep-alive, Upgrade, x-extra"),
            ("upgrade", b"websocket"),
            ("x-extra", b"1"),
            ("sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        strip(&mut h, true).unwrap();
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(h.get("x-extra").is_none());
        assert!(h.get("sec-websocket-key").is_some());
    }

    #[test]
    fn only_a_websocket_101_is_joined() {
        assert!(response_is_websocket(&headers(&[(
            "upgrade",
            b"websocket"
        )])));
        assert!(!response_is_websocket(&headers(&[("upgrade", b"h2c")])));
        assert!(!response_is_websocket(&HeaderMap::new()));
    }
}
