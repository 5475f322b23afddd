//! A watch on HTTP/1.1 request framing, underneath hyper.
//!
//! A request carrying both `Content-Length` and `Transfer-Encoding` is the classic request
//! smuggling shape. hyper follows RFC 9112 §6.3 (Transfer-Encoding wins, the length is
//! dropped, the connection closes afterwards), and drops the `Content-Length` before the
//! service can see it. Portcullis refuses such requests with 400 instead, so [`Watched`]
//! reads the same bytes hyper reads, follows the message framing (heads, fixed-length and
//! chunked bodies), and records the index of the first request whose head has both. The
//! service numbers requests in the same order and answers that one 400.
//!
//! The watch stops at the first thing it does not follow (a CONNECT or `Upgrade` request,
//! a head it cannot parse, an oversized line): hyper then answers or tunnels on its own,
//! and nothing is refused that should not be.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest chunk-size line or trailer section followed before the watch gives up.
const MAX_LINE: usize = 4096;

/// Shared between the watched stream and the connection's service.
#[derive(Debug, Default)]
pub(crate) struct Conflicts {
    /// Index of the first request whose head had both framing headers (`u64::MAX`: none).
    first: AtomicU64,
    /// Requests the service has seen.
    served: AtomicU64,
}

impl Conflicts {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            first: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
        })
    }

    /// Called once per request, in order: whether this request must be refused.
    pub(crate) fn next_is_conflicting(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        self.first.load(Ordering::Relaxed) == n
    }
}

#[derive(Debug)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// Not followed any further.
    Done,
}

/// The framing follower (pure: bytes in, conflicts recorded).
#[derive(Debug)]
struct Framing {
    state: State,
    line: Vec<u8>,
    heads: u64,
    max_head: usize,
    conflicts: Arc<Conflicts>,
}

impl Framing {
    fn new(max_head: usize, conflicts: Arc<Conflicts>) -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
            heads: 0,
            max_head,
            conflicts,
        }
    }

    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                    *n -= take as u64;
                    buf = &buf[take..];
                    if *n == 0 {
                        self.state = match self.state {
                            State::ChunkData(_) => State::ChunkEnd(2),
                            _ => State::Head,
                        };
                    }
                }
                State::ChunkEnd(n) => {
                    let take = buf.len().min(usize::from(*n));
                    *n -= take as u8;
                    buf = &buf[take..];
                    if *n == 0 {
                        self.state = State::ChunkSize;
                    }
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    if matches!(self.state, State::Head) && self.line.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2).
                        let skip = buf
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        buf = &buf[skip..];
                        if buf.is_empty() {
                            continue;
                        }
                    }
                    let old = self.line.len();
                    let take = buf.len().min(self.limit() + 1 - old);
                    self.line.extend_from_slice(&buf[..take]);
                    let Some(at) = self.terminator(old) else {
                        if self.line.len() > self.limit() {
                            self.state = State::Done;
                        }
                        buf = &buf[take..];
                        continue;
                    };
                    buf = &buf[take - (self.line.len() - at)..];
                    let line = std::mem::take(&mut self.line);
                    self.state = self.after(&line[..at]);
                }
            }
        }
    }

    /// Where the current head, chunk-size line or trailer section ends in `line`, if it
    /// does; `old` bytes of it were already searched.
    fn terminator(&self, old: usize) -> Option<usize> {
        if matches!(self.state, State::Trailers) && self.line.starts_with(b"\r\n") {
            return Some(2);
        }
        let end: &[u8] = match self.state {
            State::ChunkSize => b"\n",
            _ => b"\r\n\r\n",
        };
        let from = old.saturating_sub(end.len() - 1);
        self.line[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map(|p| from + p + end.len())
    }

    fn limit(&self) -> usize {
        match self.state {
            State::Head => self.max_head,
            _ => MAX_LINE,
        }
    }

    fn after(&mut self, line: &[u8]) -> State {
        match self.state {
            State::Head => self.head(line),
            State::Trailers => State::Head,
            _ => {
                let size = line.split(|b| *b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size).unwrap_or_default().trim();
                match u64::from_str_radix(size, 16) {
                    Ok(0) => State::Trailers,
                    Ok(n) => State::ChunkData(n),
                    Err(_) => State::Done,
                }
            }
        }
    }

    fn head(&mut self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return State::Done;
        }
        let index = self.heads;
        self.heads += 1;
        let has = |name: &str| {
            req.headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(name))
        };
        let (te, cl) = (has("transfer-encoding"), has("content-length"));
        if te && cl {
            self.conflicts.first.store(index, Ordering::Relaxed);
            // hyper closes the connection after this request.
            return State::Done;
        }
        if req.method == Some("CONNECT") || has("upgrade") {
            return State::Done;
        }
        if te {
            let chunked_last = req
                .headers
                .iter()
                .rfind(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            return if chunked_last {
                State::ChunkSize
            } else {
                State::Done
            };
        }
        let length = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
            });
        match length {
            None | Some(Some(0)) => State::Head,
            Some(Some(n)) => State::Body(n),
            Some(None) => State::Done,
        }
    }
}

