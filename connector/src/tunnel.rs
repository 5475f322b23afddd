//! The connector's side of the tunnel: resolving and dialling the relay, registering,
//! accepting the relay's streams, reconnecting with jittered backoff, and draining.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use portcullis_shared::config::ConnectorConfig;
use portcullis_shared::pki;
use portcullis_shared::proto::{
    CloseCode, ControlFrame, FrameDecoder, StreamHeader, TUNNEL_ALPN, encode_frame,
};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::tunnel_io::read_frame;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{RecvStream, SendStream, VarInt};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::origin::Origins;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The cap is short so that a relay back from a long outage (beyond the stateless-reset
/// fast path) is found again within about two seconds; a dial is one small UDP packet.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished stream's task waits for the relay to acknowledge its data.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The QUIC client config: org CA as the only root, this connector's certificate, the
/// tunnel ALPN, and no 0-RTT.
pub(crate) fn client_config(config: &ConnectorConfig) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&config.ca)? {
        roots
            .add(ca)
            .with_context(|| format!("{}: not a usable CA certificate", config.ca.display()))?;
    }
    let certs = pki::load_certs(&config.cert)?;
    let key = pki::load_key(&config.key)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .with_context(|| {
        format!(
            "{} and {} do not form a usable certificate and key",
            config.cert.display(),
            config.key.display()
        )
    })?;
    tls.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    tls.enable_early_data = false;
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut t = quinn::TransportConfig::default();
    // Frequent keep-alives make a restarted relay answer with a stateless reset within a
    // second of coming back (it keeps its reset key), and a dead one noticed in 10 s.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(10_000))));
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Retransmit a lost Initial after ~300 ms rather than ~1 s, so a relay that comes back
    // during a dial is reached quickly.
    t.initial_rtt(Duration::from_millis(100));
    // The relay opens one stream per request; these bound how many run at once.
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    client.transport_config(Arc::new(t));
    Ok(client)
}

