//! SQLite implementation of [`Store`].

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AuditEvent, AuditQuery, IdentityRecord, Store, StoreError, TokenRecord, grant_row,
    identity_row, json, redeemable,
};
use crate::identity::Identity;

/// The schema, as numbered migrations: migration `n` (1-based) takes the store from version
/// `n - 1` to `n`. Each runs in one transaction with the version bump, so a store is
/// always at one version; a release only ever appends to this list.
const MIGRATIONS: &[&str] = &[
    // 1: identities, the audit log, enrolment tokens and the change counter.
    "
CREATE TABLE IF NOT EXISTS identities (
    role       TEXT NOT NULL,
    id         TEXT NOT NULL,
    user       TEXT,
    groups     TEXT NOT NULL,
    hostnames  TEXT NOT NULL,
    serial     TEXT NOT NULL,
    key_sha256 TEXT NOT NULL DEFAULT '',
    not_after  INTEGER NOT NULL,
    issued_at  INTEGER NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (role, id)
);
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    grant_json    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER,
    revoked_at    INTEGER
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
",
    // 2: the certificate a renewal replaced, accepted for a short overlap.
    "ALTER TABLE identities ADD COLUMN previous_serial TEXT;",
    // 3: settings that are text, such as the CA the store belongs to.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 4: who did what the audit log records; an index for pruning by age.
    "ALTER TABLE audit ADD COLUMN actor TEXT NOT NULL DEFAULT '';
CREATE INDEX audit_at ON audit (at);",
];

/// The newest schema version this release knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// A [`Store`] in one SQLite file (WAL mode, 5 s busy timeout).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: Option<std::path::PathBuf>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`. The database and its WAL and
    /// shared-memory files are made readable by their owner only (0600): they hold who
    /// may connect and the audit log.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io = |error: std::io::Error| StoreError::Io {
            path: path.to_owned(),
            error,
        };
        // Created here, 0600 and never through a symbolic link, before SQLite opens it;
        // SQLite gives the WAL and shared-memory files the database's mode.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let mut store = Self::setup(Connection::open(path)?)?;
        store.path = Some(path.to_owned());
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            let file = std::path::PathBuf::from(file);
            match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        Ok(store)
    }

    /// A private in-memory store, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: None,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A poisoned lock means a panic elsewhere mid-call; SQLite's own transaction has
        // rolled back, so the connection is still consistent and safe to reuse.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }
}

/// Brings the store to [`SCHEMA_VERSION`], or refuses a store written by a newer release.
/// Stores made before versioning have the first migration's tables (created with `IF NOT
/// EXISTS`, so it is a no-op for them) and no version row.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )?;
    let found: i64 = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
            params![i as i64 + 1],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn bump(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'generation'",
        [],
    )?;
    Ok(())
}

/// Writes an identity row with `verb` (`INSERT OR REPLACE` / `INSERT OR IGNORE`);
/// returns how many rows changed.
fn insert(
    tx: &rusqlite::Transaction<'_>,
    r: &IdentityRecord,
    verb: &str,
) -> Result<usize, StoreError> {
    Ok(tx.execute(
        &format!(
            "{verb} INTO identities
             (role, id, user, groups, hostnames, serial, not_after, issued_at, revoked_at, key_sha256,
              previous_serial)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?9, ?10)"
        ),
        params![
            r.identity.role().as_str(),
            r.identity.id(),
            r.user,
            json(&r.groups),
            json(&r.hostnames),
            r.serial,
            r.not_after,
            r.issued_at,
            r.key_sha256,
            r.previous_serial,
        ],
    )?)
}

