//! The decision for one request, without IO: from the requested name, the TLS name, the
//! device certificate, the registry and the policy, either one of the relay's own
//! endpoints, a grant to forward to a connector, or the [`RequestError`] that refuses it.
//! The caller supplies every input; nothing here reads a socket, a clock or a lock.

use http::header;
use http::{Method, Request};
use portcullis_shared::hop_by_hop;
use portcullis_shared::identity::{Hostname, Identity, Role};
use portcullis_shared::policy::{self, PolicyRule, Subject};

use super::respond::RequestError;
use crate::conn::ExtendedConnect;
use crate::identity::registry::Snapshot;

/// The relay's JWKS, on its own name: the keys origins verify identity JWTs with.
pub(crate) const JWKS_PATH: &str = "/.well-known/jwks.json";
/// On the relay's own name: the published names this device may reach (JSON), for the
/// agent's split tunnel, PAC file and DNS stub.
pub(crate) const SERVICES_PATH: &str = "/.well-known/portcullis/services";

/// What kind of exchange the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    /// `CONNECT host:port`: raw TCP to a `tcp://` service.
    Connect,
    /// HTTP/1.1 `Upgrade` (WebSocket): passed through as is.
    Upgrade,
    /// Extended CONNECT with `:protocol` websocket: becomes an HTTP/1.1 upgrade on the
    /// tunnel, and a 200 to the client.
    WebSocketConnect,
}

impl Kind {
    /// Reads the kind off a request's method, extended-CONNECT protocol and headers. Only a
    /// WebSocket upgrade is an [`Kind::Upgrade`]; any other (h2c, TLS, …) is served as a
    /// plain request with the upgrade removed. A `Connection` or `Upgrade` list that is not
    /// made of tokens is refused, so no later hop can read it differently.
    pub(crate) fn of<B>(req: &Request<B>) -> Result<Self, RequestError> {
        let websocket = hop_by_hop::is_websocket_upgrade(req.headers())
            .map_err(|_| RequestError::BadHopByHop)?;
        if req.method() == Method::CONNECT {
            return match req.extensions().get::<ExtendedConnect>() {
                None => Ok(Self::Connect),
                Some(p) if p.0.eq_ignore_ascii_case("websocket") => Ok(Self::WebSocketConnect),
                Some(_) => Err(RequestError::UnsupportedProtocol),
            };
        }
        Ok(if websocket {
            Self::Upgrade
        } else {
            Self::Plain
        })
    }
}

/// The name the request is for: the URI's authority (`:authority` in HTTP/2 and HTTP/3,
/// absolute-form in HTTP/1.1) or else `Host`, port removed. `None` when it is missing,
/// malformed, or when an authority and a `Host` header disagree (a smuggling attempt: the
/// origin might route by the one that was not checked).
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let host_header = match req.headers().get(header::HOST) {
        Some(v) => Some(v.to_str().ok()?.parse::<http::uri::Authority>().ok()?),
        None => None,
    };
    let raw = match (req.uri().authority(), host_header) {
        (Some(a), Some(h)) if !a.host().eq_ignore_ascii_case(h.host()) => return None,
        (Some(a), _) => a.host().to_owned(),
        (None, Some(h)) => h.host().to_owned(),
        (None, None) => return None,
    };
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

/// What the relay knows of one request when it decides.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// From [`request_host`] (empty when it had none).
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    /// From [`Kind::of`].
    pub(crate) kind: Result<Kind, RequestError>,
    /// The TLS server name the client sent.
    pub(crate) sni: Option<&'a str>,
    /// The device certificate's identity, if one was presented.
    pub(crate) device: Option<&'a Identity>,
}

/// The relay's side of the decision: its own name, the registry and the policy in force.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) server_name: &'a Hostname,
    pub(crate) registry: &'a Snapshot,
    pub(crate) policy: &'a [PolicyRule],
}

/// Where an authorised request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// The JWKS document (needs no certificate).
    Jwks,
    /// The device's list of reachable services.
    Services,
    /// Down a connector's tunnel.
    Forward(Grant),
}

/// Who may reach what: the checked name and the caller's registry record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) host: Hostname,
    pub(crate) kind: Kind,
    pub(crate) user: String,
    pub(crate) groups: Vec<String>,
}

/// The outcome, with the user for the access log even when refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authorization {
    pub(crate) user: Option<String>,
    pub(crate) outcome: Result<Route, RequestError>,
}

