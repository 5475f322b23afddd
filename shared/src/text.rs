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

#[cfg(test)]
mod tests {
    use super::*;

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
