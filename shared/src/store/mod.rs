//! The relay's state: who holds which certificate, what each may publish, revocations,
//! and the admin audit log.
//!
//! [`Store`] is the seam a multi-relay deployment replaces with a shared database;
//! [`SqliteStore`] is the default, one file in the state directory, opened in WAL mode so
//! an admin command and the running relay can use it at once. The store never reads the
//! clock: callers pass timestamps.

#[cfg(feature = "postgres")]
pub mod pg_tls;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use serde::{Deserialize, Serialize};

use crate::identity::{HostPattern, Identity, Role};

/// Masks a store URL's password: [`crate::text::mask_url`].
pub use crate::text::mask_url;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use sqlite::{SCHEMA_VERSION, SqliteStore};

/// How long after a renewal the certificate it replaced is still accepted, seconds: long
/// enough for a device whose renewal answer was lost to retry (the agent retries every
/// minute), short enough that an older certificate is not a second credential.
pub const RENEWAL_OVERLAP_SECS: i64 = 600;

/// File name of the SQLite store inside the state directory.
pub const STORE_FILE: &str = "portcullis.db";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("store: {}", sqlite_message(.0))]
    Db(rusqlite::Error),
    /// The database file could not be created or made private.
    #[error("store {path}: {}", io_message(error))]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The id is already taken.
    #[error("{0} already exists")]
    Exists(Identity),
    /// No identity with that role and id.
    #[error("no {0} is registered")]
    NotFound(Identity),
    /// The identity was revoked; ids of revoked identities are not reused.
    #[error("{0} is revoked; issue a certificate under a new id")]
    Revoked(Identity),
    /// An enrolment token was not accepted; the reason is safe to show the caller.
    #[error("token refused: {0}")]
    TokenRefused(String),
    /// No token with that id.
    #[error("no token {0}")]
    NoSuchToken(String),
    /// The store was written by a newer release whose schema this one does not know.
    #[error(
        "the store's schema is version {found}, newer than this release knows ({supported}); run the newer release or restore a backup"
    )]
    SchemaTooNew {
        /// The store's version.
        found: i64,
        /// The newest this binary knows.
        supported: i64,
    },
    /// PostgreSQL refused or failed a statement, or the connection to it broke.
    #[cfg(feature = "postgres")]
    #[error("store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The shared store could not be reached or did not answer in time.
    #[error("the store at {url} is unavailable: {why}")]
    Unavailable {
        /// Where it is, password masked.
        url: String,
        /// What happened.
        why: String,
    },
    /// The store was made with another CA than the one in this relay's state directory.
    #[error(
        "the store belongs to the CA with fingerprint {store}, but this relay's CA is {ours}: copy the state directory (ca.crt, ca.key, jwt-signing.key) of a relay that uses this store"
    )]
    CaMismatch {
        /// SHA-256 of the store's CA certificate (DER), hex.
        store: String,
        /// SHA-256 of this relay's.
        ours: String,
    },
    /// A stored row could not be decoded (the file was edited by hand or is corrupt).
    #[error("store row for {what} is corrupt: {why}")]
    Corrupt {
        /// Which row.
        what: String,
        /// What is wrong with it.
        why: String,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e)
    }
}

/// A file error on the store, said so that a person knows what to do.
fn io_message(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ReadOnlyFilesystem => {
            "it is on a read-only file system: make it writable and try again (nothing was changed)"
                .into()
        }
        ErrorKind::StorageFull => {
            "the disk holding it is full: free space on it and try again (nothing was changed)"
                .into()
        }
        ErrorKind::PermissionDenied => {
            format!("{e}: run as the user that owns the state directory")
        }
        _ => e.to_string(),
    }
}

/// SQLite's error, said so that a person knows what to do when the disk under the store
/// is full or read-only (writes fail whole: nothing was changed).
fn sqlite_message(e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => "the disk holding it is full: free space on it and try again (nothing was changed)".into(),
        Some(ErrorCode::ReadOnly) => "it cannot be written (it is on a read-only file system, or its user may not write it): make it writable and try again (nothing was changed)".into(),
        _ => e.to_string(),
    }
}

/// One issued identity and its current certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// Role and id.
    pub identity: Identity,
    /// For devices: the user the device belongs to.
    pub user: Option<String>,
    /// For devices: the user's groups.
    pub groups: Vec<String>,
    /// For connectors: the hostnames it may publish.
    pub hostnames: Vec<HostPattern>,
    /// Serial of the current certificate (lower-case hex, no leading zeros). Older
    /// certificates of the same identity are no longer accepted for new connections.
    pub serial: String,
    /// After a renewal, the serial of the certificate it replaced. The relay accepts that
    /// certificate for [`RENEWAL_OVERLAP_SECS`] after `issued_at`, so a device whose
    /// renewal answer was lost can connect and renew again; an issue or enrolment clears it.
    pub previous_serial: Option<String>,
    /// SHA-256 of the current certificate's public key (hex). A renewal keeps the key, so
    /// live connections survive it; a re-issue with a new key cuts them.
    pub key_sha256: String,
    /// Expiry of the current certificate, Unix seconds.
    pub not_after: i64,
    /// When the current certificate was issued, Unix seconds.
    pub issued_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// What an enrolment token entitles its holder to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// Device or connector.
    pub role: Role,
    /// Devices: the user.
    #[serde(default)]
    pub user: Option<String>,
    /// Devices: the user's groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Connectors: the connector's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Connectors: hostnames it may publish.
    #[serde(default)]
    pub hostnames: Vec<HostPattern>,
    /// Lifetime of the certificate issued on enrolment, seconds.
    pub cert_ttl_secs: u64,
}

