//! Moving bytes between a tunnel stream and a TCP connection in batches, without copies
//! where the transport allows.
//!
//! QUIC delivers a stream a packet at a time (about 1.4 KB). Writing each packet's bytes
//! on as it comes costs a system call, a wake-up of the receiving connection and a frame
//! per packet; so a pump takes the next chunk, then whatever has *already* arrived (never
//! waiting for more), up to [`BATCH`], and hands the batch on in one call: a vectored
//! write to TCP, or QUIC's own chunk write, which keeps the received buffers as they are.
//! Nothing is allocated for a connection while it is idle: a read buffer is taken only
//! once the socket is readable.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::transport::{TunnelRecv, TunnelSend};

/// The most a pump gathers into one write.
pub const BATCH: usize = 64 * 1024;

/// Below this, bytes read from TCP are copied out of the read buffer so that a small
/// message does not hold a whole [`BATCH`] allocation while it waits to be acknowledged.
const SMALL: usize = 4 * 1024;

/// Polls `f` once: its output if it is ready now.
pub fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Waits for the next chunk of `recv`, then takes what has already arrived, up to
/// [`BATCH`] bytes in all, into `batch`. Returns false once the stream has ended (the
/// batch may still hold its last bytes).
pub async fn gather(recv: &mut dyn TunnelRecv, batch: &mut Vec<Bytes>) -> io::Result<bool> {
    let Some(first) = recv.read_chunk(BATCH).await? else {
        return Ok(false);
    };
    batch.push(first);
    take_ready(batch, |max| ready_now(recv.read_chunk(max)))
}

/// Takes the chunks that have already arrived into `batch`, without waiting, until it
/// holds [`BATCH`] bytes: `poll_next(max)` polls the source once for a chunk of at most
/// `max` bytes ([`ready_now`]). False once the source has ended; its error as it is.
pub fn take_ready<E>(
    batch: &mut Vec<Bytes>,
    mut poll_next: impl FnMut(usize) -> Option<Result<Option<Bytes>, E>>,
) -> Result<bool, E> {
    let mut total: usize = batch.iter().map(Bytes::len).sum();
    while total < BATCH {
        match poll_next(BATCH - total) {
            Some(Ok(Some(chunk))) => {
                total += chunk.len();
                batch.push(chunk);
            }
            Some(Ok(None)) => return Ok(false),
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(true)
}

/// Writes every chunk of `batch` with vectored writes, then empties it.
pub async fn write_vectored_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let mut n = {
            let slices: Vec<IoSlice<'_>> = batch[first..]
                .iter()
                .take(64)
                .map(|c| IoSlice::new(c))
                .collect();
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = batch[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                batch[first].advance(n);
                n = 0;
            }
        }
    }
    batch.clear();
    Ok(())
}

/// From the tunnel to TCP until the tunnel ends (then the TCP write side is shut), the
/// `early` bytes first (what the tunnel's HTTP codec had read past the request head).
pub async fn tunnel_to_tcp(
    early: Bytes,
    recv: &mut dyn TunnelRecv,
    tcp: &mut OwnedWriteHalf,
) -> io::Result<()> {
    if !early.is_empty() {
        tcp.write_all(&early).await?;
    }
    let mut batch = Vec::new();
    loop {
        let more = gather(recv, &mut batch).await?;
        write_vectored_all(tcp, &mut batch).await?;
        if !more {
            break;
        }
    }
    tcp.shutdown().await
}

/// From TCP to the tunnel until TCP ends (then the tunnel stream is finished). A read
/// buffer is taken only once the socket is readable, and handed to the tunnel as it is.
pub async fn tcp_to_tunnel(tcp: &mut OwnedReadHalf, send: &mut dyn TunnelSend) -> io::Result<()> {
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(BATCH);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = if n < SMALL {
                    Bytes::copy_from_slice(&buf)
                } else {
                    buf.freeze()
                };
                send.write_chunks(&mut [chunk]).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    send.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TunnelRecv over an in-memory reader, with the default chunk reads.
    struct Reader(tokio::io::DuplexStream);
    impl tokio::io::AsyncRead for Reader {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }
    impl TunnelRecv for Reader {}

    /// What has already arrived is gathered into one batch; the end is reported after
    /// the last bytes; vectored writes deliver every byte in order, partial writes too.
    #[tokio::test]
    async fn gathers_what_arrived_and_writes_it_whole() -> io::Result<()> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut recv = Reader(rx);
        for i in 0..10u8 {
            tx.write_all(&[i; 1000]).await?;
        }
        let mut batch = Vec::new();
        assert!(gather(&mut recv, &mut batch).await?);
        assert_eq!(batch.iter().map(Bytes::len).sum::<usize>(), 10_000);
        tx.write_all(b"last").await?;
        drop(tx);
        // The last bytes and the end arrive together.
        assert!(!gather(&mut recv, &mut batch).await?);
        assert_eq!(batch.last().map(|b| &b[..]), Some(&b"last"[..]));
        // A writer that takes at most 7 bytes per call.
        let (mut w, mut r) = tokio::io::duplex(7);
        let writer = async {
            write_vectored_all(&mut w, &mut batch).await?;
            drop(w);
            io::Result::Ok(())
        };
        let mut out = Vec::new();
        let reader = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out);
        let (w, r) = tokio::join!(writer, reader);
        w?;
        r?;
        let mut want: Vec<u8> = (0..10u8).flat_map(|i| [i; 1000]).collect();
        want.extend_from_slice(b"last");
        assert_eq!(out, want);
        assert!(batch.is_empty());
        Ok(())
    }
}