/// An HTTP/1.1 connection's transport, with its request framing followed.
pub(crate) struct Watched<T> {
    inner: T,
    framing: Framing,
}

impl<T> Watched<T> {
    pub(crate) fn new(inner: T, max_head: usize, conflicts: Arc<Conflicts>) -> Self {
        Self {
            inner,
            framing: Framing::new(max_head, conflicts),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let filled = &buf.filled()[before..];
            self.framing.feed(filled);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflicts_in(input: &[u8], chunk: usize) -> (Option<u64>, u64) {
        let c = Conflicts::new();
        let mut f = Framing::new(16 * 1024, c.clone());
        for part in input.chunks(chunk) {
            f.feed(part);
        }
        let first = c.first.load(Ordering::Relaxed);
        ((first != u64::MAX).then_some(first), f.heads)
    }

    #[test]
    fn the_conflicting_request_is_found_after_any_bodies() {
        // Bodies that look like heads must not be mistaken for them.
        let fake = "GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{fake}",
            fake.len()
        );
        stream += "POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        stream += &format!(
            "5;ext=1\r\nhello\r\n{:x}\r\n{fake}\r\n0\r\nX-T: 1\r\n\r\n",
            fake.len()
        );
        stream += "\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        stream += "POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        stream += "POST /e HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        for chunk in [1, 2, 3, 5, 64, 4096] {
            // The conflict is the fifth request (index 4), not anything inside a body.
            assert_eq!(
                conflicts_in(stream.as_bytes(), chunk),
                (Some(4), 5),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn either_order_is_a_conflict_and_plain_requests_are_not() {
        let cl_first =
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(conflicts_in(cl_first, 7).0, Some(0));
        let plain = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(conflicts_in(plain, 7), (None, 2));
    }

    #[test]
    fn the_watch_stops_where_it_cannot_follow() {
        // After an upgrade request the bytes are not HTTP/1.1 any more.
        let upgraded = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(conflicts_in(upgraded, 9), (None, 1));
        // A head beyond the limit is hyper's to refuse (431).
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(vec![b'a'; 20_000]);
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(conflicts_in(&long, 1000), (None, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// However the bytes are split across reads, the follower reaches the same verdict.
        #[test]
        fn chunking_never_changes_the_verdict(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n".to_owned()),
                    proptest::strategy::Just("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned()),
                    proptest::strategy::Just("GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned()),
                    proptest::strategy::Just("5\r\nhello\r\n".to_owned()),
                    proptest::strategy::Just("0\r\n\r\n".to_owned()),
                    proptest::strategy::Just("Content-Length: 1\r\n".to_owned()),
                    "[ -~]{0,12}",
                    "\r\n",
                ],
                0..12,
            ),
            chunk in 1usize..40,
        ) {
            let stream = parts.concat();
            let whole = conflicts_in(stream.as_bytes(), usize::MAX);
            proptest::prop_assert_eq!(conflicts_in(stream.as_bytes(), chunk), whole);
        }
    }
}
