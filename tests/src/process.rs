//! Child processes: where the built binaries are, the relay's admin CLI, spawned daemons
//! with their logs (killed on drop), network namespaces, and /proc memory figures.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

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

/// Waits up to 20 s for the ready file a child writes (atomically) once it is listening, and
/// returns its contents; fails at once if the child exits first.
pub(crate) async fn read_ready(path: &Path, child: &mut Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before it was ready");
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            panic!("{what} did not become ready");
        }
        // The poll interval of this wait for the file, not a wait of its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
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

    /// Waits for the ready file `path` this daemon writes once it is listening, and returns
    /// its contents; kills the daemon and panics with its log if it never appears.
    pub async fn wait_ready_file(&mut self, path: &Path) -> String {
        let what = format!("{} (log {})", path.display(), self.log.display());
        read_ready(path, &mut self.child, &what).await
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text` and returns the log; panics with the log after
    /// `timeout`.
    pub async fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        eventually(timeout, || async {
            let log = self.log_text();
            log.contains(text).then_some(log)
        })
        .await
        .unwrap_or_else(|| panic!("never logged {text:?}:\n{}", self.log_text()))
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

/// A process's user and system CPU time so far, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which may contain spaces, from field 3 (state) on:
    // utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// [`cpu_ticks`] in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid) as f64 / rustix::param::clock_ticks_per_second() as f64
}
