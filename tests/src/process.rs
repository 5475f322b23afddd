//! Child processes: where the built binaries are, the relay's admin CLI, spawned daemons
//! with their logs (killed on drop), network namespaces, and /proc memory figures.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::eventually;

/// Directory holding the built binaries (`target/debug` next to this test executable),
/// or `PORTCULLIS_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTCULLIS_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built binary; panics with advice if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// Runs `portcullis-relay` with `args` to completion.
pub fn relay_cli(args: &[&str]) -> Output {
    std::process::Command::new(bin("portcullis-relay"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `portcullis-relay` and asserts success.
pub fn relay_ok(args: &[&str]) -> String {
    let out = relay_cli(args);
    assert!(
        out.status.success(),
        "portcullis-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) async fn read_ready(path: &Path, child: &mut Child, what: &str) -> String {
    let found = eventually(Duration::from_secs(20), || async {
        std::fs::read_to_string(path).ok()
    })
    .await;
    match found {
        Some(s) => s,
        None => {
            let _ = child.start_kill();
            panic!("{what} did not become ready");
        }
    }
}

/// A spawned daemon whose stderr goes to a log file in the test's directory.
pub struct Daemon {
    /// The child process (killed on drop).
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (killed when the `Daemon` drops) with its output in `log`.
    pub fn spawn_logged(cmd: Command, log: PathBuf) -> Self {
        Self::spawn(cmd, log)
    }

    pub(crate) fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `KILL`) by the child's id.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("process already reaped");
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// Waits for exit, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("daemon did not exit in time")
            .unwrap()
    }
}

/// A command for `program`, run inside network namespace `netns` if given.
pub fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Peak resident set size of a process, in bytes (`VmHWM` from /proc).
pub fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// Current resident set size of a process, in bytes (`VmRSS` from /proc).
pub fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}
