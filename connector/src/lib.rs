//! The Portcullis connector as a library. It runs on a private host, dials the relay over
//! QUIC (it never listens), registers its ingress rules, and serves each stream the relay
//! opens by proxying one HTTP exchange to the origin.

mod dial;
mod identity;
mod live;
mod ops;
mod origin;
mod status;
mod tunnel;

pub use status::{TunnelState, TunnelStatus};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis_shared::config::{ConfigError, ConnectorConfig};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::telemetry::TelemetryArgs;

/// The Portcullis connector: publishes private services through the relay over an
/// outbound QUIC tunnel.
#[derive(Debug, Parser)]
#[command(name = "portcullis-connector", version)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Connector commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the connector.
    Run {
        /// The connector's configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// A one-time connector token to enrol with when the configuration's `key` does
        /// not exist yet (a first start, such as a new pod): the key, certificate and CA
        /// are written at the configuration's `key`, `cert` and `ca` paths. Ignored once
        /// enrolled.
        #[arg(long, env = "PORTCULLIS_ENROLL_TOKEN_FILE")]
        enroll_token_file: Option<PathBuf>,
    },
    /// Check a configuration file without starting anything: exit 0 when the connector
    /// would start with it (its CA, certificate and key load, every ingress service is
    /// usable), else exit 1 with the file, the line where one is known, and what to fix.
    Check {
        /// The connector's configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Show each relay tunnel's state, as the running connector last wrote it.
    Status {
        /// The connector's configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enrol with a one-time token: makes a key here, gets a certificate, and writes a
    /// ready configuration into the state directory. The token comes from --token-file,
    /// PORTCULLIS_TOKEN or standard input (never the command line).
    Enroll {
        /// File holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Directory for the key, certificate and connector.toml.
        #[arg(long, env = "PORTCULLIS_STATE")]
        state: PathBuf,
    },
}

/// Runs the command line's command to completion.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run {
            config,
            enroll_token_file,
        } => rt.block_on(async {
            if let Some(token) = &enroll_token_file {
                let loaded = ConnectorConfig::load(&config)?;
                identity::enroll::enroll_if_new(token, &loaded).await?;
            }
            run_from_file(config).await
        }),
        Command::Check { config } => check(&config),
        Command::Status { config, json } => status(&config, json),
        Command::Enroll { token_file, state } => {
            rt.block_on(identity::enroll::enroll(token_file.as_deref(), &state))
        }
    }
}

/// `check`: what `run` does before it dials, and nothing after: the file parses and holds
/// together, the origins' clients build, the CA, certificate and key load, and so does
/// `[otlp] ca`.
#[allow(clippy::print_stdout)] // the command's output is its product
fn check(path: &Path) -> anyhow::Result<()> {
    // Exit 1 for every finding (not `run`'s 64 for a bad configuration).
    let config = ConnectorConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let what = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
    origin::Origins::new(&config, Arc::default(), origin::Reports::default()).map_err(what)?;
    dial::Dialer::new(&config).map_err(what)?;
    // Hostnames the certificate may not publish: the relay would refuse them.
    let granted_file = portcullis_shared::config::granted_hostnames_path(&config.cert);
    if let Ok(text) = std::fs::read_to_string(&granted_file) {
        let granted = portcullis_shared::config::parse_granted_hostnames(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", granted_file.display()))?;
        let source = std::fs::read_to_string(path).unwrap_or_default();
        for rule in &config.ingress {
            if !granted.iter().any(|g| g.covers(&rule.hostname)) {
                let quoted = format!("\"{}\"", rule.hostname);
                let line = source
                    .lines()
                    .position(|l| l.trim_start().starts_with("hostname") && l.contains(&quoted))
                    .map_or(String::new(), |n| format!(":{}", n + 1));
                let list: Vec<String> = granted.iter().map(ToString::to_string).collect();
                anyhow::bail!(
                    "{}{line}: this connector's certificate may not publish {} (it may publish {}, as {} says): the relay would refuse it; enrol with a token for that name (`token create connector NAME --hostname {}`) or remove the rule",
                    path.display(),
                    rule.hostname,
                    list.join(", "),
                    granted_file.display(),
                    rule.hostname
                );
            }
        }
    }
    // The relay takes only a connector's certificate on the tunnel.
    let chain = portcullis_shared::pki::load_certs(&config.cert).map_err(|e| what(e.into()))?;
    if let Some(leaf) = chain.first() {
        let info = portcullis_shared::pki::inspect(leaf).map_err(|e| what(e.into()))?;
        match info.identity {
            Some(identity) if identity.role() == portcullis_shared::Role::Connector => {}
            Some(identity) => anyhow::bail!(
                "{}: cert {} is {identity}'s certificate, not a connector's: the relay refuses it on the tunnel; enrol with a connector token (`portcullis-relay token create connector NAME ...`)",
                path.display(),
                config.cert.display()
            ),
            None => anyhow::bail!(
                "{}: cert {} names no Portcullis identity: use the certificate `portcullis-connector enroll` or `portcullis-relay issue connector` made",
                path.display(),
                config.cert.display()
            ),
        }
    }
    if let Some(otlp) = &config.otlp {
        portcullis_shared::otlp::check(otlp).map_err(|e| what(e.into()))?;
    }
    if let Some(token) = &config.admin_token_file {
        portcullis_shared::admin_gate::read_token(token).map_err(|e| what(e.into()))?;
    }
    println!("{}: ok", path.display());
    Ok(())
}

/// `status`: every tunnel's state from the running connector's status file.
#[allow(clippy::print_stdout)] // the command's output is its product
fn status(config: &Path, json: bool) -> anyhow::Result<()> {
    let config = ConnectorConfig::load(config)?;
    let path = config
        .status_file
        .context("the configuration names no status file")?;
    let tunnels = status::read_status(&path)?;
    if json {
        println!("{}", serde_json::json!({ "tunnels": tunnels }));
        return Ok(());
    }
    println!("{:<28} {:<28} state", "relay", "address");
    for t in tunnels {
        let state = match &t.state {
            TunnelState::Connecting => "connecting".to_owned(),
            TunnelState::Up {
                published,
                transport,
                ..
            } => {
                format!("up over {transport}, publishing {}", published.join(", "))
            }
            TunnelState::Down { error, .. } => format!("down: {error}"),
            TunnelState::Draining => "draining".to_owned(),
        };
        println!("{:<28} {:<28} {state}", t.relay, t.address.to_string());
    }
    Ok(())
}

/// The process exit status for an error: 64 (EX_USAGE) for bad configuration, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        64
    } else {
        1
    }
}