impl Store for SqliteStore {
    fn put_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let revoked: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at FROM identities WHERE role = ?1 AND id = ?2",
                    params![r.identity.role().as_str(), r.identity.id()],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(Some(_)) = revoked {
                return Err(StoreError::Revoked(r.identity.clone()));
            }
            insert(&tx, r, "INSERT OR REPLACE")?;
            bump(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn create_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let inserted = insert(&tx, r, "INSERT OR IGNORE")?;
            if inserted == 0 {
                return Err(StoreError::Exists(r.identity.clone()));
            }
            bump(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT role, id, user, groups, hostnames, serial, not_after, issued_at, revoked_at, key_sha256,
                        previous_serial
                 FROM identities ORDER BY role, id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, i64>(6)?,
                    row.get::<_, i64>(7)?,
                    row.get::<_, Option<i64>>(8)?,
                    row.get::<_, String>(9)?,
                    row.get::<_, Option<String>>(10)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (
                    role,
                    id,
                    user,
                    groups,
                    hostnames,
                    serial,
                    not_after,
                    issued_at,
                    revoked_at,
                    key_sha256,
                    previous_serial,
                ) = row?;
                out.push(identity_row(
                    &role,
                    &id,
                    user,
                    &groups,
                    &hostnames,
                    serial,
                    previous_serial,
                    key_sha256,
                    not_after,
                    issued_at,
                    revoked_at,
                )?);
            }
            Ok(out)
        })
    }

    fn revoke(&self, identity: &Identity, at: i64) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE identities SET revoked_at = COALESCE(revoked_at, ?3)
                 WHERE role = ?1 AND id = ?2",
                params![identity.role().as_str(), identity.id(), at],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(identity.clone()));
            }
            bump(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO audit (at, action, subject, detail, actor) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.at, e.action, e.subject, e.detail, e.actor],
            )?;
            Ok(())
        })
    }

    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let since = query.since.unwrap_or(i64::MIN);
        let until = query.until.unwrap_or(i64::MAX);
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT at, action, subject, detail, actor FROM audit WHERE at >= ?1 AND at <= ?2 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![since, until], |row| {
                Ok(AuditEvent {
                    at: row.get(0)?,
                    action: row.get(1)?,
                    subject: row.get(2)?,
                    detail: row.get(3)?,
                    actor: row.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.with(|conn| {
            let n = conn.execute("DELETE FROM audit WHERE at < ?1", params![before])?;
            Ok(n as u64)
        })
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO tokens (id, secret_sha256, grant_json, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    t.id,
                    t.secret_sha256,
                    json(&t.grant),
                    t.created_at,
                    t.expires_at
                ],
            )?;
            Ok(())
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, secret_sha256, grant_json, created_at, expires_at, used_at, revoked_at
                 FROM tokens ORDER BY created_at DESC, id",
            )?;
            let rows = stmt.query_map([], token_row)?;
            rows.map(|r| r?).collect()
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> Result<(), StoreError> {
        self.with(|conn| {
            let n = conn.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, at],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchToken(id.to_owned()));
            }
            Ok(())
        })
    }

    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: i64,
    ) -> Result<TokenRecord, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let found = tx
                .query_row(
                    "SELECT id, secret_sha256, grant_json, created_at, expires_at, used_at, revoked_at
                     FROM tokens WHERE id = ?1",
                    params![id],
                    token_row,
                )
                .optional()?;
            let token = found
                .ok_or_else(|| StoreError::TokenRefused("unknown token".into()))??;
            redeemable(&token, secret_sha256, now)?;
            tx.execute("UPDATE tokens SET used_at = ?2 WHERE id = ?1", params![id, now])?;
            tx.commit()?;
            Ok(TokenRecord {
                used_at: Some(now),
                ..token
            })
        })
    }

    fn bind_ca(&self, ca_sha256: &str) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR IGNORE INTO settings (key, value) VALUES ('ca_sha256', ?1)",
                params![ca_sha256],
            )?;
            let bound: String = tx.query_row(
                "SELECT value FROM settings WHERE key = 'ca_sha256'",
                [],
                |row| row.get(0),
            )?;
            tx.commit()?;
            if bound != ca_sha256 {
                return Err(StoreError::CaMismatch {
                    store: bound,
                    ours: ca_sha256.to_owned(),
                });
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("SQLite {}", p.display()),
            None => "SQLite in memory".into(),
        }
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            let v: i64 = conn.query_row(
                "SELECT value FROM meta WHERE key = 'generation'",
                [],
                |row| row.get(0),
            )?;
            Ok(v as u64)
        })
    }
}

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TokenRecord, StoreError>> {
    let id: String = row.get(0)?;
    let grant: String = row.get(2)?;
    let grant = match grant_row(&id, &grant) {
        Ok(g) => g,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(TokenRecord {
        id,
        secret_sha256: row.get(1)?,
        grant,
        created_at: row.get(3)?,
        expires_at: row.get(4)?,
        used_at: row.get(5)?,
        revoked_at: row.get(6)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    fn record(id: &str) -> IdentityRecord {
        IdentityRecord {
            identity: Identity::new(Role::Device, id).unwrap(),
            user: Some("alice".into()),
            groups: vec!["eng".into()],
            hostnames: vec![],
            serial: "abc".into(),
            previous_serial: None,
            key_sha256: "k".into(),
            not_after: 100,
            issued_at: 1,
            revoked_at: None,
        }
    }

    #[test]
    fn identities_round_trip_and_bump_generation() {
        let store = SqliteStore::in_memory().unwrap();
        let g0 = store.generation().unwrap();
        store.put_identity(&record("alice")).unwrap();
        assert_eq!(store.identities().unwrap(), vec![record("alice")]);
        assert!(store.generation().unwrap() > g0);
    }

    #[test]
    fn revoked_identities_stay_revoked() {
        let store = SqliteStore::in_memory().unwrap();
        let r = record("alice");
        store.put_identity(&r).unwrap();
        store.revoke(&r.identity, 50).unwrap();
        store.revoke(&r.identity, 60).unwrap();
        assert_eq!(store.identities().unwrap()[0].revoked_at, Some(50));
        assert!(matches!(
            store.put_identity(&r),
            Err(StoreError::Revoked(_))
        ));
    }

    #[test]
    fn create_never_replaces() {
        let store = SqliteStore::in_memory().unwrap();
        store.create_identity(&record("alice")).unwrap();
        assert!(matches!(
            store.create_identity(&record("alice")),
            Err(StoreError::Exists(_))
        ));
    }

    #[test]
    fn revoking_an_unknown_identity_is_not_found() {
        let store = SqliteStore::in_memory().unwrap();
        let id = Identity::new(Role::Connector, "ghost").unwrap();
        assert!(matches!(store.revoke(&id, 1), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        use crate::store::TokenGrant;
        let store = SqliteStore::in_memory().unwrap();
        let grant = TokenGrant {
            role: Role::Device,
            user: Some("alice".into()),
            groups: vec![],
            name: None,
            hostnames: vec![],
            cert_ttl_secs: 60,
        };
        let token = |id: &str| TokenRecord {
            id: id.into(),
            secret_sha256: "s".repeat(64),
            grant: grant.clone(),
            created_at: 0,
            expires_at: 100,
            used_at: None,
            revoked_at: None,
        };
        store.create_token(&token("a")).unwrap();
        store.create_token(&token("b")).unwrap();
        store.create_token(&token("c")).unwrap();
        let refused = |r: Result<TokenRecord, StoreError>| match r {
            Err(StoreError::TokenRefused(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(store.redeem_token("a", &"x".repeat(64), 1)),
            "unknown token"
        );
        assert!(store.redeem_token("a", &"s".repeat(64), 1).is_ok());
        assert_eq!(
            refused(store.redeem_token("a", &"s".repeat(64), 2)),
            "the token was already used"
        );
        assert_eq!(
            refused(store.redeem_token("b", &"s".repeat(64), 100)),
            "the token has expired"
        );
        store.revoke_token("c", 5).unwrap();
        assert_eq!(
            refused(store.redeem_token("c", &"s".repeat(64), 6)),
            "the token was revoked"
        );
        assert_eq!(
            refused(store.redeem_token("zz", &"s".repeat(64), 6)),
            "unknown token"
        );
        assert_eq!(store.tokens().unwrap().len(), 3);
    }

    #[test]
    fn the_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path).unwrap();
        store.put_identity(&record("alice")).unwrap();
        let mode = |suffix: &str| {
            let p = dir.path().join(format!("s.db{suffix}"));
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(
            (mode(""), mode("-wal"), mode("-shm")),
            (0o600, 0o600, 0o600)
        );
        // An existing database left world-readable is made private when opened.
        drop(store);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&path).unwrap();
        assert_eq!(mode(""), 0o600);
    }

    #[test]
    fn two_handles_on_one_file_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let relay = SqliteStore::open(&path).unwrap();
        let admin = SqliteStore::open(&path).unwrap();
        let g = relay.generation().unwrap();
        admin.put_identity(&record("bob")).unwrap();
        assert!(relay.generation().unwrap() > g);
        assert_eq!(relay.identities().unwrap().len(), 1);
    }

    #[test]
    fn a_store_from_before_versioning_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The first release's schema: no version row, no previous serial.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);")
                .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO identities (role, id, user, groups, hostnames, serial, key_sha256,
                 not_after, issued_at) VALUES ('device', 'alice', 'alice', '[]', '[]', 'abc', 'k', 9, 1)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let rows = store.identities().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].serial, "abc");
        assert_eq!(rows[0].previous_serial, None);
        let renewed = IdentityRecord {
            previous_serial: Some("abc".into()),
            serial: "abd".into(),
            ..rows[0].clone()
        };
        store.put_identity(&renewed).unwrap();
        assert_eq!(store.identities().unwrap(), vec![renewed]);
        drop(store);
        // Opening again is a no-op.
        assert_eq!(
            SqliteStore::open(&path)
                .unwrap()
                .identities()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_store_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                params![SCHEMA_VERSION + 1],
            )
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, supported }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err}"
        );
        assert!(
            err.to_string().contains("newer than this release knows"),
            "{err}"
        );
    }
}
