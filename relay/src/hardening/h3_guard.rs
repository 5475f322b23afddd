//! A guard between QUIC and the h3 library on device HTTP/3 connections.
//!
//! h3 buffers a whole frame before it looks at it, whatever length the frame declares, and
//! it lets a repeated pseudo-header field silently replace the first. The guard wraps the
//! QUIC streams h3 reads and walks the frames itself:
//!
//! - HEADERS frames longer than `max_header_bytes` are never buffered: the first is
//!   replaced by a section h3 answers with 431, one in trailers resets the stream with
//!   H3_EXCESSIVE_LOAD.
//! - Request and trailer sections are decoded (static table and literals only, as a
//!   zero-capacity QPACK decoder requires) and refused with H3_MESSAGE_ERROR when a
//!   pseudo-header field repeats, follows a regular field, is unknown, or appears in
//!   trailers, when a name is not a lower-case token, or when a value holds CR, LF or NUL
//!   (RFC 9114 §4.1.2, §4.2, §4.3).
//! - Unknown frame types are dropped without buffering (RFC 9114 §9); frames that never
//!   belong on a request stream close the connection with H3_FRAME_UNEXPECTED.
//! - Control-stream frames are capped at 4 KiB.
//! - `:protocol` values h3 0.0.8 does not know (RFC 9220 `websocket`) are carried through
//!   h3 as `connect-udp` and the real value is recorded for [`Guard::extended_protocol`].
//!
//! DATA frames pass through untouched and uncopied.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use portcullis_shared::h3wire::{self, FRAME_DATA, FRAME_HEADERS, FieldLine, H3Code};

const H3_FRAME_UNEXPECTED: u64 = H3Code::FrameUnexpected.code();
const H3_FRAME_ERROR: u64 = H3Code::FrameError.code();
const H3_EXCESSIVE_LOAD: u64 = H3Code::ExcessiveLoad.code();
const H3_MESSAGE_ERROR: u64 = H3Code::MessageError.code();

/// Largest frame accepted on the control stream (SETTINGS, GOAWAY, MAX_PUSH_ID).
const MAX_CONTROL_FRAME: u64 = 4096;
/// The `:protocol` value h3 0.0.8 accepts that stands in for the ones it does not know.
const CARRIER_PROTOCOL: &[u8] = b"connect-udp";

/// Per-connection guard state.
pub(crate) struct Guard {
    conn: quinn::Connection,
    max_header_bytes: usize,
    protocols: Mutex<HashMap<u64, String>>,
}

impl Guard {
    pub(crate) fn new(conn: quinn::Connection, max_header_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            conn,
            max_header_bytes,
            protocols: Mutex::new(HashMap::new()),
        })
    }

    /// The `:protocol` the client sent on request stream `id`, when the guard had to carry
    /// it through h3 under another name.
    pub(crate) fn extended_protocol(&self, id: StreamId) -> Option<String> {
        self.protocols
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&id.into_inner()))
    }

    fn forget(&self, id: StreamId) {
        if let Ok(mut p) = self.protocols.lock() {
            p.remove(&id.into_inner());
        }
    }
}

/// What a stream did wrong, and how far the consequences reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    Stream(u64, &'static str),
    Connection(u64, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A client-initiated bidirectional stream: one request.
    Request,
    /// A unidirectional stream whose type is not known yet.
    Uni,
    /// The peer's control stream.
    Control,
}

#[derive(Debug)]
enum State {
    /// Reading a frame head (or, on a new unidirectional stream, its type).
    Head,
    /// Passing this many payload bytes through.
    Pass(u64),
    /// Dropping this many payload bytes.
    Skip(u64),
    /// Collecting a HEADERS payload of this length.
    Collect(usize, Vec<u8>),
    /// Everything passes (QPACK encoder and decoder streams, unknown stream types).
    Opaque,
}

