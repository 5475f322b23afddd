//! The QUIC listener: accepts connections until shutdown and dispatches each by ALPN and
//! certificate role — connector tunnels (connector certificates), HTTP/3 (device
//! certificates) and enrolment (no certificate needed). A certificate whose role does not
//! match the protocol it asked for is closed with [`CloseCode::WrongRole`].
//!
//! Before any handshake work each attempt is admitted or not (overload, Retry, the
//! connection caps; see [`admit`]), and the handshake itself runs under
//! `handshake_timeout`. Every connection starts with a stranger's small limits, raised
//! once its certificate shows a connector or a device.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, bail};
use portcullis_shared::config::{LimitsConfig, RelayConfig};
use portcullis_shared::identity::{Identity, Role};
use portcullis_shared::pki;
use portcullis_shared::proto::{CloseCode, ENROLL_ALPN, MAX_ENROLL_LEN, TUNNEL_ALPN};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::transport::{QuicTransport, Transport, quic_alpn};
use portcullis_shared::udp::BufferSizes;
use quinn::crypto::rustls::QuicServerConfig;
use tracing::Instrument;

use crate::hardening::conn_limit::{ConnGuard, PendingGuard};
use crate::hardening::overload::Shed;
use crate::identity::tls;
use crate::ops::metrics::Listener;
use crate::state::State;

/// Binds the QUIC endpoint on `quic_listen` with the relay's TLS config and transport
/// settings.
pub(crate) fn bind(
    config: &RelayConfig,
    tls: rustls::ServerConfig,
) -> anyhow::Result<(quinn::Endpoint, BufferSizes)> {
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls).context("QUIC TLS config")?,
    ));
    server.transport_config(Arc::new(transport(&config.limits, config.quic_congestion)?));
    // Connection attempts not yet taken by the accept loop: quinn refuses beyond
    // MAX_INCOMING, and buffers little for each (0-RTT is never accepted, so a client has
    // nothing to send before the relay answers).
    server.max_incoming(MAX_INCOMING);
    server.incoming_buffer_size(INCOMING_BUFFER);
    server.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    let (socket, sizes) = portcullis_shared::udp::bind(config.quic_listen).with_context(|| {
        format!(
            "binding QUIC on {}: is the port in use?",
            config.quic_listen
        )
    })?;
    portcullis_shared::udp::report(sizes);
    let endpoint = quinn::Endpoint::new(
        endpoint_config(&config.state_dir)?,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("starting QUIC on {}", config.quic_listen))?;
    Ok((endpoint, sizes))
}

/// The QUIC endpoint config, with the stateless-reset key kept in the state directory.
/// A restarted relay then answers connectors' packets for connections it no longer has
/// with a valid stateless reset, so they reconnect at once instead of waiting for their
/// idle timeout.
fn endpoint_config(state_dir: &Path) -> anyhow::Result<quinn::EndpointConfig> {
    let path = state_dir.join("quic-reset.key");
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        _ => {
            let mut bytes = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| anyhow::anyhow!("no randomness for the QUIC reset key"))?;
            pki::write_private_file(&path, &bytes)?;
            bytes
        }
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    // Connection IDs must also validate across restarts, or the new process drops the
    // connectors' packets as garbage instead of resetting them.
    let tag = ring::hmac::sign(&key, b"portcullis connection-id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config =
        portcullis_shared::udp::endpoint_config(quinn::EndpointConfig::new(Arc::new(key)));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// Connection attempts quinn holds for the accept loop at most.
const MAX_INCOMING: usize = 4096;
/// Bytes buffered for one connection attempt beyond its first packet.
const INCOMING_BUFFER: u64 = 16 * 1024;
/// Bytes buffered for all connection attempts together beyond their first packets.
const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;
/// The connection flow-control window until the peer's certificate says what it is:
/// enough for one enrolment request (`MAX_ENROLL_LEN`).
const STRANGER_WINDOW: u32 = MAX_ENROLL_LEN as u32;

/// The transport parameters every connection starts with are a stranger's: one
/// bidirectional stream at a time, no unidirectional ones, a 64 KiB connection window.
/// QUIC lets limits grow but never shrink, so [`open_up`] raises them once the
/// certificate shows a connector or a device; enrolment keeps them.
fn transport(
    limits: &LimitsConfig,
    congestion: portcullis_shared::config::QuicCongestion,
) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(limits.idle_timeout)?));
    // PINGs keep a busy connection up (a request waiting on a slow origin sends nothing);
    // an idle one is closed by its listener (see crate::hardening::idle), not by QUIC. An
    // enrolment connection is closed at its deadline however it is kept up.
    t.keep_alive_interval(Some(limits.idle_timeout / 3));
    // Downloads to devices and uploads to connectors keep their rate through random loss
    // (see portcullis_shared::congestion).
    t.congestion_controller_factory(portcullis_shared::congestion::factory(congestion));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Explicit windows: quinn's default connection window is effectively unbounded.
    t.stream_receive_window(limits.quic_stream_window.into());
    t.receive_window(STRANGER_WINDOW.into());
    t.send_window(u64::from(limits.quic_connection_window));
    // No unreliable datagrams: nothing uses them, and quinn would otherwise buffer over
    // 1 MB of them for any peer, a stranger included.
    t.datagram_receive_buffer_size(None);
    // Larger datagrams where the path carries them (loopback, jumbo frames).
    portcullis_shared::udp::discover_mtu(&mut t);
    Ok(t)
}

