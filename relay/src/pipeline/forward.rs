//! Carrying an authorised request to its connector: take the device's and connector's
//! stream slots, open a tunnel stream (trying another connector when one has just gone),
//! send the rewritten request over HTTP/1.1 on it, and shape the response — streamed,
//! or a [`Tunnel`] for CONNECT and upgrades, or TLS terminated here for `CONNECT host:443`
//! to a web service.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use portcullis_shared::hop_by_hop;
use portcullis_shared::identity::{Hostname, Identity};
use portcullis_shared::tunnel_body::{Fold, TunnelBody};
use tokio::sync::OwnedSemaphorePermit;

use super::access::Access;
use super::authorize::{Grant, Kind};
use super::respond::{RequestError, empty};
use super::rewrite::{
    Caller, connect_request, rewrite_request, strip_hop_by_hop, websocket_request,
};
use super::upgrade::{Tunnel, TunnelParts, Upstream};
use crate::clock::now;
use crate::conn::{BoxError, ConnInfo, ReqBody, RespBody};
use crate::identity::jwt::Claims;
use crate::state::State;
use crate::tunnel::{ConnectorHandle, TunnelStream};

/// How many times a request moves on to another connector whose tunnel just failed.
const RETRIES: usize = 2;

/// Forwards `req`, authorised by `grant`, down a connector's tunnel.
pub(super) async fn forward(
    state: &Arc<State>,
    info: &ConnInfo,
    req: Request<ReqBody>,
    grant: Grant,
    access: &mut Access,
) -> Result<Response<RespBody>, RequestError> {
    let device = info.device.as_ref().ok_or(RequestError::NoDevice)?;
    let (connector, io) = match open_stream(state, device, &grant.host, access).await {
        Ok(opened) => opened,
        Err(e) => {
            // A name some connector may publish is a label of the SLI series even when
            // no stream opened, so that its 502s (no connector, a failed tunnel) count
            // against it; other names stay `-`, which keeps the label set to what
            // connectors publish. Looked up on this failure path only.
            access.routed = state
                .registry
                .snapshot()
                .certificate_name(&grant.host)
                .is_some();
            return Err(e);
        }
    };
    access.routed = true;
    let jwt = state.jwt.token(&Claims {
        user: &grant.user,
        device: device.id(),
        groups: &grant.groups,
        hostname: grant.host.as_str(),
        now: now(),
    });
    let caller = Caller {
        device,
        user: &grant.user,
        groups: &grant.groups,
        jwt: jwt.as_deref(),
        peer: info.peer,
        trace: &access.trace,
    };
    let connect_port = req.uri().port_u16();
    let outgoing = match grant.kind {
        Kind::Connect => connect_request(req, &grant.host, &caller)?,
        Kind::WebSocketConnect => websocket_request(req, &grant.host, &caller)?,
        Kind::Plain | Kind::Upgrade => {
            rewrite_request(req, &grant.host, &caller, grant.kind == Kind::Upgrade)?
        }
    };
    let mut resp = exchange(state, &connector, io, outgoing).await?;

    if grant.kind == Kind::Connect
        && connect_port == Some(443)
        && resp.status() == StatusCode::NOT_FOUND
    {
        // No TCP service on 443 under this name, but a web service: terminate TLS here.
        let mut permits = std::mem::take(&mut access.permits);
        // Keep the device's slot; the connector that answered 404 (its slot was acquired
        // last) is not used.
        permits.pop();
        let parts = TunnelParts {
            upstream: Upstream::TerminateTls(state.clone(), Arc::new(info.clone())),
            permits,
            revoked: info.revoked.clone(),
            live: info.live.clone(),
        };
        let mut resp = Response::new(empty());
        resp.extensions_mut().insert(Tunnel::new(parts));
        return Ok(resp);
    }
    let opened = match grant.kind {
        Kind::Connect => resp.status().is_success(),
        Kind::Upgrade | Kind::WebSocketConnect => {
            resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && hop_by_hop::response_is_websocket(resp.headers())
        }
        Kind::Plain => false,
    };
    if opened {
        let parts = TunnelParts {
            upstream: Upstream::Connector(hyper::upgrade::on(&mut resp)),
            permits: std::mem::take(&mut access.permits),
            revoked: info.revoked.clone(),
            live: info.live.clone(),
        };
        let (mut head, _) = resp.into_parts();
        match grant.kind {
            Kind::WebSocketConnect => {
                // RFC 8441: the 101 of HTTP/1.1 becomes a 200 on the extended CONNECT
                // stream.
                head.status = StatusCode::OK;
                for h in ["upgrade", "connection", "sec-websocket-accept"] {
                    head.headers.remove(h);
                }
            }
            Kind::Connect => head.headers.clear(),
            Kind::Upgrade | Kind::Plain => {
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                head.headers
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
        }
        head.extensions.insert(Tunnel::new(parts));
        return Ok(Response::from_parts(head, empty()));
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 for anything but the WebSocket upgrade this request asked for is never
        // joined or passed on: the client's next bytes would reach the origin unread.
        tracing::info!(connector.name = %connector.name, "the origin switched protocols unasked; refused");
        return Err(RequestError::TunnelFailed);
    }
    let (mut parts, body) = resp.into_parts();
    // A response's malformed Connection line still loses every fixed hop-by-hop header.
    let _ = strip_hop_by_hop(&mut parts.headers, false);
    let body = TunnelBody::new(body, Fold::Unfold);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// Picks a connector for `host` and opens a tunnel stream to it. A connection that turns
/// out to be gone (a connector that just exited) is dropped from routing and the next one
/// is tried, which is safe because nothing of the request has been sent yet.
async fn open_stream(
    state: &State,
    device: &Identity,
    host: &Hostname,
    access: &mut Access,
) -> Result<(Arc<ConnectorHandle>, TunnelStream), RequestError> {
    let mut attempts = 0;
    loop {
        let connector = state.router.pick(host).ok_or(RequestError::NoConnector)?;
        let slots = acquire(state, device, &connector)?;
        match connector.open_http(host).await {
            Ok(io) => {
                access.permits.extend(slots);
                return Ok((connector, io));
            }
            Err(e) if attempts < RETRIES => {
                attempts += 1;
                tracing::info!(connector.name = %connector.name, error = %format!("{e:#}"), "connector gone; trying another");
                connector.retire();
            }
            Err(e) => {
                tracing::info!(connector.name = %connector.name, error = %format!("{e:#}"), "tunnel stream failed");
                return Err(RequestError::TunnelFailed);
            }
        }
    }
}

/// The device's slot, then the connector's.
fn acquire(
    state: &State,
    device: &Identity,
    connector: &ConnectorHandle,
) -> Result<Vec<OwnedSemaphorePermit>, RequestError> {
    let device_permit = state
        .device_slots(device.id())
        .try_acquire_owned()
        .map_err(|_| RequestError::DeviceLimit)?;
    let connector_permit = connector
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| RequestError::ConnectorLimit)?;
    Ok(vec![device_permit, connector_permit])
}

/// One HTTP/1.1 exchange on the tunnel stream; the connection task runs on (for upgrades)
/// under the relay's shutdown tracker.
async fn exchange(
    state: &State,
    connector: &ConnectorHandle,
    io: TunnelStream,
    outgoing: Request<ReqBody>,
) -> Result<Response<hyper::body::Incoming>, RequestError> {
    let failed = |e: &dyn std::fmt::Display| {
        tracing::info!(connector.name = %connector.name, error = %e, "tunnel stream failed");
        RequestError::TunnelFailed
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ReqBody>(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    let metrics = state.metrics.clone();
    metrics.tunnel_streams.fetch_add(1, Ordering::Relaxed);
    state.shutdown.tracker().spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel stream ended with an error");
        }
        metrics.tunnel_streams.fetch_sub(1, Ordering::Relaxed);
    });
    sender.send_request(outgoing).await.map_err(|e| failed(&e))
}
