//! Arbitrary bytes into the folded-trailers decoder: refuse or round-trip, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_shared::proto::{decode_trailers, encode_trailers};

fuzz_target!(|data: &[u8]| {
    if let Ok(fields) = decode_trailers(data) {
        let again = encode_trailers(fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        assert_eq!(decode_trailers(again.as_bytes()).expect("round trip"), fields);
    }
});
