//! A small HTTP origin for the end-to-end tests: echoes requests as JSON, streams chunks
//! on a timer, answers slowly, or sends N bytes. `--listen ADDR --ready-file PATH`.

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

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
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
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            });
            let stream = tokio_stream_from(rx);
            Response::new(StreamBody::new(stream).boxed())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
            Response::new(full("slow done\n".into()))
        }
        "/bytes" => {
            let n = query(&req, "n").unwrap_or(0) as usize;
            Response::new(full("x".repeat(n)))
        }
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
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_default(),
            "--ready-file" => ready = args.next(),
            _ => anyhow::bail!("usage: pc-origin --listen ADDR --ready-file PATH"),
        }
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    if let Some(path) = ready {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, listener.local_addr()?.to_string())?;
        std::fs::rename(tmp, path)?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                .await;
        });
    }
}
