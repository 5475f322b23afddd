//! The private names this device may reach, as the relay lists them: the split tunnel's
//! and the PAC file's source of truth, refreshed every minute.

use std::sync::RwLock;

use portcullis_shared::identity::{HostPattern, Hostname};

use crate::relay::Relay;

/// The current list.
#[derive(Debug, Default)]
pub(crate) struct Services {
    patterns: RwLock<Vec<HostPattern>>,
}

impl Services {
    pub(crate) fn is_private(&self, host: &str) -> bool {
        let Ok(host) = Hostname::parse(host) else {
            return false;
        };
        self.patterns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|p| p.matches(&host))
    }

    pub(crate) fn list(&self) -> Vec<HostPattern> {
        self.patterns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the relay (GET /.well-known/portcullis/services on its own name).
    pub(crate) async fn refresh(
        &self,
        relay: &Relay,
        server_name: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let req = http::Request::get(format!(
            "https://{server_name}/.well-known/portcullis/services"
        ))
        .body(())?;
        let mut stream = relay.send(req).await?;
        let failed = |e| anyhow::anyhow!("reading the service list: {e}");
        stream.finish().await.map_err(failed)?;
        let resp = stream.recv_response().await.map_err(failed)?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.recv_data().await.map_err(failed)? {
            body.extend_from_slice(&chunk);
        }
        anyhow::ensure!(
            resp.status() == 200,
            "the relay refused the service list: {} {}",
            resp.status(),
            String::from_utf8_lossy(&body).trim()
        );
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let patterns = v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().and_then(|s| HostPattern::parse(s).ok()))
                    .collect()
            })
            .unwrap_or_default();
        *self.patterns.write().unwrap_or_else(|p| p.into_inner()) = patterns;
        Ok(v)
    }

    /// A PAC file sending exactly the private names through the proxy at `proxy`.
    pub(crate) fn pac(&self, proxy: &str) -> String {
        let mut tests = Vec::new();
        for p in self.list() {
            tests.push(match p {
                HostPattern::Exact(h) => format!("host == \"{h}\""),
                HostPattern::Wildcard(s) => format!("dnsDomainIs(host, \".{s}\")"),
            });
        }
        let cond = if tests.is_empty() {
            "false".to_owned()
        } else {
            tests.join(" ||\n      ")
        };
        format!(
            "function FindProxyForURL(url, host) {{\n  host = host.toLowerCase();\n  if ({cond})\n    return \"PROXY {proxy}\";\n  return \"DIRECT\";\n}}\n"
        )
    }
}
