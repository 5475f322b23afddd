//! Arbitrary bytes, fed in arbitrary pieces, into the control-frame decoder: it may refuse
//! them but must never panic or buffer past its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_shared::proto::{FrameDecoder, encode_frame};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut decoder = FrameDecoder::default();
    for piece in data.chunks(split) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let again = encode_frame(&frame).expect("a decoded frame re-encodes");
                    let mut d = FrameDecoder::default();
                    d.push(&again);
                    assert_eq!(d.next_frame().expect("round trip"), Some(frame));
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});
