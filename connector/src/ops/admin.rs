//! The connector's optional admin listener (`admin_listen`): `/healthz` (the process
//! runs), `/readyz` (at least one tunnel is registered with a relay) and `/metrics`, plain
//! HTTP/1.1 for the kubelet's probes and Prometheus; with `admin_token_file`, every
//! request (the probes optionally excepted) must carry the bearer token, and at most
//! [`portcullis_shared::admin_gate::MAX_ADMIN_CONNECTIONS`] connections are held.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_shared::admin_gate::AdminGate;
use portcullis_shared::shutdown::Shutdown;
use tokio::net::TcpListener;

use portcullis_shared::metrics::{self as exposition, Registry as Exposition};

use crate::ops::metrics::Metrics;
use crate::status::{Status, TunnelState};

/// What the admin listener reads.
pub(crate) struct Admin {
    pub(crate) status: Arc<Status>,
    /// What `/metrics` shows: every family, registered by the part that owns it.
    pub(crate) exposition: Exposition,
    /// The bearer token (if any) and the connection cap.
    pub(crate) gate: AdminGate,
}

/// The connector's `/metrics`: the process and build families, then under
/// `portcullis_connector_` the counters [`Metrics`] keeps and the tunnels' states
/// [`Status`] keeps.
pub(crate) fn exposition(metrics: &Arc<Metrics>, status: &Arc<Status>) -> Exposition {
    let mut root = exposition::daemon_registry("portcullis_connector");
    let prefixed = exposition::prefixed(&mut root, "portcullis_connector");
    prefixed.register_collector(Box::new(metrics.clone()));
    prefixed.register_collector(Box::new(status.clone()));
    root
}

fn respond(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if !admin.gate.allows(req.uri().path(), req.headers()) {
        let mut resp = Response::new(Full::new(Bytes::from_static(
            b"a bearer token is required\n",
        )));
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let up = admin
                .status
                .tunnels()
                .iter()
                .any(|t| matches!(t.state, TunnelState::Up { .. }));
            if up {
                (StatusCode::OK, "text/plain", "ready\n".to_owned())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no tunnel is registered with a relay\n".to_owned(),
                )
            }
        }
        "/metrics" => (
            StatusCode::OK,
            exposition::CONTENT_TYPE,
            exposition::encode(&admin.exposition),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// Binds `addr` and serves until `shutdown`; the bound address is logged.
pub(crate) async fn start(
    addr: SocketAddr,
    admin: Admin,
    shutdown: Shutdown,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin_listen {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(admin = %bound, "admin listener: /healthz, /readyz, /metrics");
    tokio::spawn(serve(listener, Arc::new(admin), shutdown));
    Ok(bound)
}

async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let Some(place) = admin.gate.admit() else {
            tracing::debug!("admin listener full: connection closed");
            continue;
        };
        let admin = admin.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&admin, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                () = stop.wait() => {}
            }
        });
    }
}
