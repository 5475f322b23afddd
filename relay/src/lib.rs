//! The Portcullis relay as a library: the command line and offline admin commands
//! ([`cli`]) and the daemon ([`server`]). `main.rs` only parses arguments and prints
//! errors.
//!
//! Layers, top to bottom; a file imports only from files below it, so the relay has no
//! import circle (see `docs/development.md`):
//! - [`server`]: identity, bind, serve, drain; `reload`: relay.toml and certificate files.
//! - `listen`: HTTPS, QUIC (ALPN dispatch), connector tunnels, HTTP/3, enrolment,
//!   TLS-in-CONNECT, admin HTTP.
//! - `pipeline`: authorize, forward, rewrite, respond, access log, upgrades.
//! - `state`: what every task shares; it holds only types from the layers below.
//! - `tunnel` (the routing table of connectors), `conn` (per-connection facts).
//! - `identity` (TLS, registry, JWT), `ops` (metrics, access log), `hardening` (framing
//!   checks, guards, limiters), `clock`.

pub mod cli;
pub mod server;

mod clock;
mod conn;
mod hardening;
mod identity;
mod listen;
mod ops;
mod pipeline;
mod reload;
mod state;
mod tunnel;

pub use cli::admin;

use cli::{CaCommand, Cli, Command, IssueCommand, JwtCommand, RevokeCommand};
use portcullis_shared::Role;
use portcullis_shared::config::ConfigError;

/// Runs the command line's command to completion.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca(CaCommand::Init {
            state,
            org,
            permit_dns,
        }) => admin::with_place(&state, |at| admin::ca_init(at, &org, &permit_dns)),
        Command::Ca(CaCommand::ExportRoot { state, out }) => {
            admin::with_place(&state, |at| admin::ca_export_root(at, &out))
        }
        Command::Ca(CaCommand::RemoveRootKey { state }) => {
            admin::with_place(&state, admin::ca_remove_root_key)
        }
        Command::Ca(CaCommand::RotateIntermediate { state, root_key }) => {
            admin::with_place(&state, |at| {
                admin::ca_rotate_intermediate(at, root_key.as_deref())
            })
        }
        Command::Issue(IssueCommand::Connector {
            name,
            hostnames,
            ttl,
            state,
            out,
        }) => admin::with_place(&state, |at| {
            admin::issue_connector(at, &name, &hostnames, ttl, &out)
        }),
        Command::Issue(IssueCommand::Device {
            id,
            user,
            groups,
            ttl,
            state,
            out,
        }) => admin::with_place(&state, |at| {
            admin::issue_device(at, &id, &user, &groups, ttl, &out)
        }),
        Command::Revoke(RevokeCommand::Device { id, state }) => {
            admin::with_place(&state, |at| admin::revoke(at, Role::Device, &id))
        }
        Command::Revoke(RevokeCommand::Connector { name, state }) => {
            admin::with_place(&state, |at| admin::revoke(at, Role::Connector, &name))
        }
        Command::Revoke(RevokeCommand::User { user, state }) => {
            admin::with_place(&state, |at| admin::revoke_user(at, &user))
        }
        Command::List { state, json } => admin::with_place(&state, |at| admin::list(at, json)),
        Command::Audit {
            state,
            identity,
            action,
            since,
            until,
            json,
        } => admin::with_place(&state, |at| {
            admin::audit_list(
                at,
                &admin::AuditFilter {
                    identity,
                    action,
                    since,
                    until,
                },
                json,
            )
        }),
        Command::Token(cmd) => admin::token(cmd),
        Command::Jwt(JwtCommand::Rotate { state }) => admin::with_place(&state, admin::jwt_rotate),
        Command::Jwt(JwtCommand::Retire { state }) => admin::with_place(&state, admin::jwt_retire),
        Command::Check { config } => check(&config),
        Command::Run { config, ready_file } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(server::run_from_file(&config, ready_file.as_deref()))
        }
    }
}

/// `check`: the file parses, its values hold together (the state directory holds a CA,
/// as loading checks), the public certificate and key it names (if any) load and match,
/// and so does `[otlp] ca`. Nothing is opened for writing and no socket is bound.
#[allow(clippy::print_stdout)] // the command's output is its product
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    // Exit 1 for every finding (not `run`'s 64 for a bad configuration).
    let config =
        portcullis_shared::config::RelayConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let chain = portcullis_shared::pki::load_certs(cert)
            .with_context(|| format!("{}: tls_cert", path.display()))?;
        // The public certificate is what devices get for every published name.
        if let Some(leaf) = chain.first() {
            let names = portcullis_shared::pki::inspect(leaf)
                .with_context(|| format!("{}: tls_cert {}", path.display(), cert.display()))?
                .dns_names;
            for pattern in config.policy.iter().flat_map(|rule| &rule.hostnames) {
                if !portcullis_shared::pki::certificate_covers(&names, pattern) {
                    anyhow::bail!(
                        "{}: tls_cert {} is not valid for {pattern}, which a [[policy]] rule publishes (it is for {}): devices would refuse it; add the name to the certificate, or leave tls_cert out and the relay mints certificates from the organisation CA",
                        path.display(),
                        cert.display(),
                        if names.is_empty() {
                            "no DNS name".to_owned()
                        } else {
                            names.join(", ")
                        }
                    );
                }
            }
        }
        let key = portcullis_shared::pki::load_key(key)
            .with_context(|| format!("{}: tls_key", path.display()))?;
        rustls::crypto::ring::sign::any_supported_type(&key)
            .ok()
            .and_then(|signer| {
                rustls::sign::CertifiedKey::new(chain, signer)
                    .keys_match()
                    .ok()
            })
            .with_context(|| {
                format!(
                    "{}: tls_key is not the key of tls_cert (or not a usable key)",
                    path.display()
                )
            })?;
    }
    if let Some(otlp) = &config.otlp {
        portcullis_shared::otlp::check(otlp).with_context(|| path.display().to_string())?;
    }
    if let Some(token) = &config.admin.token_file {
        portcullis_shared::admin_gate::read_token(token)
            .with_context(|| format!("{}: [admin] token_file", path.display()))?;
    }
    // Files in the state directory the relay's user could not read.
    identity::state_dir::check_owners(&config.state_dir)
        .with_context(|| format!("{}: state_dir", path.display()))?;
    // A name-constrained CA must cover the relay's own name, or connectors refuse it.
    portcullis_shared::pki::Ca::load(&config.state_dir)
        .and_then(|ca| ca.check_server_name(config.server_name.as_str()))
        .with_context(|| format!("{}: server_name", path.display()))?;
    println!("{}: ok", path.display());
    Ok(())
}

/// Whether `err` is a command's output going to a reader that went away (`audit | head`):
/// the command then ends quietly, with success.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The process exit status for an error: 64 (EX_USAGE) for bad configuration, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        64
    } else {
        1
    }
}