/// Decides one request, checking in order: a valid name (400), the relay's JWKS, a device
/// certificate (403), the relay's services list, the TLS name (421), the exchange kind
/// (501), a published name (404), an enrolled device (403) and the policy (403).
pub(crate) fn authorize(ctx: Context<'_>, facts: Facts<'_>) -> Authorization {
    let refuse = |e| Authorization {
        user: None,
        outcome: Err(e),
    };
    let Ok(host) = Hostname::parse(facts.host) else {
        return refuse(RequestError::BadHost);
    };
    let own_name = host == *ctx.server_name;
    if own_name && facts.path == JWKS_PATH {
        return refuse_none(Route::Jwks);
    }
    // Only a device certificate makes a caller; a connector's never does.
    let Some(device) = facts.device.filter(|d| d.role() == Role::Device) else {
        return refuse(RequestError::NoDevice);
    };
    if own_name && facts.path == SERVICES_PATH {
        return refuse_none(Route::Services);
    }
    // The TLS name must be the requested one, or the relay's own name (a client that
    // connected to "the relay" may reach any name it is allowed on that one connection).
    let sni_ok = facts
        .sni
        .and_then(|s| Hostname::parse(s).ok())
        .is_some_and(|s| s == host || s == *ctx.server_name);
    if !sni_ok {
        return refuse(RequestError::SniMismatch);
    }
    let kind = match facts.kind {
        Ok(k) => k,
        Err(e) => return refuse(e),
    };
    if !ctx.registry.is_published_name(&host) {
        return refuse(RequestError::UnknownHost);
    }
    let Some(record) = ctx.registry.active(device) else {
        return refuse(RequestError::DeviceRevoked);
    };
    let user = record.user.clone().unwrap_or_default();
    let subject = Subject {
        device: device.id(),
        user: &user,
        groups: &record.groups,
    };
    let outcome = if policy::evaluate(ctx.policy, &host, subject).is_allowed() {
        Ok(Route::Forward(Grant {
            host,
            kind,
            user: user.clone(),
            groups: record.groups.clone(),
        }))
    } else {
        Err(RequestError::Denied)
    };
    Authorization {
        user: Some(user),
        outcome,
    }
}

fn refuse_none(route: Route) -> Authorization {
    Authorization {
        user: None,
        outcome: Ok(route),
    }
}

#[cfg(test)]
mod tests {
    use portcullis_shared::identity::HostPattern;
    use portcullis_shared::store::IdentityRecord;

    use super::*;
    use crate::identity::registry::Registry;

    fn id(s: &str) -> Identity {
        let (role, name) = s.split_once(':').unwrap();
        Identity::new(Role::parse(role).unwrap(), name).unwrap()
    }

    fn record(identity: &str, user: Option<&str>, hostnames: &[&str]) -> IdentityRecord {
        let id = id(identity);
        IdentityRecord {
            user: user.map(str::to_owned),
            groups: vec!["eng".into()],
            ..Registry::test_record(id.role(), id.id(), hostnames)
        }
    }

    struct World {
        server_name: Hostname,
        registry: Snapshot,
        policy: Vec<PolicyRule>,
        device: Identity,
    }

    impl World {
        fn new() -> Self {
            let registry = Snapshot::new(vec![
                record("device:alice-laptop", Some("alice"), &[]),
                record("connector:web", None, &["app.acme.test", "*.dev.acme.test"]),
            ]);
            Self {
                server_name: Hostname::parse("relay.acme.test").unwrap(),
                registry,
                policy: vec![PolicyRule {
                    hostnames: vec![HostPattern::parse("app.acme.test").unwrap()],
                    groups: vec!["eng".into()],
                    ..PolicyRule::default()
                }],
                device: id("device:alice-laptop"),
            }
        }

        fn ctx(&self) -> Context<'_> {
            Context {
                server_name: &self.server_name,
                registry: &self.registry,
                policy: &self.policy,
            }
        }

