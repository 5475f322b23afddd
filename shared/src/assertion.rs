//! The identity headers the relay sets on every request it forwards, and the connector's
//! second look at them: every `portcullis-*` header is removed from what arrives on a
//! tunnel stream, and the caller's user, device and groups are set again from the relay's
//! signed assertion (`portcullis-jwt-assertion`, an ES256 JWT), so the origin only ever
//! sees what that assertion says. The relay signs; origins verify against its JWKS; this
//! module only reads the claims (the tunnel it arrived on is the relay's, authenticated by
//! mutual TLS). Functions over `http` types without IO.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The caller's user.
pub const USER: &str = "portcullis-user";
/// The caller's device id.
pub const DEVICE: &str = "portcullis-device";
/// The caller's groups, comma-separated.
pub const GROUPS: &str = "portcullis-groups";
/// The relay's signed assertion of the three.
pub const JWT: &str = "portcullis-jwt-assertion";

/// Whether `name` is one of Portcullis's own headers, in either spelling (`_` read as
/// `-`, as CGI, WSGI, Rack and PHP do).
pub fn is_portcullis_header(name: &HeaderName) -> bool {
    name.as_str().get(..11).is_some_and(|p| {
        p.bytes()
            .zip(b"portcullis-")
            .all(|(a, b)| a == *b || (a, *b) == (b'_', b'-'))
    })
}

/// Removes every header whose name `matches`.
pub fn remove_where(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|k| matches(k)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// What an assertion says of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertedCaller {
    /// `sub`.
    pub user: String,
    /// `device`.
    pub device: String,
    /// `groups`.
    pub groups: Vec<String>,
}

impl AssertedCaller {
    /// Reads the claims of a compact JWT; `None` when it is not one or lacks a claim.
    /// The signature is not checked here (see the module's note).
    pub fn from_jwt(token: &str) -> Option<Self> {
        let mut parts = token.split('.');
        let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next())
        else {
            return None;
        };
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let groups = claims
            .get("groups")?
            .as_array()?
            .iter()
            .map(|g| g.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            user: claims.get("sub")?.as_str()?.to_owned(),
            device: claims.get("device")?.as_str()?.to_owned(),
            groups,
        })
    }
}

/// Removes every `portcullis-*` header, then sets the user, device, groups and the
/// assertion itself from the assertion that arrived; without a readable one, the request
/// leaves with no identity at all. Returns the caller the headers now name.
pub fn reassert(headers: &mut HeaderMap) -> Option<AssertedCaller> {
    let token = headers
        .get(JWT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    remove_where(headers, is_portcullis_header);
    let token = token?;
    let caller = AssertedCaller::from_jwt(&token)?;
    for (name, value) in [
        (USER, caller.user.as_str()),
        (DEVICE, caller.device.as_str()),
        (GROUPS, &caller.groups.join(",")),
        (JWT, token.as_str()),
    ] {
        let Ok(value) = HeaderValue::from_str(value) else {
            // A claim that cannot be a header value: no identity rather than part of one.
            for n in [USER, DEVICE, GROUPS, JWT] {
                headers.remove(n);
            }
            return None;
        };
        headers.insert(HeaderName::from_static(name), value);
    }
    Some(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let enc = |v: String| URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            enc(r#"{"alg":"ES256"}"#.into()),
            enc(claims.to_string())
        )
    }

    #[test]
    fn identity_headers_come_only_from_the_assertion() {
        let token = jwt(&serde_json::json!({
            "sub": "alice", "device": "alice-laptop", "groups": ["eng", "ops"]
        }));
        let mut h = HeaderMap::new();
        h.insert(USER, HeaderValue::from_static("ceo"));
        h.insert(GROUPS, HeaderValue::from_static("admins"));
        h.insert("portcullis_user", HeaderValue::from_static("ceo"));
        h.insert("portcullis-admin", HeaderValue::from_static("1"));
        h.insert(JWT, HeaderValue::from_str(&token).unwrap());
        h.insert("accept", HeaderValue::from_static("*/*"));
        let caller = reassert(&mut h).unwrap();
        assert_eq!(caller.user, "alice");
        assert_eq!(h[USER], "alice");
        assert_eq!(h[DEVICE], "alice-laptop");
        assert_eq!(h[GROUPS], "eng,ops");
        assert_eq!(h[JWT], token.as_str());
        assert!(h.get("portcullis_user").is_none() && h.get("portcullis-admin").is_none());
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn without_a_readable_assertion_no_identity_leaves() {
        for token in [
            None,
            Some("not-a-jwt".to_owned()),
            Some(jwt(&serde_json::json!({"sub": "alice"}))),
            Some(jwt(
                &serde_json::json!({"sub": "a\nb", "device": "d", "groups": []}),
            )),
        ] {
            let mut h = HeaderMap::new();
            h.insert(USER, HeaderValue::from_static("ceo"));
            if let Some(t) = &token {
                h.insert(JWT, HeaderValue::from_str(t).unwrap());
            }
            assert_eq!(reassert(&mut h), None, "{token:?}");
            assert!(h.is_empty(), "{h:?}");
        }
    }
}
