//! Joins a local byte stream (a TCP connection, standard input/output, an upgraded proxy
//! connection) to a CONNECT tunnel through the relay: both ways, half-close carried.

use bytes::BytesMut;
use portcullis_shared::pump::{ready_now, take_ready, write_vectored_all};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::relay::Stream;

/// Copies until both directions have ended.
pub(crate) async fn join<R, W>(mut local_read: R, mut local_write: W, stream: Stream)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = (stream.send, stream.recv);
    let up = async {
        let mut buf = BytesMut::with_capacity(32 * 1024);
        loop {
            buf.reserve(32 * 1024);
            match local_read.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send_data(buf.split().freeze()).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.finish().await;
    };
    // Returns true when the relay side failed (reset, relay gone) rather than finished.
    let down = async {
        let mut batch = Vec::new();
        let failed = loop {
            match rx.recv_data().await {
                Ok(Some(chunk)) => {
                    // What has already arrived goes with it in one write (QUIC hands
                    // over a packet's worth at a time); nothing waits for more.
                    batch.push(chunk);
                    let end = match take_ready(&mut batch, |_| ready_now(rx.recv_data())) {
                        Ok(true) => None,
                        Ok(false) => Some(false),
                        Err(_) => Some(true),
                    };
                    if write_vectored_all(&mut local_write, &mut batch)
                        .await
                        .is_err()
                    {
                        return true;
                    }
                    // Standard output holds writes until flushed; an interactive peer
                    // (ssh) must see each chunk at once.
                    if local_write.flush().await.is_err() {
                        return true;
                    }
                    if let Some(failed) = end {
                        break failed;
                    }
                }
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        let _ = local_write.flush().await;
        let _ = local_write.shutdown().await;
        failed
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut up => { down.await; }
        // After a clean end from the relay the local side may still be sending; after a
        // failure nothing will carry its bytes, so stop reading it.
        failed = &mut down => if !failed { up.await; },
    }
}
