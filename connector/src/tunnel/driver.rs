//! One session's control loop: the relay's control frames read on a task of their own,
//! registration, keep-alives, withdrawals of unhealthy hostnames, and the drain at the
//! end, driven through the protocol's `ConnectorSession` state machine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use portcullis_shared::proto::{
    CloseCode, ConnectorEvent, ConnectorSession, ConnectorSessionConfig, ControlFrame,
    FrameDecoder, StreamHeader, encode_frame,
};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::transport::{
    BiStream, BoxFuture, Transport, TransportError, TunnelRecv, TunnelSend,
};
use portcullis_shared::tunnel_io::{FrameReadError, read_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use super::context::{Tunnel, TunnelContext};
use crate::dial::{DELIVERY_TIMEOUT, HEADER_TIMEOUT};
use crate::origin::Origins;
use crate::origin::health::Withdrawn;
use crate::status::TunnelState;

/// Reads the relay's control frames on a task of their own and hands them over, so the
/// driver's loop waits on a channel rather than re-polling the stream on every wake-up.
/// The last item is the stream's end (`Ok(None)`) or its error.
fn read_frames(
    mut recv: Box<dyn TunnelRecv>,
) -> tokio::sync::mpsc::Receiver<Result<Option<ControlFrame>, FrameReadError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::default();
        loop {
            let frame = read_frame(&mut recv, &mut decoder).await;
            let last = !matches!(frame, Ok(Some(_)));
            if tx.send(frame).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// The async shell around one tunnel's [`ConnectorSession`].
struct Driver {
    session: ConnectorSession,
    control: Box<dyn TunnelSend>,
    /// The relay's control frames, from [`read_frames`].
    frames: tokio::sync::mpsc::Receiver<Result<Option<ControlFrame>, FrameReadError>>,
    /// Each stream task says here when it ends.
    finished_tx: tokio::sync::mpsc::UnboundedSender<()>,
    finished: tokio::sync::mpsc::UnboundedReceiver<()>,
    draining: bool,
    /// The hostnames the relay accepted, once registered.
    accepted: Vec<String>,
    /// Follows the hostnames withdrawn for unhealthy origins.
    withdrawn: Withdrawn,
    /// Whether the relay accepted the registration.
    registered: bool,
}

/// What woke the driver.
enum Input {
    Stream(BiStream),
    Frame(Result<Option<ControlFrame>, FrameReadError>),
    Finished,
    Timeout,
    Shutdown,
    /// The set of withdrawn hostnames changed.
    Health,
}

impl Driver {
    async fn run(
        &mut self,
        transport: &dyn Transport,
        cx: &TunnelContext,
        shutdown: &Shutdown,
        tunnel: &Tunnel,
    ) -> anyhow::Result<()> {
        // One accept in flight for the tunnel's life, re-armed after each stream.
        let mut accept = transport.accept_bi();
        loop {
            self.transmit().await?;
            if let Some(end) = self.act(transport, tunnel) {
                return end;
            }
            let input = match self.next_input(&mut accept, shutdown).await {
                Ok(input) => input,
                Err(e) => {
                    if let Some(why) = e.peer_code().and_then(close_reason) {
                        tracing::error!(reason = why, "the relay closed the tunnel");
                    }
                    return Err(anyhow::Error::new(e).context("tunnel closed"));
                }
            };
            let now = Instant::now();
            match input {
                Input::Stream(stream) => {
                    accept = transport.accept_bi();
                    self.session.handle_stream_accepted(now);
                    let done = self.finished_tx.clone();
                    let metrics = cx.live.metrics.clone();
                    let task = serve_stream(stream, cx.live.current().origins.clone());
                    metrics.streams.fetch_add(1, Ordering::Relaxed);
                    metrics.streams_active.fetch_add(1, Ordering::Relaxed);
                    shutdown.tracker().spawn(
                        async move {
                            task.await;
                            metrics.streams_active.fetch_sub(1, Ordering::Relaxed);
                            let _ = done.send(());
                        }
                        .instrument(tracing::debug_span!("stream")),
                    );
                }
                Input::Frame(Ok(Some(frame))) => {
                    // The error is also queued as a Close event, acted on above.
                    let _ = self.session.handle_frame(now, frame);
                }
                Input::Frame(Ok(None)) => self.session.handle_control_closed(now),
                Input::Frame(Err(FrameReadError::Decode(e))) => {
                    self.session.handle_decode_error(now, e);
                }
                Input::Frame(Err(FrameReadError::Io(e))) => {
                    return Err(e).context("reading the control stream");
                }
                Input::Finished => {
                    self.session.handle_stream_finished(now);
                    // Take every other stream that has ended too, in one wake-up.
                    while self.finished.try_recv().is_ok() {
                        self.session.handle_stream_finished(now);
                    }
                }
                Input::Timeout => self.session.handle_timeout(now),
                Input::Health => self.publish(tunnel),
                Input::Shutdown => {
                    // Drain: the relay stops routing here; in-flight streams finish,
                    // streams it opened before it read the Drain are still accepted.
                    self.draining = true;
                    self.session.start_drain(now);
                    tunnel.set(TunnelState::Draining);
                }
            }
        }
    }

    async fn next_input(
        &mut self,
        accept: &mut BoxFuture<'_, Result<BiStream, TransportError>>,
        shutdown: &Shutdown,
    ) -> Result<Input, TransportError> {
        let deadline = self.session.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let draining = self.draining;
        let stop = async {
            if draining {
                std::future::pending().await
            } else {
                shutdown.wait().await
            }
        };
        // A finished stream before a new one, so the drain's accounting stays current.
        Ok(tokio::select! {
            biased;
            Some(()) = self.finished.recv() => Input::Finished,
            stream = accept => Input::Stream(stream?),
            Some(frame) = self.frames.recv() => Input::Frame(frame),
            () = timer => Input::Timeout,
            () = stop => Input::Shutdown,
            Ok(()) = self.withdrawn.changed() => Input::Health,
        })
    }

    /// Tells the relay to route the accepted hostnames whose origins are healthy.
    fn publish(&mut self, tunnel: &Tunnel) {
        let withdrawn = self.withdrawn.borrow_and_update().clone();
        let published: Vec<String> = self
            .accepted
            .iter()
            .filter(|h| !withdrawn.contains(*h))
            .cloned()
            .collect();
        if self.session.publish(published.clone()) {
            tunnel.up(published);
        }
    }

    /// Writes every frame the session queued, and finishes the control stream when the
    /// drain asks for it.
    async fn transmit(&mut self) -> anyhow::Result<()> {
        while let Some(frame) = self.session.poll_transmit() {
            self.control
                .write_all(&encode_frame(&frame)?)
                .await
                .context("writing the control stream")?;
        }
        if self.session.poll_finish_control() {
            let _ = self.control.shutdown().await;
        }
        Ok(())
    }

    /// Acts on every event the session queued; `Some` ends the tunnel with that result.
    fn act(&mut self, transport: &dyn Transport, tunnel: &Tunnel) -> Option<anyhow::Result<()>> {
        while let Some(event) = self.session.poll_event() {
            match event {
                ConnectorEvent::Registered { accepted, rejected } => {
                    for r in &rejected {
                        tracing::error!(hostname = %r.hostname, reason = %r.reason, "the relay refused to publish this hostname; check the connector's certificate (issue connector --hostname)");
                    }
                    tracing::info!(published = ?accepted, transport = tunnel.kind.as_str(), "tunnel up");
                    self.accepted = accepted.clone();
                    // Origins already known to be unhealthy are withdrawn at once.
                    if !self.withdrawn.borrow_and_update().is_empty() {
                        self.publish(tunnel);
                    } else {
                        tunnel.up(accepted);
                    }
                    tunnel.registered.notify_one();
                    // Only a registration the relay answered counts as success: a refused
                    // certificate fails after the QUIC handshake and must keep backing off.
                    self.registered = true;
                }
                ConnectorEvent::DrainNotAcknowledged => {
                    tracing::warn!(
                        "the relay did not acknowledge the drain; finishing what arrived"
                    );
                }
                ConnectorEvent::DrainComplete => {
                    transport.close(CloseCode::Normal, "connector shutting down");
                    return Some(Ok(()));
                }
                ConnectorEvent::DrainTimedOut {
                    in_flight,
                    not_arrived,
                } => {
                    tracing::warn!(
                        in_flight,
                        not_arrived,
                        "drain grace expired; closing with streams in flight"
                    );
                    transport.close(CloseCode::Normal, "connector shutting down");
                    return Some(Ok(()));
                }
                ConnectorEvent::Close { code, reason } => {
                    transport.close(code, &reason.to_string());
                    return Some(Err(anyhow::Error::new(reason).context("tunnel protocol")));
                }
            }
        }
        None
    }
}

/// A sentence for the operator for the relay's close code, `None` for an orderly close.
fn close_reason(code: CloseCode) -> Option<&'static str> {
    match code {
        CloseCode::Revoked => Some("this connector's certificate was revoked"),
        CloseCode::Shutdown => Some("the relay is restarting"),
        CloseCode::Protocol => Some("protocol error"),
        CloseCode::WrongRole => Some("wrong certificate role"),
        CloseCode::Normal => None,
    }
}

async fn serve_stream(mut stream: BiStream, origins: Arc<Origins>) {
    let header = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut prefix = [0u8; 3];
        stream.recv.read_exact(&mut prefix).await?;
        let len = StreamHeader::body_len(prefix)?;
        let mut buf = vec![0u8; 3 + len];
        buf[..3].copy_from_slice(&prefix);
        stream.recv.read_exact(&mut buf[3..]).await?;
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
    // handed to the transport.
    let delivered = stream.send.delivered();
    origins.serve_http(header, stream).await;
    let _ = tokio::time::timeout(DELIVERY_TIMEOUT, delivered).await;
}

/// One connected tunnel, driven by its [`ConnectorSession`]: register, then serve the
/// relay's streams until the connection ends, or until `shutdown` and the drain that
/// follows it complete. Also returns whether the relay accepted the registration.
pub(super) async fn session(
    transport: Arc<dyn Transport>,
    cx: Arc<TunnelContext>,
    shutdown: Shutdown,
    tunnel: Arc<Tunnel>,
) -> (anyhow::Result<()>, bool) {
    let control = match transport.open_bi().await {
        Ok(c) => c,
        Err(e) => {
            return (
                Err(anyhow::Error::new(e).context("opening the control stream")),
                false,
            );
        }
    };
    let agent = concat!("portcullis-connector/", env!("CARGO_PKG_VERSION")).to_owned();
    let session = ConnectorSession::new(
        Instant::now(),
        cx.live.current().hostnames(),
        agent,
        ConnectorSessionConfig::new(cx.config.drain_grace),
    );
    let (finished_tx, finished) = tokio::sync::mpsc::unbounded_channel();
    let BiStream { send, recv } = control;
    let mut driver = Driver {
        session,
        control: send,
        frames: read_frames(recv),
        finished_tx,
        finished,
        draining: false,
        accepted: Vec::new(),
        withdrawn: tunnel.withdrawn.clone(),
        registered: false,
    };
    let result = driver.run(&*transport, &cx, &shutdown, &tunnel).await;
    (result, driver.registered)
}
