//! W3C Trace Context (`traceparent`): parsing a caller's, continuing it with a span of our
//! own, or starting a trace. The relay continues the client's trace (or starts one) and
//! hands its own span to the connector; the connector hands its span to the origin; both
//! log the trace id, so one request can be followed from client to origin.

use crate::pki::{hex, push_hex};

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// One hop's trace context: the trace it belongs to, this hop's span, and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// This hop's span (the `parent-id` the next hop sees), never all zero.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

/// The `sampled` trace flag.
const SAMPLED: u8 = 1;

/// Whether a trace id falls in the sampled share `ratio`: its last 8 bytes, halved, below
/// `ratio` of 2^63.
fn ratio_admits(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

/// Random, non-zero ids. Trace ids must be unique, not secret (nothing is authorised by
/// them): a fast thread-local generator, not a system call per request.
fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    fastrand::fill(&mut out);
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1;
    }
    out
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace, not sampled.
    pub fn root() -> Self {
        Self {
            trace_id: random(),
            span_id: random(),
            flags: 0,
        }
    }

    /// A `traceparent` value, if it is a valid one: version `00` exactly, or a later
    /// version whose first four fields have the same shape (W3C Trace Context, level 1,
    /// section 3.2.4: parse what is understood and ignore the rest). Ids of all zeros
    /// and version `ff` are invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut fields = value.split('-');
        let version = unhex::<1>(fields.next()?)?[0];
        let trace_id = unhex::<16>(fields.next()?)?;
        let span_id = unhex::<8>(fields.next()?)?;
        let flags = unhex::<1>(fields.next()?)?[0];
        let rest_ok = match version {
            0xff => false,
            0 => fields.next().is_none(),
            _ => true,
        };
        let zero = trace_id.iter().all(|b| *b == 0) || span_id.iter().all(|b| *b == 0);
        (rest_ok && !zero).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The caller's trace continued with a new span of ours, or a new trace when the
    /// caller sent none or an invalid one.
    pub fn continue_from(header: Option<&str>) -> Self {
        header
            .and_then(Self::parse)
            .map_or_else(Self::root, |caller| caller.child())
    }

    /// A new trace, sampled with probability `ratio` (a caller's trace keeps the caller's
    /// decision instead). The decision comes from the trace id, as OpenTelemetry's
    /// `TraceIdRatioBased` sampler makes it, so components with the same ratio agree.
    pub fn root_sampled(ratio: f64) -> Self {
        let mut trace = Self::root();
        if ratio_admits(&trace.trace_id, ratio) {
            trace.flags |= SAMPLED;
        }
        trace
    }

    /// Whether the trace is sampled (flag bit 0): its spans are exported.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The same context with its sampled flag set or cleared.
    pub fn with_sampled(self, sampled: bool) -> Self {
        Self {
            flags: if sampled {
                self.flags | SAMPLED
            } else {
                self.flags & !SAMPLED
            },
            ..self
        }
    }

    /// A span of our own in the same trace.
    pub fn child(&self) -> Self {
        Self {
            span_id: random(),
            ..*self
        }
    }

    /// The `traceparent` value naming this hop's span as the next hop's parent.
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// This hop's span id, 16 hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let caller = TraceContext::parse(GOOD).unwrap();
        assert_eq!(caller.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(caller.span_id(), "00f067aa0ba902b7");
        assert_eq!(caller.header(), GOOD);
        let ours = TraceContext::continue_from(Some(GOOD));
        assert_eq!(ours.trace_id, caller.trace_id);
        assert_eq!(ours.flags, 1);
        assert_ne!(ours.span_id, caller.span_id);
        assert!(
            ours.header()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn invalid_values_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
            let fresh = TraceContext::continue_from(Some(bad));
            assert_ne!(fresh.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(fresh.flags, 0);
        }
        // A later version: its first four fields are used, the rest ignored.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(TraceContext::parse(later).is_some());
    }

    #[test]
    fn sampling_follows_the_caller_or_the_ratio() {
        // The caller's flag is kept by its child span.
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(TraceContext::continue_from(Some(sampled)).sampled());
        assert!(!TraceContext::continue_from(Some(unsampled)).sampled());
        // New traces: all, none, or about the share asked for.
        assert!(TraceContext::root_sampled(1.0).sampled());
        assert!(!TraceContext::root_sampled(0.0).sampled());
        assert!(!TraceContext::root().sampled());
        let n = (0..10_000)
            .filter(|_| TraceContext::root_sampled(0.25).sampled())
            .count();
        assert!((2_000..3_000).contains(&n), "{n} of 10000 sampled at 0.25");
        // The decision is the trace id's: the same id gets the same answer.
        let mut id = [0u8; 16];
        id[8] = 0x20; // 0x20.. >> 1 = 0x10.. = 1/8 of 2^63
        assert!(ratio_admits(&id, 0.13));
        assert!(!ratio_admits(&id, 0.12));
    }

    #[test]
    fn new_traces_have_distinct_nonzero_ids() {
        let a = TraceContext::root();
        let b = TraceContext::root();
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.trace_id.iter().any(|x| *x != 0));
        assert_eq!(TraceContext::parse(&a.header()), Some(a));
    }
}
