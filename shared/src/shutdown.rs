//! One shutdown handle per process: a cancellation token every task watches, and a task
//! tracker the process waits on before it exits.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cloned into every task; cancelled once on SIGTERM/SIGINT (or by a test).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh, uncancelled handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown starts; use in `select!`.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// A handle that is triggered with this one or on its own, and shares its tracker:
    /// for stopping one part (say, one relay's tunnel) while the process goes on, its
    /// tasks still awaited at exit.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
        }
    }

    /// The underlying token, for child tokens.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The tracker that tasks which must finish before exit are spawned on.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Closes the tracker and waits up to `grace` for tracked tasks. Returns whether they
    /// all finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Triggers this handle on the first SIGTERM or SIGINT. Call from `main`.
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
            this.trigger();
        });
        Ok(())
    }
}

/// SIGHUP, the reload signal. [`Hangups::recv`] resolves on each one; where no handler
/// could be installed it never resolves (the reason is logged once, at creation).
#[derive(Debug)]
pub struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    /// Installs the handler; `file` names what SIGHUP reloads, for the warning.
    pub fn new(file: &str) -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Self(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; {file} is still reloaded when it changes");
                Self(None)
            }
        }
    }

    /// The next SIGHUP.
    pub async fn recv(&mut self) {
        match self.0.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}
