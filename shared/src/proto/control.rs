//! Control frames: `[version u8][type u8][length u32 BE][payload]`, payload JSON.

use serde::{Deserialize, Serialize};

use super::{DecodeError, MAX_FRAME_LEN, VERSION};

const HEADER_LEN: usize = 6;

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlFrame {
    /// Connector → relay, first frame: the hostnames it wants to publish.
    Register {
        /// Hostnames or `*.suffix` patterns from the connector's ingress rules.
        hostnames: Vec<String>,
        /// The connector's version, for the relay's logs.
        agent: String,
    },
    /// Relay → connector: which hostnames the relay accepted and which it refused.
    Registered {
        /// Hostnames now routed to this connector.
        accepted: Vec<String>,
        /// Hostnames refused, each with the reason.
        rejected: Vec<Rejection>,
    },
    /// Connector → relay: stop routing new streams here; in-flight ones finish.
    Drain,
    /// Relay → connector, the answer to [`ControlFrame::Drain`]: nothing more will be
    /// routed here, and `opened` streams were opened on this tunnel in all, so the
    /// connector knows when every one of them has reached it.
    Drained {
        /// Bidirectional streams the relay opened on this connection.
        opened: u64,
    },
    /// Connector → relay, after `Registered`: route exactly these of the accepted
    /// hostnames here from now on; the others are withdrawn (their origin is unhealthy)
    /// until a later `Publish` names them again.
    Publish {
        /// A subset of the hostnames the relay accepted, as the connector sent them.
        hostnames: Vec<String>,
    },
}

/// A hostname the relay refused to route to a connector, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The hostname as the connector sent it.
    pub hostname: String,
    /// A sentence for the connector's log.
    pub reason: String,
}

impl ControlFrame {
    fn type_byte(&self) -> u8 {
        match self {
            Self::Register { .. } => 1,
            Self::Registered { .. } => 2,
            Self::Drain => 3,
            Self::Drained { .. } => 4,
            Self::Publish { .. } => 5,
        }
    }
}

/// Encodes one control frame. Frames over [`MAX_FRAME_LEN`] are a programming error on
/// our side, and are refused rather than sent.
pub fn encode_frame(frame: &ControlFrame) -> Result<Vec<u8>, DecodeError> {
    let payload = serde_json::to_vec(frame).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(VERSION);
    out.push(frame.type_byte());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Incremental decoder: feed it bytes as they arrive, take frames out as they complete.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or an error
    /// as soon as the header is invalid (before the payload is buffered).
    pub fn next_frame(&mut self) -> Result<Option<ControlFrame>, DecodeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.buf[0] != VERSION {
            return Err(DecodeError::Version(self.buf[0]));
        }
        let ty = self.buf[1];
        if !(1..=5).contains(&ty) {
            return Err(DecodeError::UnknownType(ty));
        }
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let frame: ControlFrame = serde_json::from_slice(&self.buf[HEADER_LEN..HEADER_LEN + len])
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if frame.type_byte() != ty {
            return Err(DecodeError::Malformed(format!(
                "type byte {ty} does not match the payload"
            )));
        }
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<ControlFrame> {
        vec![
            ControlFrame::Register {
                hostnames: vec!["a.internal".into(), "*.b.internal".into()],
                agent: "test".into(),
            },
            ControlFrame::Registered {
                accepted: vec!["a.internal".into()],
                rejected: vec![Rejection {
                    hostname: "*.b.internal".into(),
                    reason: "not allowed".into(),
                }],
            },
            ControlFrame::Drain,
            ControlFrame::Drained { opened: 7 },
            ControlFrame::Publish {
                hostnames: vec!["a.internal".into()],
            },
        ]
    }

    #[test]
    fn frames_round_trip_even_byte_by_byte() {
        let mut wire = Vec::new();
        for f in frames() {
            wire.extend(encode_frame(&f).unwrap());
        }
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::default();
        dec.push(&[VERSION, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_frame(), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn wrong_version_and_type_are_refused() {
        let mut dec = FrameDecoder::default();
        dec.push(&[9, 1, 0, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Err(DecodeError::Version(9)));
        let mut dec = FrameDecoder::default();
        dec.push(&[VERSION, 77, 0, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Err(DecodeError::UnknownType(77)));
    }

    #[test]
    fn mismatched_type_byte_is_malformed() {
        let mut wire = encode_frame(&ControlFrame::Drain).unwrap();
        wire[1] = 1;
        let mut dec = FrameDecoder::default();
        dec.push(&wire);
        assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut dec = FrameDecoder::default();
            let len = (seed % 64) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            if bytes.len() > 1 {
                bytes[0] = VERSION;
            }
            dec.push(&bytes);
            let _ = dec.next_frame();
        }
    }
}
