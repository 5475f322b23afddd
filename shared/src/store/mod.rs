//! The relay's state: who holds which certificate, what each may publish, revocations,
//! and the admin audit log.
//!
//! [`Store`] is the seam a multi-relay deployment replaces with a shared database;
//! [`SqliteStore`] is the default, one file in the state directory, opened in WAL mode so
//! an admin command and the running relay can use it at once. The store never reads the
//! clock: callers pass timestamps.

mod sqlite;

use crate::identity::{HostPattern, Identity};

pub use sqlite::SqliteStore;

/// File name of the SQLite store inside the state directory.
pub const STORE_FILE: &str = "portcullis.db";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("store: {0}")]
    Db(#[from] rusqlite::Error),
    /// No identity with that role and id.
    #[error("no {0} is registered")]
    NotFound(Identity),
    /// The identity was revoked; ids of revoked identities are not reused.
    #[error("{0} is revoked; issue a certificate under a new id")]
    Revoked(Identity),
    /// A stored row could not be decoded (the file was edited by hand or is corrupt).
    #[error("store row for {what} is corrupt: {why}")]
    Corrupt {
        /// Which row.
        what: String,
        /// What is wrong with it.
        why: String,
    },
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
    /// certificates of the same identity are no longer accepted.
    pub serial: String,
    /// Expiry of the current certificate, Unix seconds.
    pub not_after: i64,
    /// When the current certificate was issued, Unix seconds.
    pub issued_at: i64,
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
}

/// Persistent state behind the relay and its admin commands.
pub trait Store: Send + Sync {
    /// Records a newly issued certificate for an identity, replacing the identity's previous
    /// certificate. Fails with [`StoreError::Revoked`] if the identity was revoked.
    fn put_identity(&self, record: &IdentityRecord) -> Result<(), StoreError>;

    /// All identities, revoked ones included, ordered by role and id.
    fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError>;

    /// Marks an identity revoked at `at`. Revoking twice is not an error.
    fn revoke(&self, identity: &Identity, at: i64) -> Result<(), StoreError>;

    /// Appends to the audit log.
    fn audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// The audit log, oldest first.
    fn audit_log(&self) -> Result<Vec<AuditEvent>, StoreError>;

    /// A number that changes whenever identities change, from any process. The relay polls
    /// it to apply revocations within a second.
    fn generation(&self) -> Result<u64, StoreError>;
}
