//! Arbitrary bytes into the QPACK field-section decoder the relay's HTTP/3 guard uses:
//! refuse or decode, never panic; what decodes re-encodes to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_shared::h3wire::{decode_field_section, encode_field_section};

fuzz_target!(|data: &[u8]| {
    if let Ok(fields) = decode_field_section(data) {
        let again = encode_field_section(
            fields
                .iter()
                .map(|f| (f.name.as_slice(), f.value.as_slice())),
        );
        let decoded = decode_field_section(&again).expect("round trip");
        assert!(decoded
            .iter()
            .zip(&fields)
            .all(|(a, b)| a.name == b.name && a.value == b.value));
        assert_eq!(decoded.len(), fields.len());
    }
});