/// Raises an authenticated connection's limits to the relay's: devices open one
/// bidirectional stream per HTTP/3 request (connectors open only their control stream);
/// HTTP/3 needs three unidirectional control streams per side.
fn open_up(conn: &quinn::Connection, limits: &LimitsConfig) {
    conn.set_max_concurrent_bi_streams(limits.max_concurrent_streams.into());
    conn.set_max_concurrent_uni_streams(8u32.into());
    conn.set_receive_window(limits.quic_connection_window.into());
}

/// Accepts QUIC connections until shutdown; each is served on the shutdown tracker.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>, shutdown: Shutdown) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = shutdown.wait() => return,
        };
        let Some(admitted) = admit(incoming, &state) else {
            continue;
        };
        let span = tracing::info_span!("quic", client.addr = %admitted.incoming.remote_address(), connector.name = tracing::field::Empty, device.id = tracing::field::Empty);
        let state = state.clone();
        let task_shutdown = shutdown.clone();
        shutdown.tracker().spawn(
            async move {
                if let Err(e) = serve(admitted, state, task_shutdown).await {
                    tracing::info!(error = %format!("{e:#}"), "QUIC connection ended");
                }
            }
            .instrument(span),
        );
    }
}

/// A connection attempt the listener took on.
struct Admitted {
    incoming: quinn::Incoming,
    /// Its place in the connection caps, held for the connection's life.
    place: ConnGuard,
    /// Counts it among unvalidated handshakes until the handshake ends.
    pending: Option<PendingGuard>,
}

/// Decides a connection attempt before any handshake work, in this order: refused while
/// the relay sheds handshakes; asked to Retry if its address is unvalidated and
/// `quic_retry_threshold` unvalidated handshakes are in progress; refused beyond the
/// connection caps. Retry comes before the caps so that packets with a spoofed source
/// address hold at most `quic_retry_threshold` places of the address they claim, each for
/// at most `handshake_timeout`.
fn admit(incoming: quinn::Incoming, state: &State) -> Option<Admitted> {
    let peer = incoming.remote_address();
    if state.overload.sheds_handshakes() {
        state.metrics.shed(Shed::QuicHandshake);
        tracing::debug!(client.addr = %peer, "overloaded: QUIC connection refused");
        incoming.refuse();
        return None;
    }
    let validated = incoming.remote_address_validated();
    let threshold = state.config.limits.quic_retry_threshold;
    if state.quic_pending.must_retry(validated, threshold) && incoming.may_retry() {
        state.metrics.quic_retries.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = incoming.retry() {
            e.into_incoming().refuse();
        }
        return None;
    }
    let place = match state.quic_conns.try_acquire(peer.ip()) {
        Ok(place) => place,
        Err(why) => {
            state.metrics.refused(Listener::Quic, why);
            tracing::debug!(client.addr = %peer, limit = why.label(), "QUIC connection refused");
            incoming.refuse();
            return None;
        }
    };
    let pending = (!validated).then(|| state.quic_pending.enter());
    Some(Admitted {
        incoming,
        place,
        pending,
    })
}

