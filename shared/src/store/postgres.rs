//! PostgreSQL implementation of [`Store`]: the store several relays share.
//!
//! The [`Store`] trait is synchronous (SQLite's calls are), so [`PostgresStore`] runs the
//! asynchronous `tokio-postgres` client on a small runtime of its own, one thread, and
//! each call waits for its answer with a deadline: a store that does not answer makes the
//! call fail with [`StoreError::Unavailable`], it never hangs the caller. The connection
//! is made again on the next call after it breaks.
//!
//! Writes that change identities bump a generation counter and `NOTIFY
//! portcullis_changes` in the same transaction; a second connection `LISTEN`s and wakes
//! [`Store::changes`], so every relay applies a revocation as soon as it commits.
//! Schema changes are numbered migrations, applied at open under an advisory lock so two
//! relays starting together do not race; a store from a newer release is refused.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Config, Row};

use super::pg_tls;

use super::{
    AuditEvent, AuditQuery, IdentityRecord, Store, StoreError, TokenRecord, grant_row,
    identity_row, json, mask_url, redeemable,
};
use crate::identity::Identity;

/// The schema, as numbered migrations (see the SQLite store's, which it mirrors).
const MIGRATIONS: &[&str] = &[
    // 1: identities, the audit log, enrolment tokens, settings and the change counter.
    "
CREATE TABLE identities (
    role            TEXT NOT NULL,
    id              TEXT NOT NULL,
    user_name       TEXT,
    groups          TEXT NOT NULL,
    hostnames       TEXT NOT NULL,
    serial          TEXT NOT NULL,
    previous_serial TEXT,
    key_sha256      TEXT NOT NULL,
    not_after       BIGINT NOT NULL,
    issued_at       BIGINT NOT NULL,
    revoked_at      BIGINT,
    PRIMARY KEY (role, id)
);
CREATE TABLE audit (
    seq     BIGSERIAL PRIMARY KEY,
    at      BIGINT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    grant_json    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT,
    revoked_at    BIGINT
);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('generation', 0);
",
    // 2: who did what the audit log records; an index for pruning by age.
    "ALTER TABLE audit ADD COLUMN actor TEXT NOT NULL DEFAULT '';
CREATE INDEX audit_at ON audit (at);",
];

/// The newest schema version this release knows.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock migrations hold (any constant the deployment does not use elsewhere).
const MIGRATION_LOCK: i64 = 0x706f_7274_6375;

/// The channel identity changes are announced on.
const CHANNEL: &str = "portcullis_changes";

/// How long one call may wait for PostgreSQL, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before listening again after the listening connection broke.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// Identity columns in the order [`identity_from`] reads them.
const IDENTITY_COLUMNS: &str = "role, id, user_name, groups, hostnames, serial, previous_serial, \
     key_sha256, not_after, issued_at, revoked_at";

/// Token columns in the order [`token_from`] reads them.
const TOKEN_COLUMNS: &str =
    "id, secret_sha256, grant_json, created_at, expires_at, used_at, revoked_at";

