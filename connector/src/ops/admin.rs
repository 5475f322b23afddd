//! The connector's optional admin listener (`admin_listen`): `/healthz` (the process
//! runs), `/readyz` (at least one tunnel is registered with a relay) and `/metrics`, plain
//! HTTP/1.1 for the kubelet's probes and Prometheus; with `admin_token_file`, every
//! request (the probes optionally excepted) must carry the bearer token, and at most
//! [`portcullis_shared::admin_gate::MAX_ADMIN_CONNECTIONS`] connections are held.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use portcullis_shared::admin_gate::{AdminGate, AdminService};
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
    tokio::spawn(portcullis_shared::admin_gate::serve(
        listener,
        Arc::new(admin),
        shutdown,
    ));
    Ok(bound)
}

impl AdminService for Admin {
    type Body = Full<Bytes>;

    fn gate(&self) -> &AdminGate {
        &self.gate
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        respond(self, req)
    }
}