/// The frame walker of one stream (pure: bytes in, bytes or a violation out).
#[derive(Debug)]
struct Filter {
    kind: Kind,
    max_header_bytes: usize,
    state: State,
    head: Vec<u8>,
    out: VecDeque<Bytes>,
    headers_seen: bool,
    /// A `:protocol` value carried under [`CARRIER_PROTOCOL`].
    protocol: Option<String>,
}

impl Filter {
    fn new(kind: Kind, max_header_bytes: usize) -> Self {
        Self {
            kind,
            max_header_bytes,
            state: State::Head,
            head: Vec::with_capacity(16),
            out: VecDeque::new(),
            headers_seen: false,
            protocol: None,
        }
    }

    fn feed(&mut self, mut chunk: Bytes) -> Result<(), Violation> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Opaque => {
                    self.out.push_back(chunk);
                    return Ok(());
                }
                State::Pass(rest) => {
                    let n = chunk
                        .len()
                        .min(usize::try_from(*rest).unwrap_or(usize::MAX));
                    *rest -= n as u64;
                    self.out.push_back(chunk.split_to(n));
                    if *rest == 0 {
                        self.state = State::Head;
                    }
                }
                State::Skip(rest) => {
                    let n = chunk
                        .len()
                        .min(usize::try_from(*rest).unwrap_or(usize::MAX));
                    *rest -= n as u64;
                    chunk.advance(n);
                    if *rest == 0 {
                        self.state = State::Head;
                    }
                }
                State::Collect(len, buf) => {
                    let n = chunk.len().min(*len - buf.len());
                    buf.extend_from_slice(&chunk.split_to(n));
                    if buf.len() == *len {
                        let payload = std::mem::take(buf);
                        self.state = State::Head;
                        self.headers(payload)?;
                    }
                }
                State::Head => {
                    let take = chunk.len().min(16 - self.head.len());
                    let before = self.head.len();
                    self.head.extend_from_slice(&chunk[..take]);
                    if self.kind == Kind::Uni {
                        let Ok((ty, n)) = h3wire::decode_varint(&self.head) else {
                            chunk.advance(take);
                            continue;
                        };
                        chunk.advance(n - before);
                        self.out.push_back(Bytes::copy_from_slice(&self.head[..n]));
                        self.head.clear();
                        if ty == 0x00 {
                            self.kind = Kind::Control;
                        } else {
                            self.state = State::Opaque;
                        }
                        continue;
                    }
                    match h3wire::decode_frame_head(&self.head) {
                        Err(_) => chunk.advance(take),
                        Ok(h) => {
                            chunk.advance(h.head_len - before);
                            let head = Bytes::copy_from_slice(&self.head[..h.head_len]);
                            self.head.clear();
                            self.frame(h.ty, h.len, head)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream ended cleanly: inside a frame, that is a connection error of type
    /// H3_FRAME_ERROR (RFC 9114 §7.1).
    fn finish(&self) -> Result<(), Violation> {
        let inside = match &self.state {
            State::Opaque => false,
            State::Head => !self.head.is_empty(),
            State::Pass(_) | State::Skip(_) | State::Collect(..) => true,
        };
        if inside && self.kind != Kind::Uni {
            return Err(Violation::Connection(
                H3_FRAME_ERROR,
                "stream ended inside a frame",
            ));
        }
        Ok(())
    }

    fn frame(&mut self, ty: u64, len: u64, head: Bytes) -> Result<(), Violation> {
        let unexpected = Violation::Connection(H3_FRAME_UNEXPECTED, "frame type not allowed here");
        let pass = |f: &mut Self| {
            f.out.push_back(head);
            f.state = if len == 0 {
                State::Head
            } else {
                State::Pass(len)
            };
        };
        match (self.kind, ty) {
            (Kind::Request, FRAME_DATA) => pass(self),
            (Kind::Request, FRAME_HEADERS) if len > self.max_header_bytes as u64 => {
                if self.headers_seen {
                    return Err(Violation::Stream(
                        H3_EXCESSIVE_LOAD,
                        "trailer section larger than the limit",
                    ));
                }
                // Let h3 answer 431 as it does for sections that decode too large, without
                // buffering what the client declared.
                self.headers_seen = true;
                self.emit_headers(&oversized_section(self.max_header_bytes));
                self.state = State::Skip(len);
            }
            (Kind::Request, FRAME_HEADERS) if len == 0 => self.headers(Vec::new())?,
            (Kind::Request, FRAME_HEADERS) => {
                self.state = State::Collect(len as usize, Vec::with_capacity(len as usize));
            }
            // CANCEL_PUSH, SETTINGS, PUSH_PROMISE, GOAWAY, MAX_PUSH_ID and the reserved
            // HTTP/2 types (RFC 9114 §7.2.8) never belong on a request stream.
            (Kind::Request, 0x2..=0x9 | 0xd) => return Err(unexpected),
            (Kind::Control, 0x3 | 0x4 | 0x7 | 0xd) if len > MAX_CONTROL_FRAME => {
                return Err(Violation::Connection(
                    H3_EXCESSIVE_LOAD,
                    "control frame larger than the limit",
                ));
            }
            (Kind::Control, 0x3 | 0x4 | 0x7 | 0xd) => pass(self),
            (Kind::Control, 0x0..=0x9) => return Err(unexpected),
            // Unknown and reserved types are ignored (RFC 9114 §9), here without buffering.
            _ => {
                self.state = if len == 0 {
                    State::Head
                } else {
                    State::Skip(len)
                }
            }
        }
        Ok(())
    }

    fn headers(&mut self, payload: Vec<u8>) -> Result<(), Violation> {
        let trailers = self.headers_seen;
        self.headers_seen = true;
        // Whatever the guard cannot read (a dynamic-table reference, a bad integer) h3
        // refuses on its own, with the connection error QPACK requires.
        let Ok(fields) = h3wire::decode_field_section(&payload) else {
            self.emit_headers(&payload);
            return Ok(());
        };
        check_section(&fields, trailers).map_err(|why| Violation::Stream(H3_MESSAGE_ERROR, why))?;
        let carried = fields.iter().find(|f| {
            f.name == b":protocol"
                && !matches!(f.value.as_slice(), b"webtransport" | b"connect-udp")
        });
        match carried {
            None => self.emit_headers(&payload),
            Some(f) => {
                self.protocol = Some(String::from_utf8_lossy(&f.value).into_owned());
                let mut block = payload[..f.span.start].to_vec();
                h3wire::encode_literal(b":protocol", CARRIER_PROTOCOL, &mut block);
                block.extend_from_slice(&payload[f.span.end..]);
                self.emit_headers(&block);
            }
        }
        Ok(())
    }

    fn emit_headers(&mut self, block: &[u8]) {
        let mut frame = Vec::with_capacity(block.len() + 9);
        h3wire::encode_frame(FRAME_HEADERS, block, &mut frame);
        self.out.push_back(Bytes::from(frame));
    }
}

/// A section whose decoded size is just over `limit`, so h3 answers it with 431.
fn oversized_section(limit: usize) -> Vec<u8> {
    let filler = vec![b'a'; limit];
    h3wire::encode_field_section([(&b"x"[..], filler.as_slice())])
}

/// RFC 9114 §4.1.2, §4.2 and §4.3: what makes a request or trailer section malformed
/// beyond what h3 checks.
fn check_section(fields: &[FieldLine], trailers: bool) -> Result<(), &'static str> {
    const PSEUDO: [&[u8]; 5] = [
        b":method",
        b":scheme",
        b":authority",
        b":path",
        b":protocol",
    ];
    let mut seen = [false; 5];
    let mut regular = false;
    let mut connect = false;
    for f in fields {
        if f.value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
            return Err("CR, LF or NUL in a field value");
        }
        if f.is_pseudo() {
            if trailers {
                return Err("pseudo-header field in trailers");
            }
            if regular {
                return Err("pseudo-header field after a regular field");
            }
            let i = PSEUDO
                .iter()
                .position(|p| *p == f.name.as_slice())
                .ok_or("unknown or response pseudo-header field")?;
            if std::mem::replace(&mut seen[i], true) {
                return Err("repeated pseudo-header field");
            }
            connect |= i == 0 && f.value == b"CONNECT";
        } else {
            regular = true;
            let token = |b: &u8| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(b)
            };
            if f.name.is_empty() || !f.name.iter().all(token) {
                return Err("field name is not a lower-case token");
            }
        }
    }
    if seen[4] && !connect {
        return Err(":protocol on a request that is not CONNECT");
    }
    Ok(())
}

