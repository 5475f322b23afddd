//! Reading control frames from an async stream: the thin IO shell around
//! [`crate::proto::FrameDecoder`], shared by the relay and the connector.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::{ControlFrame, DecodeError, FrameDecoder};

/// Why reading a control frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The stream failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error("control stream: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads the next control frame, keeping partial bytes in `decoder` between calls.
/// `Ok(None)` when the stream ends cleanly. Cancel-safe: bytes already read stay in the
/// decoder.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
) -> Result<Option<ControlFrame>, FrameReadError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        match reader.read(&mut buf).await? {
            0 => return Ok(None),
            n => decoder.push(&buf[..n]),
        }
    }
}

/// Reads one message prefixed by its length (4 bytes, big-endian), as enrolment uses over
/// TCP; a length over `max` is refused (`InvalidData`) before anything more is read.
pub async fn read_prefixed<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let len = reader.read_u32().await? as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes, over the {max} allowed"),
        ));
    }
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one message prefixed by its length, for [`read_prefixed`].
pub async fn write_prefixed<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u32::try_from(message.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too long"))?;
    writer.write_u32(len).await?;
    writer.write_all(message).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::proto::encode_frame;

    #[tokio::test]
    async fn frames_cross_a_tiny_duplex_pipe() {
        let (mut a, mut b) = tokio::io::duplex(8);
        let frames = vec![
            ControlFrame::Register {
                hostnames: vec!["a.internal".into()],
                agent: "t".into(),
            },
            ControlFrame::Drain,
        ];
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in &sent {
                a.write_all(&encode_frame(f).unwrap()).await.unwrap();
            }
        });
        let mut decoder = FrameDecoder::default();
        let mut got = Vec::new();
        while let Some(f) = read_frame(&mut b, &mut decoder).await.unwrap() {
            got.push(f);
            if got.len() == frames.len() {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, frames);
    }

    #[tokio::test]
    async fn a_bad_frame_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[9, 9, 0, 0, 0, 0]).await.unwrap();
        let mut decoder = FrameDecoder::default();
        assert!(matches!(
            read_frame(&mut b, &mut decoder).await,
            Err(FrameReadError::Decode(_))
        ));
    }
}
