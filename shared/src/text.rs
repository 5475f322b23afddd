//! Text that came from the network, a token, an identity provider or a file, made safe to
//! print on a terminal or in a line-oriented log: control characters (C0, DEL, C1) and
//! Unicode bidirectional overrides are written as escapes (`\n`, `\u{1b}`, `\u{202e}`),
//! so such text can never start a line of its own, move the cursor, or reorder what a
//! reader sees. Everything else is kept as it is. Pure.

use std::borrow::Cow;

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character and bidirectional override escaped; borrowed when
/// there is none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An error and its causes as one line for a person: each cause after the one before it,
/// `: `-separated, leaving out a cause whose words are already there (errors that print
/// their source themselves would otherwise say `No such file or directory` twice), with
/// line breaks and control characters escaped.
pub fn error_line<'a>(
    causes: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for cause in causes {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    printable(&line).into_owned()
}

/// `url` with its password, if any, replaced by `***`, for logs and errors: in the
/// user information (`user:password@`) and in the query (`password=`, `sslpassword=`).
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("password")
                            || k.eq_ignore_ascii_case("sslpassword") =>
                    {
                        format!("{k}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Self>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = "No such file or directory (os error 2)";
        let e = Layer(
            "tls_cert",
            Some(Box::new(Layer(
                "nope.crt: No such file or directory (os error 2)",
                Some(Box::new(Layer(io, None))),
            ))),
        );
        let mut chain: Vec<&(dyn std::error::Error + 'static)> = vec![&e];
        while let Some(next) = chain.last().and_then(|c| c.source()) {
            chain.push(next);
        }
        assert_eq!(
            error_line(chain),
            "tls_cert: nope.crt: No such file or directory (os error 2)"
        );
        let odd = Layer("bad\nline", None);
        assert_eq!(
            error_line([&odd as &(dyn std::error::Error + 'static)]),
            "bad\\nline"
        );
    }

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped_and_nothing_else() {
        assert!(matches!(printable("alice [eng]"), Cow::Borrowed(_)));
        assert_eq!(printable("café – ok"), "café – ok");
        assert_eq!(
            printable("x\n2026-12-07T00:00:00Z revoke device:ceo\r\t"),
            "x\\n2026-12-07T00:00:00Z revoke device:ceo\\r\\t"
        );
        assert_eq!(
            printable("\u{1b}[2J\u{7f}\u{85}"),
            "\\u{1b}[2J\\u{7f}\\u{85}"
        );
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert!(!printable("a\u{2066}b\u{0}c").chars().any(needs_escape));
    }
}