/// A QUIC connection as h3 sees it (`T` = `h3_quinn::Connection`), or its stream opener
/// (`T` = `h3_quinn::OpenStreams`), with every stream h3 reads going through a [`Filter`].
pub(crate) struct Guarded<T> {
    inner: T,
    guard: Arc<Guard>,
}

/// The connection h3 is built on.
pub(crate) type GuardedConnection = Guarded<h3_quinn::Connection>;

impl GuardedConnection {
    pub(crate) fn new(guard: Arc<Guard>) -> Self {
        Self {
            inner: h3_quinn::Connection::new(guard.conn.clone()),
            guard,
        }
    }
}

impl<T: Clone> Clone for Guarded<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guard: self.guard.clone(),
        }
    }
}

impl quic::Connection<Bytes> for GuardedConnection {
    type RecvStream = GuardedRecv;
    type OpenStreams = Guarded<h3_quinn::OpenStreams>;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<GuardedRecv, ConnectionErrorIncoming>> {
        let guard = &self.guard;
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, cx).map_ok(|inner| {
            let reader = Reader::new(guard, Kind::Uni, quic::RecvStream::recv_id(&inner));
            GuardedRecv { inner, reader }
        })
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, ConnectionErrorIncoming>> {
        let guard = &self.guard;
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, cx)
            .map_ok(|inner| GuardedBidi::new(guard, inner))
    }

    fn opener(&self) -> Guarded<h3_quinn::OpenStreams> {
        Guarded {
            inner: quic::Connection::<Bytes>::opener(&self.inner),
            guard: self.guard.clone(),
        }
    }
}

