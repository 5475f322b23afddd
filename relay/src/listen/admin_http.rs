//! The admin listener: `/healthz`, `/readyz` and `/metrics`, plain HTTP/1.1 on a private
//! address (loopback unless `[admin] allow_remote`, checked with the configuration), with
//! a bearer token on every request when `[admin] token_file` is set, and at most
//! [`portcullis_shared::admin_gate::MAX_ADMIN_CONNECTIONS`] connections open.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_shared::admin_gate::{AdminGate, AdminService};

use portcullis_shared::metrics::{self as exposition, Registry as Exposition};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::conn::RespBody;
use crate::identity::registry::{Registry, RegistryMetrics};
use crate::identity::tls::CertResolver;
use crate::pipeline::{body, text};
use crate::state::State;

#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) ready: AtomicBool,
    /// What `/metrics` shows: every family, registered by the part that owns it.
    pub(crate) exposition: Exposition,
    /// The bearer token (if any) and the connection cap.
    pub(crate) gate: AdminGate,
}

/// The relay's `/metrics`: the process and build families, then under
/// `portcullis_relay_` the relay's counters and SLIs, its identities and store, its
/// certificates, and the connectors able to take each name. `device_ids`: list devices'
/// certificates one by one (their ids name their users).
pub(crate) fn exposition(
    relay: &Arc<State>,
    registry: &Arc<Registry>,
    resolver: &Arc<CertResolver>,
    device_ids: bool,
) -> Exposition {
    let mut root = exposition::daemon_registry("portcullis_relay");
    let prefixed = exposition::prefixed(&mut root, "portcullis_relay");
    prefixed.register_collector(Box::new(relay.metrics.clone()));
    prefixed.register_collector(Box::new(RegistryMetrics {
        registry: registry.clone(),
        device_ids,
    }));
    prefixed.register_collector(Box::new(resolver.clone()));
    prefixed.register_collector(Box::new(Replicas {
        relay: relay.clone(),
        registry: registry.clone(),
    }));
    root
}

/// `hostname_replicas`: every name a registered connector may publish, or the policy
/// opens, with how many connectors may take a stream for it now (0 when none).
#[derive(Debug)]
struct Replicas {
    relay: Arc<State>,
    registry: Arc<Registry>,
}

impl Collector for Replicas {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        exposition::gauges(
            &mut encoder,
            "hostname_replicas",
            "Connectors that may take a new stream for each hostname a registered connector may publish or the policy opens (not draining, not silent, origin healthy); 0 when none can.",
            hostname_replicas(&self.relay, &self.registry)
                .into_iter()
                .map(|(name, n)| {
                    (
                        [("hostname", exposition::label(&name))],
                        i64::try_from(n).unwrap_or(i64::MAX),
                    )
                }),
        )
    }
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
            exposition::encode(&state.exposition),
            exposition::CONTENT_TYPE,
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Every name a connector may publish (registered connectors' certificates) or the policy
/// opens, with how many connectors may take a stream for it now: 0 when none, so that a
/// name's last connector going reads 0 instead of the series vanishing.
fn hostname_replicas(relay: &State, registry: &Registry) -> Vec<(String, usize)> {
    let mut all: std::collections::BTreeMap<String, usize> = registry
        .snapshot()
        .certificate_names()
        .into_iter()
        .chain(
            relay
                .policy()
                .iter()
                .flat_map(|rule| rule.hostnames.iter().map(ToString::to_string)),
        )
        .map(|name| (name, 0))
        .collect();
    all.extend(relay.router.replicas());
    all.into_iter().collect()
}

impl AdminService for AdminState {
    type Body = RespBody;

    fn gate(&self) -> &AdminGate {
        &self.gate
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<RespBody> {
        respond(self, req)
    }
}
