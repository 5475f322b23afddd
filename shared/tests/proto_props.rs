//! Property tests for the tunnel protocol's decoders and the policy's invariants: bounded
//! (a fixed number of cases), so they run on every `cargo test`, standing in for the
//! cargo-fuzz targets in `shared/fuzz` where no nightly toolchain is available.

#![allow(clippy::unwrap_used)]

use portcullis_shared::identity::{HostPattern, Hostname};
use portcullis_shared::policy::{Decision, PolicyRule, Subject, evaluate};
use portcullis_shared::proto::{
    ControlFrame, FrameDecoder, Rejection, StreamHeader, StreamKind, decode_trailers, encode_frame,
    encode_trailers,
};
use proptest::prelude::*;

fn frame() -> impl Strategy<Value = ControlFrame> {
    prop_oneof![
        (prop::collection::vec(".{0,40}", 0..8), ".{0,20}")
            .prop_map(|(hostnames, agent)| ControlFrame::Register { hostnames, agent }),
        (
            prop::collection::vec(".{0,40}", 0..8),
            prop::collection::vec((".{0,40}", ".{0,60}"), 0..4)
        )
            .prop_map(|(accepted, r)| ControlFrame::Registered {
                accepted,
                rejected: r
                    .into_iter()
                    .map(|(hostname, reason)| Rejection { hostname, reason })
                    .collect()
            }),
        Just(ControlFrame::Drain),
        any::<u64>().prop_map(|opened| ControlFrame::Drained { opened }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn control_frames_round_trip_in_any_pieces(frames in prop::collection::vec(frame(), 1..5), split in 1usize..64) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(encode_frame(f).unwrap());
        }
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for piece in wire.chunks(split) {
            dec.push(piece);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut dec = FrameDecoder::default();
        dec.push(&data);
        let _ = dec.next_frame();
        if let Ok(h) = StreamHeader::decode(&data) {
            prop_assert_eq!(h.encode(), data.clone());
        }
        let _ = decode_trailers(&data);
    }

    #[test]
    fn stream_headers_round_trip(name in "[a-z0-9.-]{1,253}") {
        let h = StreamHeader { kind: StreamKind::Http, hostname: name };
        prop_assert_eq!(StreamHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn trailers_round_trip(fields in prop::collection::vec(("[a-z][a-z0-9-]{0,20}", prop::collection::vec(1u8..=255, 0..40)), 0..8)) {
        let enc = encode_trailers(fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        prop_assert_eq!(decode_trailers(enc.as_bytes()).unwrap(), fields);
    }

    #[test]
    fn policy_denies_unless_a_rule_names_the_caller(
        label in "[a-z]{1,10}",
        user in "[a-z]{1,8}",
        other in "[a-z]{1,8}",
    ) {
        prop_assume!(user != other);
        let host = Hostname::parse(&format!("{label}.internal")).unwrap();
        let subject = Subject { device: "d", user: &user, groups: &[] };
        prop_assert_eq!(evaluate(&[], &host, subject), Decision::Deny);
        let rule = PolicyRule {
            hostnames: vec![HostPattern::parse("*.internal").unwrap()],
            users: vec![other],
            ..PolicyRule::default()
        };
        prop_assert_eq!(evaluate(&[rule], &host, subject), Decision::Deny);
    }

    #[test]
    fn a_pattern_never_covers_a_name_it_does_not_match(a in "[a-z]{1,6}", b in "[a-z]{1,6}", c in "[a-z]{1,6}") {
        let narrow = HostPattern::parse(&format!("*.{a}.internal")).unwrap();
        let other = Hostname::parse(&format!("{b}.{c}.internal")).unwrap();
        if narrow.covers(&HostPattern::Exact(other.clone())) {
            prop_assert!(narrow.matches(&other));
        }
        let sibling = HostPattern::parse(&format!("{b}.internal")).unwrap();
        prop_assert!(!narrow.covers(&sibling));
    }
}

mod h3wire_props {
    use portcullis_shared::h3wire::{
        decode_field_section, decode_varint, encode_field_section, encode_varint,
    };
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_sections_are_refused_or_decoded_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(fields) = decode_field_section(&bytes) {
                // Spans tile the block after its two-byte (or longer) prefix, in order.
                let mut at = fields.first().map_or(bytes.len(), |f| f.span.start);
                for f in &fields {
                    prop_assert_eq!(f.span.start, at);
                    at = f.span.end;
                }
                prop_assert_eq!(at, bytes.len());
            }
        }

        #[test]
        fn encoded_sections_round_trip(fields in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..300), prop::collection::vec(any::<u8>(), 0..300)), 0..8)) {
            let block = encode_field_section(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let decoded = decode_field_section(&block).unwrap();
            let pairs: Vec<_> = decoded.into_iter().map(|f| (f.name, f.value)).collect();
            prop_assert_eq!(pairs, fields);
        }

        #[test]
        fn varints_round_trip(v in 0u64..(1 << 62)) {
            let mut out = Vec::new();
            encode_varint(v, &mut out);
            prop_assert_eq!(decode_varint(&out).unwrap(), (v, out.len()));
        }
    }
}
