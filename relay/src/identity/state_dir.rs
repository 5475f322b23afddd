//! What a state directory records about the relay that uses it: which store it belongs
//! to (so that an admin command given only the directory reaches the relay's store or
//! refuses, and never writes a stray SQLite file), and a lock held while a relay runs on
//! it (so that two relays never share one directory).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use portcullis_shared::store::mask_url;
use serde::{Deserialize, Serialize};

/// The file recording which store the directory's relay uses.
pub(crate) const STORE_RECORD_FILE: &str = "store.json";
/// The file a running relay holds locked.
pub(crate) const RUN_LOCK_FILE: &str = "relay.lock";

/// Which store a state directory's relay uses, as [`STORE_RECORD_FILE`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoreRecord {
    /// The shared store's URL with its password masked; `None`: the SQLite file.
    pub(crate) shared: Option<String>,
    /// The relay.toml the relay last ran with, which names the store with its password.
    pub(crate) config: Option<PathBuf>,
}

impl StoreRecord {
    /// The record for a relay on the store at `url` (`None`: SQLite), run from `config`.
    pub(crate) fn new(url: Option<&str>, config: Option<&Path>) -> Self {
        Self {
            shared: url.map(mask_url),
            config: config.map(|c| std::path::absolute(c).unwrap_or_else(|_| c.to_owned())),
        }
    }

    /// What the record says, or `None` when the directory has none (made before records,
    /// or never run): such a directory is taken to be SQLite's.
    pub(crate) fn read(state_dir: &Path) -> io::Result<Option<Self>> {
        let path = state_dir.join(STORE_RECORD_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a store record ({e})", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the record into `state_dir` unless it already says the same (replacing
    /// the file whole).
    pub(crate) fn write(&self, state_dir: &Path) -> io::Result<()> {
        if Self::read(state_dir).ok().flatten().as_ref() == Some(self) {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let path = state_dir.join(STORE_RECORD_FILE);
        let tmp = state_dir.join(format!(".{STORE_RECORD_FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }
}

/// A relay's hold on its state directory, released when the relay exits (however it
/// exits: the kernel drops the lock with the process).
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: File,
}

/// Why a state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    /// Another process holds it.
    #[error(
        "another relay is running on {dir} (it holds {dir}/{RUN_LOCK_FILE}): stop it, or give \
         this relay a state directory of its own (relays share a PostgreSQL store, not a \
         state directory)"
    )]
    Held { dir: String },
    /// The lock file could not be opened.
    #[error("cannot lock {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl RunLock {
    /// Locks `state_dir` for one running relay, or says which process holds it.
    pub(crate) fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(RUN_LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held {
                dir: state_dir.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

/// Whether two paths name one directory (resolved when both exist).
pub(crate) fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The uid this process runs as.
fn my_uid() -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// The account name of `uid`, from /etc/passwd.
fn account(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)? == uid.to_string()).then(|| name.to_owned())
    })
}

/// `uid`'s account name, else `uid N`.
fn user_name(uid: u32) -> String {
    account(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// Refuses, before anything is read or written, an admin command run as neither the
/// owner of `state_dir` nor root: it could not read the keys, and what it wrote the
/// relay could not read. A directory that does not exist yet (`ca init`) passes.
pub(crate) fn check_caller(state_dir: &Path) -> Result<(), OwnerError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::metadata(state_dir) else {
        return Ok(());
    };
    let me = my_uid().map_err(|e| OwnerError::Io(e.to_string()))?;
    if me == 0 || me == dir.uid() {
        return Ok(());
    }
    Err(OwnerError::WrongUser {
        dir: state_dir.display().to_string(),
        owner: user_name(dir.uid()),
        me: user_name(me),
    })
}

/// Why an admin command may not work on a state directory.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OwnerError {
    /// Run by a user who neither owns it nor is root.
    #[error(
        "{dir} belongs to {owner}, and this command runs as {me}: run it as {owner} (`sudo -u \
         {owner} portcullis-relay ...`) or as root; nothing was changed"
    )]
    WrongUser {
        dir: String,
        owner: String,
        me: String,
    },
    /// Ownership could not be read or changed.
    #[error("{0}")]
    Io(String),
}

/// Refuses a state directory holding a file its owner (the user the relay runs as) does
/// not own: left by a command run as root, it is one the relay cannot read.
pub(crate) fn check_owners(state_dir: &Path) -> Result<(), OwnerError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e: io::Error| OwnerError::Io(format!("{}: {e}", state_dir.display()));
    let dir = std::fs::metadata(state_dir).map_err(io)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_file() && meta.uid() != dir.uid() {
            let owner = user_name(dir.uid());
            let chown = account(dir.uid()).unwrap_or_else(|| dir.uid().to_string());
            return Err(OwnerError::Io(format!(
                "{} belongs to {} but the directory (and the relay) to {owner}: the relay \
                 cannot read it; `chown {chown}: {}`",
                path.display(),
                user_name(meta.uid()),
                path.display()
            )));
        }
    }
    Ok(())
}

/// After an admin command run as root on a directory another user owns: gives every file
/// directly in it (keys, certificates, the store, records) back to the directory's owner,
/// so that the relay, running as that user, can read what the command wrote.
pub(crate) fn hand_back(state_dir: &Path) -> Result<(), OwnerError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e: io::Error| OwnerError::Io(format!("{}: {e}", state_dir.display()));
    let Ok(dir) = std::fs::metadata(state_dir) else {
        return Ok(());
    };
    if my_uid().map_err(io)? != 0 || dir.uid() == 0 {
        return Ok(());
    }
    for entry in std::fs::read_dir(state_dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        if meta.is_file() && (meta.uid(), meta.gid()) != (dir.uid(), dir.gid()) {
            std::os::unix::fs::chown(&path, Some(dir.uid()), Some(dir.gid())).map_err(|e| {
                OwnerError::Io(format!(
                    "cannot give {} to {}: {e}",
                    path.display(),
                    user_name(dir.uid())
                ))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_no_password_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StoreRecord::read(dir.path()).unwrap(), None);
        let record = StoreRecord::new(
            Some("postgres://relay:hunter2@db.internal/portcullis"),
            Some(Path::new("/etc/portcullis/relay.toml")),
        );
        record.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(STORE_RECORD_FILE)).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(StoreRecord::read(dir.path()).unwrap(), Some(record));
        std::fs::write(dir.path().join(STORE_RECORD_FILE), "{").unwrap();
        let err = StoreRecord::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a store record"), "{err}");
    }

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another relay is running on"), "{err}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
