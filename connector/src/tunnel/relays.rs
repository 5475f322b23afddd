//! Tunnels to every relay: the configured relays are resolved (names again every
//! `relay_resolve_interval`), each address gets a tunnel of its own that reconnects on its
//! own, an address that leaves a name has its tunnel drained and closed, and the state of
//! every tunnel is logged and written to the status file (`portcullis-connector status`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use portcullis_shared::config::{ConnectorConfig, RelayTarget};
use portcullis_shared::shutdown::Shutdown;

use crate::dial::{self, Backoff};
use crate::live::Live;
use crate::status::Status;
use crate::tunnel::context::{self, TunnelContext};
use crate::tunnel::session;

/// Keeps a tunnel to every relay address until shutdown; returns once every tunnel has
/// drained and closed.
pub(crate) async fn run(
    config: ConnectorConfig,
    live: Arc<Live>,
    shutdown: Shutdown,
    status: Arc<Status>,
    withdrawn: crate::origin::health::Withdrawn,
) -> anyhow::Result<()> {
    let targets = config
        .relays()
        .ok_or_else(|| anyhow::anyhow!("relay is not host:port"))?;
    let names = targets.iter().any(|t| t.host.parse::<IpAddr>().is_err());
    let mut known: HashMap<RelayTarget, Vec<SocketAddr>> = HashMap::new();
    let mut tunnels: HashMap<SocketAddr, Tunnel> = HashMap::new();
    let mut tick = tokio::time::interval(config.relay_resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Until every name has resolved once, retry sooner than the interval.
    let mut backoff = Backoff::default();
    loop {
        let mut all_resolved = true;
        // A resolver built afresh each round reads the system's configuration and hosts
        // file again, so changes to either are followed too.
        let resolver = if names {
            match hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the system's DNS configuration");
                    None
                }
            }
        } else {
            None
        };
        for target in &targets {
            match resolve(resolver.as_ref(), target).await {
                Ok(addrs) => {
                    let before = known.insert(target.clone(), addrs.clone());
                    if before.as_ref() != Some(&addrs) {
                        tracing::info!(relay = %target, addresses = ?addrs, "resolved the relay");
                    }
                }
                // A failed lookup keeps the addresses the name had: DNS trouble alone
                // never takes a working tunnel down.
                Err(e) => {
                    all_resolved &= known.contains_key(target);
                    tracing::warn!(relay = %target, error = %e, "cannot resolve the relay; retrying");
                }
            }
        }
        let wanted: HashMap<SocketAddr, &RelayTarget> = known
            .iter()
            .flat_map(|(t, addrs)| addrs.iter().map(move |a| (*a, t)))
            .collect();
        tunnels.retain(|addr, t| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(relay = %t.relay, address = %addr, "the address left the relay's name: draining its tunnel");
                t.stop.trigger();
            }
            keep
        });
        for (addr, target) in &wanted {
            if tunnels.contains_key(addr) {
                continue;
            }
            let stop = shutdown.child();
            let endpoint = dial::endpoint_for(*addr)?;
            let task = tokio::spawn(session::supervise(
                TunnelContext {
                    endpoint,
                    config: config.clone(),
                    live: live.clone(),
                    shutdown: stop.clone(),
                },
                context::Tunnel::new((*target).clone(), *addr, status.clone(), withdrawn.clone()),
            ));
            tunnels.insert(
                *addr,
                Tunnel {
                    relay: (*target).clone(),
                    stop,
                    task,
                },
            );
        }
        let wait = if all_resolved {
            backoff.reset();
            None
        } else {
            Some(backoff.next_delay())
        };
        tokio::select! {
            _ = tick.tick(), if wait.is_none() => {}
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            () = shutdown.wait() => break,
        }
    }
    status.close();
    for (_, t) in tunnels {
        let _ = t.task.await;
    }
    Ok(())
}

/// One tunnel's handles.
struct Tunnel {
    relay: RelayTarget,
    /// Triggered to drain and close just this tunnel.
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// The addresses of `target`, sorted: itself for an IP address.
async fn resolve(
    resolver: Option<&hickory_resolver::TokioResolver>,
    target: &RelayTarget,
) -> anyhow::Result<Vec<SocketAddr>> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let resolver = resolver.ok_or_else(|| anyhow::anyhow!("no resolver"))?;
    let ips = resolver
        .lookup_ip(target.host.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {}", target.host, dns_failure(&e)))?;
    let mut addrs: Vec<_> = ips
        .iter()
        .map(|ip| SocketAddr::new(ip, target.port))
        .collect();
    addrs.sort();
    addrs.dedup();
    anyhow::ensure!(!addrs.is_empty(), "the name has no address");
    Ok(addrs)
}

/// Why a name did not resolve, in words (the resolver's own errors print the whole query).
fn dns_failure(e: &hickory_resolver::net::NetError) -> String {
    use hickory_resolver::net::NetError;
    if e.is_nx_domain() {
        "the name does not exist (NXDOMAIN): check `relay` in connector.toml".to_owned()
    } else if e.is_no_records_found() {
        "the name has no address (A or AAAA record)".to_owned()
    } else if matches!(e, NetError::Timeout) {
        "no DNS server answered in time".to_owned()
    } else {
        let text = e.to_string();
        match text.split_once(" Query {") {
            Some((head, _)) => head.trim_end_matches([':', ' ']).to_owned(),
            None => text,
        }
    }
}
