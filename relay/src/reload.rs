//! Hot reload of relay.toml: on SIGHUP and when the file's modification time changes.
//! What a reload changes is [`State::reload`]'s business. Also the watchers of the public
//! certificate files and of the JWT signing keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_shared::shutdown::{Hangups, Shutdown};

use crate::identity::tls::CertResolver;
use crate::state::State;

/// Reloads relay.toml on SIGHUP, and when its modification time changes (checked every
/// 2 s, so an edited or re-mounted file is picked up without a signal).
pub(crate) async fn watch_config(path: PathBuf, state: Arc<State>, shutdown: Shutdown) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = mtime(&path);
    let mut hup = Hangups::new("relay.toml");
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            () = hup.recv() => {
                tracing::info!(path = %path.display(), "SIGHUP: reloading relay.toml");
                seen = mtime(&path);
                state.reload(&path);
            }
            _ = tick.tick() => {
                let now = mtime(&path);
                if now.is_some() && now != seen {
                    seen = now;
                    tracing::info!(path = %path.display(), "relay.toml changed: reloading");
                    state.reload(&path);
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

/// Reloads the public certificate files (`tls_cert`, `tls_key`) when they change, as
/// cert-manager rewrites them; a broken pair keeps the previous one.
pub(crate) async fn watch_tls_files(resolver: Arc<CertResolver>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = resolver.reload_static() {
                    tracing::warn!(error = %format!("{e:#}"), "keeping the previous tls_cert");
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

/// Re-reads the JWT signing keys every 2 s, so `portcullis-relay jwt rotate` and
/// `jwt retire` take effect without a restart; a broken file keeps the keys in force.
pub(crate) async fn watch_jwt_keys(state: Arc<State>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = state.jwt.reload() {
                    tracing::warn!(error = %format!("{e:#}"), "keeping the JWT signing keys in force");
                }
            }
            () = shutdown.wait() => return,
        }
    }
}
