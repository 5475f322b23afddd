//! Opening the store: the SQLite file in the state directory, or the PostgreSQL database
//! several relays share, bound to the CA in the state directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use portcullis_shared::pki;
use portcullis_shared::store::{PostgresStore, STORE_FILE, SqliteStore, Store, mask_url};
use portcullis_shared::token::sha256_hex;

use super::state_dir::{StoreRecord, same_dir};

/// Opens the store of the relay whose state directory is `state_dir`: the database at
/// `url` if one is given (`postgres://...`), else `state_dir/portcullis.db`. The store is
/// bound to the state directory's CA: a store already bound to another CA is refused,
/// so relays that share a store share their keys.
pub(crate) fn open(state_dir: &Path, url: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    if !state_dir.join(pki::CA_KEY_FILE).exists() {
        bail!(
            "{} holds no CA: run `portcullis-relay ca init --state {}` first",
            state_dir.display(),
            state_dir.display()
        );
    }
    let ca = pki::Ca::load(state_dir)?;
    let store: Arc<dyn Store> = match url {
        Some(url) => Arc::new(PostgresStore::connect(url)?),
        None => Arc::new(
            SqliteStore::open(&state_dir.join(STORE_FILE))
                .with_context(|| format!("opening the store in {}", state_dir.display()))?,
        ),
    };
    store.bind_ca(&sha256_hex(ca.cert_der())).with_context(|| {
        format!(
            "checking {} against {}",
            store.describe(),
            state_dir.display()
        )
    })?;
    Ok(store)
}

/// How an admin command reaches a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminOpen {
    /// `ca init`: the store may be new.
    Create,
    /// Every other command: the directory's relay's store, which must exist.
    Existing,
}

/// Opens the store an admin command means: the one at `url` (from `--store`,
/// `PORTCULLIS_STORE` or `--config`), else the one the state directory's relay uses.
/// A directory whose relay uses a shared store is never given a SQLite file: without a
/// URL, the command reads it from the relay.toml the relay last ran with, or refuses,
/// naming the store. A URL for another store than the relay's is refused too.
pub(crate) fn open_for_admin(
    state_dir: &Path,
    url: Option<&str>,
    config: Option<&Path>,
    mode: AdminOpen,
) -> anyhow::Result<Arc<dyn Store>> {
    let record = StoreRecord::read(state_dir)?;
    let shared = record.as_ref().and_then(|r| r.shared.clone());
    let url = match (url, &shared) {
        (Some(url), Some(recorded)) if !same_store(&mask_url(url), recorded) => bail!(
            "{} belongs to the relay on {recorded}, not {}: give that relay's relay.toml \
             (--config) and nothing else; nothing was changed",
            state_dir.display(),
            mask_url(url)
        ),
        (Some(url), _) => Some(url.to_owned()),
        (None, Some(recorded)) => {
            let last = record.as_ref().and_then(|r| r.config.as_deref());
            match last.and_then(|c| url_from_relay_config(c, state_dir, recorded)) {
                Some(url) => Some(url),
                None => bail!(
                    "{} belongs to a relay on the shared store {recorded}: give its \
                     relay.toml with --config {} (or the URL with --store or \
                     PORTCULLIS_STORE); nothing was changed",
                    state_dir.display(),
                    last.map_or("FILE".into(), |c| c.display().to_string())
                ),
            }
        }
        (None, None) => {
            if mode == AdminOpen::Existing
                && !state_dir.join(STORE_FILE).exists()
                && state_dir.join(pki::CA_KEY_FILE).exists()
            {
                bail!(
                    "{} has no store ({}): give the relay's relay.toml with --config, or its \
                     state directory with --state; nothing was changed",
                    state_dir.display(),
                    STORE_FILE
                );
            }
            None
        }
    };
    let store = open(state_dir, url.as_deref())?;
    if mode == AdminOpen::Create || record.is_none() && url.is_some() {
        StoreRecord::new(url.as_deref(), config)
            .write(state_dir)
            .with_context(|| format!("recording the store in {}", state_dir.display()))?;
    }
    Ok(store)
}

/// The store URL from the relay.toml at `config`, when it still describes `state_dir`
/// and the `recorded` store.
fn url_from_relay_config(config: &Path, state_dir: &Path, recorded: &str) -> Option<String> {
    let view = portcullis_shared::config::RelayConfig::for_admin(config).ok()?;
    let url = view.store_url?;
    (same_dir(&view.state_dir, state_dir) && same_store(&mask_url(&url), recorded)).then_some(url)
}

/// Whether two masked store URLs name one database: equal but for their query (TLS
/// options may be spelt differently).
fn same_store(a: &str, b: &str) -> bool {
    let base = |u: &str| u.split_once('?').map_or(u, |(b, _)| b).to_owned();
    base(a) == base(b)
}
