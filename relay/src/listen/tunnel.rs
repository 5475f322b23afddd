//! The relay's driver of one connector tunnel: a thin async shell that feeds the
//! connector's control stream, timer expiries and settled stream opens to its
//! [`RelaySession`], writes what the session transmits, and acts on its events (route,
//! unroute, close). Revocation and the transport closing end it.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use portcullis_shared::identity::Identity;
use portcullis_shared::proto::{
    CloseCode, FrameDecoder, RelayEvent, RelaySession, RelaySessionConfig, encode_frame,
};
use portcullis_shared::transport::{BiStream, Transport, TunnelRecv, TunnelSend};
use portcullis_shared::tunnel_io::{FrameReadError, read_frame};
use tokio::io::AsyncWriteExt;

use crate::identity::registry::LiveGuard;
use crate::state::State;
use crate::tunnel::ConnectorHandle;

/// Serves one connector's tunnel until its connection closes, it is revoked, or it breaks
/// the protocol.
pub(crate) async fn serve_connector(
    transport: Arc<dyn Transport>,
    identity: Identity,
    key_sha256: String,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let not_after = super::peer_not_after(&*transport);
    let live = state
        .registry
        .track(&identity, &key_sha256, not_after, crate::clock::now());
    let allowed = state
        .registry
        .snapshot()
        .active(&identity)
        .map(|r| r.hostnames.clone())
        .unwrap_or_default();
    let session = RelaySession::new(
        Instant::now(),
        allowed,
        identity.id().to_owned(),
        RelaySessionConfig::default(),
    );
    let handle = Arc::new(ConnectorHandle::new(
        state.router.next_id(),
        identity.id().to_owned(),
        transport,
        session,
        state.config.limits.max_streams_per_connector,
    ));
    state
        .shutdown
        .tracker()
        .spawn(crate::tunnel::watch_liveness(handle.clone()));
    let mut driver = Driver {
        handle: handle.clone(),
        state: state.clone(),
        control: None,
        decoder: FrameDecoder::default(),
        control_ended: false,
        up: false,
        gauge: None,
        stopping: false,
    };
    let result = driver.run(&live).await;
    state.router.remove(&handle);
    if driver.up {
        tracing::info!("connector down");
    }
    result
}

struct Driver {
    handle: Arc<ConnectorHandle>,
    state: Arc<State>,
    /// The control stream, once the connector has opened it.
    control: Option<(Box<dyn TunnelSend>, Box<dyn TunnelRecv>)>,
    decoder: FrameDecoder,
    /// The connector finished its control stream.
    control_ended: bool,
    /// Registered and counted in the metrics.
    up: bool,
    /// Counts the tunnel by transport while it is up.
    gauge: Option<crate::ops::metrics::GaugeGuard>,
    /// The relay is shutting down: close once the tunnel's requests have finished.
    stopping: bool,
}

/// What woke the driver.
enum Input {
    Control(BiStream),
    Frame(Result<Option<portcullis_shared::proto::ControlFrame>, FrameReadError>),
    Timeout,
    Wake,
    Revoked,
    Closed,
    /// The relay is shutting down.
    Shutdown,
    /// Shutting down, and no request is in flight on this tunnel any more.
    Idle,
}

impl Driver {
    async fn run(&mut self, live: &LiveGuard) -> anyhow::Result<()> {
        let transport = self.handle.transport.clone();
        loop {
            let input = self.next_input(&*transport, live).await?;
            let now = Instant::now();
            match input {
                Input::Control(stream) => self.control = Some((stream.send, stream.recv)),
                Input::Frame(Ok(Some(frame))) => {
                    // The error is also queued as a Close event, acted on below.
                    let _ = self.handle.session().handle_frame(now, frame);
                }
                Input::Frame(Ok(None)) => {
                    self.control_ended = true;
                    self.handle.session().handle_control_closed(now);
                }
                Input::Frame(Err(FrameReadError::Decode(e))) => {
                    self.handle.session().handle_decode_error(now, e);
                }
                Input::Frame(Err(FrameReadError::Io(e))) => {
                    return Err(e).context("reading the control stream");
                }
                Input::Timeout => self.handle.session().handle_timeout(now),
                Input::Wake => {}
                Input::Revoked => {
                    transport.close(CloseCode::Revoked, "certificate revoked");
                    anyhow::bail!("connector revoked");
                }
                Input::Closed => return Ok(()),
                Input::Shutdown => self.stopping = true,
                Input::Idle => {
                    transport.close(CloseCode::Shutdown, "relay shutting down");
                    return Ok(());
                }
            }
            self.transmit().await?;
            self.act()?;
        }
    }