/// An enrolment token as the relay keeps it: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 (hex) of the secret.
    pub secret_sha256: String,
    /// What it grants.
    pub grant: TokenGrant,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; unusable from then on.
    pub expires_at: i64,
    /// When it was used, if it was (tokens are single-use).
    pub used_at: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix seconds.
    pub at: i64,
    /// What happened: `ca.init`, `issue`, `revoke`, ...
    pub action: String,
    /// Whom it concerned, e.g. `device:alice`.
    pub subject: String,
    /// Free text for people.
    pub detail: String,
    /// Who did it: `local:<user>` for an admin command on the relay host, `relay` for the
    /// running relay's own changes, `client:<address>` for an enrolment or renewal. Empty
    /// for rows written before the store recorded actors.
    pub actor: String,
}

/// Which audit events to read: a time range (Unix seconds, both ends included). Subject
/// and action filters are the reader's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// At or after.
    pub since: Option<i64>,
    /// At or before.
    pub until: Option<i64>,
}

/// Persistent state behind the relay and its admin commands.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Records a newly issued certificate for an identity, replacing the identity's previous
    /// certificate. Fails with [`StoreError::Revoked`] if the identity was revoked.
    fn put_identity(&self, record: &IdentityRecord) -> Result<(), StoreError>;

    /// Records a new identity; fails with [`StoreError::Exists`] if the id is taken (by an
    /// active or a revoked identity). Enrolment uses this, so it never replaces anyone.
    fn create_identity(&self, record: &IdentityRecord) -> Result<(), StoreError>;

    /// All identities, revoked ones included, ordered by role and id.
    fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError>;

    /// Marks an identity revoked at `at`. Revoking twice is not an error.
    fn revoke(&self, identity: &Identity, at: i64) -> Result<(), StoreError>;

    /// Appends to the audit log.
    fn audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// The audit events in `query`'s time range, oldest first.
    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;

    /// Deletes the audit events older than `before` (Unix seconds), for `audit_retention`;
    /// returns how many went.
    fn prune_audit(&self, before: i64) -> Result<u64, StoreError>;

    /// A number that changes whenever identities change, from any process. The relay polls
    /// it to apply revocations within a second.
    fn generation(&self) -> Result<u64, StoreError>;

    /// Stores a new enrolment token.
    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// All tokens, newest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Revokes an unused token.
    fn revoke_token(&self, id: &str, at: i64) -> Result<(), StoreError>;

    /// Atomically checks and consumes a token: it must exist, match `secret_sha256`, be
    /// unused, unrevoked and unexpired at `now`. Fails with [`StoreError::TokenRefused`].
    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: i64,
    ) -> Result<TokenRecord, StoreError>;

    /// Binds the store to the CA whose certificate has SHA-256 `ca_sha256` (hex): the
    /// first caller records it, and later callers with another CA get
    /// [`StoreError::CaMismatch`], so relays with different keys cannot share a store.
    fn bind_ca(&self, ca_sha256: &str) -> Result<(), StoreError>;

    /// Woken whenever another process may have changed identities, for stores that can
    /// tell (PostgreSQL's LISTEN/NOTIFY); callers still poll [`Store::generation`] as a
    /// backstop.
    fn changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Where the store is, for logs and errors (passwords masked).
    fn describe(&self) -> String;
}

/// Decodes the stored fields of an identity row that are not plain strings and numbers.
#[allow(clippy::too_many_arguments)]
fn identity_row(
    role: &str,
    id: &str,
    user: Option<String>,
    groups: &str,
    hostnames: &str,
    serial: String,
    previous_serial: Option<String>,
    key_sha256: String,
    not_after: i64,
    issued_at: i64,
    revoked_at: Option<i64>,
) -> Result<IdentityRecord, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        what: format!("{role}:{id}"),
        why,
    };
    let role = Role::parse(role).ok_or_else(|| corrupt("unknown role".into()))?;
    let identity = Identity::new(role, id).map_err(|e| corrupt(e.to_string()))?;
    let groups: Vec<String> = serde_json::from_str(groups).map_err(|e| corrupt(e.to_string()))?;
    let hostnames: Vec<HostPattern> =
        serde_json::from_str(hostnames).map_err(|e| corrupt(e.to_string()))?;
    Ok(IdentityRecord {
        identity,
        user,
        groups,
        hostnames,
        serial,
        previous_serial,
        key_sha256,
        not_after,
        issued_at,
        revoked_at,
    })
}

/// A token grant as stored (JSON).
fn grant_row(id: &str, json: &str) -> Result<TokenGrant, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        what: format!("token {id}"),
        why: e.to_string(),
    })
}

/// JSON for a stored list.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

/// Why `token` cannot be redeemed with `secret_sha256` at `now`, if it cannot.
fn redeemable(token: &TokenRecord, secret_sha256: &str, now: i64) -> Result<(), StoreError> {
    let refused = |why: &str| StoreError::TokenRefused(why.to_owned());
    if !constant_time_eq(token.secret_sha256.as_bytes(), secret_sha256.as_bytes()) {
        return Err(refused("unknown token"));
    }
    if token.revoked_at.is_some() {
        return Err(refused("the token was revoked"));
    }
    if token.used_at.is_some() {
        return Err(refused("the token was already used"));
    }
    if token.expires_at <= now {
        return Err(refused("the token has expired"));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
