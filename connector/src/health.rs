//! Origin health checks: each ingress rule with a `health_check` is probed every
//! `interval` (an HTTP GET of `path`, or a TCP connect); `fall` failures in a row withdraw
//! its hostname from every relay, `rise` successes in a row publish it again. Every tunnel
//! watches the set of withdrawn hostnames and tells its relay (`Publish`), so the relay
//! routes to a replica whose origin is healthy.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_shared::config::{ConnectorConfig, HealthCheck, IngressRule, Scheme};
use portcullis_shared::shutdown::Shutdown;
use tokio::sync::watch;

/// The hostnames (as in the ingress rules) withdrawn because their origin is unhealthy.
pub(crate) type Withdrawn = watch::Receiver<BTreeSet<String>>;

/// One origin's state from its recent results: healthy until `fall` failures in a row,
/// then unhealthy until `rise` successes in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    healthy: bool,
    /// Results in a row that disagree with `healthy`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    /// A new origin, taken as healthy (its first `fall` failures withdraw it).
    pub(crate) fn new(rise: u32, fall: u32) -> Self {
        Self {
            healthy: true,
            streak: 0,
            rise,
            fall,
        }
    }

    /// Takes one check's result; `Some(healthy)` when the state changes.
    pub(crate) fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }
}

/// Starts a checker for every rule with a health check; the receiver follows the set of
/// withdrawn hostnames. The checkers stop at shutdown.
pub(crate) fn start(config: &ConnectorConfig, shutdown: &Shutdown) -> anyhow::Result<Withdrawn> {
    let (tx, rx) = watch::channel(BTreeSet::new());
    let tx = Arc::new(tx);
    for rule in &config.ingress {
        if let Some(check) = rule.health_check.clone() {
            let probe = Probe::new(rule, &check)?;
            tokio::spawn(run(
                rule.hostname.to_string(),
                check,
                probe,
                tx.clone(),
                shutdown.clone(),
            ));
        }
    }
    Ok(rx)
}

async fn run(
    hostname: String,
    check: HealthCheck,
    probe: Probe,
    withdrawn: Arc<watch::Sender<BTreeSet<String>>>,
    shutdown: Shutdown,
) {
    let mut health = Health::new(check.rise, check.fall);
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let result = tokio::time::timeout(check.timeout, probe.check())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)));
        if let Err(why) = &result {
            tracing::debug!(%hostname, error = %why, "health check failed");
        }
        match health.record(result.is_ok()) {
            Some(true) => {
                tracing::info!(%hostname, "origin healthy again: publishing the hostname");
                withdrawn.send_modify(|set| {
                    set.remove(&hostname);
                });
            }
            Some(false) => {
                tracing::warn!(%hostname, error = %result.err().unwrap_or_default(), "origin unhealthy: withdrawing the hostname");
                withdrawn.send_modify(|set| {
                    set.insert(hostname.clone());
                });
            }
            None => {}
        }
    }
}

/// What one check does.
enum Probe {
    /// Connect to `authority`.
    Tcp { authority: String },
    /// GET `url` (with `Host: host`).
    Http {
        url: String,
        host: String,
        client: Box<Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>>,
    },
}

impl Probe {
    fn new(rule: &IngressRule, check: &HealthCheck) -> anyhow::Result<Self> {
        let authority = rule.service.authority();
        let Some(path) = &check.path else {
            return Ok(Self::Tcp { authority });
        };
        let scheme = if rule.service.scheme == Scheme::Https {
            "https"
        } else {
            "http"
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(check.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::origin::tls_for(rule)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(rule.service.scheme == Scheme::H2c)
            .pool_max_idle_per_host(0)
            .build(connector);
        // A wildcard rule's check names the service itself.
        let host = match &rule.hostname {
            portcullis_shared::identity::HostPattern::Exact(h) => h.to_string(),
            portcullis_shared::identity::HostPattern::Wildcard(_) => authority.clone(),
        };
        Ok(Self::Http {
            url: format!("{scheme}://{authority}{path}"),
            host,
            client: Box::new(client),
        })
    }

    async fn check(&self) -> Result<(), String> {
        match self {
            Self::Tcp { authority } => tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map(drop)
                .map_err(|e| format!("cannot connect to {authority}: {e}")),
            Self::Http { url, host, client } => {
                let req = http::Request::get(url.as_str())
                    .header(http::header::HOST, host.as_str())
                    .header(
                        http::header::USER_AGENT,
                        "portcullis-connector health check",
                    )
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let status = resp.status();
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("GET {url}: {status}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_in_a_row_withdraw_and_rise_successes_restore() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        // A success in between starts the count again.
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert_eq!(h.record(true), None);
    }

    #[test]
    fn rise_and_fall_of_one_act_on_the_first_result() {
        let mut h = Health::new(1, 1);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true));
    }
}
