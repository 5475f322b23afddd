//! HTTP/3 on the QUIC listener (ALPN `h3`, device certificates): the same request path as
//! HTTPS ([`crate::pipeline`]), with bodies and trailers carried as h3 frames, and CONNECT
//! tunnels carried on the request stream itself.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Frame;
use portcullis_shared::h3wire::H3Code;
use portcullis_shared::identity::Identity;
use portcullis_shared::pump;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::transport::{QuicTransport, Transport};
use portcullis_shared::tunnel_body::ChannelBody;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::conn::{BoxError, ConnInfo, ExtendedConnect, ReqBody};
use crate::hardening::h3_guard::{Guard, GuardedBidi, GuardedConnection, GuardedRecv, GuardedSend};
use crate::hardening::idle::Activity;
use crate::hardening::reset_flood::ResetFlood;
use crate::pipeline::{self, Halves, Tunnel, TunnelParts};
use crate::state::State;

type SendHalf = h3::server::RequestStream<GuardedSend, Bytes>;
type RecvHalf = h3::server::RequestStream<GuardedRecv, Bytes>;

/// Serves one device's HTTP/3 connection until it closes, the device is revoked, or
/// shutdown (then in-flight requests finish within the drain grace).
pub(crate) async fn serve(
    transport: QuicTransport,
    device: Identity,
    key_sha256: String,
    state: Arc<State>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let conn = transport.connection();
    let not_after = super::peer_not_after(&transport);
    let live = Arc::new(
        state
            .registry
            .track(&device, &key_sha256, not_after, crate::clock::now()),
    );
    let info = Arc::new(ConnInfo {
        peer: transport.remote_address(),
        sni: transport.server_name(),
        device: Some(device),
        revoked: live.token(),
        live: Some(live.clone()),
        protocol: "HTTP/3",
        activity: Activity::new(),
    });
    let _gauge = state
        .metrics
        .device_connection(portcullis_shared::transport::TransportKind::Quic);
    let limits = &state.config.limits;
    let wire = Guard::new(conn.clone(), limits.max_header_bytes);
    let mut h3c = h3::server::builder()
        .max_field_section_size(limits.max_header_bytes as u64)
        .enable_extended_connect(true)
        .build::<GuardedConnection, Bytes>(GuardedConnection::new(wire.clone()))
        .await?;
    let requests = tokio_util::task::TaskTracker::new();
    let flood = Arc::new(ResetFlood::default());
    loop {
        tokio::select! {
            r = h3c.accept() => match r {
                Ok(Some(resolver)) => {
                    let state = state.clone();
                    let info = info.clone();
                    let wire = wire.clone();
                    let span = tracing::debug_span!("h3.request");
                    let guard = flood.guard();
                    shutdown.tracker().spawn(requests.track_future(async move {
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => {
                                if serve_request(state, info, &wire, req, stream).await {
                                    guard.finish();
                                }
                            }
                            // h3 has already answered 431 (to a section over the limit, as
                            // decoded or as the guard saw it declared) or reset the stream
                            // (H3_MESSAGE_ERROR).
                            Err(e) => {
                                if matches!(e, h3::error::StreamError::HeaderTooBig { .. }) {
                                    state.metrics.sli.codec_refusal("HTTP/3", 431);
                                }
                                tracing::debug!(error = %e, "malformed HTTP/3 request");
                            }
                        }
                    }.instrument(span)));
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(error = %e, "HTTP/3 connection ended");
                    }
                    break;
                }
            },
            () = flood.tripped.cancelled() => {
                close(conn, H3Code::ExcessiveLoad, "H3_EXCESSIVE_LOAD");
                break;
            }
            () = info.activity.idle(limits.idle_timeout) => {
                tracing::debug!("closing an idle HTTP/3 connection");
                let _ = h3c.shutdown(0).await;
                close(conn, H3Code::NoError, "idle");
                break;
            }
            () = live.revoked() => {
                tracing::info!("closing a revoked device's HTTP/3 connection");
                close(conn, H3Code::NoError, "certificate revoked");
                break;
            }
            () = shutdown.wait() => {
                let _ = h3c.shutdown(0).await;
                requests.close();
                let _ = tokio::time::timeout(state.config.drain_grace, requests.wait()).await;
                break;
            }
        }
    }
    Ok(())
}

