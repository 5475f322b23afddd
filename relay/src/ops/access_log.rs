//! The access log: one JSON line per request, appended to a file in the state directory
//! and written before the response finishes, so a restart loses no line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use serde::Serialize;

#[derive(Debug)]
pub(crate) struct AccessLog {
    file: Mutex<File>,
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub(crate) struct Entry<'a> {
    pub(crate) time: String,
    pub(crate) client: String,
    pub(crate) device: Option<&'a str>,
    pub(crate) user: Option<&'a str>,
    pub(crate) hostname: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) protocol: &'a str,
    pub(crate) status: u16,
    pub(crate) bytes: u64,
    pub(crate) duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
}

impl AccessLog {
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        // Never through a symbolic link planted where the log goes.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("opening the access log {}", path.display()))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    pub(crate) fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        // One write(2) of a whole line on an O_APPEND file: lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(error = %e, "cannot write the access log");
        }
    }
}
