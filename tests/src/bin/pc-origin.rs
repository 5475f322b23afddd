//! A small origin for the end-to-end tests: echoes requests as JSON, streams chunks or
//! server-sent events on a timer, answers slowly, sends or checksums any number of bytes,
//! sends trailers, and echoes WebSocket messages (`/ws`). With `--echo-ready-file PATH` it
//! also runs a raw TCP echo server (echoing until EOF, then half-closing). Like Go's h2c
//! handler, it accepts an `Upgrade: h2c` on any path and then speaks HTTP/2, logging what
//! each HTTP/2 request claims: the tests prove such an upgrade never reaches it.
//! `--listen ADDR --ready-file PATH`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// A request header's value as text, for the origin's log.
fn claim(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // One line per request reaching the origin, so tests can tell what was never forwarded.
    eprintln!("origin request: {} {}", req.method(), req.uri());
    if req.version() == hyper::Version::HTTP_2 {
        // What a request spoken as HTTP/2 claimed (a device reaching the origin after an
        // h2c upgrade would choose these itself).
        eprintln!(
            "origin http2 request: {} portcullis-user={:?} x-forwarded-for={:?}",
            req.uri().path(),
            claim(&req, "portcullis-user"),
            claim(&req, "x-forwarded-for"),
        );
    }
    let h2c = req
        .headers()
        .get("upgrade")
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"h2c"));
    if h2c && req.version() == hyper::Version::HTTP_11 {
        return Ok(h2c_upgrade(req));
    }
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    let resp = match req.uri().path() {
        "/stream" => {
            let n = query(&req, "n").unwrap_or(10);
            let ms = query(&req, "ms").unwrap_or(100);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))))
                        .await
                        .is_err()
                    {
                        eprintln!("client went away after {i} chunks");
                        return;
                    }
                    // The endpoint's pacing between chunks, asked for with `ms`.
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            });
            let stream = tokio_stream_from(rx);
            Response::new(StreamBody::new(stream).boxed())
        }
        "/slow" => {
            // A slow origin is this endpoint's purpose.
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
            Response::new(full("slow done\n".into()))
        }
        "/bytes" => {
            // Streamed in 64 KiB chunks of a repeating pattern, never held whole.
            let n = query(&req, "n").unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
            tokio::spawn(async move {
                let chunk = pattern_chunk();
                let mut left = n;
                while left > 0 {
                    let take = left.min(chunk.len() as u64) as usize;
                    if tx.send(Ok(Frame::data(chunk.slice(..take)))).await.is_err() {
                        return;
                    }
                    left -= take as u64;
                }
            });
            let mut resp = Response::new(StreamBody::new(tokio_stream_from(rx)).boxed());
            resp.headers_mut().insert("content-length", n.into());
            resp
        }
        "/sha256" => {
            // Hashes the request body as it streams in; answers "<hex> <length>".
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0u64;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(Response::new(full("body error\n".into())));
                };
                if let Some(data) = frame.data_ref() {
                    ctx.update(data);
                    len += data.len() as u64;
                }
            }
            let hex: String = ctx
                .finish()
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Response::new(full(format!("{hex} {len}")))
        }
        "/sse" => {
            let ms = query(&req, "ms").unwrap_or(1000);
            let n = query(&req, "n").unwrap_or(3);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    let event = Bytes::from(format!("data: event {i}\n\n"));
                    if tx.send(Ok(Frame::data(event))).await.is_err() {
                        return;
                    }
                    // The endpoint's pacing between events, asked for with `ms`.
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            });
            let mut resp = Response::new(StreamBody::new(tokio_stream_from(rx)).boxed());
            resp.headers_mut().insert(
                "content-type",
                "text/event-stream"
                    .parse()
                    .unwrap_or(hyper::header::HeaderValue::from_static("text/plain")),
            );
            resp
        }
        "/trailers" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"body-then-trailers\n"))))
                    .await;
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                trailers.insert(
                    "x-checksum",
                    hyper::header::HeaderValue::from_static("abc123"),
                );
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            Response::new(StreamBody::new(tokio_stream_from(rx)).boxed())
        }
        "/ws" => websocket(req),
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::new(Full::new(body).boxed())
        }
        path => {
            let mut headers = serde_json::Map::new();
            for name in req.headers().keys() {
                let values: Vec<_> = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                headers.insert(name.to_string(), values.join(", ").into());
            }
            let body = serde_json::json!({
                "origin": "pc-origin",
                "method": req.method().as_str(),
                "path": path,
                "headers": headers,
            });
            Response::new(full(body.to_string()))
        }
    };
    Ok(resp)
}

/// The 64 KiB chunk `/bytes` repeats (a byte pattern a test can checksum independently),
/// built once.
fn pattern_chunk() -> Bytes {
    static CHUNK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    CHUNK
        .get_or_init(|| (0..64 * 1024).map(|i| (i % 251) as u8).collect())
        .clone()
}

/// Answers a WebSocket handshake and echoes every message until the client closes.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut resp =
            Response::new(Full::new(Bytes::from_static(b"not a websocket request\n")).boxed());
        *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return resp;
    };
    eprintln!(
        "origin websocket: portcullis-user={:?} x-forwarded-for={:?} jwt={}",
        claim(&req, "portcullis-user"),
        claim(&req, "x-forwarded-for"),
        claim(&req, "portcullis-jwt-assertion").is_some_and(|j| j.split('.').count() == 3),
    );
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                let _ = ws.close(None).await;
                return;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        "connection",
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        "upgrade",
        hyper::header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = accept.parse() {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

/// Accepts an h2c upgrade on any path, as Go's h2c handler does: answers 101 and then
/// speaks HTTP/2 on the connection, serving whatever requests the client sends there.
/// (The upgrading request's own answer on stream 1 is left out: the tests only look at
/// what reaches the origin.)
fn h2c_upgrade(mut req: Request<Incoming>) -> Response<Body> {
    eprintln!("origin h2c upgrade accepted: {}", req.uri());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(upgraded, hyper::service::service_fn(handle))
            .await;
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        "connection",
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    h.insert("upgrade", hyper::header::HeaderValue::from_static("h2c"));
    resp
}

async fn tcp_echo(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:0".to_owned();
    let mut ready = None;
    let mut echo_ready = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_default(),
            "--ready-file" => ready = args.next(),
            "--echo-ready-file" => echo_ready = args.next(),
            _ => anyhow::bail!("usage: pc-origin --listen ADDR --ready-file PATH"),
        }
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    if let Some(path) = echo_ready {
        let ip = listener.local_addr()?.ip();
        let echo = tokio::net::TcpListener::bind((ip, 0)).await?;
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, echo.local_addr()?.to_string())?;
        std::fs::rename(tmp, path)?;
        tokio::spawn(tcp_echo(echo));
    }
    if let Some(path) = ready {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, listener.local_addr()?.to_string())?;
        std::fs::rename(tmp, path)?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        hyper::service::service_fn(handle),
                    )
                    .await;
        });
    }
}