impl<T> quic::OpenStreams<Bytes> for Guarded<T>
where
    T: quic::OpenStreams<
            Bytes,
            BidiStream = h3_quinn::BidiStream<Bytes>,
            SendStream = h3_quinn::SendStream<Bytes>,
        >,
{
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, StreamErrorIncoming>> {
        let guard = &self.guard;
        self.inner
            .poll_open_bidi(cx)
            .map_ok(|inner| GuardedBidi::new(guard, inner))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.inner.close(code, reason);
    }
}

/// The reading side of a guarded stream: runs the [`Filter`] and acts on violations.
struct Reader {
    filter: Filter,
    guard: Arc<Guard>,
    id: StreamId,
    /// The stream error the send side must reset with (0: none).
    poison: Arc<AtomicU64>,
    failed: Option<u64>,
}

impl Reader {
    fn new(guard: &Arc<Guard>, kind: Kind, id: StreamId) -> Self {
        Self {
            filter: Filter::new(kind, guard.max_header_bytes),
            guard: guard.clone(),
            id,
            poison: Arc::new(AtomicU64::new(0)),
            failed: None,
        }
    }

    fn poll_data<S: quic::RecvStream<Buf = Bytes>>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        loop {
            if let Some(error_code) = self.failed {
                return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated { error_code }));
            }
            if let Some(b) = self.filter.out.pop_front() {
                return Poll::Ready(Ok(Some(b)));
            }
            let fed = match ready!(inner.poll_data(cx))? {
                Some(mut chunk) => {
                    let chunk = chunk.copy_to_bytes(chunk.remaining());
                    self.filter.feed(chunk)
                }
                None => match self.filter.finish() {
                    Ok(()) => return Poll::Ready(Ok(None)),
                    Err(v) => Err(v),
                },
            };
            if let Some(p) = self.filter.protocol.take()
                && let Ok(mut map) = self.guard.protocols.lock()
            {
                map.insert(self.id.into_inner(), p);
            }
            if let Err(v) = fed {
                self.filter.out.clear();
                let code = match v {
                    Violation::Stream(code, why) => {
                        tracing::debug!(reason = why, "refusing a malformed HTTP/3 stream");
                        inner.stop_sending(code);
                        self.poison.store(code, Ordering::Relaxed);
                        code
                    }
                    Violation::Connection(code, why) => {
                        tracing::debug!(reason = why, "closing an HTTP/3 connection");
                        self.guard
                            .conn
                            .close(quinn::VarInt::from_u32(code as u32), why.as_bytes());
                        code
                    }
                };
                self.failed = Some(code);
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if self.filter.kind == Kind::Request {
            self.guard.forget(self.id);
        }
    }
}