/// Closes the whole HTTP/3 connection with an HTTP/3 error code.
fn close(conn: &quinn::Connection, code: H3Code, reason: &str) {
    conn.close(
        quinn::VarInt::from_u64(code.code()).unwrap_or(quinn::VarInt::MAX),
        reason.as_bytes(),
    );
}

/// The h3 library's value for one of our codes.
fn h3_code(code: H3Code) -> h3::error::Code {
    match code {
        H3Code::NoError => h3::error::Code::H3_NO_ERROR,
        H3Code::InternalError => h3::error::Code::H3_INTERNAL_ERROR,
        H3Code::FrameUnexpected => h3::error::Code::H3_FRAME_UNEXPECTED,
        H3Code::FrameError => h3::error::Code::H3_FRAME_ERROR,
        H3Code::ExcessiveLoad => h3::error::Code::H3_EXCESSIVE_LOAD,
        H3Code::MessageError => h3::error::Code::H3_MESSAGE_ERROR,
    }
}

async fn serve_request(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    wire: &Guard,
    req: Request<()>,
    stream: h3::server::RequestStream<GuardedBidi, Bytes>,
) -> bool {
    let carried = wire.extended_protocol(stream.id());
    let (mut tx, rx) = stream.split();
    let (mut parts, ()) = req.into_parts();
    if let Some(p) = parts.extensions.get::<h3::ext::Protocol>() {
        // RFC 9220 `websocket` travels through h3 under another name (see h3_guard).
        let p = ExtendedConnect(carried.unwrap_or_else(|| p.as_str().to_owned()));
        parts.extensions.insert(p);
    }
    let declared = match validate(&parts.headers) {
        Ok(declared) => declared,
        Err(why) => {
            // RFC 9114 §4.1.2: a malformed request is a stream error of type
            // H3_MESSAGE_ERROR; nothing of it is forwarded.
            tracing::debug!(reason = why, "malformed HTTP/3 request");
            tx.stop_stream(h3_code(H3Code::MessageError));
            return true;
        }
    };
    let connect = parts.method == Method::CONNECT;
    let violated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (body, kept_rx): (ReqBody, _) = if connect {
        (
            Empty::new().map_err(|never| match never {}).boxed(),
            Some(rx),
        )
    } else {
        (
            request_body(&state, rx, declared, violated.clone()).boxed(),
            None,
        )
    };
    let resp = pipeline::handle(state, info, Request::from_parts(parts, body)).await;
    if violated.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!("HTTP/3 body did not match its Content-Length");
        tx.stop_stream(h3_code(H3Code::MessageError));
        return true;
    }
    let tunnel = resp.extensions().get::<Tunnel>().and_then(Tunnel::take);
    let (head, mut body) = resp.into_parts();
    if let Err(e) = tx.send_response(Response::from_parts(head, ())).await {
        tracing::debug!(error = %e, "sending the response head failed");
        return false;
    }
    if let (Some(tunnel), Some(rx)) = (tunnel, kept_rx) {
        pump(tunnel, tx, rx).await;
        return true;
    }
    while let Some(frame) = body.frame().await {
        let sent = match frame {
            Ok(f) if f.is_data() => match f.into_data() {
                Ok(data) => tx.send_data(data).await,
                Err(_) => Ok(()),
            },
            Ok(f) => match f.into_trailers() {
                Ok(trailers) => tx.send_trailers(trailers).await,
                Err(_) => Ok(()),
            },
            Err(e) => {
                tracing::debug!(error = %e, "upstream body failed; resetting the stream");
                tx.stop_stream(h3_code(H3Code::InternalError));
                return true;
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "client went away");
            return false;
        }
    }
    tx.finish().await.is_ok()
}

/// Checks what h3 leaves to the application (RFC 9114 §4.2, §4.1.2): no connection-specific
/// fields, `TE` only as `trailers`, at most one Content-Length value. Returns the declared
/// length, or why the request is malformed.
fn validate(headers: &http::HeaderMap) -> Result<Option<u64>, &'static str> {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        if headers.contains_key(name) {
            return Err("connection-specific header field");
        }
    }
    if headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        return Err("TE other than trailers");
    }
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    if lengths.next().is_some() {
        return Err("more than one Content-Length");
    }
    first
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or("invalid Content-Length")
}

