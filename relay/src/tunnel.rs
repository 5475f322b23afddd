//! Connector tunnels on the relay: accepting QUIC connections with the tunnel ALPN,
//! registration on the control stream, the routing table, and opening one stream per
//! request down a connector's connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use portcullis_shared::identity::{HostPattern, Hostname, Identity, Role};
use portcullis_shared::pki;
use portcullis_shared::proto::{
    CloseCode, ControlFrame, ENROLL_ALPN, FrameDecoder, Rejection, StreamHeader, StreamKind,
    TUNNEL_ALPN, encode_frame,
};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::tunnel_io::read_frame;
use quinn::{RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::server::State;

/// Time a connector has to register after its handshake.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// One connected connector.
#[derive(Debug)]
pub(crate) struct ConnectorHandle {
    id: u64,
    pub(crate) name: String,
    conn: quinn::Connection,
    draining: AtomicBool,
    /// Streams opened on this tunnel; the lock also keeps an open from racing a drain.
    opened: tokio::sync::Mutex<u64>,
    /// Concurrent requests and tunnels through this connector, at most
    /// `limits.max_streams_per_connector`.
    pub(crate) slots: Arc<Semaphore>,
}

impl ConnectorHandle {
    /// Stops routing to this connector (its connection failed).
    pub(crate) fn retire(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Opens a tunnel stream for one HTTP exchange to `host` and writes its header.
    pub(crate) async fn open_http(
        &self,
        host: &Hostname,
    ) -> anyhow::Result<tokio::io::Join<RecvStream, SendStream>> {
        let (mut send, recv) = {
            let mut opened = self.opened.lock().await;
            // After a Drain the connector counts on no stream beyond those it was told of.
            anyhow::ensure!(
                !self.draining.load(Ordering::Relaxed),
                "the connector is draining"
            );
            let stream = self
                .conn
                .open_bi()
                .await
                .context("opening a tunnel stream")?;
            *opened += 1;
            stream
        };
        let header = StreamHeader {
            kind: StreamKind::Http,
            hostname: host.to_string(),
        };
        send.write_all(&header.encode())
            .await
            .context("writing the stream header")?;
        Ok(tokio::io::join(recv, send))
    }
}

/// Hostname → connectors serving it, round-robin among them.
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: RwLock<HashMap<HostPattern, Vec<Arc<ConnectorHandle>>>>,
    next: AtomicUsize,
    ids: AtomicU64,
    /// Every connected connector, routed or draining, for closing at shutdown.
    all: std::sync::Mutex<HashMap<u64, Arc<ConnectorHandle>>>,
}

impl Router {
    /// A live, non-draining connector for `host`: exact routes first, then the most
    /// specific wildcard.
    pub(crate) fn pick(&self, host: &Hostname) -> Option<Arc<ConnectorHandle>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut candidates = routes.get(&HostPattern::Exact(host.clone()));
        if candidates.is_none_or(|c| c.is_empty()) {
            let name = host.as_str();
            candidates = name
                .match_indices('.')
                .filter_map(|(i, _)| Hostname::parse(&name[i + 1..]).ok())
                .find_map(|suffix| {
                    routes
                        .get(&HostPattern::Wildcard(suffix))
                        .filter(|c| !c.is_empty())
                });
        }
        // Round robin over the routable ones, without allocating per request.
        let routable = |c: &&Arc<ConnectorHandle>| !c.draining.load(Ordering::Relaxed);
        let candidates = candidates?;
        let n = candidates.iter().filter(routable).count();
        if n == 0 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        candidates.iter().filter(routable).nth(i).cloned()
    }

    fn add(&self, handle: &Arc<ConnectorHandle>, patterns: &[HostPattern]) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle.clone());
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for p in patterns {
            routes.entry(p.clone()).or_default().push(handle.clone());
        }
    }

    fn remove(&self, handle: &ConnectorHandle) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.retain(|_, list| {
            list.retain(|c| c.id != handle.id);
            !list.is_empty()
        });
    }

    /// Closes every connector connection (relay shutdown).
    pub(crate) fn close_all(&self, code: CloseCode) {
        let all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        for c in all.values() {
            c.conn
                .close(VarInt::from_u32(code.code()), b"relay shutting down");
        }
    }
}

/// Accepts QUIC connections until shutdown and dispatches them by ALPN: connector tunnels
/// (connector certificates) and HTTP/3 (device certificates). A certificate whose role
/// does not match the protocol it asked for is closed with [`CloseCode::WrongRole`].
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>, shutdown: Shutdown) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = shutdown.wait() => return,
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("quic", client.addr = %incoming.remote_address(), connector.name = tracing::field::Empty, device.id = tracing::field::Empty);
        tokio::spawn(
            async move {
                if let Err(e) = serve_quic(incoming, state, shutdown).await {
                    tracing::info!(error = %format!("{e:#}"), "QUIC connection ended");
                }
            }
            .instrument(span),
        );
    }
}