        fn facts<'a>(&'a self, host: &'a str, sni: &'a str) -> Facts<'a> {
            Facts {
                host,
                path: "/",
                kind: Ok(Kind::Plain),
                sni: Some(sni),
                device: Some(&self.device),
            }
        }

        fn decide(&self, facts: Facts<'_>) -> Result<Route, RequestError> {
            authorize(self.ctx(), facts).outcome
        }
    }

    #[test]
    fn an_allowed_device_is_granted_the_checked_name() {
        let w = World::new();
        let a = authorize(w.ctx(), w.facts("app.acme.test", "app.acme.test"));
        assert_eq!(a.user.as_deref(), Some("alice"));
        let Ok(Route::Forward(grant)) = a.outcome else {
            panic!("not forwarded: {a:?}")
        };
        assert_eq!(grant.host.as_str(), "app.acme.test");
        assert_eq!(grant.groups, vec!["eng".to_owned()]);
    }

    #[test]
    fn the_relays_own_name_on_the_tls_layer_reaches_any_allowed_name() {
        let w = World::new();
        assert!(matches!(
            w.decide(w.facts("app.acme.test", "relay.acme.test")),
            Ok(Route::Forward(_))
        ));
    }

    #[test]
    fn refusals_come_in_order() {
        let w = World::new();
        assert_eq!(w.decide(w.facts("", "x")), Err(RequestError::BadHost));
        assert_eq!(
            w.decide(w.facts("app.acme.test", "other.acme.test")),
            Err(RequestError::SniMismatch)
        );
        assert_eq!(
            w.decide(w.facts("nope.acme.test", "nope.acme.test")),
            Err(RequestError::UnknownHost)
        );
        // Published (under the wildcard) but no rule allows it: default deny.
        let a = authorize(w.ctx(), w.facts("x.dev.acme.test", "x.dev.acme.test"));
        assert_eq!(a.outcome, Err(RequestError::Denied));
        assert_eq!(a.user.as_deref(), Some("alice"));
        let mut unsupported = w.facts("app.acme.test", "app.acme.test");
        unsupported.kind = Err(RequestError::UnsupportedProtocol);
        assert_eq!(
            w.decide(unsupported),
            Err(RequestError::UnsupportedProtocol)
        );
    }

    #[test]
    fn without_a_device_certificate_only_the_jwks_is_served() {
        let w = World::new();
        let mut f = w.facts("relay.acme.test", "relay.acme.test");
        f.device = None;
        f.path = JWKS_PATH;
        assert_eq!(w.decide(f), Ok(Route::Jwks));
        f.path = SERVICES_PATH;
        assert_eq!(w.decide(f), Err(RequestError::NoDevice));
        let mut f = w.facts("app.acme.test", "app.acme.test");
        f.device = None;
        assert_eq!(w.decide(f), Err(RequestError::NoDevice));
    }

    #[test]
    fn a_revoked_or_unknown_device_is_refused() {
        let mut w = World::new();
        w.device = id("device:mallory");
        assert_eq!(
            w.decide(w.facts("app.acme.test", "app.acme.test")),
            Err(RequestError::DeviceRevoked)
        );
    }

    #[test]
    fn a_connector_certificate_is_not_a_device() {
        let mut w = World::new();
        w.device = id("connector:web");
        assert_eq!(
            w.decide(w.facts("app.acme.test", "app.acme.test")),
            Err(RequestError::NoDevice)
        );
    }

    #[test]
    fn request_host_refuses_disagreeing_authority_and_host() {
        let req = Request::builder()
            .uri("https://a.acme.test/")
            .header("host", "b.acme.test")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), None);
        let req = Request::builder()
            .uri("/")
            .header("host", "App.Acme.Test.:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("app.acme.test"));
    }

    #[test]
    fn kinds_are_read_from_method_protocol_and_headers() {
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("db.acme.test:5432")
            .body(())
            .unwrap();
        assert_eq!(Kind::of(&connect), Ok(Kind::Connect));
        let mut ws = Request::builder()
            .method(Method::CONNECT)
            .uri("https://app.acme.test/ws")
            .body(())
            .unwrap();
        ws.extensions_mut()
            .insert(ExtendedConnect("websocket".into()));
        assert_eq!(Kind::of(&ws), Ok(Kind::WebSocketConnect));
        ws.extensions_mut()
            .insert(ExtendedConnect("connect-udp".into()));
        assert_eq!(Kind::of(&ws), Err(RequestError::UnsupportedProtocol));
        let upgrade = Request::builder()
            .uri("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(Kind::of(&upgrade), Ok(Kind::Upgrade));
    }

    #[test]
    fn an_h2c_upgrade_is_a_plain_request_and_a_malformed_connection_line_is_refused() {
        let h2c = |connection: &[u8]| {
            Request::builder()
                .uri("/")
                .header(
                    "connection",
                    http::HeaderValue::from_bytes(connection).unwrap(),
                )
                .header("upgrade", "h2c")
                .header("http2-settings", "AAMAAABkAAQAAP__")
                .body(())
                .unwrap()
        };
        assert_eq!(Kind::of(&h2c(b"Upgrade, HTTP2-Settings")), Ok(Kind::Plain));
        for bad in [
            &b"Upgrade, HTTP2-Settings\xff"[..],
            b"Upgrade HTTP2-Settings",
        ] {
            assert_eq!(Kind::of(&h2c(bad)), Err(RequestError::BadHopByHop));
        }
        // Refused as a 400 once the caller is known, before any route is taken.
        let w = World::new();
        let req = h2c(b"upgrade;x");
        let mut facts = w.facts("app.acme.test", "app.acme.test");
        facts.kind = Kind::of(&req);
        assert_eq!(w.decide(facts), Err(RequestError::BadHopByHop));
    }
}
