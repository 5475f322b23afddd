//! The HTTPS listener: TLS over TCP with device certificates, HTTP/1.1 and HTTP/2, and,
//! by their own ALPNs, connector tunnels and enrolment where UDP is blocked. The
//! request path itself is [`crate::pipeline`]; this module owns the TCP/TLS connection, its
//! upgrades (HTTP/1.1 Upgrade, HTTP/2 CONNECT and extended CONNECT), revocation and drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_shared::identity::Role;
use portcullis_shared::pki;
use portcullis_shared::proto::{ENROLL_ALPN, TUNNEL_TCP_ALPN};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::tcp_transport::{PeerInfo, TcpSettings, TcpTransport};
use portcullis_shared::transport::{Transport, TransportKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::now;
use crate::conn::{BoxError, ConflictingLength, ConnInfo, ExtendedConnect, RespBody};
use crate::hardening::conn_limit::ConnGuard;
use crate::hardening::h1_framing::{Conflicts, Watched};
use crate::hardening::idle::Activity;
use crate::hardening::overload::Shed;
use crate::hardening::reset_flood::ResetFlood;
use crate::identity::tls;
use crate::listen::{enroll, tunnel};
use crate::ops::metrics::Listener;
use crate::pipeline::{self, Tunnel};
use crate::state::State;

/// Accepts HTTPS connections until shutdown; each runs until done, revoked or drained.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    shutdown: Shutdown,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        // Dropping the socket closes it before any TLS work.
        let Some(place) = admit(&state, peer) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let span = tracing::debug_span!("https", client.addr = %peer, device.id = tracing::field::Empty, connector.name = tracing::field::Empty);
        let conn = Accepted { tcp, peer, place };
        let serve = serve_connection(conn, acceptor.clone(), state.clone(), shutdown.clone());
        shutdown.tracker().spawn(serve.instrument(span));
    }
}

/// Whether a new TCP connection may go on to its TLS handshake: not while the relay
/// sheds handshakes, nor beyond the connection caps. Its place in the caps, held for the
/// connection's life.
fn admit(state: &State, peer: SocketAddr) -> Option<ConnGuard> {
    if state.overload.sheds_handshakes() {
        state.metrics.shed(Shed::HttpsHandshake);
        tracing::debug!(client.addr = %peer, "overloaded: connection closed before TLS");
        return None;
    }
    match state.https_conns.try_acquire(peer.ip()) {
        Ok(place) => Some(place),
        Err(why) => {
            state.metrics.refused(Listener::Https, why);
            tracing::debug!(client.addr = %peer, limit = why.label(), "connection refused");
            None
        }
    }
}

/// The HTTP/1.1 and HTTP/2 server settings every client connection gets: header limits
/// and timeouts, HTTP/2 stream limit and keep-alive, extended CONNECT.
pub(crate) fn http_builder(
    limits: &portcullis_shared::config::LimitsConfig,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.idle_timeout / 2)
        .enable_connect_protocol();
    builder
}

/// The HTTP/2 settings of a connector's tunnel over TCP: the same windows as its QUIC
/// tunnel would get, a PING every second (for the round-trip time; the connector's own
/// come every 250 ms), and the connector's idle timeout.
fn tunnel_settings(limits: &portcullis_shared::config::LimitsConfig) -> TcpSettings {
    TcpSettings {
        stream_window: limits.quic_stream_window,
        connection_window: limits.quic_connection_window,
        keep_alive: Duration::from_secs(1),
        idle_timeout: TUNNEL_IDLE_TIMEOUT,
        max_streams: 0,
    }
}

/// A tunnel over TCP from which nothing has arrived for this long is closed, as a QUIC
/// tunnel is by the connector's idle timeout.
const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP connection admitted past the caps.
struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    /// Its place in the connection caps, given back when the connection ends.
    place: ConnGuard,
}

