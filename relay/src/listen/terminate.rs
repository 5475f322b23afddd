//! The in-memory TLS listener for `CONNECT host:443` tunnels whose TLS ends at the relay
//! (the agent's HTTPS proxying): the request pipeline hands over one end of a byte pipe
//! ([`Terminated`]); this serves HTTPS on it with the org-CA leaf for the name, under the
//! outer connection's device identity, with the same limits as a direct connection.

use std::sync::{Arc, Weak};

use portcullis_shared::shutdown::Shutdown;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::TlsAcceptor;

use super::https::serve_http;
use crate::conn::{ConnInfo, Terminated};
use crate::hardening::idle::Activity;
use crate::state::State;

/// Serves every [`Terminated`] tunnel handed over, until the relay stops.
pub(crate) async fn terminator(
    mut rx: UnboundedReceiver<Terminated>,
    acceptor: TlsAcceptor,
    state: Weak<State>,
    shutdown: Shutdown,
) {
    loop {
        let (io, outer) = tokio::select! {
            next = rx.recv() => match next {
                Some(t) => t,
                None => return,
            },
            () = shutdown.wait() => return,
        };
        let Some(state) = state.upgrade() else { return };
        shutdown
            .tracker()
            .spawn(serve_terminated(io, acceptor.clone(), state, outer));
    }
}

/// Serves the HTTPS connection inside a `CONNECT host:443` tunnel whose TLS ends at the
/// relay: no client certificate inside; the device is the outer connection's.
async fn serve_terminated(
    io: tokio::io::DuplexStream,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    outer: Arc<ConnInfo>,
) {
    let tls = match tokio::time::timeout(state.config.limits.handshake_timeout, acceptor.accept(io))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(reason = %e, "TLS inside CONNECT refused");
            return;
        }
        Err(_) => return,
    };
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let info = Arc::new(ConnInfo {
        sni: session.server_name().map(str::to_owned),
        protocol: if h2 {
            "HTTP/2 in CONNECT"
        } else {
            "HTTP/1.1 in CONNECT"
        },
        // Its own idle timeout: the outer tunnel stays busy while this connection lives.
        activity: Activity::new(),
        ..(*outer).clone()
    });
    // The same limits and reset-flood guard as a direct connection; the outer
    // connection's revocation closes this one too.
    let grace = state.config.limits.idle_timeout;
    serve_http(tls, h2, state, info, std::future::pending(), grace, None).await;
}
