//! The device's private key: in the OS keyring (Secret Service or kernel keyutils on Linux,
//! Keychain on macOS, Credential Manager on Windows) through the `keyring` crate, or, only
//! with `--key-store file`, in a 0600 file in the agent's home.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::home::Home;

const SERVICE: &str = "portcullis";

/// The keyring entry for this home's device (several homes can coexist).
#[cfg(not(target_os = "linux"))]
fn entry(home: &Home, identity: &str) -> anyhow::Result<keyring::Entry> {
    let account = format!("{identity}@{}", home.dir.display());
    keyring::Entry::new(SERVICE, &account).context("opening the OS keyring")
}

/// On Linux: the kernel keyutils store, in the user's keyring (shared by all of the user's
/// processes, unlike a login session's keyring, which daemons and CI jobs often lack),
/// linked into the persistent keyring where the kernel offers one.
#[cfg(target_os = "linux")]
fn entry(home: &Home, identity: &str) -> anyhow::Result<keyring::Entry> {
    use keyring::keyutils::KeyutilsCredential;
    use linux_keyutils::{KeyRing, KeyRingIdentifier};
    let account = format!("{identity}@{}", home.dir.display());
    let user = KeyRing::from_special_id(KeyRingIdentifier::User, true)
        .map_err(|e| anyhow::anyhow!("no OS keyring is reachable (kernel keyutils: {e})"))?;
    let credential = KeyutilsCredential {
        session: user,
        persistent: KeyRing::get_persistent(KeyRingIdentifier::User).ok(),
        description: format!("{SERVICE}:{account}"),
    };
    Ok(keyring::Entry::new_with_credential(Box::new(credential)))
}

/// Stores the PKCS#8 key.
pub(crate) fn store(home: &Home, kind: &str, identity: &str, key: &[u8]) -> anyhow::Result<()> {
    match kind {
        "keyring" => entry(home, identity)?
            .set_password(&B64.encode(key))
            .map_err(|e| anyhow::anyhow!(
                "no OS keyring is reachable ({e}); to keep the key in a 0600 file instead, enrol with --key-store file"
            )),
        "file" => {
            portcullis_shared::pki::write_private_file(
                &home.key_file(),
                portcullis_shared::pki::pkcs8_pem(key).as_bytes(),
            )?;
            Ok(())
        }
        other => bail!("unknown key store {other:?}: use keyring or file"),
    }
}

/// Loads the PKCS#8 key.
pub(crate) fn load(home: &Home, kind: &str, identity: &str) -> anyhow::Result<Vec<u8>> {
    match kind {
        "keyring" => {
            let b64 = entry(home, identity)?.get_password().map_err(|e| {
                anyhow::anyhow!("the device key is not in the OS keyring ({e}): enrol again")
            })?;
            B64.decode(b64)
                .context("the key in the keyring is corrupt: enrol again")
        }
        _ => {
            let key = portcullis_shared::pki::load_key(&home.key_file())?;
            Ok(key.secret_der().to_vec())
        }
    }
}

/// Deletes the key (logout).
pub(crate) fn delete(home: &Home, kind: &str, identity: &str) -> anyhow::Result<()> {
    match kind {
        "keyring" => match entry(home, identity)?.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("removing the key from the keyring: {e}")),
        },
        _ => match std::fs::remove_file(home.key_file()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("removing the key file"),
        },
    }
}