async fn serve_connection(
    conn: Accepted,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    shutdown: Shutdown,
) {
    let Accepted { tcp, peer, place } = conn;
    let accepted = tokio::time::Instant::now();
    let limits = &state.config.limits;
    let handshake = tls::with_source(peer.ip(), acceptor.accept(tcp));
    let tls = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => {
            state.metrics.sli.handshake("https", "ok");
            tls
        }
        Ok(Err(e)) => {
            state
                .metrics
                .sli
                .handshake("https", crate::ops::sli::tls_failure(&e));
            tracing::info!(client.addr = %peer, reason = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            state.metrics.sli.handshake("https", "timeout");
            tracing::debug!(client.addr = %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let tls13 = session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let alpn = session.alpn_protocol();
    let cert = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| pki::inspect(leaf).ok());
    // A stranger leaves the listener's places for strangers' own, so devices never wait
    // for places strangers hold, and lives at most `unauthenticated_lifetime`.
    let (_place, lifetime) = if cert.is_none() && alpn != Some(TUNNEL_TCP_ALPN) {
        match state.https_strangers.try_acquire(peer.ip()) {
            Ok(stranger) => {
                drop(place);
                (stranger, Some(accepted + limits.unauthenticated_lifetime))
            }
            Err(why) => {
                state.metrics.refused_unauthenticated(Listener::Https);
                tracing::debug!(client.addr = %peer, limit = "max_unauthenticated_connections", per = why.label(), "connection without a certificate closed");
                return;
            }
        }
    } else {
        (place, None)
    };
    match alpn {
        Some(TUNNEL_TCP_ALPN | ENROLL_ALPN) if !tls13 => {
            // Only reachable with `min_version = "1.2"`: tunnels and enrolment are 1.3 only.
            tracing::info!(client.addr = %peer, "tunnel or enrolment over TLS 1.2 refused");
            return;
        }
        Some(TUNNEL_TCP_ALPN) => {
            let Some((identity, key_sha256)) = cert
                .and_then(|c| c.identity.map(|id| (id, c.key_sha256)))
                .filter(|(id, _)| id.role() == Role::Connector)
            else {
                tracing::info!(client.addr = %peer, "tunnel over TCP without a connector certificate refused");
                return;
            };
            tracing::Span::current().record("connector.name", identity.id());
            // Only a tunnel keeps the peer's chain and name past the handshake.
            let (_, session) = tls.get_ref();
            let peer_info = PeerInfo {
                certificates: session
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
                server_name: session.server_name().map(str::to_owned),
                remote: peer,
            };
            let transport = match tokio::time::timeout(
                limits.handshake_timeout,
                TcpTransport::relay(tls, peer_info, tunnel_settings(limits)),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "tunnel over TCP failed to start");
                    return;
                }
                Err(_) => {
                    tracing::info!("tunnel over TCP: HTTP/2 handshake timed out");
                    return;
                }
            };
            let transport: Arc<dyn Transport> = Arc::new(transport);
            if let Err(e) = Box::pin(tunnel::serve_connector(
                transport, identity, key_sha256, state,
            ))
            .await
            {
                tracing::info!(error = %format!("{e:#}"), "tunnel over TCP ended");
            }
            return;
        }
        Some(ENROLL_ALPN) => {
            let caller = cert.and_then(|c| c.identity.clone().map(|id| (id, c)));
            if let Err(e) = Box::pin(enroll::serve_tcp(tls, peer.ip(), caller, state)).await {
                tracing::debug!(error = %format!("{e:#}"), "enrolment over TCP ended");
            }
            return;
        }
        _ => {}
    }
    let (key_sha256, not_after) = cert
        .as_ref()
        .map(|c| (c.key_sha256.clone(), c.not_after))
        .unwrap_or_default();
    if cert
        .as_ref()
        .and_then(|c| c.identity.as_ref())
        .is_some_and(|id| id.role() != Role::Device)
    {
        tracing::info!(client.addr = %peer, "a connector certificate on HTTPS refused");
        return;
    }
    let device = cert
        .and_then(|info| info.identity)
        .filter(|id| id.role() == Role::Device);
    if let Some(d) = &device {
        tracing::Span::current().record("device.id", d.id());
    }
    let live = device
        .as_ref()
        .map(|d| Arc::new(state.registry.track(d, &key_sha256, not_after, now())));
    let _client = state.clients.token();
    let _device_gauge = device
        .is_some()
        .then(|| state.metrics.device_connection(TransportKind::Tcp));
    let h2 = session.alpn_protocol() == Some(b"h2");
    let info = Arc::new(ConnInfo {
        peer,
        sni: session.server_name().map(str::to_owned),
        device,
        revoked: live
            .as_ref()
            .map_or_else(CancellationToken::new, |l| l.token()),
        live,
        protocol: if h2 { "HTTP/2" } else { "HTTP/1.1" },
        activity: Activity::new(),
    });
    let grace = state.config.drain_grace;
    serve_http(
        tls,
        h2,
        state.clone(),
        info,
        shutdown.wait(),
        grace,
        lifetime,
    )
    .await;
}

