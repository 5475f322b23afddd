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
    #[cfg(test)]
    pub(crate) fn new(rise: u32, fall: u32) -> Self {
        Self::starting(true, rise, fall)
    }

    /// An origin whose last known state was `healthy`.
    pub(crate) fn starting(healthy: bool, rise: u32, fall: u32) -> Self {
        Self {
            healthy,
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

/// The running checkers, one per rule with a health check, and the set of withdrawn
/// hostnames they keep. A reload hands them the new rules: a checker whose rule is
/// unchanged goes on, the others stop and new ones start from the state the hostname had
/// (a withdrawn hostname stays withdrawn until `rise` successes).
pub(crate) struct Checkers {
    tx: Arc<watch::Sender<BTreeSet<String>>>,
    running: std::sync::Mutex<std::collections::HashMap<String, (IngressRule, Shutdown)>>,
    shutdown: Shutdown,
}

impl Checkers {
    /// No checkers yet (see [`Checkers::update`]); the receiver follows the set of
    /// withdrawn hostnames. Checkers stop at `shutdown`.
    pub(crate) fn new(shutdown: &Shutdown) -> (Self, Withdrawn) {
        let (tx, rx) = watch::channel(BTreeSet::new());
        (
            Self {
                tx: Arc::new(tx),
                running: std::sync::Mutex::new(std::collections::HashMap::new()),
                shutdown: shutdown.clone(),
            },
            rx,
        )
    }

    /// Runs a checker for every rule of `config` with a health check. Every probe is built
    /// before anything changes, so an error leaves the running checkers as they were.
    pub(crate) fn update(&self, config: &ConnectorConfig) -> anyhow::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut start = Vec::new();
        for rule in &config.ingress {
            let Some(check) = &rule.health_check else {
                continue;
            };
            let hostname = rule.hostname.to_string();
            if running.get(&hostname).is_some_and(|(r, _)| r == rule) {
                continue;
            }
            start.push((
                hostname,
                check.clone(),
                Probe::new(rule, check)?,
                rule.clone(),
            ));
        }
        let wanted: BTreeSet<String> = config
            .ingress
            .iter()
            .filter(|r| r.health_check.is_some())
            .map(|r| r.hostname.to_string())
            .collect();
        running.retain(|hostname, (_, stop)| {
            let keep = wanted.contains(hostname) && !start.iter().any(|(h, ..)| h == hostname);
            if !keep {
                stop.trigger();
            }
            keep
        });
        // A hostname no longer checked is no longer withdrawn.
        self.tx.send_if_modified(|set| {
            let before = set.len();
            set.retain(|h| wanted.contains(h));
            set.len() != before
        });
        for (hostname, check, probe, rule) in start {
            let stop = self.shutdown.child();
            let healthy = !self.tx.borrow().contains(&hostname);
            tokio::spawn(run(
                hostname.clone(),
                Health::starting(healthy, check.rise, check.fall),
                check,
                probe,
                self.tx.clone(),
                stop.clone(),
            ));
            running.insert(hostname, (rule, stop));
        }
        Ok(())
    }
}

async fn run(
    hostname: String,
    mut health: Health,
    check: HealthCheck,
    probe: Probe,
    withdrawn: Arc<watch::Sender<BTreeSet<String>>>,
    shutdown: Shutdown,
) {
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
    fn an_origin_withdrawn_before_a_reload_stays_withdrawn_until_rise_successes() {
        let mut h = Health::starting(false, 2, 3);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
    }

    #[test]
    fn rise_and_fall_of_one_act_on_the_first_result() {
        let mut h = Health::new(1, 1);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true));
    }
}
