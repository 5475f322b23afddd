//! `audit_retention`: the running relay deletes audit rows older than it, at start and
//! then every hour, off the async threads, and records each deletion as an audit row of
//! its own (`audit.prune`). Several relays on one store each prune; the deletion is the
//! same whoever runs it.

use std::sync::Arc;
use std::time::Duration;

use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::{AuditEvent, Store};

use crate::clock::{now, rfc3339};

/// How often the relay prunes.
const EVERY: Duration = Duration::from_secs(3600);

/// Prunes now and every [`EVERY`] until shutdown.
pub(crate) async fn prune_audit(store: Arc<dyn Store>, retention: Duration, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let store = store.clone();
                let pruned = tokio::task::spawn_blocking(move || prune_once(&*store, retention)).await;
                if let Ok(Err(e)) = pruned {
                    tracing::warn!(error = %e, "cannot prune the audit log; will try again in an hour");
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

/// Deletes the rows older than `retention` and records that it did.
fn prune_once(
    store: &dyn Store,
    retention: Duration,
) -> Result<u64, portcullis_shared::store::StoreError> {
    let before = now().saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
    let deleted = store.prune_audit(before)?;
    if deleted > 0 {
        tracing::info!(deleted, "pruned the audit log (audit_retention)");
        store.audit(&AuditEvent {
            at: now(),
            action: "audit.prune".into(),
            subject: "audit".into(),
            detail: format!(
                "deleted {deleted} rows older than {} (audit_retention {})",
                rfc3339(before),
                humantime::format_duration(retention)
            ),
            actor: "relay".into(),
        })?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use portcullis_shared::store::{AuditQuery, SqliteStore};

    use super::*;

    #[test]
    fn rows_older_than_the_retention_go_and_the_pruning_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let day = 24 * 3600;
        for (at, action) in [(now() - 3 * day, "old"), (now() - 60, "recent")] {
            store
                .audit(&AuditEvent {
                    at,
                    action: action.into(),
                    subject: "x".into(),
                    detail: String::new(),
                    actor: "local:test".into(),
                })
                .unwrap();
        }
        assert_eq!(
            prune_once(&store, Duration::from_secs(2 * day as u64)).unwrap(),
            1
        );
        let left: Vec<_> = store
            .audit_log(&AuditQuery::default())
            .unwrap()
            .into_iter()
            .map(|e| (e.action, e.actor))
            .collect();
        assert_eq!(
            left,
            [
                ("recent".to_owned(), "local:test".to_owned()),
                ("audit.prune".to_owned(), "relay".to_owned())
            ]
        );
        // Nothing more to prune: nothing recorded.
        assert_eq!(
            prune_once(&store, Duration::from_secs(2 * day as u64)).unwrap(),
            0
        );
        assert_eq!(store.audit_log(&AuditQuery::default()).unwrap().len(), 2);
    }
}
