//! An access log: one JSON object per line, appended with one `write(2)` per line to a
//! file opened `O_APPEND` (lines never interleave, a crash loses no finished line), or to
//! standard output when the path is `-`. [`AccessLog::reopen`] opens the path again, for
//! log rotation (the daemons call it on SIGUSR2).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where lines go.
#[derive(Debug)]
enum Sink {
    File(File),
    Stdout,
}

/// An open access log.
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    sink: Mutex<Writer>,
}

/// The sink and how the last writes went.
#[derive(Debug)]
struct Writer {
    sink: Sink,
    /// Lines not written since the last one that was (a full or read-only disk).
    lost: u64,
    /// A line was cut short (the disk filled during it): the next line starts on a new
    /// line, so the fragment stays a line of its own instead of spoiling the next.
    cut: bool,
}

impl Writer {
    fn new(sink: Sink) -> Self {
        Self {
            sink,
            lost: 0,
            cut: false,
        }
    }

    /// Writes `line` with one `write(2)`, noting a short write.
    fn put(&mut self, line: &[u8]) -> std::io::Result<()> {
        let written = match &mut self.sink {
            Sink::File(f) => f.write(line),
            Sink::Stdout => std::io::stdout()
                .lock()
                .write_all(line)
                .map(|()| line.len()),
        }?;
        if written < line.len() {
            if written > 0 {
                self.cut = true;
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "short write",
            ));
        }
        Ok(())
    }
}

fn open(path: &Path) -> std::io::Result<Sink> {
    if path == Path::new("-") {
        return Ok(Sink::Stdout);
    }
    // Never through a symbolic link planted where the log goes.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(Sink::File)
}

impl AccessLog {
    /// Opens (creating, mode 0600) `path` for appending; `-` is standard output.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            sink: Mutex::new(Writer::new(open(path)?)),
        })
    }

    /// Opens the path again (after a rotation moved the file away); on failure the old
    /// file is kept, and the error returned.
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = open(&self.path)?;
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).sink = fresh;
        Ok(())
    }

    /// Where the log goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` as one line. A line that cannot be written (a full or read-only
    /// disk) is lost, with one WARN line when the first is and one INFO line, counting
    /// them, when lines can be written again: the requests are served either way.
    pub fn write<T: serde::Serialize>(&self, entry: &T) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut w = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if w.cut {
            line.insert(0, b'\n');
        }
        match w.put(&line) {
            Ok(()) => {
                w.cut = false;
                if w.lost > 0 {
                    tracing::info!(
                        path = %self.path.display(),
                        lost = w.lost,
                        "access log writable again; the lines of the requests served meanwhile were lost"
                    );
                    w.lost = 0;
                }
            }
            Err(e) => {
                if w.lost == 0 {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot write the access log: requests are served but not logged until it can; free space on its disk or make it writable"
                    );
                }
                w.lost += 1;
            }
        }
    }

    /// Reopens the log on every SIGUSR2 until `shutdown`, logging the outcome.
    pub async fn reopen_on_sigusr2(
        self: std::sync::Arc<Self>,
        shutdown: crate::shutdown::Shutdown,
    ) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut usr2 = match signal(SignalKind::user_defined2()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no SIGUSR2 handler: the access log cannot be reopened");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = usr2.recv() => match self.reopen() {
                    Ok(()) => tracing::info!(path = %self.path.display(), "SIGUSR2: access log reopened"),
                    Err(e) => tracing::error!(path = %self.path.display(), error = %e, "SIGUSR2: cannot reopen the access log; still writing to the old file"),
                },
                () = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_path_after_a_rotation_and_reopen() {
        let dir = std::env::temp_dir().join(format!("pc-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::open(&path).unwrap();
        log.write(&serde_json::json!({"n": 1}));
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.write(&serde_json::json!({"n": 2}));
        log.reopen().unwrap();
        log.write(&serde_json::json!({"n": 3}));
        let old = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old, "{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(new, "{\"n\":3}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
