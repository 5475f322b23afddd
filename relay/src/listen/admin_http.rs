//! The admin listener: `/healthz`, `/readyz` and `/metrics`, plain HTTP/1.1 on a private
//! address (loopback unless `[admin] allow_remote`, checked with the configuration), with
//! a bearer token on every request when `[admin] token_file` is set.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_shared::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::conn::RespBody;
use crate::identity::registry::Registry;
use crate::identity::tls::CertResolver;
use crate::ops::metrics::Metrics;
use crate::pipeline::{body, text};

#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) ready: AtomicBool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) resolver: Arc<CertResolver>,
    /// The relay's state, for the routing table (the replicas each published name has).
    pub(crate) relay: Arc<crate::state::State>,
    /// The bearer token every request must present, if one is configured.
    pub(crate) token: Option<String>,
    /// Whether `/metrics` lists device ids.
    pub(crate) device_ids: bool,
    /// Whether `/healthz` and `/readyz` answer without the token.
    pub(crate) probes_without_token: bool,
}

/// Whether `req` carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized(token: &str, req: &Request<Incoming>) -> bool {
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, given)| given)
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<RespBody> {
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
    if let Some(token) = &state.token
        && !(probe && state.probes_without_token)
        && !authorized(token, req)
    {
        let mut resp = text(StatusCode::UNAUTHORIZED, "a bearer token is required");
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" if state.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        "/metrics" => body(
            StatusCode::OK,
            state.metrics.render(
                &state.registry,
                &state.resolver,
                &state.relay.router.replicas(),
                state.device_ids,
            ),
            "text/plain; version=0.0.4",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let state = state.clone();
        let stop = shutdown.clone();
        shutdown.tracker().spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            // A scraper's keep-alive connection must not hold up the drain.
            tokio::select! {
                _ = conn => {}
                () = stop.wait() => {}
            }
        });
    }
}
