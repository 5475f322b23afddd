//! The request path shared by every client listener (HTTPS, HTTP/3, and HTTPS inside a
//! CONNECT whose TLS ends at the relay): decide ([`authorize`]), then either answer from
//! the relay itself or carry the exchange down a connector's tunnel as HTTP/1.1 on a
//! fresh tunnel stream ([`forward`]). Every refusal is a [`RequestError`], turned into a
//! response in one place ([`respond`]); every request gets one access-log line
//! ([`access`]).
//!
//! Plain requests stream both bodies through; tunnels (CONNECT, upgrades) come back as a
//! [`Tunnel`] in the response's extensions for the listener to join ([`upgrade`]).

mod access;
mod authorize;
mod forward;
mod respond;
mod rewrite;
mod services;
mod upgrade;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response, StatusCode};

pub(crate) use respond::{RequestError, body, text};
pub(crate) use upgrade::{Halves, Tunnel, TunnelParts, join_hyper};

use self::access::Access;
use self::authorize::{Context, Facts, Kind, Route, authorize};
use crate::conn::{ConflictingLength, ConnInfo, ReqBody, RespBody};
use crate::hardening::overload::Shed;
use crate::state::State;

/// Handles one request from any listener.
pub(crate) async fn handle(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    req: Request<ReqBody>,
) -> Response<RespBody> {
    let mut access = Access::begin(&state, &info, &req);
    let req = access.count_request_body(req);
    let resp = match serve(&state, &info, req, &mut access).await {
        Ok(resp) => resp,
        Err(e) => {
            access.reason = Some(e.reason());
            e.response()
        }
    };
    // The line is written when the body has been sent (or abandoned), with its size.
    access.log_when_sent(resp, state)
}

async fn serve(
    state: &Arc<State>,
    info: &ConnInfo,
    req: Request<ReqBody>,
    access: &mut Access,
) -> Result<Response<RespBody>, RequestError> {
    // RFC 9112 §6.1: a request with both is a smuggling vector; refuse it and close. Only
    // HTTP/1.1 can carry both (HTTP/2 and HTTP/3 refuse Transfer-Encoding as malformed),
    // and hyper drops the Content-Length, so the listener marks such requests.
    if req.extensions().get::<ConflictingLength>().is_some() {
        return Err(RequestError::ConflictingLength);
    }
    // Shed before any work: a new request only (this runs once per request; what is
    // already streaming never comes back here).
    if state.overload.sheds_requests() {
        state.metrics.shed(Shed::Request);
        return Err(RequestError::Overloaded);
    }
    let policy = state.policy();
    let registry = state.registry.snapshot();
    let decision = authorize(
        Context {
            server_name: &state.config.server_name,
            registry: &registry,
            policy: &policy,
        },
        Facts {
            host: &access.hostname,
            path: req.uri().path(),
            kind: Kind::of(&req),
            sni: info.sni.as_deref(),
            device: info.device.as_ref(),
        },
    );
    access.user = decision.user;
    if matches!(decision.outcome, Ok(Route::Forward(_) | Route::Services)) {
        access.authorised();
    }
    match decision.outcome {
        Ok(Route::Jwks) => Ok(respond::json(StatusCode::OK, &state.jwt.jwks())),
        Ok(Route::Services) => services::list(state, &registry, info),
        Ok(Route::Forward(grant)) => forward::forward(state, info, req, grant, access).await,
        Err(RequestError::Denied) => {
            state.metrics.denied.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(hostname = %access.hostname, "denied by policy");
            Err(RequestError::Denied)
        }
        Err(e) => Err(e),
    }
}