    async fn next_input(
        &mut self,
        transport: &dyn Transport,
        live: &LiveGuard,
    ) -> anyhow::Result<Input> {
        let Self {
            handle,
            control,
            decoder,
            control_ended,
            state,
            stopping,
            ..
        } = self;
        let stopping = *stopping;
        let shutdown = async {
            if stopping {
                std::future::pending().await
            } else {
                state.shutdown.wait().await
            }
        };
        // Every client connection gone (none can send another request), then every stream
        // slot free again: the requests on this tunnel have finished.
        let idle = async {
            if stopping {
                state.clients.wait().await;
                let all = u32::try_from(state.config.limits.max_streams_per_connector)
                    .unwrap_or(u32::MAX);
                let _ = handle.slots.acquire_many(all).await;
            } else {
                std::future::pending().await
            }
        };
        let deadline = handle.session().poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let control = async {
            match (control, *control_ended) {
                (None, _) => match transport.accept_bi().await {
                    Ok(stream) => Ok(Input::Control(stream)),
                    Err(e) => Err(anyhow::Error::new(e).context("waiting for the control stream")),
                },
                (Some((_, recv)), false) => Ok(Input::Frame(read_frame(recv, decoder).await)),
                (Some(_), true) => std::future::pending().await,
            }
        };
        Ok(tokio::select! {
            input = control => input?,
            () = timer => Input::Timeout,
            () = handle.wake.notified() => Input::Wake,
            () = live.revoked() => Input::Revoked,
            _ = transport.closed() => Input::Closed,
            () = shutdown => Input::Shutdown,
            () = idle => Input::Idle,
        })
    }

    /// Writes every frame the session has queued.
    async fn transmit(&mut self) -> anyhow::Result<()> {
        loop {
            let Some(frame) = self.handle.session().poll_transmit() else {
                return Ok(());
            };
            let (send, _) = self
                .control
                .as_mut()
                .context("a control frame to send before the control stream exists")?;
            send.write_all(&encode_frame(&frame)?)
                .await
                .context("writing the control stream")?;
        }
    }

    /// Acts on every event the session has queued.
    fn act(&mut self) -> anyhow::Result<()> {
        loop {
            let Some(event) = self.handle.session().poll_event() else {
                return Ok(());
            };
            match event {
                RelayEvent::Registered {
                    patterns,
                    accepted,
                    rejected,
                    agent,
                } => {
                    for r in &rejected {
                        tracing::warn!(hostname = %r.hostname, reason = %r.reason, "refused a connector's hostname");
                    }
                    self.state.router.add(&self.handle, &patterns);
                    self.up = true;
                    let transport = self.handle.transport.kind();
                    self.gauge = Some(self.state.metrics.tunnel(transport));
                    tracing::info!(hostnames = accepted.len(), %agent, transport = transport.as_str(), "connector up");
                }
                RelayEvent::Draining => {
                    tracing::info!("connector draining");
                    self.state.router.unroute(&self.handle);
                }
                RelayEvent::Published { patterns } => {
                    tracing::info!(hostnames = ?patterns.iter().map(ToString::to_string).collect::<Vec<_>>(), "connector changed what it publishes");
                    self.state.router.unroute(&self.handle);
                    self.state.router.add(&self.handle, &patterns);
                }
                RelayEvent::Close { code, reason } => {
                    self.handle.transport.close(code, &reason.to_string());
                    return Err(anyhow::Error::new(reason).context("tunnel protocol"));
                }
            }
        }
    }
}