async fn serve_quic(
    incoming: quinn::Incoming,
    state: Arc<State>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let conn = incoming.await.context("handshake")?;
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() == Some(ENROLL_ALPN) {
        // Enrolment needs no certificate (renewal presents one).
        let caller = peer_identity(&conn).ok();
        return crate::enroll::serve(conn, caller, state).await;
    }
    let (identity, key_sha256) = match peer_identity(&conn) {
        Ok(found) => found,
        Err(e) => {
            conn.close(
                VarInt::from_u32(CloseCode::WrongRole.code()),
                b"a client certificate is required",
            );
            return Err(e);
        }
    };
    match (alpn.as_deref(), identity.role()) {
        (Some(TUNNEL_ALPN), Role::Connector) => {
            tracing::Span::current().record("connector.name", identity.id());
            serve_connector(conn, identity, key_sha256, state).await
        }
        (Some(b"h3"), Role::Device) => {
            tracing::Span::current().record("device.id", identity.id());
            crate::http3::serve(conn, identity, key_sha256, state, shutdown).await
        }
        _ => {
            conn.close(
                VarInt::from_u32(CloseCode::WrongRole.code()),
                b"certificate role does not match the protocol",
            );
            bail!("{identity} asked for a protocol its role may not use")
        }
    }
}

fn peer_identity(conn: &quinn::Connection) -> anyhow::Result<(Identity, String)> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .context("no client certificate")?;
    let leaf = certs.first().context("no client certificate")?;
    let info = pki::inspect(leaf)?;
    let identity = info
        .identity
        .context("client certificate names no identity")?;
    Ok((identity, info.key_sha256))
}

async fn serve_connector(
    conn: quinn::Connection,
    identity: Identity,
    key_sha256: String,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let live = state.registry.track(&identity, &key_sha256);

    let (mut send, mut recv) = tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi())
        .await
        .context("no registration within 10 s")?
        .context("waiting for the control stream")?;
    let mut decoder = FrameDecoder::default();
    let Some(ControlFrame::Register { hostnames, agent }) =
        tokio::time::timeout(REGISTER_TIMEOUT, read_frame(&mut recv, &mut decoder))
            .await
            .context("no registration within 10 s")??
    else {
        conn.close(
            VarInt::from_u32(CloseCode::Protocol.code()),
            b"expected Register",
        );
        bail!("first control frame was not Register");
    };

    let allowed = state
        .registry
        .snapshot()
        .active(&identity)
        .map(|r| r.hostnames.clone())
        .unwrap_or_default();
    let mut accepted = Vec::new();
    let mut patterns = Vec::new();
    let mut rejected = Vec::new();
    for name in hostnames {
        match HostPattern::parse(&name) {
            Ok(p) if allowed.iter().any(|a| a.covers(&p)) => {
                patterns.push(p);
                accepted.push(name);
            }
            Ok(_) => rejected.push(Rejection {
                reason: format!("connector {} may not publish {name}", identity.id()),
                hostname: name,
            }),
            Err(e) => rejected.push(Rejection {
                hostname: name,
                reason: e.to_string(),
            }),
        }
    }
    for r in &rejected {
        tracing::warn!(hostname = %r.hostname, reason = %r.reason, "refused a connector's hostname");
    }
    let reply = ControlFrame::Registered {
        accepted: accepted.clone(),
        rejected,
    };
    send.write_all(&encode_frame(&reply)?).await?;

    let handle = Arc::new(ConnectorHandle {
        id: state.router.ids.fetch_add(1, Ordering::Relaxed),
        name: identity.id().to_owned(),
        conn: conn.clone(),
        draining: AtomicBool::new(false),
        opened: tokio::sync::Mutex::new(0),
        slots: Arc::new(Semaphore::new(
            state.config.limits.max_streams_per_connector,
        )),
    });
    state.router.add(&handle, &patterns);
    state.metrics.connectors.fetch_add(1, Ordering::Relaxed);
    tracing::info!(hostnames = accepted.len(), %agent, "connector up");

    let result = loop {
        tokio::select! {
            frame = read_frame(&mut recv, &mut decoder) => match frame {
                Ok(Some(ControlFrame::Drain)) => {
                    tracing::info!("connector draining");
                    handle.draining.store(true, Ordering::Relaxed);
                    state.router.remove(&handle);
                    // Once any open in progress has finished, no more can start: tell the
                    // connector how many streams to wait for.
                    let opened = *handle.opened.lock().await;
                    let _ = send.write_all(&encode_frame(&ControlFrame::Drained { opened })?).await;
                }
                Ok(Some(other)) => {
                    conn.close(VarInt::from_u32(CloseCode::Protocol.code()), b"unexpected control frame");
                    break Err(anyhow::anyhow!("unexpected control frame {other:?}"));
                }
                // A connector keeps its control stream open for the tunnel's life; one that
                // ends it is closed, so it cannot linger outside revocation's reach.
                // After Drain the connector finishes its control stream; wait for it to close
                // (still watching revocation).
                Ok(None) if handle.draining.load(Ordering::Relaxed) => {
                    tokio::select! {
                        _ = conn.closed() => {}
                        () = live.revoked() => conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"certificate revoked"),
                    }
                    break Ok(conn.close_reason().unwrap_or(quinn::ConnectionError::LocallyClosed));
                }
                Ok(None) => {
                    conn.close(VarInt::from_u32(CloseCode::Protocol.code()), b"control stream closed");
                    break Ok(conn.closed().await);
                }
                Err(e) => break Err(e.into()),
            },
            () = live.revoked() => {
                conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"certificate revoked");
                break Err(anyhow::anyhow!("connector revoked"));
            }
        }
    };
    state.router.remove(&handle);
    state
        .router
        .all
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&handle.id);
    state.metrics.connectors.fetch_sub(1, Ordering::Relaxed);
    tracing::info!("connector down");
    result.map(|_| ())
}
