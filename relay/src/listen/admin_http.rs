//! The admin listener: `/healthz`, `/readyz` and `/metrics`, plain HTTP/1.1 on a private
//! address (loopback unless `[admin] allow_remote`, checked with the configuration), with
//! a bearer token on every request when `[admin] token_file` is set, and at most
//! [`portcullis_shared::admin_gate::MAX_ADMIN_CONNECTIONS`] connections open.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_shared::admin_gate::AdminGate;
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
    /// The bearer token (if any) and the connection cap.
    pub(crate) gate: AdminGate,
    /// Whether `/metrics` lists device ids.
    pub(crate) device_ids: bool,
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<RespBody> {
    if !state.gate.allows(req.uri().path(), req.headers()) {
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
                &hostname_replicas(state),
                state.device_ids,
            ),
            "text/plain; version=0.0.4",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Every name a connector may publish (registered connectors' certificates) or the policy
/// opens, with how many connectors may take a stream for it now: 0 when none, so that a
/// name's last connector going reads 0 instead of the series vanishing.
fn hostname_replicas(state: &AdminState) -> Vec<(String, usize)> {
    let mut all: std::collections::BTreeMap<String, usize> = state
        .registry
        .snapshot()
        .certificate_names()
        .into_iter()
        .chain(
            state
                .relay
                .policy()
                .iter()
                .flat_map(|rule| rule.hostnames.iter().map(ToString::to_string)),
        )
        .map(|name| (name, 0))
        .collect();
    all.extend(state.relay.router.replicas());
    all.into_iter().collect()
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
        let Some(place) = state.gate.admit() else {
            tracing::debug!("admin listener full: connection closed");
            continue;
        };
        let state = state.clone();
        let stop = shutdown.clone();
        shutdown.tracker().spawn(async move {
            let _place = place;
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
