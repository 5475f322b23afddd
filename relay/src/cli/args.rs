//! Command-line interface of `portcullis-relay`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use portcullis_shared::telemetry::TelemetryArgs;

/// The Portcullis relay: the only public piece. Holds the organisation CA, authenticates
/// every device, applies policy and carries requests down connectors' tunnels.
#[derive(Debug, Parser)]
#[command(name = "portcullis-relay", version)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the CA, the store and the logs live.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// The relay's state directory (the one given to `ca init`); without it, `state_dir`
    /// of `--config`'s file.
    #[arg(long, env = "PORTCULLIS_STATE")]
    pub state: Option<PathBuf>,
    /// The shared store several relays use, `postgres://user:password@host:port/db`;
    /// without it, the SQLite file in the state directory.
    #[arg(
        long,
        env = "PORTCULLIS_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub store: Option<String>,
    /// The relay's relay.toml: its state directory where `--state` is not given, its store
    /// (`store`, `store_file`) where `--store` is not, and its `jwt_prepublish` for `jwt
    /// rotate` and `jwt retire`. Without a store from either, a state directory whose
    /// relay uses a shared store is reached through the relay.toml it last ran with.
    #[arg(long, env = "PORTCULLIS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the organisation CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue a certificate directly (bootstrapping; no token needed).
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Revoke an identity: new handshakes fail and its live connections close.
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// One-time enrolment tokens for devices and connectors.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Rotate the key that signs identity assertions (JWTs).
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// List identities with their user, groups or hostnames, expiry and revocation.
    List {
        #[command(flatten)]
        state: StateArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the audit log, oldest first: certificates issued, renewed and revoked, tokens
    /// created, used and revoked, enrolments refused, JWT key rotations, policy reloads.
    Audit {
        #[command(flatten)]
        state: StateArgs,
        /// Only events about this identity or token: `device:ID`, `connector:NAME`,
        /// `token:ID`, or an id or name alone.
        #[arg(long)]
        identity: Option<String>,
        /// Only this action (`issue`, `renew`, `revoke`, `enroll`, `token.create`,
        /// `policy.reload`, ...).
        #[arg(long)]
        action: Option<String>,
        /// From this time on: RFC 3339 (`2026-11-01T00:00:00Z`) or an age (`24h`, `7d`).
        #[arg(long, value_parser = parse_when)]
        since: Option<i64>,
        /// Up to this time: RFC 3339 or an age, as `--since`.
        #[arg(long, value_parser = parse_when)]
        until: Option<i64>,
        /// Print JSON (an array of events) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file without starting anything: exit 0 when the relay would
    /// start with it, else exit 1 with the file, the line where one is known, and what to
    /// fix (for CI pipelines and before a reload).
    Check {
        /// The relay's configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Run the relay.
    Run {
        /// The relay's configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Write the bound addresses here as JSON once listening (for tests and scripts).
        #[arg(long, hide = true)]
        ready_file: Option<PathBuf>,
    },
}

/// `jwt` subcommands.
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Make a new signing key: published in the JWKS at once (a running relay follows
    /// within 2 s), signing once `jwt_prepublish` (default 1h) has passed, so origins that
    /// cache the JWKS know it first; the key it replaces stays published (tokens it signed
    /// still verify) until `jwt retire`.
    Rotate {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Stop publishing the previous key, ending the overlap `jwt rotate` began.
    Retire {
        #[command(flatten)]
        state: StateArgs,
    },
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA in the state directory; refuses to overwrite an existing one.
    Init {
        #[command(flatten)]
        state: StateArgs,
        /// Organisation name written into the CA certificate.
        #[arg(long, default_value = "Portcullis")]
        org: String,
        /// A domain the CA may vouch for server names under (`.internal`,
        /// `.corp.example.com`), written into the CA as an X.509 name constraint: devices
        /// that trust the CA then trust it for these domains only, and for no IP address.
        /// Repeat for more. Include the relay's own server_name. Without it the CA is not
        /// constrained.
        #[arg(long = "permit-dns", value_name = "DOMAIN")]
        permit_dns: Vec<String>,
    },
    /// Copy the root CA's key to FILE, to keep offline (then `ca remove-root-key`).
    ExportRoot {
        #[command(flatten)]
        state: StateArgs,
        /// Where to write the key (0600); refuses to replace a file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete the root CA's key from the state directory; the relay signs with the
    /// intermediate, and devices and connectors trust the root.
    RemoveRootKey {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Make a new intermediate, signed with the root key (from FILE once it was removed);
    /// restart the relays to sign with it. Nothing enrols again.
    RotateIntermediate {
        #[command(flatten)]
        state: StateArgs,
        /// The root key, where it is kept offline; default the state directory's.
        #[arg(long, value_name = "FILE")]
        root_key: Option<PathBuf>,
    },
}

/// `issue` subcommands.
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// Issue a connector certificate allowed to publish the given hostnames.
    Connector {
        /// The connector's name.
        name: String,
        /// A hostname (exact, or *.suffix) the connector may publish. Repeat for more.
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// Validity.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        state: StateArgs,
        /// Directory to write NAME.crt, NAME.key and ca.crt into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a device certificate for a user.
    Device {
        /// The device's id.
        id: String,
        /// The user the device belongs to.
        #[arg(long)]
        user: String,
        /// A group of the user. Repeat for more.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Validity.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        state: StateArgs,
        /// Directory to write ID.crt, ID.key, ID.p12 and ca.crt into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `revoke` subcommands.
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke a device.
    Device {
        /// The device's id.
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Revoke a connector.
    Connector {
        /// The connector's name.
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Revoke every device of a user (a person who left, or whose devices are all in
    /// doubt); their certificates stop working at once.
    User {
        /// The user, as in `token create device --user`.
        user: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

/// Where enrolled devices and connectors will find the relay (defaults to what the running
/// relay recorded in the state directory: its `server_name` and QUIC port).
#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// The relay's public QUIC address, `host:port`; repeat it for several relays (the
    /// agent uses the first it can reach and moves to another when that one fails).
    #[arg(long)]
    pub relay: Vec<String>,
    /// The relay's TLS name.
    #[arg(long)]
    pub server_name: Option<String>,
    /// The relays' public HTTPS port, where agents and connectors go over TLS on TCP when
    /// UDP is blocked (default: what the running relay recorded, its `https_listen` port).
    #[arg(long)]
    pub relay_tcp_port: Option<u16>,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed as the last line of output.
    #[command(subcommand)]
    Create(TokenCreate),
    /// List tokens: id, what they grant, expiry, used or revoked.
    List {
        #[command(flatten)]
        state: StateArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused token.
    Revoke {
        /// The token's id (from `token list`).
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

/// `token create` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCreate {
    /// A token that enrols one device for a user.
    Device {
        /// The user the device will belong to.
        #[arg(long)]
        user: String,
        /// A group of the user. Repeat for more.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How long the token stays usable.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Lifetime of the device certificate; the agent renews it at two thirds.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        cert_ttl: Duration,
        #[command(flatten)]
        endpoint: EndpointArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// A token that enrols one connector.
    Connector {
        /// The connector's name.
        name: String,
        /// A hostname (exact, or *.suffix) the connector may publish. Repeat for more.
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// How long the token stays usable.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Lifetime of the connector certificate.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        cert_ttl: Duration,
        #[command(flatten)]
        endpoint: EndpointArgs,
        #[command(flatten)]
        state: StateArgs,
    },
}

/// A point in time for `audit`: RFC 3339, or an age before now (`24h`), as Unix seconds.
fn parse_when(s: &str) -> Result<i64, String> {
    let at = humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_duration(s).map(|age| std::time::SystemTime::now() - age))
        .map_err(|_| {
            format!("{s:?} is neither a time (2026-11-01T00:00:00Z) nor an age (24h, 7d)")
        })?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64))
}
