//! Tunnels: `CONNECT` (raw TCP), HTTP/1.1 `Upgrade` and extended `CONNECT` (WebSocket over
//! HTTP/2 and HTTP/3) end with a [`Tunnel`] in the response's extensions; the listener
//! joins the client's side to it once the response is sent, since only it knows how its
//! own stream is upgraded.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use portcullis_shared::transport::{IoRecv, IoSend, JoinedStream, TunnelRecv, TunnelSend};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::conn::ConnInfo;
use crate::identity::registry::LiveGuard;
use crate::state::State;

/// In the extensions of a response that opens a tunnel: the connector side's upgraded
/// stream, and what must live as long as the tunnel does.
#[derive(Clone)]
pub(crate) struct Tunnel(Arc<Mutex<Option<TunnelParts>>>);

/// What a tunnel is made of until the listener joins it.
pub(crate) struct TunnelParts {
    pub(crate) upstream: Upstream,
    pub(crate) permits: Vec<OwnedSemaphorePermit>,
    pub(crate) revoked: CancellationToken,
    pub(crate) live: Option<Arc<LiveGuard>>,
}

/// Where a tunnel's bytes go.
pub(crate) enum Upstream {
    /// The connector's upgraded stream (raw TCP, WebSocket).
    Connector(OnUpgrade),
    /// `CONNECT host:443` to a published web service: TLS ends here, at the relay, with
    /// the org-CA leaf for `host`, and the requests inside are served like direct HTTPS
    /// requests under the outer connection's device identity (the agent's HTTPS proxying).
    TerminateTls(Arc<State>, Arc<ConnInfo>),
}

impl Tunnel {
    pub(crate) fn new(parts: TunnelParts) -> Self {
        Self(Arc::new(Mutex::new(Some(parts))))
    }

    /// The parts, once: the listener that joins the tunnel takes them.
    pub(crate) fn take(&self) -> Option<TunnelParts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A byte stream to join a client to.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Upstream {
    /// The stream to copy the client's bytes to.
    pub(crate) async fn open(self) -> Option<Box<dyn Io>> {
        match self {
            Self::Connector(upgrade) => match upgrade.await {
                Ok(u) => Some(Box::new(TokioIo::new(u))),
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel upgrade failed");
                    None
                }
            },
            Self::TerminateTls(state, info) => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                // Handed to the long-lived task that serves these (see `listen::terminate`),
                // which keeps the request path free of a recursive future type.
                state.terminator.send((ours, info)).ok()?;
                Some(Box::new(theirs))
            }
        }
    }
}

/// A tunnel's upstream as two halves, ready for [`portcullis_shared::pump`].
pub(crate) struct Halves {
    /// Bytes the connector side's HTTP codec read past the response head: they come
    /// first.
    pub(crate) early: Bytes,
    pub(crate) recv: Box<dyn TunnelRecv>,
    pub(crate) send: Box<dyn TunnelSend>,
}

impl Upstream {
    /// The stream to copy the client's bytes to, as two halves: the connector's tunnel
    /// stream as its transport made it (QUIC moves chunks without copies), any other
    /// stream through `AsyncRead` and `AsyncWrite`.
    pub(crate) async fn open_halves(self) -> Option<Halves> {
        let io = match self {
            Self::Connector(upgrade) => match upgrade.await {
                Ok(u) => match u.downcast::<TokioIo<JoinedStream>>() {
                    Ok(parts) => {
                        let (recv, send) = parts.io.into_inner().into_inner();
                        return Some(Halves {
                            early: parts.read_buf,
                            recv,
                            send,
                        });
                    }
                    Err(u) => Box::new(TokioIo::new(u)) as Box<dyn Io>,
                },
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel upgrade failed");
                    return None;
                }
            },
            terminate @ Self::TerminateTls(..) => terminate.open().await?,
        };
        let (recv, send) = tokio::io::split(io);
        Some(Halves {
            early: Bytes::new(),
            recv: Box::new(IoRecv(recv)),
            send: Box::new(IoSend(send)),
        })
    }
}

impl TunnelParts {
    /// Copies bytes both ways between the client's upgraded stream and the upstream,
    /// honouring half-close, until both directions end or the device is revoked.
    pub(crate) async fn join_with<C>(self, mut client: C)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let Some(mut upstream) = self.upstream.open().await else {
            return;
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
            }
            () = self.revoked.cancelled() => tracing::info!("closing a revoked device's tunnel"),
        }
        drop(self.permits);
        drop(self.live);
    }
}

/// Joins a hyper-upgraded client stream (HTTP/1.1 upgrade, HTTP/2 CONNECT) to a tunnel.
pub(crate) async fn join_hyper(client: OnUpgrade, tunnel: TunnelParts) {
    match client.await {
        Ok(c) => tunnel.join_with(TokioIo::new(c)).await,
        Err(e) => tracing::debug!(error = %e, "client upgrade failed"),
    }
}
