//! The Portcullis employee agent: enrol with one token (the key is made here and kept in
//! the OS keyring), then reach the organisation's private services from ordinary tools
//! through one HTTP/3 connection to the relay: a local HTTP/CONNECT proxy with a PAC file,
//! a DNS stub, TCP forwards and an SSH `ProxyCommand`.

#![allow(clippy::print_stdout)] // status and enrol print their results

mod dns;
mod home;
mod keystore;
mod peer;
mod proxy;
mod pump;
mod relay;
mod services;
mod transport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use portcullis_shared::enroll_client;
use portcullis_shared::pki;
use portcullis_shared::proto::{EnrollRequest, EnrollResponse};
use portcullis_shared::telemetry::TelemetryArgs;

use crate::home::{AgentState, Home};
use crate::relay::{Credentials, Relay};
use crate::services::Services;

/// The Portcullis agent: your organisation's private services from this device.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Where the agent keeps its state (default: the user's config directory).
    #[arg(long, global = true, env = "PORTCULLIS_HOME")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrol this device with the token from your administrator (from --token-file,
    /// PORTCULLIS_TOKEN or standard input; never on the command line).
    Enroll {
        /// File holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Dial this address instead of the one in the token (its TLS name still applies).
        #[arg(long)]
        relay: Option<String>,
        /// Where the private key lives: the OS keyring, or a 0600 file in --home.
        #[arg(long, default_value = "keyring", value_parser = ["keyring", "file"])]
        key_store: String,
        /// A preferred device id (default: made from your user name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Connect and serve the local proxy (and DNS stub); runs in the foreground.
    Up {
        /// Loopback address for the HTTP/CONNECT proxy.
        #[arg(long, default_value = "127.0.0.1:8118")]
        proxy: SocketAddr,
        /// Loopback address for the DNS stub (off unless given).
        #[arg(long)]
        dns: Option<SocketAddr>,
        /// Once listening, write the bound addresses here as JSON (`proxy`, `dns`).
        #[arg(long, hide = true)]
        ready_file: Option<PathBuf>,
    },
    /// Forward a local TCP port to a private TCP service.
    Tcp {
        /// The private service, HOSTNAME:PORT.
        target: String,
        /// Local address to listen on (loopback).
        #[arg(long)]
        listen: SocketAddr,
        /// Once listening, write the bound address here as JSON (`listen`).
        #[arg(long, hide = true)]
        ready_file: Option<PathBuf>,
    },
    /// Standard input/output to a private TCP service, for ssh's ProxyCommand:
    /// `ProxyCommand portcullis ssh-proxy %h %p`.
    SshProxy {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// Identity, certificate expiry, relay, round-trip time, reachable services.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove this device's key and certificate.
    Logout,
}

/// Runs the command line's command.
pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = Home::resolve(cli.home)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Enroll {
                token_file,
                relay,
                key_store,
                name,
            } => enroll(&home, token_file, relay, &key_store, name).await,
            Command::Up {
                proxy,
                dns,
                ready_file,
            } => up(&home, proxy, dns, ready_file.as_deref()).await,
            Command::Tcp {
                target,
                listen,
                ready_file,
            } => tcp(&home, &target, listen, ready_file.as_deref()).await,
            Command::SshProxy { host, port } => ssh_proxy(&home, &host, port).await,
            Command::Status { json } => status(&home, json).await,
            Command::Logout => logout(&home),
        }
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn enroll(
    home: &Home,
    token_file: Option<PathBuf>,
    relay: Option<String>,
    key_store: &str,
    name: Option<String>,
) -> anyhow::Result<ExitCode> {
    if home.exists() {
        bail!(
            "already enrolled in {}: run `portcullis logout` first",
            home.dir.display()
        );
    }
    let token = enroll_client::read_token(token_file.as_deref())?;
    // `--relay` replaces the token's relays.
    let relays = match relay {
        Some(r) => vec![r],
        None => token.relays(),
    };
    let (key, csr) = pki::generate_enrolment_csr()?;
    let request = EnrollRequest::Enroll {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        csr,
        name,
    };
    let answer = enroll_client::exchange_any(
        &relays,
        token.tcp_port,
        &token.server_name,
        &token.ca_sha256,
        None,
        &request,
    )
    .await?;
    let (identity, cert, ca, not_after) = match answer {
        EnrollResponse::Issued {
            identity,
            cert,
            ca,
            not_after,
            ..
        } => (identity, cert, ca, not_after),
        EnrollResponse::Refused { reason } => bail!("the relay refused enrolment: {reason}"),
    };
    std::fs::create_dir_all(&home.dir)
        .with_context(|| format!("creating {}", home.dir.display()))?;
    keystore::store(home, key_store, &identity, &key)?;
    pki::write_public_file(&home.cert(), cert.as_bytes())?;
    pki::write_public_file(&home.ca(), ca.as_bytes())?;
    home.save(&AgentState {
        identity: identity.clone(),
        relay: relays[0].clone(),
        more_relays: relays[1..].to_vec(),
        server_name: token.server_name,
        tcp_port: token.tcp_port,
        ca_sha256: token.ca_sha256,
        key_store: key_store.to_owned(),
        issued_at: now(),
        not_after,
    })?;
    println!(
        "enrolled as {identity} (key in the {}); run `portcullis up` to connect",
        if key_store == "keyring" {
            "OS keyring"
        } else {
            "file store"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Connected agent: state, credentials, relay connection.
struct Agent {
    home: Home,
    state: std::sync::Mutex<AgentState>,
    relay: Arc<Relay>,
}

impl Agent {
    async fn start(home: &Home) -> anyhow::Result<Arc<Self>> {
        let state = home.load()?;
        if state.not_after <= now() {
            bail!(
                "this device's certificate expired at {} and was not renewed: ask your administrator for a new token",
                humantime::format_rfc3339(
                    UNIX_EPOCH + Duration::from_secs(state.not_after.max(0) as u64)
                )
            );
        }
        let creds = Credentials::load(home, &state)?;
        let relay = Arc::new(Relay::new(&state, &creds).await?);
        Ok(Arc::new(Self {
            home: home.clone(),
            state: std::sync::Mutex::new(state),
            relay,
        }))
    }

    fn state(&self) -> AgentState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Renews at two thirds of the certificate's lifetime, with the same key.
    async fn renew_forever(self: Arc<Self>) {
        loop {
            let s = self.state();
            let at = s.issued_at + (s.not_after - s.issued_at) * 2 / 3;
            let wait = (at - now()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.renew().await {
                Ok(not_after) => tracing::info!(not_after, "certificate renewed"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "certificate renewal failed; retrying in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }

    async fn renew(&self) -> anyhow::Result<i64> {
        let state = self.state();
        let creds = Credentials::load(&self.home, &state)?;
        let (cert, not_after) = enroll_client::renew(enroll_client::Renewal {
            relays: &state.relays(),
            tcp_port: state.tcp_port,
            server_name: &state.server_name,
            ca_sha256: &state.ca_sha256,
            certs: creds.certs.clone(),
            key: creds.key.clone_key(),
        })
        .await?;
        pki::write_public_file(&self.home.cert(), cert.as_bytes())?;
        let mut new_state = state;
        new_state.issued_at = now();
        new_state.not_after = not_after;
        self.home.save(&new_state)?;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new_state.clone();
        self.relay
            .update_credentials(&Credentials::load(&self.home, &new_state)?)?;
        Ok(not_after)
    }
}

/// Writes `contents` to `path` atomically (a temporary file, then a rename), so a reader
/// never sees half of it.
fn write_ready_file(path: &Path, contents: &serde_json::Value) -> anyhow::Result<()> {
    pki::write_public_file(path, contents.to_string().as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

async fn up(
    home: &Home,
    proxy_addr: SocketAddr,
    dns_addr: Option<SocketAddr>,
    ready_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        proxy_addr.ip().is_loopback(),
        "the proxy listens on loopback only, not {proxy_addr}"
    );
    let agent = Agent::start(home).await?;
    let state = agent.state();
    let services = Arc::new(Services::default());
    services
        .refresh(&agent.relay, &state.server_name)
        .await
        .context("fetching the list of private services")?;
    let listener = tokio::net::TcpListener::bind(proxy_addr)
        .await
        .with_context(|| format!("binding the proxy on {proxy_addr}: is the port in use?"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(proxy::serve(
        listener,
        Arc::new(proxy::Proxy {
            relay: agent.relay.clone(),
            services: services.clone(),
            addr: bound,
            inner_tls: proxy::Proxy::inner_tls(relay::org_ca_roots(home)?)?,
        }),
    ));
    let mut dns_bound = None;
    if let Some(addr) = dns_addr {
        let socket = dns::bind(addr).await?;
        let local = socket.local_addr()?;
        tracing::info!(dns = %local, "DNS stub up");
        dns_bound = Some(local);
        tokio::spawn(dns::serve(socket, services.clone()));
    }
    tokio::spawn(agent.clone().renew_forever());
    {
        let (relay, services, server_name) = (
            agent.relay.clone(),
            services.clone(),
            state.server_name.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Err(e) = services.refresh(&relay, &server_name).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot refresh the service list");
                }
            }
        });
    }
    tracing::info!(proxy = %bound, identity = %state.identity, "agent up: https_proxy=http://{bound}, PAC at http://{bound}/proxy.pac");
    rebind_on_usr1(agent.relay.clone())?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Written last: once it exists, every listener and signal handler is in place.
    if let Some(path) = ready_file {
        write_ready_file(
            path,
            &serde_json::json!({ "proxy": bound, "dns": dns_bound }),
        )?;
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGUSR1 means the network changed: move to a new local socket; QUIC migration keeps
/// every open stream alive.
fn rebind_on_usr1(relay: Arc<Relay>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match relay.rebind() {
                Ok(local) => tracing::info!(%local, "moved to a new local address"),
                Err(e) => tracing::warn!(error = %e, "cannot rebind"),
            }
        }
    });
    Ok(())
}

async fn tcp(
    home: &Home,
    target: &str,
    listen: SocketAddr,
    ready_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        listen.ip().is_loopback(),
        "forwards listen on loopback only, not {listen}"
    );
    let agent = Agent::start(home).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}: is the port in use?"))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, target, "forwarding");
    tokio::spawn(agent.clone().renew_forever());
    rebind_on_usr1(agent.relay.clone())?;
    if let Some(path) = ready_file {
        write_ready_file(path, &serde_json::json!({ "listen": bound }))?;
    }
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let relay = agent.relay.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            // The forward carries this device's identity: for this user only.
            if !peer::allowed(peer, bound).await {
                return;
            }
            match relay.connect(&target).await {
                Ok(stream) => {
                    let (r, w) = tcp.into_split();
                    pump::join(r, w, stream).await;
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot open the tunnel"),
            }
        });
    }
}

async fn ssh_proxy(home: &Home, host: &str, port: u16) -> anyhow::Result<ExitCode> {
    let agent = Agent::start(home).await?;
    rebind_on_usr1(agent.relay.clone())?;
    let stream = agent.relay.connect(&format!("{host}:{port}")).await?;
    pump::join(tokio::io::stdin(), tokio::io::stdout(), stream).await;
    Ok(ExitCode::SUCCESS)
}

async fn status(home: &Home, json: bool) -> anyhow::Result<ExitCode> {
    let state = home.load()?;
    let expires =
        humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(state.not_after.max(0) as u64));
    let mut report = serde_json::json!({
        "identity": state.identity,
        "relay": state.relay,
        "relays": state.relays(),
        "certificate_expires": expires.to_string(),
        "key_store": state.key_store,
    });
    let connected = async {
        let agent = Agent::start(home).await?;
        let services = Services::default();
        let listing = services.refresh(&agent.relay, &state.server_name).await?;
        let conn = agent.relay.connection().await?;
        anyhow::Ok((listing, conn.rtt(), conn.remote_address(), conn.kind()))
    }
    .await;
    let code = match connected {
        Ok((listing, rtt, via, kind)) => {
            report["state"] = "connected".into();
            report["connected_to"] = via.to_string().into();
            report["transport"] = kind.as_str().into();
            report["rtt_ms"] = (rtt.as_secs_f64() * 1000.0).into();
            report["user"] = listing["user"].clone();
            report["groups"] = listing["groups"].clone();
            report["services"] = listing["services"].clone();
            ExitCode::SUCCESS
        }
        Err(e) => {
            report["state"] = "disconnected".into();
            report["error"] = format!("{e:#}").into();
            ExitCode::from(1)
        }
    };
    if json {
        println!("{report}");
    } else {
        println!("identity:     {}", state.identity);
        println!("certificate:  expires {expires}");
        println!("relays:       {}", state.relays().join(", "));
        println!("state:        {}", report["state"].as_str().unwrap_or(""));
        if let Some(via) = report["connected_to"].as_str() {
            println!(
                "connected to: {via} ({})",
                report["transport"].as_str().unwrap_or("")
            );
        }
        if let Some(rtt) = report["rtt_ms"].as_f64() {
            println!("rtt:          {rtt:.2} ms");
        }
        if let Some(e) = report["error"].as_str() {
            println!("error:        {e}");
        }
        if let Some(list) = report["services"].as_array() {
            let names: Vec<_> = list.iter().filter_map(|s| s.as_str()).collect();
            println!("services:     {}", names.join(", "));
        }
    }
    Ok(code)
}

fn logout(home: &Home) -> anyhow::Result<ExitCode> {
    let state = home.load()?;
    keystore::delete(home, &state.key_store, &state.identity)?;
    for f in [home.cert(), home.ca(), home.path("agent.json")] {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
        }
    }
    println!("logged out {}: key and certificate removed", state.identity);
    Ok(ExitCode::SUCCESS)
}
