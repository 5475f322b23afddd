//! Arbitrary bytes into the stream-header decoder: refuse or round-trip, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_shared::proto::StreamHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = StreamHeader::decode(data) {
        assert_eq!(header.encode(), data);
    }
});