/// Every address the relay's host resolves to (an IP literal is itself), retrying until
/// resolution succeeds or shutdown.
pub(crate) async fn resolve_relay(
    config: &ConnectorConfig,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<SocketAddr>> {
    let (host, port) = config.relay_host_port().context("relay is not host:port")?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let resolver = hickory_resolver::TokioResolver::builder_tokio()
        .and_then(|b| b.build())
        .context("reading the system's DNS configuration")?;
    let mut backoff = Backoff::default();
    loop {
        match resolver.lookup_ip(host).await {
            Ok(ips) => {
                let mut addrs: Vec<_> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                addrs.sort();
                addrs.dedup();
                if !addrs.is_empty() {
                    tracing::info!(relay = host, addresses = addrs.len(), "resolved the relay");
                    return Ok(addrs);
                }
            }
            Err(e) => {
                tracing::warn!(relay = host, error = %e, "cannot resolve the relay; retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = shutdown.wait() => bail!("shut down before the relay's name resolved"),
        }
    }
}

/// A client endpoint for dialling `addr`: bound to an ephemeral port, never listening.
pub(crate) fn endpoint_for(addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    quinn::Endpoint::client(bind).context("creating the QUIC client socket")
}

/// Exponential backoff with full jitter in the upper half.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Keeps one tunnel to `addr` up until shutdown.
pub(crate) async fn supervise(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    client: quinn::ClientConfig,
    config: ConnectorConfig,
    origins: Arc<Origins>,
    shutdown: Shutdown,
) {
    let server_name = config.relay_server_name().unwrap_or_default();
    let mut backoff = Backoff::default();
    let span = tracing::info_span!("tunnel", relay.addr = %addr);
    async {
        while !shutdown.is_triggered() {
            let connecting = match endpoint.connect_with(client.clone(), addr, &server_name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot dial the relay");
                    break;
                }
            };
            let attempt = tokio::select! {
                r = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => r,
                () = shutdown.wait() => break,
            };
            match attempt {
                Ok(Ok(conn)) => {
                    match session(&conn, &config, &origins, &shutdown, &mut backoff).await {
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "tunnel lost"),
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot connect to the relay"),
                Err(_) => tracing::warn!("connecting to the relay timed out"),
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
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    .instrument(span)
    .await;
}

/// One connected tunnel: register, then serve streams until the connection ends or
/// shutdown (then drain).
async fn session(
    conn: &quinn::Connection,
    config: &ConnectorConfig,
    origins: &Arc<Origins>,
    shutdown: &Shutdown,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let (mut control, mut control_recv) =
        conn.open_bi().await.context("opening the control stream")?;
    let register = ControlFrame::Register {
        hostnames: config
            .ingress
            .iter()
            .map(|r| r.hostname.to_string())
            .collect(),
        agent: concat!("portcullis-connector/", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    control.write_all(&encode_frame(&register)?).await?;
    let mut decoder = FrameDecoder::default();
    let reply = tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut control_recv, &mut decoder))
        .await
        .context("the relay did not answer the registration")??;
    match reply {
        Some(ControlFrame::Registered { accepted, rejected }) => {
            for r in &rejected {
                tracing::error!(hostname = %r.hostname, reason = %r.reason, "the relay refused to publish this hostname; check the connector's certificate (issue connector --hostname)");
            }
            tracing::info!(published = ?accepted, "tunnel up");
            // Only a registration the relay answered counts as success: a refused
            // certificate fails after the QUIC handshake and must keep backing off.
            backoff.reset();
        }
        other => bail!("unexpected registration reply {other:?}"),
    }

    let streams = TaskTracker::new();
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let serve = |(send, recv): (SendStream, RecvStream)| {
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::debug_span!("stream", stream.id = %send.id());
        let task = streams.track_future(serve_stream(send, recv, origins.clone()).instrument(span));
        shutdown.tracker().spawn(task);
    };
    let result = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(stream) => serve(stream),
                Err(e) => break Err(anyhow::Error::new(e).context("tunnel closed")),
            },
            () = shutdown.wait() => break Ok(()),
        }
    };
    if result.is_ok() {
        // Drain: the relay stops routing here; in-flight streams finish, then close.
        let _ = control
            .write_all(&encode_frame(&ControlFrame::Drain)?)
            .await;
        let _ = control.finish();
        // Streams the relay opened before it read the Drain may still be arriving: keep
        // accepting (and serving) them for as long as the drain lasts.
        let late = async {
            while let Ok(stream) = conn.accept_bi().await {
                serve(stream);
            }
        };
        let drained = async {
            // The relay answers with how many streams it opened here in all; once that
            // many have arrived, the in-flight set is complete.
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                read_frame(&mut control_recv, &mut decoder),
            )
            .await;
            if let Ok(Ok(Some(ControlFrame::Drained { opened }))) = answer {
                let all_here = async {
                    while accepted.load(std::sync::atomic::Ordering::Relaxed) < opened {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                let _ = tokio::time::timeout(config.drain_grace, all_here).await;
            } else {
                tracing::warn!("the relay did not acknowledge the drain; finishing what arrived");
            }
            streams.close();
            if tokio::time::timeout(config.drain_grace, streams.wait())
                .await
                .is_err()
            {
                tracing::warn!("drain grace expired; closing with streams in flight");
            }
        };
        // `late` first, so a stream that has arrived is tracked before the wait ends.
        tokio::select! {
            biased;
            () = late => {}
            () = drained => {}
        }
        conn.close(
            VarInt::from_u32(CloseCode::Normal.code()),
            b"connector shutting down",
        );
    } else if let Some(code) = close_reason(conn) {
        tracing::error!(reason = code, "the relay closed the tunnel");
    }
    result
}

fn close_reason(conn: &quinn::Connection) -> Option<&'static str> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            match CloseCode::from_code(c.error_code.into_inner())? {
                CloseCode::Revoked => Some("this connector's certificate was revoked"),
                CloseCode::Shutdown => Some("the relay is restarting"),
                CloseCode::Protocol => Some("protocol error"),
                CloseCode::WrongRole => Some("wrong certificate role"),
                CloseCode::Normal => None,
            }
        }
        _ => None,
    }
}

async fn serve_stream(send: SendStream, mut recv: RecvStream, origins: Arc<Origins>) {
    let header = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut prefix = [0u8; 3];
        recv.read_exact(&mut prefix).await?;
        let len = StreamHeader::body_len(prefix)?;
        let mut buf = vec![0u8; 3 + len];
        buf[..3].copy_from_slice(&prefix);
        recv.read_exact(&mut buf[3..]).await?;
        Ok::<_, anyhow::Error>(StreamHeader::decode(&buf)?)
    })
    .await;
    let header = match header {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %format!("{e:#}"), "bad stream header");
            return;
        }
        Err(_) => return,
    };
    // Resolves once the relay has everything written here (or stopped reading): a drain
    // then closes the connection only after in-flight responses were delivered, not just
    // handed to QUIC.
    let delivered = send.stopped();
    origins.serve_http(header, send, recv).await;
    let _ = tokio::time::timeout(DELIVERY_TIMEOUT, delivered).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        for _ in 0..40 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        let late = b.next_delay();
        assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX, "{late:?}");
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }
}