/// Loads the config and runs until SIGTERM or SIGINT; reloads the ingress rules and
/// credentials on SIGHUP and when the files change.
pub async fn run_from_file(path: PathBuf) -> anyhow::Result<()> {
    let config = ConnectorConfig::load(&path)?;
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .context("installing signal handlers")?;
    run_with(Some(path), config, shutdown).await
}

/// Runs the connector until `shutdown` fires, then drains: tells the relay to route no
/// new streams here, lets in-flight ones finish within `drain_grace`, and closes. The
/// certificate is renewed at two thirds of its lifetime; nothing else is reloaded (there
/// is no file to reload from).
pub async fn run(config: ConnectorConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(None, config, shutdown).await
}

async fn run_with(
    path: Option<PathBuf>,
    config: ConnectorConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = Arc::new(ops::metrics::Metrics::default());
    let (checkers, withdrawn) = origin::health::Checkers::new(&shutdown);
    let watched = path.is_some();
    let live = Arc::new(live::Live::new(
        path,
        config.clone(),
        metrics.clone(),
        checkers,
    )?);
    let status = Arc::new(status::Status::new(
        config.status_file.clone(),
        shutdown.clone(),
    ));
    if let Some(addr) = config.admin_listen {
        let token = config
            .admin_token_file
            .as_deref()
            .map(portcullis_shared::admin_gate::read_token)
            .transpose()?;
        let admin = ops::admin::Admin {
            status: status.clone(),
            exposition: ops::admin::exposition(&metrics, &status),
            gate: portcullis_shared::admin_gate::AdminGate::new(
                token,
                config.admin_probes_without_token,
                portcullis_shared::admin_gate::MAX_ADMIN_CONNECTIONS,
            ),
        };
        ops::admin::start(addr, admin, shutdown.clone()).await?;
    }
    if watched {
        tokio::spawn(live.clone().watch(shutdown.clone()));
    }
    if let Some(log) = &live.reports.access {
        tokio::spawn(log.clone().reopen_on_sigusr2(shutdown.clone()));
    }
    tokio::spawn(identity::renew::run(live.clone(), shutdown.clone()));
    let spans = live.reports.spans.clone();
    tunnel::relays::run(config.clone(), live, shutdown.clone(), status, withdrawn).await?;
    if !shutdown.drain(config.drain_grace).await {
        tracing::warn!(grace = ?config.drain_grace, "drain grace expired with streams in flight");
    }
    if let Some(spans) = spans {
        let _ = tokio::task::spawn_blocking(move || spans.shutdown(Duration::from_secs(5))).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    tracing::info!("connector stopped");
    Ok(())
}
