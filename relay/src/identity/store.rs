//! Opening the store: the SQLite file in the state directory, or the PostgreSQL database
//! several relays share, bound to the CA in the state directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use portcullis_shared::pki;
use portcullis_shared::store::{PostgresStore, STORE_FILE, SqliteStore, Store};
use portcullis_shared::token::sha256_hex;

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