/// Joins a CONNECT request stream to the connector's tunnel: bytes both ways, FIN for FIN,
/// in batches of what has already arrived (see [`portcullis_shared::pump`]): the
/// client's bytes go on as QUIC received them, without a copy; the origin's go out as one
/// DATA frame per batch.
async fn pump(tunnel: TunnelParts, mut tx: SendHalf, mut rx: RecvHalf) {
    let TunnelParts {
        upstream,
        permits,
        revoked,
        live,
    } = tunnel;
    let Some(Halves {
        early,
        mut recv,
        mut send,
    }) = upstream.open_halves().await
    else {
        return;
    };
    let client_to_origin = async {
        let mut batch = Vec::new();
        loop {
            let more = gather_request(&mut rx, &mut batch).await;
            if send.write_chunks(&mut batch).await.is_err() {
                return;
            }
            batch.clear();
            if !more {
                break;
            }
        }
        let _ = send.shutdown().await;
    };
    let origin_to_client = async {
        if !early.is_empty() && tx.send_data(early).await.is_err() {
            return;
        }
        let mut batch = Vec::new();
        loop {
            let Ok(more) = pump::gather(&mut *recv, &mut batch).await else {
                return;
            };
            let data = match batch.len() {
                0 => None,
                1 => batch.pop(),
                _ => {
                    let mut one = BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
                    batch.drain(..).for_each(|b| one.put(b));
                    Some(one.freeze())
                }
            };
            if let Some(data) = data
                && tx.send_data(data).await.is_err()
            {
                return;
            }
            if !more {
                break;
            }
        }
        let _ = tx.finish().await;
    };
    tokio::select! {
        _ = async { tokio::join!(client_to_origin, origin_to_client) } => {}
        () = revoked.cancelled() => tracing::info!("closing a revoked device's tunnel"),
    }
    drop(permits);
    drop(live);
}

/// Waits for the client's next bytes on a CONNECT stream, then takes what has already
/// arrived, up to [`pump::BATCH`] in all, into `batch`. False once the stream has ended
/// (or failed: the upstream then gets a clean end, as before).
async fn gather_request(rx: &mut RecvHalf, batch: &mut Vec<Bytes>) -> bool {
    fn whole(mut chunk: impl Buf) -> Bytes {
        chunk.copy_to_bytes(chunk.remaining())
    }
    match rx.recv_data().await {
        Ok(Some(chunk)) => batch.push(whole(chunk)),
        _ => return false,
    }
    pump::take_ready(batch, |_| {
        pump::ready_now(rx.recv_data()).map(|r| r.map(|chunk| chunk.map(whole)))
    })
    .unwrap_or(false)
}

/// Reads an HTTP/3 request body into a [`ChannelBody`]: a task reads the h3 stream into a
/// small channel, so backpressure reaches the client through QUIC flow control.
///
/// With `declared` (the request's Content-Length), a body that runs past it or ends short
/// of it is an error, and `violated` is set so the stream is reset with H3_MESSAGE_ERROR
/// (RFC 9114 §4.1.2).
fn request_body(
    state: &State,
    mut stream: RecvHalf,
    declared: Option<u64>,
    violated: Arc<std::sync::atomic::AtomicBool>,
) -> ChannelBody {
    let (tx, body) = ChannelBody::channel(4);
    state.shutdown.tracker().spawn(async move {
        let mut seen = 0u64;
        let mismatch = |violated: &std::sync::atomic::AtomicBool| {
            violated.store(true, std::sync::atomic::Ordering::Relaxed);
            BoxError::from("request body does not match its Content-Length")
        };
        loop {
            match stream.recv_data().await {
                Ok(Some(mut chunk)) => {
                    let data = chunk.copy_to_bytes(chunk.remaining());
                    seen += data.len() as u64;
                    if declared.is_some_and(|d| seen > d) {
                        let _ = tx.send(Err(mismatch(&violated))).await;
                        return;
                    }
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        return;
                    }
                }
                Ok(None) if declared.is_some_and(|d| seen != d) => {
                    let _ = tx.send(Err(mismatch(&violated))).await;
                    return;
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as BoxError)).await;
                    return;
                }
            }
        }
        if let Ok(Some(trailers)) = stream.recv_trailers().await {
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        }
    });
    body
}