/// Serves HTTP/1.1 or HTTP/2 on an established TLS stream, with the relay's limits and
/// reset-flood guard, until the connection ends, the device is revoked, the client floods
/// resets, it reaches `lifetime` (a stranger's: closed at once), or it idles or `stop`
/// fires (then requests in flight get `grace`).
pub(crate) async fn serve_http<T>(
    tls: T,
    h2: bool,
    state: Arc<State>,
    info: Arc<ConnInfo>,
    stop: impl Future<Output = ()>,
    grace: Duration,
    lifetime: Option<tokio::time::Instant>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
    let activity = info.activity.clone();
    let revoked = info.revoked.clone();
    let flood = Arc::new(ResetFlood::default());
    let svc_flood = flood.clone();
    let svc_state = state.clone();
    let conflicts = Conflicts::new();
    let svc_conflicts = (!h2).then(|| conflicts.clone());
    let service = hyper::service::service_fn(move |req| {
        let guard = svc_flood.guard();
        let refuse = svc_conflicts
            .as_ref()
            .is_some_and(|c| c.next_is_conflicting());
        let fut = serve_request(svc_state.clone(), info.clone(), req, refuse);
        async move {
            let resp = fut.await;
            guard.finish();
            resp
        }
    });
    let io = Watched::new(tls, limits.max_header_bytes, conflicts);
    let builder = http_builder(limits);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let graceful = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                // hyper answered 431 to a head over `max_buf_size` before any service saw it.
                if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse_too_large) {
                    state.metrics.sli.codec_refusal("HTTP/1.1", 431);
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            false
        }
        () = revoked.cancelled() => {
            tracing::info!("closing a revoked device's connection");
            false
        }
        () = flood.tripped.cancelled() => false,
        () = until(lifetime) => {
            tracing::debug!("closing a connection without a certificate at unauthenticated_lifetime");
            false
        }
        () = activity.idle(limits.idle_timeout) => {
            tracing::debug!("closing an idle connection");
            true
        }
        () = stop => true,
    };
    if graceful {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(grace, conn.as_mut()).await;
    }
}

/// Waits until `at`, or for ever without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `conflicting`: the HTTP/1.1 head carried both Content-Length and Transfer-Encoding
/// (see [`crate::hardening::h1_framing`]); it is refused and the connection closed.
pub(crate) async fn serve_request(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    conflicting: bool,
) -> Result<http::Response<RespBody>, Infallible> {
    if conflicting {
        req.extensions_mut().insert(ConflictingLength);
    }
    let may_upgrade =
        req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE);
    let client_upgrade = may_upgrade.then(|| hyper::upgrade::on(&mut req));
    if let Some(p) = req.extensions().get::<hyper::ext::Protocol>() {
        let p = ExtendedConnect(p.as_str().to_owned());
        req.extensions_mut().insert(p);
    }
    let req = req.map(|b| b.map_err(BoxError::from).boxed());
    let mut resp = pipeline::handle(state.clone(), info, req).await;
    if let Some(tunnel) = resp.extensions().get::<Tunnel>().and_then(Tunnel::take)
        && let Some(client) = client_upgrade
    {
        state
            .shutdown
            .tracker()
            .spawn(pipeline::join_hyper(client, tunnel));
    }
    if let Some(alt_svc) = &state.alt_svc {
        resp.headers_mut().insert(header::ALT_SVC, alt_svc.clone());
    }
    Ok(resp)
}
