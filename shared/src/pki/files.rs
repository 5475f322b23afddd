//! Reading and writing PEM files with the right permissions.
//!
//! Every write goes to a new temporary file beside the target (created with
//! `O_CREAT|O_EXCL`, which never follows a symbolic link, under a random name) and is then
//! renamed over the target, which replaces a symbolic link there instead of writing
//! through it: a reader sees the old file or the new one, never half of one, and a link
//! planted where a secret is written cannot redirect it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::PkiError;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Creates `dir` (and missing parents) and forces its mode to 0700, whatever it was.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Forces an existing directory's mode to 0700, if this process may; a directory owned
/// by someone else is left alone (its owner's files in it are not this process's to
/// protect).
pub fn force_private_dir(dir: &Path) {
    let Ok(meta) = fs::metadata(dir) else {
        return;
    };
    if meta.permissions().mode() & 0o777 != 0o700
        && let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the state directory private (0700)");
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    write_with(path, bytes, mode, false)
}

/// Like [`write_private_file`], but fails with `AlreadyExists` instead of replacing a file
/// (or a symbolic link, even a dangling one).
pub fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_with(path, bytes, 0o600, true)
}

fn write_with(path: &Path, bytes: &[u8], mode: u32, create_new: bool) -> Result<(), PkiError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(io_err(parent))?;
    let name = path.file_name().ok_or_else(|| PkiError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let mut random = [0u8; 8];
    // Without randomness the name is still new (create_new refuses an existing one).
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        super::hex(&random)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // The mode given to open is narrowed by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        if create_new {
            // A link fails if anything, a dangling symbolic link included, is at `path`.
            fs::hard_link(&tmp, path).map_err(io_err(path))
        } else {
            fs::rename(&tmp, path).map_err(io_err(path))
        }
    })();
    if create_new || written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable once the directory is.
    if let Ok(dir) = fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Writes a secret (private key, PKCS#12 bundle) readable by its owner only (0600).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_file(path, bytes, 0o600)
}

/// Writes a public file (certificate) with mode 0644.
pub fn write_public_file(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_file(path, bytes, 0o644)
}

/// The system's CA bundle, read from the usual Linux locations (empty if none is found):
/// what an origin or collector with a public certificate is checked against.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .find_map(|p| load_certs(Path::new(p)).ok())
    .unwrap_or_default()
}

/// The CAs in the PEM file `ca`, or the system's without it.
pub fn root_store(ca: Option<&Path>) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| PkiError::BadFile {
                    path: path.to_owned(),
                    what: format!("not a usable CA certificate ({e})"),
                })?;
            }
        }
        None => {
            roots.add_parsable_certificates(system_roots());
        }
    }
    Ok(roots)
}

/// TLS client settings for a server with a public certificate (an origin, a collector):
/// verified against the CAs in `ca`, or the system's without it; no client certificate.
pub fn server_verifying_client(ca: Option<&Path>) -> Result<rustls::ClientConfig, PkiError> {
    let roots = root_store(ca)?;
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
    .map_err(|e| PkiError::Parse(format!("TLS settings refused: {e}")))
}

/// Reads every certificate in a PEM file. Errors name the file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadFile {
            path: path.to_owned(),
            what: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadFile {
            path: path.to_owned(),
            what: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| PkiError::BadFile {
        path: path.to_owned(),
        what: format!("no usable private key ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_replace_a_symbolic_link_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "untouched").unwrap();
        let key = dir.path().join("device.key");
        std::os::unix::fs::symlink(&target, &key).unwrap();
        write_private_file(&key, b"secret").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        assert!(fs::symlink_metadata(&key).unwrap().file_type().is_file());
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret");
        assert_eq!(mode(&key), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn an_existing_file_gets_the_new_mode_and_create_new_refuses_even_a_dangling_link() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.crt");
        fs::write(&cert, "old").unwrap();
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o666)).unwrap();
        write_public_file(&cert, b"new").unwrap();
        assert_eq!(
            (fs::read_to_string(&cert).unwrap().as_str(), mode(&cert)),
            ("new", 0o644)
        );
        let key = dir.path().join("ca.key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &key).unwrap();
        let err = write_new_private_file(&key, b"k").unwrap_err();
        assert!(
            matches!(&err, PkiError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn private_directories_are_forced_to_0700() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        fs::set_permissions(&state, fs::Permissions::from_mode(0o750)).unwrap();
        force_private_dir(&state);
        assert_eq!(mode(&state), 0o700);
    }
}
