//! One tunnel to one relay address, supervised: dial (QUIC first, TLS over TCP when UDP
//! is blocked, probing QUIC again while on TCP), run the session, accept the relay's
//! streams and hand each to the origins, and reconnect with jittered backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::tcp_transport::TcpTransport;
use portcullis_shared::transport::{QuicTransport, Transport, TransportKind};
use tracing::Instrument;

use super::context::{Tunnel, TunnelContext};
use super::driver;
use crate::dial::{Backoff, CONNECT_TIMEOUT, PROBE_MAX, PROBE_MIN, PROBE_TIMEOUT};
use crate::status::TunnelState;

/// Keeps one tunnel to `addr` (an address of `relay`) up until `shutdown`, reconnecting
/// with jittered exponential backoff, independently of every other tunnel. QUIC first;
/// where its handshake fails the tunnel goes over TLS on TCP, and moves back to QUIC once
/// a probe gets through.
pub(crate) async fn supervise(cx: TunnelContext, tunnel: Tunnel) {
    let cx = Arc::new(cx);
    let server_name = cx
        .config
        .relay_server_name(&tunnel.relay)
        .unwrap_or_default();
    let mut backoff = Backoff::default();
    let span = tracing::info_span!("tunnel", relay = %tunnel.relay, relay.addr = %tunnel.addr);
    let addr = tunnel.addr;
    let shutdown = &cx.shutdown;
    async {
        while !shutdown.is_triggered() {
            tunnel.set(TunnelState::Connecting);
            let dialer = cx.live.current().dialer.clone();
            let quic = tokio::select! {
                r = dialer.quic(&cx.endpoint, addr, &server_name, CONNECT_TIMEOUT) => r,
                () = shutdown.wait() => break,
            };
            match quic {
                Ok(conn) => {
                    let transport = Arc::new(QuicTransport::new(conn));
                    let first = Arc::new(tunnel.on(TransportKind::Quic));
                    let (result, registered) =
                        serve(transport, &cx, shutdown, &server_name, first).await;
                    if registered {
                        backoff.reset();
                    }
                    if let Err(e) = result {
                        tunnel.down(format!("tunnel lost: {e:#}"));
                    }
                }
                Err(quic_error) => {
                    tracing::info!(error = %format!("{quic_error:#}"), "QUIC to the relay failed; trying TLS over TCP");
                    let tcp = tokio::select! {
                        r = dialer.tcp(addr, &server_name) => r,
                        () = shutdown.wait() => break,
                    };
                    match tcp {
                        Ok(transport) => {
                            if let Err(e) =
                                over_tcp(transport, &cx, &server_name, &mut backoff, &tunnel).await
                            {
                                tunnel.down(format!("tunnel lost: {e:#}"));
                            }
                        }
                        Err(e) => tunnel.down(format!(
                            "cannot connect to the relay: {quic_error:#}; over TCP: {e:#}"
                        )),
                    }
                }
            }
            if shutdown.is_triggered() {
                break;
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), cx.endpoint.wait_idle()).await;
        tunnel.status.remove(addr);
        tracing::info!("tunnel closed");
    }
    .instrument(span)
    .await;
}

/// Runs the tunnel over TCP while probing QUIC with backoff; once a QUIC handshake gets
/// through, a QUIC tunnel registers, then the TCP one drains (the relay routes new
/// streams to QUIC, streams open on TCP finish there) and the QUIC one goes on.
async fn over_tcp(
    tcp: TcpTransport,
    cx: &Arc<TunnelContext>,
    server_name: &str,
    backoff: &mut Backoff,
    tunnel: &Tunnel,
) -> anyhow::Result<()> {
    tracing::info!(transport = "tcp", "tunnel over TLS on TCP");
    let child = cx.shutdown.child();
    let tcp_tunnel = Arc::new(tunnel.on(TransportKind::Tcp));
    let tcp_session = serve(Arc::new(tcp), cx, &child, server_name, tcp_tunnel.clone());
    tokio::pin!(tcp_session);
    let probe = probe_quic(cx, tunnel.addr, server_name);
    let conn = tokio::select! {
        (r, registered) = &mut tcp_session => {
            // Registered over TCP: the next failure starts the backoff afresh.
            if registered {
                backoff.reset();
            }
            return r;
        }
        conn = probe => conn,
    };
    tracing::info!("UDP to the relay works again: moving the tunnel back to QUIC");
    let quic = Arc::new(QuicTransport::new(conn));
    let quic_tunnel = Arc::new(tunnel.on(TransportKind::Quic));
    let registered = quic_tunnel.registered.clone();
    let quic_run = async {
        let (r, registered) = serve(quic, cx, &cx.shutdown, server_name, quic_tunnel).await;
        if registered {
            backoff.reset();
        }
        // QUIC failed before the TCP tunnel finished draining: both end, and the
        // supervisor starts again.
        child.trigger();
        r
    };
    let handover = async {
        tokio::select! {
            () = registered.notified() => {
                tcp_tunnel.quiet.store(true, Ordering::Relaxed);
                tracing::info!(transport = "quic", "tunnel back on QUIC; the TCP tunnel drains");
                child.trigger();
            }
            () = child.wait() => {}
        }
    };
    let (quic_result, (tcp_result, _), ()) = tokio::join!(quic_run, tcp_session, handover);
    if let Err(e) = tcp_result {
        tracing::debug!(error = %format!("{e:#}"), "the TCP tunnel ended with an error while draining");
    }
    quic_result
}