/// Each protocol's future is boxed once the handshake says which it is, so that a
/// stranger's task holds only what its own protocol needs (HTTP/3's state is the largest
/// by far).
async fn serve(admitted: Admitted, state: Arc<State>, shutdown: Shutdown) -> anyhow::Result<()> {
    let Admitted {
        incoming,
        place,
        pending,
    } = admitted;
    let limits = &state.config.limits;
    // quinn reads the ClientHello as it accepts; a ClientHello that spans more than one
    // packet is read by its driver, outside this scope, and counts only globally.
    let source = incoming.remote_address().ip();
    let connecting = tls::with_source_sync(source, || incoming.into_future());
    let handshake = tokio::time::timeout(limits.handshake_timeout, connecting).await;
    drop(pending);
    let conn = match handshake {
        Ok(Ok(conn)) => {
            state.metrics.sli.handshake("quic", "ok");
            conn
        }
        Ok(Err(e)) => {
            state
                .metrics
                .sli
                .handshake("quic", crate::ops::sli::quic_failure(&e));
            return Err(e).context("handshake");
        }
        Err(_) => {
            // Dropping the handshake's future closes the connection.
            state.metrics.sli.handshake("quic", "timeout");
            bail!("handshake timed out after {:?}", limits.handshake_timeout);
        }
    };
    let alpn = quic_alpn(&conn);
    let transport = QuicTransport::new(conn);
    if alpn.as_deref() == Some(ENROLL_ALPN) {
        // Enrolment needs no certificate (renewal presents one), and keeps a stranger's
        // limits.
        let caller = peer_identity(&transport).ok();
        let conn = transport.connection().clone();
        // A stranger leaves the listener's places for strangers' own, so devices never
        // wait for places strangers hold.
        let _place = match caller {
            Some(_) => place,
            None => match state.quic_strangers.try_acquire(conn.remote_address().ip()) {
                Ok(stranger) => {
                    drop(place);
                    stranger
                }
                Err(_) => {
                    state.metrics.refused_unauthenticated(Listener::Quic);
                    conn.close(
                        quinn::VarInt::from_u32(CloseCode::Normal.code()),
                        b"too many connections without a certificate; try again shortly",
                    );
                    bail!("closed over max_unauthenticated_connections");
                }
            },
        };
        return Box::pin(crate::listen::enroll::serve(conn, caller, state)).await;
    }
    let _place = place;
    let (identity, key_sha256) = match peer_identity(&transport) {
        Ok((identity, cert)) => (identity, cert.key_sha256),
        Err(e) => {
            transport.close(CloseCode::WrongRole, "a client certificate is required");
            return Err(e);
        }
    };
    match (alpn.as_deref(), identity.role()) {
        (Some(TUNNEL_ALPN), Role::Connector) => {
            tracing::Span::current().record("connector.name", identity.id());
            open_up(transport.connection(), limits);
            let transport = Arc::new(transport);
            Box::pin(crate::listen::tunnel::serve_connector(
                transport, identity, key_sha256, state,
            ))
            .await
        }
        (Some(b"h3"), Role::Device) => {
            tracing::Span::current().record("device.id", identity.id());
            open_up(transport.connection(), limits);
            let _client = state.clients.token();
            Box::pin(crate::listen::http3::serve(
                transport, identity, key_sha256, state, shutdown,
            ))
            .await
        }
        _ => {
            transport.close(
                CloseCode::WrongRole,
                "certificate role does not match the protocol",
            );
            bail!("{identity} asked for a protocol its role may not use")
        }
    }
}

/// The identity the peer's certificate names, and what else the relay reads from it.
fn peer_identity(transport: &dyn Transport) -> anyhow::Result<(Identity, pki::CertInfo)> {
    let certs = transport
        .peer_certificates()
        .context("no client certificate")?;
    let leaf = certs.first().context("no client certificate")?;
    let info = pki::inspect(leaf)?;
    let identity = info
        .identity
        .clone()
        .context("client certificate names no identity")?;
    Ok((identity, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Devices and connectors alike may grow their datagrams where the path carries them:
    /// the relay accepts them and searches for them itself.
    #[test]
    fn the_relay_accepts_and_searches_for_large_datagrams() -> anyhow::Result<()> {
        let t = transport(&LimitsConfig::default(), Default::default())?;
        assert!(
            portcullis_shared::udp::searches_to_max_datagram(&t),
            "{t:?}"
        );
        let dir = tempfile::tempdir()?;
        let config = endpoint_config(dir.path())?;
        assert!(
            portcullis_shared::udp::accepts_max_datagram(&config),
            "{config:?}"
        );
        Ok(())
    }
}
