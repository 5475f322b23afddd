//! A real PostgreSQL server for one test: `initdb` in a temporary directory, `postgres`
//! on a free loopback port with password (SCRAM) authentication, run as an unprivileged
//! user when the tests run as root, stopped and removed on drop.
//!
//! When PostgreSQL is not installed, [`TestPostgres::start`] returns `None` and the test
//! skips, unless `PORTCULLIS_REQUIRE_POSTGRES` is set (CI sets it), when that is a failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The role and password the tests' relays use.
const USER: &str = "portcullis";
/// The role's password, which no output may ever show.
pub const PG_PASSWORD: &str = "s3cret-for-tests";
const PASSWORD: &str = PG_PASSWORD;

/// A running PostgreSQL server with a `portcullis` database.
pub struct TestPostgres {
    /// `postgres://portcullis:<password>@127.0.0.1:<port>/portcullis`.
    pub url: String,
    port: u16,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The server's certificate chain and key files when it speaks TLS.
    tls: Option<(PathBuf, PathBuf)>,
}

impl TestPostgres {
    /// Initialises and starts a server; `None` (the test should skip) if PostgreSQL is
    /// not installed and `PORTCULLIS_REQUIRE_POSTGRES` is unset.
    pub async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// Like [`TestPostgres::start`], with TLS offered (`ssl=on`) with this certificate
    /// chain and key (PEM); clients may still connect without it.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Self> {
        Self::start_with(Some((cert_pem, key_pem))).await
    }

    async fn start_with(tls: Option<(&str, &str)>) -> Option<Self> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("PORTCULLIS_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is not installed (initdb not found); `bash .ci/run` installs it"
            );
            eprintln!("skipping: PostgreSQL is not installed");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("pc-pg-").tempdir().unwrap();
        // Root may not run PostgreSQL: the server runs as `postgres` (or `nobody`).
        let run_as = if rustix::process::geteuid().is_root() {
            Some(unprivileged_user())
        } else {
            None
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["data", "sock"] {
            let p = dir.path().join(sub);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as {
            for p in ["data", "sock", "pwfile"] {
                std::os::unix::fs::chown(dir.path().join(p), Some(uid), Some(gid)).unwrap();
            }
        }
        let log = dir.path().join("initdb.log");
        let status = command(&bin, "initdb", run_as)
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "initdb failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // The key must be the server user's and private, or PostgreSQL refuses it.
        let tls = tls.map(|(cert, key)| {
            let (cert_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = run_as {
                for p in [&cert_path, &key_path] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
                }
            }
            (cert_path, key_path)
        });
        let port = free_port();
        let mut pg = Self {
            url: format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/portcullis"),
            port,
            bin,
            run_as,
            dir,
            child: None,
            tls,
        };
        pg.start_server().await;
        pg.admin("CREATE DATABASE portcullis").await;
        Some(pg)
    }

    /// Stops the server (fast shutdown: clients are disconnected), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_server().await;
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    async fn start_server(&mut self) {
        let log = self.dir.path().join("postgres.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = command(&self.bin, "postgres", self.run_as);
        if let Some((cert, key)) = &self.tls {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        let child = cmd
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // A test's data is thrown away: no need to make it durable.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = self.url_of("postgres");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("postgres exited ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within {START_TIMEOUT:?}: {}",
                self.log_text()
            );
            // The poll interval of this bounded wait for the server to listen.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url_of(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` in the `postgres` database.
    async fn admin(&self, sql: &str) {
        let (client, conn) =
            tokio_postgres::connect(&self.url_of("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = driver.await;
    }

    /// Runs `sql` in the `portcullis` database (to inspect or damage what a relay wrote).
    pub async fn execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let result = client.batch_execute(sql).await;
        drop(client);
        let _ = driver.await;
        result
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn command(bin: &Path, program: &str, run_as: Option<(u32, u32)>) -> Command {
    match run_as {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(bin.join(program));
            c
        }
        None => Command::new(bin.join(program)),
    }
}

/// The directory holding `initdb` and `postgres`: Debian's newest
/// `/usr/lib/postgresql/N/bin`, else the one on `PATH`.
fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
    })
}

/// The uid and gid of `postgres`, or of `nobody`.
fn unprivileged_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3
                && f[0] == name
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                return (uid, gid);
            }
        }
    }
    panic!("no unprivileged user (postgres or nobody) to run PostgreSQL as");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
