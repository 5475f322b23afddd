//! [`TestOrigin`]: an HTTP origin inside the test's runtime on `127.0.0.1:0`, in its own
//! tracing span. It answers every request with JSON naming itself and echoing what it
//! received (method, path, headers), records what reached it, and holds `/hold` requests
//! until the test releases them, so a test controls exactly when a response is written.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tracing::Instrument;

/// How long [`TestOrigin::wait_held`] waits before the test fails.
const HOLD_TIMEOUT: Duration = Duration::from_secs(15);

struct State {
    name: String,
    /// `HOST PATH` of every request that reached this origin, in order.
    seen: Mutex<Vec<String>>,
    /// How many `/hold` requests have arrived.
    held: watch::Sender<usize>,
    /// Whether `/hold` requests may be answered.
    released: watch::Sender<bool>,
    /// Whether `/healthz` answers 200 (else 503).
    healthy: std::sync::atomic::AtomicBool,
}

/// A running in-process origin; stops accepting when dropped.
pub struct TestOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl TestOrigin {
    /// Starts an origin called `name` (it says so in each answer) and returns once it is
    /// listening.
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            name: name.to_owned(),
            seen: Mutex::default(),
            held: watch::Sender::new(0),
            released: watch::Sender::new(false),
            healthy: true.into(),
        });
        let serving = state.clone();
        let task = tokio::spawn(
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = serving.clone();
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    tokio::spawn(
                        async move {
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tcp), service)
                                    .await;
                        }
                        .in_current_span(),
                    );
                }
            }
            .instrument(tracing::info_span!("origin", name)),
        );
        Self { addr, state, task }
    }

    /// `HOST PATH` of every request that reached it so far.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `n` `/hold` requests have arrived (and are being held).
    pub async fn wait_held(&self, n: usize) {
        let mut held = self.state.held.subscribe();
        let arrived = tokio::time::timeout(HOLD_TIMEOUT, held.wait_for(|h| *h >= n)).await;
        assert!(
            matches!(arrived, Ok(Ok(_))),
            "{} /hold requests never reached origin {}",
            n,
            self.state.name
        );
    }

    /// Answers every held `/hold` request, and later ones at once.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Makes `/healthz` answer 200 (healthy) or 503. Health checks are not counted in
    /// [`TestOrigin::requests`].
    pub fn set_healthy(&self, healthy: bool) {
        self.state
            .healthy
            .store(healthy, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    state: Arc<State>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        let healthy = state.healthy.load(std::sync::atomic::Ordering::Relaxed);
        let mut resp = hyper::Response::new(Full::new(Bytes::from(if healthy {
            "ok"
        } else {
            "unhealthy"
        })));
        if !healthy {
            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(resp);
    }
    tracing::info!(%host, %path, method = %req.method(), "origin request");
    state
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("{host} {path}"));
    let body = if path == "/hold" {
        state.held.send_modify(|h| *h += 1);
        let mut released = state.released.subscribe();
        let _ = released.wait_for(|r| *r).await;
        format!("released by {}", state.name)
    } else {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                )
            })
            .collect();
        serde_json::json!({
            "origin": state.name,
            "method": req.method().as_str(),
            "path": path,
            "headers": headers,
        })
        .to_string()
    };
    Ok(hyper::Response::new(Full::new(Bytes::from(body))))
}