/// A request stream before h3 splits it.
pub(crate) struct GuardedBidi {
    inner: h3_quinn::BidiStream<Bytes>,
    reader: Reader,
}

impl GuardedBidi {
    fn new(guard: &Arc<Guard>, inner: h3_quinn::BidiStream<Bytes>) -> Self {
        let id = quic::RecvStream::recv_id(&inner);
        Self {
            inner,
            reader: Reader::new(guard, Kind::Request, id),
        }
    }
}

impl quic::RecvStream for GuardedBidi {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let r = self.reader.poll_data(&mut self.inner, cx);
        let code = self.reader.poison.swap(0, Ordering::Relaxed);
        if code != 0 {
            quic::SendStream::reset(&mut self.inner, code);
        }
        r
    }

    fn stop_sending(&mut self, error_code: u64) {
        quic::RecvStream::stop_sending(&mut self.inner, error_code);
    }

    fn recv_id(&self) -> StreamId {
        quic::RecvStream::recv_id(&self.inner)
    }
}

impl quic::SendStream<Bytes> for GuardedBidi {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl quic::BidiStream<Bytes> for GuardedBidi {
    type SendStream = GuardedSend;
    type RecvStream = GuardedRecv;

    fn split(self) -> (GuardedSend, GuardedRecv) {
        let (send, recv) = self.inner.split();
        let poison = self.reader.poison.clone();
        (
            GuardedSend {
                inner: send,
                poison,
            },
            GuardedRecv {
                inner: recv,
                reader: self.reader,
            },
        )
    }
}

/// The receiving half of a guarded stream.
pub(crate) struct GuardedRecv {
    inner: h3_quinn::RecvStream,
    reader: Reader,
}

impl quic::RecvStream for GuardedRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.reader.poll_data(&mut self.inner, cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// The sending half of a request stream: once its receiving half found the request
/// malformed, it resets instead of sending.
pub(crate) struct GuardedSend {
    inner: h3_quinn::SendStream<Bytes>,
    poison: Arc<AtomicU64>,
}

impl GuardedSend {
    fn poisoned(&mut self) -> Result<(), StreamErrorIncoming> {
        match self.poison.swap(0, Ordering::Relaxed) {
            0 => Ok(()),
            error_code => {
                quic::SendStream::reset(&mut self.inner, error_code);
                Err(StreamErrorIncoming::StreamTerminated { error_code })
            }
        }
    }
}

impl quic::SendStream<Bytes> for GuardedSend {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.poisoned()?;
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.poisoned()?;
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.poisoned()?;
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> Vec<u8> {
        let block =
            h3wire::encode_field_section(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        let mut f = Vec::new();
        h3wire::encode_frame(FRAME_HEADERS, &block, &mut f);
        f
    }

    fn run(kind: Kind, input: &[u8], chunk: usize) -> (Result<(), Violation>, Vec<u8>, Filter) {
        let mut f = Filter::new(kind, 1024);
        let mut r = Ok(());
        for c in input.chunks(chunk) {
            r = f.feed(Bytes::copy_from_slice(c));
            if r.is_err() {
                break;
            }
        }
        let out = f.out.drain(..).flat_map(|b| b.to_vec()).collect();
        (r, out, f)
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "app.test"),
        (":path", "/"),
    ];

    #[test]
    fn well_formed_requests_pass_byte_for_byte_in_any_chunking() {
        let mut input = request(&GET);
        h3wire::encode_frame(FRAME_DATA, b"body bytes", &mut input);
        // An unknown (grease) frame type is dropped.
        h3wire::encode_frame(0x21, b"ignored", &mut input);
        h3wire::encode_frame(FRAME_HEADERS, &h3wire::encode_field_section([]), &mut input);
        let mut expected = request(&GET);
        h3wire::encode_frame(FRAME_DATA, b"body bytes", &mut expected);
        h3wire::encode_frame(
            FRAME_HEADERS,
            &h3wire::encode_field_section([]),
            &mut expected,
        );
        for chunk in [1, 2, 3, 7, 1000] {
            let (r, out, _) = run(Kind::Request, &input, chunk);
            assert_eq!(r, Ok(()));
            assert_eq!(out, expected, "chunk size {chunk}");
        }
    }

    #[test]
    fn malformed_sections_are_message_errors() {
        let cases: [&[(&str, &str)]; 7] = [
            &[(":method", "GET"), (":method", "POST"), (":path", "/")],
            &[(":method", "GET"), ("x-a", "1"), (":path", "/")],
            &[(":method", "GET"), (":status", "200")],
            &[(":method", "GET"), ("x-a", "v\r\nx-b: smuggled")],
            &[(":method", "GET"), ("x-a", "nul\0")],
            &[(":method", "GET"), ("X-Upper", "1")],
            &[(":method", "GET"), (":protocol", "websocket")],
        ];
        for fields in cases {
            let (r, _, _) = run(Kind::Request, &request(fields), 5);
            assert!(
                matches!(r, Err(Violation::Stream(H3_MESSAGE_ERROR, _))),
                "{fields:?}: {r:?}"
            );
        }
        // Pseudo-header fields in trailers.
        let mut input = request(&GET);
        input.extend(request(&[(":path", "/again")]));
        let (r, _, _) = run(Kind::Request, &input, 9);
        assert!(matches!(r, Err(Violation::Stream(H3_MESSAGE_ERROR, _))));
    }

    #[test]
    fn oversized_sections_are_never_buffered() {
        // The head declares a megabyte; only 20 bytes follow and nothing is collected.
        let mut input = Vec::new();
        h3wire::encode_varint(FRAME_HEADERS, &mut input);
        h3wire::encode_varint(1 << 20, &mut input);
        input.extend_from_slice(&[0u8; 20]);
        let (r, out, f) = run(Kind::Request, &input, 4);
        assert_eq!(r, Ok(()));
        assert!(matches!(f.state, State::Skip(n) if n == (1 << 20) - 20));
        // What h3 gets instead is a section that decodes just over the limit.
        let head = h3wire::decode_frame_head(&out).unwrap();
        let fields = h3wire::decode_field_section(&out[head.head_len..]).unwrap();
        assert_eq!(fields[0].value.len(), 1024);
        // Oversized trailers reset the stream.
        let mut input = request(&GET);
        h3wire::encode_varint(FRAME_HEADERS, &mut input);
        h3wire::encode_varint(4096, &mut input);
        let (r, _, _) = run(Kind::Request, &input, 64);
        assert!(matches!(r, Err(Violation::Stream(H3_EXCESSIVE_LOAD, _))));
    }

    #[test]
    fn frames_that_do_not_belong_close_the_connection() {
        let mut input = Vec::new();
        h3wire::encode_frame(0x4, &[], &mut input);
        let (r, _, _) = run(Kind::Request, &input, 1);
        assert!(matches!(
            r,
            Err(Violation::Connection(H3_FRAME_UNEXPECTED, _))
        ));
        // A control stream: SETTINGS passes, a huge one is refused before buffering.
        let mut input = vec![0x00];
        h3wire::encode_frame(0x4, &[0x06, 0x44, 0x00], &mut input);
        let (r, out, _) = run(Kind::Uni, &input, 2);
        assert_eq!((r, out), (Ok(()), input.clone()));
        h3wire::encode_varint(0x4, &mut input);
        h3wire::encode_varint(1 << 30, &mut input);
        let (r, _, _) = run(Kind::Uni, &input, 3);
        assert!(matches!(
            r,
            Err(Violation::Connection(H3_EXCESSIVE_LOAD, _))
        ));
        // QPACK encoder streams are not framed and pass as they are.
        let input = [0x02, 0x3f, 0xe1, 0x1f, 0x01];
        let (r, out, _) = run(Kind::Uni, &input, 1);
        assert_eq!((r, out), (Ok(()), input.to_vec()));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_a_frame_error() {
        let whole = request(&GET);
        for cut in 1..whole.len() {
            let (r, _, f) = run(Kind::Request, &whole[..cut], 4);
            assert_eq!(r, Ok(()));
            assert!(
                matches!(f.finish(), Err(Violation::Connection(H3_FRAME_ERROR, _))),
                "cut at {cut}"
            );
        }
        let (_, _, f) = run(Kind::Request, &whole, 4);
        assert_eq!(f.finish(), Ok(()));
    }

    #[test]
    fn websocket_is_carried_through_h3_and_remembered() {
        let fields = [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":authority", "app.test"),
            (":path", "/ws"),
            ("sec-websocket-version", "13"),
        ];
        let (r, out, f) = run(Kind::Request, &request(&fields), 3);
        assert_eq!(r, Ok(()));
        assert_eq!(f.protocol.as_deref(), Some("websocket"));
        let head = h3wire::decode_frame_head(&out).unwrap();
        let got = h3wire::decode_field_section(&out[head.head_len..]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect();
        assert_eq!(names[1], (b":protocol".to_vec(), b"connect-udp".to_vec()));
        assert_eq!(names[4], (b":path".to_vec(), b"/ws".to_vec()));
        assert_eq!(names.len(), 6);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        #[test]
        fn arbitrary_streams_never_panic_nor_buffer_past_the_limit(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            chunk in 1usize..64,
            uni in proptest::prelude::any::<bool>(),
        ) {
            let mut f = Filter::new(if uni { Kind::Uni } else { Kind::Request }, 1024);
            let mut out = 0;
            for c in bytes.chunks(chunk) {
                let fed = f.feed(Bytes::copy_from_slice(c));
                out += f.out.drain(..).map(|b| b.len()).sum::<usize>();
                if let State::Collect(len, buf) = &f.state {
                    proptest::prop_assert!(*len <= 1024 && buf.len() <= *len);
                }
                if fed.is_err() {
                    break;
                }
            }
            let _ = f.finish();
            // At most the input, one section standing in for an oversized one, and one
            // rewritten `:protocol`.
            proptest::prop_assert!(out <= bytes.len() + 1024 + 64);
        }

        #[test]
        fn well_formed_requests_pass_unchanged_in_any_chunking(
            values in proptest::collection::vec("[a-z0-9 ./=-]{0,40}", 0..6),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            chunk in 1usize..50,
        ) {
            let mut fields: Vec<(String, String)> =
                GET.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            fields.extend(values.iter().enumerate().map(|(i, v)| (format!("x-f{i}"), v.clone())));
            let pairs: Vec<(&str, &str)> =
                fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let mut input = request(&pairs);
            h3wire::encode_frame(FRAME_DATA, &body, &mut input);
            let (r, out, f) = run(Kind::Request, &input, chunk);
            proptest::prop_assert_eq!(r, Ok(()));
            proptest::prop_assert_eq!(f.finish(), Ok(()));
            proptest::prop_assert_eq!(out, input);
        }
    }
}
