//! Where the agent keeps its state: `agent.json` (identity, relay, expiry), the device
//! certificate and the org CA; the private key lives in the OS keyring (or, only when
//! asked, in a 0600 file here). One directory per enrolment, chosen with `--home`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// What `portcullis enroll` recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AgentState {
    /// `device:<id>`.
    pub(crate) identity: String,
    /// The relay's QUIC address: the preferred one.
    pub(crate) relay: String,
    /// More relays, tried in order when `relay` cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) more_relays: Vec<String>,
    /// The relay's TLS name.
    pub(crate) server_name: String,
    /// The relays' HTTPS port, for the fallback over TLS on TCP; `None`: the QUIC port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tcp_port: Option<u16>,
    /// SHA-256 of the org CA.
    pub(crate) ca_sha256: String,
    /// `keyring` or `file`.
    pub(crate) key_store: String,
    /// The current certificate's validity, Unix seconds.
    pub(crate) issued_at: i64,
    pub(crate) not_after: i64,
}

impl AgentState {
    /// Every relay, the preferred one first.
    pub(crate) fn relays(&self) -> Vec<String> {
        std::iter::once(self.relay.clone())
            .chain(self.more_relays.iter().cloned())
            .collect()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Home {
    pub(crate) dir: PathBuf,
}

impl Home {
    /// `--home`, `PORTCULLIS_HOME`, or the user's config directory.
    pub(crate) fn resolve(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = match explicit {
            Some(d) => d,
            None => match std::env::var_os("XDG_CONFIG_HOME") {
                Some(x) => PathBuf::from(x).join("portcullis"),
                None => {
                    PathBuf::from(std::env::var_os("HOME").context("no HOME: pass --home DIR")?)
                        .join(".config/portcullis")
                }
            },
        };
        Ok(Self { dir })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn cert(&self) -> PathBuf {
        self.path("device.crt")
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.path("ca.crt")
    }

    pub(crate) fn key_file(&self) -> PathBuf {
        self.path("device.key")
    }

    pub(crate) fn load(&self) -> anyhow::Result<AgentState> {
        let path = self.path("agent.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "not enrolled (no {}): run `portcullis enroll` with the token your administrator gave you",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&text).with_context(|| {
            format!(
                "{} is corrupt: run `portcullis logout` and enrol again",
                path.display()
            )
        })
    }

    pub(crate) fn save(&self, state: &AgentState) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(state)?;
        portcullis_shared::pki::write_private_file(&self.path("agent.json"), &json)?;
        Ok(())
    }

    pub(crate) fn exists(&self) -> bool {
        Path::new(&self.path("agent.json")).exists()
    }
}