/// Tries QUIC to `addr` after 1 s, then at doubling intervals up to [`PROBE_MAX`], until
/// a handshake completes.
async fn probe_quic(cx: &TunnelContext, addr: SocketAddr, server_name: &str) -> quinn::Connection {
    let mut wait = PROBE_MIN;
    loop {
        tokio::time::sleep(wait).await;
        let dialer = cx.live.current().dialer.clone();
        match dialer
            .quic(&cx.endpoint, addr, server_name, PROBE_TIMEOUT)
            .await
        {
            Ok(conn) => return conn,
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "QUIC still unreachable"),
        }
        wait = (wait * 2).min(PROBE_MAX);
    }
}

/// A tunnel session running on a connection of its own, with its own stop signal.
struct Running {
    task: std::pin::Pin<Box<dyn Future<Output = (anyhow::Result<()>, bool)> + Send>>,
    tunnel: Arc<Tunnel>,
    stop: Shutdown,
}

impl Running {
    fn start(
        transport: Arc<dyn Transport>,
        cx: &Arc<TunnelContext>,
        shutdown: &Shutdown,
        tunnel: Arc<Tunnel>,
    ) -> Self {
        let stop = shutdown.child();
        Self {
            task: Box::pin(driver::session(
                transport,
                cx.clone(),
                stop.clone(),
                tunnel.clone(),
            )),
            tunnel,
            stop,
        }
    }
}

/// Serves the tunnel on `transport` until its connection ends, replacing the connection
/// make-before-break whenever the published hostnames or the credentials change (a reload,
/// a renewed certificate): a new connection of the same kind, made with the credentials in
/// force, registers; only then is the old one drained, its streams finishing on it. A
/// replacement that fails leaves the old connection serving. Returns the last
/// connection's result, and whether any connection registered.
async fn serve(
    transport: Arc<dyn Transport>,
    cx: &Arc<TunnelContext>,
    shutdown: &Shutdown,
    server_name: &str,
    first: Arc<Tunnel>,
) -> (anyhow::Result<()>, bool) {
    let kind = first.kind;
    let mut replacements = cx.live.replacements();
    replacements.borrow_and_update();
    let mut registered = false;
    let mut current = Running::start(transport, cx, shutdown, first);
    loop {
        tokio::select! {
            (r, reg) = &mut current.task => return (r, registered || reg),
            Ok(()) = replacements.changed() => {}
        }
        tracing::info!(
            "the hostnames or the credentials changed: replacing the tunnel's connection"
        );
        let dialer = cx.live.current().dialer.clone();
        let dial = async {
            Ok::<Arc<dyn Transport>, anyhow::Error>(match kind {
                TransportKind::Quic => Arc::new(QuicTransport::new(
                    dialer
                        .quic(
                            &cx.endpoint,
                            current.tunnel.addr,
                            server_name,
                            CONNECT_TIMEOUT,
                        )
                        .await?,
                )),
                TransportKind::Tcp => Arc::new(dialer.tcp(current.tunnel.addr, server_name).await?),
            })
        };
        let next = tokio::select! {
            r = dial => r,
            (r, reg) = &mut current.task => return (r, registered || reg),
        };
        let next = match next {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot open the replacement connection; the current one keeps serving");
                continue;
            }
        };
        let mut next = Running::start(next, cx, shutdown, Arc::new(current.tunnel.on(kind)));
        tokio::select! {
            () = next.tunnel.registered.notified() => {
                current.tunnel.quiet.store(true, Ordering::Relaxed);
                current.stop.trigger();
                cx.live.metrics.tunnel_replacements.fetch_add(1, Ordering::Relaxed);
                tracing::info!("the replacement connection registered; the old one drains");
                registered = true;
                let old = std::mem::replace(&mut current, next);
                // The old connection drains on its own; the process waits for it at exit.
                shutdown.tracker().spawn(async move {
                    let (r, _) = old.task.await;
                    if let Err(e) = r {
                        tracing::debug!(error = %format!("{e:#}"), "the replaced connection ended with an error");
                    }
                });
            }
            (r, _) = &mut next.task => {
                let why = r.err().map(|e| format!("{e:#}")).unwrap_or_default();
                tracing::warn!(error = %why, "the replacement connection ended before it registered; the current one keeps serving");
            }
            (r, reg) = &mut current.task => {
                registered |= reg;
                if let Err(e) = r {
                    tracing::info!(error = %format!("{e:#}"), "the tunnel's connection ended while it was being replaced");
                }
                current = next;
            }
        }
    }
}