/// A [`Store`] in a PostgreSQL database several relays share.
pub struct PostgresStore {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    config: Config,
    /// TLS as the URL's `sslmode` says (see [`pg_tls`]).
    tls: pg_tls::MakeRustls,
    url: String,
    client: tokio::sync::Mutex<Option<Client>>,
    changes: Arc<Notify>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`),
    /// creates or migrates its schema, and starts listening for changes. Fails with a
    /// message naming the URL (password masked) if the database cannot be reached.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let masked = mask_url(url);
        let unavailable = |why: String| StoreError::Unavailable {
            url: masked.clone(),
            why,
        };
        let parts = pg_tls::split_url(url).map_err(&unavailable)?;
        let mut config: Config = parts
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| unavailable(format!("not a valid URL: {e}")))?;
        let mode = parts
            .mode
            .unwrap_or_else(|| pg_tls::default_mode(config.get_hosts(), config.get_hostaddrs()));
        config.ssl_mode(pg_tls::ssl_mode(mode));
        let tls = pg_tls::MakeRustls::new(
            pg_tls::client_config(mode, parts.root_cert.as_deref()).map_err(&unavailable)?,
        );
        config.connect_timeout(CALL_TIMEOUT);
        config.application_name("portcullis-relay");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("portcullis-store")
            .enable_all()
            .build()
            .map_err(|e| unavailable(format!("cannot start its client: {e}")))?;
        let shared = Arc::new(Shared {
            config,
            tls,
            url: masked,
            client: tokio::sync::Mutex::new(None),
            changes: Arc::new(Notify::new()),
        });
        let store = Self {
            shared,
            runtime: Some(runtime),
        };
        store.call(|c| Box::pin(migrate(c)))?;
        if let Some(rt) = &store.runtime {
            rt.spawn(listen(store.shared.clone()));
        }
        Ok(store)
    }

    /// Runs `op` with the connection (made first if there is none) on the store's
    /// runtime, and waits for its result at most [`CALL_TIMEOUT`].
    fn call<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut Client) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        let unavailable = |why: &str| StoreError::Unavailable {
            url: self.shared.url.clone(),
            why: why.to_owned(),
        };
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| unavailable("the store is closed"))?;
        let (tx, rx) = mpsc::sync_channel(1);
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let result = tokio::time::timeout(CALL_TIMEOUT, async {
                let mut slot = shared.client.lock().await;
                let client = match slot.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => connect(&shared).await?,
                };
                let client = slot.insert(client);
                let result = op(client).await;
                if client.is_closed() {
                    *slot = None;
                }
                result
            })
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable {
                    url: shared.url.clone(),
                    why: format!("no answer within {CALL_TIMEOUT:?}"),
                })
            });
            let _ = tx.send(result);
        });
        rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(unavailable("no answer from the store's client")))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The relay may drop its store from inside its own runtime, where a blocking
        // shutdown is not allowed.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A new connection, driven on the current runtime until its client is dropped.
async fn connect(shared: &Shared) -> Result<Client, StoreError> {
    let (client, connection) = shared
        .config
        .connect(shared.tls.clone())
        .await
        .map_err(|e| StoreError::Unavailable {
            url: shared.url.clone(),
            why: with_causes(&e),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the connection to the store broke");
        }
    });
    Ok(client)
}

/// An error and its causes, `: `-joined: tokio-postgres names only the kind of failure
/// ("error performing TLS handshake"), the cause says which (an unknown issuer, say).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Listens for changes on a connection of its own, waking `changes` for each, for as
/// long as the store lives; wakes it too after every reconnection, since changes may
/// have been missed meanwhile.
async fn listen(shared: Arc<Shared>) {
    loop {
        match shared.config.connect(shared.tls.clone()).await {
            Ok((client, mut connection)) => {
                let changes = shared.changes.clone();
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let driver = tokio::spawn(async move {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => changes.notify_one(),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        shared.changes.notify_one();
                        let _ = driver.await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for store changes");
                        driver.abort();
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::debug!(error = %with_causes(&e), "cannot connect to listen for store changes")
            }
        }
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    )
    .await?;
    let found: i64 = match tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .await?
    {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql).await?;
        let version = i as i64 + 1;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Bumps the generation and announces the change, in `tx`.
async fn bump(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'generation'",
        &[],
    )
    .await?;
    tx.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
    Ok(())
}

/// Writes an identity row (`upsert`: replacing an existing one, unrevoking it); returns
/// how many rows changed.
async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    r: &IdentityRecord,
    upsert: bool,
) -> Result<u64, StoreError> {
    let conflict = if upsert {
        "ON CONFLICT (role, id) DO UPDATE SET user_name = EXCLUDED.user_name,
         groups = EXCLUDED.groups, hostnames = EXCLUDED.hostnames, serial = EXCLUDED.serial,
         previous_serial = EXCLUDED.previous_serial, key_sha256 = EXCLUDED.key_sha256,
         not_after = EXCLUDED.not_after, issued_at = EXCLUDED.issued_at, revoked_at = NULL"
    } else {
        "ON CONFLICT (role, id) DO NOTHING"
    };
    Ok(tx
        .execute(
            &format!(
                "INSERT INTO identities ({IDENTITY_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) {conflict}"
            ),
            &[
                &r.identity.role().as_str(),
                &r.identity.id(),
                &r.user,
                &json(&r.groups),
                &json(&r.hostnames),
                &r.serial,
                &r.previous_serial,
                &r.key_sha256,
                &r.not_after,
                &r.issued_at,
            ],
        )
        .await?)
}

fn identity_from(row: &Row) -> Result<IdentityRecord, StoreError> {
    let role: String = row.try_get(0)?;
    let id: String = row.try_get(1)?;
    let groups: String = row.try_get(3)?;
    let hostnames: String = row.try_get(4)?;
    identity_row(
        &role,
        &id,
        row.try_get(2)?,
        &groups,
        &hostnames,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get(10)?,
    )
}

fn token_from(row: &Row) -> Result<TokenRecord, StoreError> {
    let id: String = row.try_get(0)?;
    let grant: String = row.try_get(2)?;
    Ok(TokenRecord {
        grant: grant_row(&id, &grant)?,
        secret_sha256: row.try_get(1)?,
        created_at: row.try_get(3)?,
        expires_at: row.try_get(4)?,
        used_at: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
        id,
    })
}

impl Store for PostgresStore {
    fn put_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let revoked = tx
                    .query_opt(
                        "SELECT revoked_at FROM identities WHERE role = $1 AND id = $2 FOR UPDATE",
                        &[&r.identity.role().as_str(), &r.identity.id()],
                    )
                    .await?;
                if let Some(row) = revoked
                    && row.try_get::<_, Option<i64>>(0)?.is_some()
                {
                    return Err(StoreError::Revoked(r.identity.clone()));
                }
                insert(&tx, &r, true).await?;
                bump(&tx).await?;
                tx.commit().await?;
                Ok(())
            })
        })
    }

    fn create_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                if insert(&tx, &r, false).await? == 0 {
                    return Err(StoreError::Exists(r.identity.clone()));
                }
                bump(&tx).await?;
                tx.commit().await?;
                Ok(())
            })
        })
    }

    fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!("SELECT {IDENTITY_COLUMNS} FROM identities ORDER BY role, id"),
                        &[],
                    )
                    .await?;
                rows.iter().map(identity_from).collect()
            })
        })
    }

    fn revoke(&self, identity: &Identity, at: i64) -> Result<(), StoreError> {
        let identity = identity.clone();
        self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let n = tx
                    .execute(
                        "UPDATE identities SET revoked_at = COALESCE(revoked_at, $3)
                         WHERE role = $1 AND id = $2",
                        &[&identity.role().as_str(), &identity.id(), &at],
                    )
                    .await?;
                if n == 0 {
                    return Err(StoreError::NotFound(identity));
                }
                bump(&tx).await?;
                tx.commit().await?;
                Ok(())
            })
        })
    }

    fn audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
        let e = e.clone();
        self.call(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO audit (at, action, subject, detail, actor) VALUES ($1, $2, $3, $4, $5)",
                    &[&e.at, &e.action, &e.subject, &e.detail, &e.actor],
                )
                .await?;
                Ok(())
            })
        })
    }

    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let since = query.since.unwrap_or(i64::MIN);
        let until = query.until.unwrap_or(i64::MAX);
        self.call(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT at, action, subject, detail, actor FROM audit WHERE at >= $1 AND at <= $2 ORDER BY seq",
                        &[&since, &until],
                    )
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok(AuditEvent {
                            at: row.try_get(0)?,
                            action: row.try_get(1)?,
                            subject: row.try_get(2)?,
                            detail: row.try_get(3)?,
                            actor: row.try_get(4)?,
                        })
                    })
                    .collect()
            })
        })
    }

    fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.call(move |c| {
            Box::pin(async move {
                Ok(c.execute("DELETE FROM audit WHERE at < $1", &[&before])
                    .await?)
            })
        })
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let row = c
                    .query_one("SELECT value FROM meta WHERE key = 'generation'", &[])
                    .await?;
                Ok(row.try_get::<_, i64>(0)? as u64)
            })
        })
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.call(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO tokens (id, secret_sha256, grant_json, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &t.id,
                        &t.secret_sha256,
                        &json(&t.grant),
                        &t.created_at,
                        &t.expires_at,
                    ],
                )
                .await?;
                Ok(())
            })
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at DESC, id"),
                        &[],
                    )
                    .await?;
                rows.iter().map(token_from).collect()
            })
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            Box::pin(async move {
                let n = c
                    .execute(
                        "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                        &[&id, &at],
                    )
                    .await?;
                if n == 0 {
                    return Err(StoreError::NoSuchToken(id));
                }
                Ok(())
            })
        })
    }

    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: i64,
    ) -> Result<TokenRecord, StoreError> {
        let (id, secret_sha256) = (id.to_owned(), secret_sha256.to_owned());
        self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                // The row lock makes a token single-use across every relay: a second
                // redeemer waits here, then sees it used.
                let token = tx
                    .query_opt(
                        &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1 FOR UPDATE"),
                        &[&id],
                    )
                    .await?
                    .ok_or_else(|| StoreError::TokenRefused("unknown token".into()))?;
                let token = token_from(&token)?;
                redeemable(&token, &secret_sha256, now)?;
                tx.execute("UPDATE tokens SET used_at = $2 WHERE id = $1", &[&id, &now])
                    .await?;
                tx.commit().await?;
                Ok(TokenRecord {
                    used_at: Some(now),
                    ..token
                })
            })
        })
    }

    fn bind_ca(&self, ca_sha256: &str) -> Result<(), StoreError> {
        let ours = ca_sha256.to_owned();
        self.call(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO settings (key, value) VALUES ('ca_sha256', $1)
                     ON CONFLICT (key) DO NOTHING",
                    &[&ours],
                )
                .await?;
                let bound: String = c
                    .query_one("SELECT value FROM settings WHERE key = 'ca_sha256'", &[])
                    .await?
                    .try_get(0)?;
                if bound != ours {
                    return Err(StoreError::CaMismatch { store: bound, ours });
                }
                Ok(())
            })
        })
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.shared.changes.clone())
    }

    fn describe(&self) -> String {
        format!("PostgreSQL {}", self.shared.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        assert_eq!(
            mask_url("postgres://relay:s3cr:et@db.internal:5432/portcullis?sslmode=disable"),
            "postgres://relay:***@db.internal:5432/portcullis?sslmode=disable"
        );
        assert_eq!(
            mask_url("postgresql://relay@db/portcullis"),
            "postgresql://relay@db/portcullis"
        );
        assert_eq!(mask_url("postgres://db/p@x"), "postgres://db/p@x");
        assert_eq!(mask_url("host=db user=relay"), "host=db user=relay");
        assert_eq!(
            mask_url("postgres://relay@db/p?sslmode=require&password=hunter2&PassWord=x"),
            "postgres://relay@db/p?sslmode=require&password=***&PassWord=***"
        );
    }

    #[test]
    fn an_unreachable_database_is_named_with_its_password_masked() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let err = PostgresStore::connect("postgres://relay:hunter2@127.0.0.1:1/portcullis")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("postgres://relay:***@127.0.0.1:1/portcullis"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
