//! The agent's one QUIC connection to the relay, carrying HTTP/3: opened on first use,
//! reopened when it drops (relay restart), rebindable to a new local socket (roaming:
//! QUIC migration keeps open streams alive). No 0-RTT: the relay refuses replayable data.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use portcullis_shared::pki;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::home::{AgentState, Home};
use crate::keystore;
use crate::transport::{Exchange, H3Connection, RelayConnection};

/// One request or tunnel through the relay, whatever carries it.
pub(crate) type Stream = Exchange;

/// The org CA stored at enrolment, as rustls trust roots.
pub(crate) fn org_ca_roots(home: &Home) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&home.ca())? {
        roots
            .add(ca)
            .context("the stored org CA is unusable: enrol again")?;
    }
    Ok(roots)
}

/// The device's credentials, as rustls wants them.
pub(crate) struct Credentials {
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) key_der: Vec<u8>,
    pub(crate) roots: rustls::RootCertStore,
}

impl Credentials {
    pub(crate) fn load(home: &Home, state: &AgentState) -> anyhow::Result<Self> {
        let certs = pki::load_certs(&home.cert())?;
        let key_der = keystore::load(home, &state.key_store, &state.identity)?;
        Ok(Self {
            certs,
            key: pki::pkcs8(key_der.clone()),
            key_der,
            roots: org_ca_roots(home)?,
        })
    }

    fn client_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(self.roots.clone())
        .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
        .context("the device certificate and key do not match: enrol again")?;
        tls.alpn_protocols = vec![b"h3".to_vec()];
        tls.enable_early_data = false;
        let mut config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            10_000,
        ))));
        transport.initial_rtt(Duration::from_millis(100));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// The connection to the relay and what it takes to reopen it.
pub(crate) struct Relay {
    endpoint: quinn::Endpoint,
    /// `host:port`, resolved again for every new connection (the relay may move).
    relay: String,
    addr: SocketAddr,
    server_name: String,
    config: RwLock<quinn::ClientConfig>,
    current: tokio::sync::Mutex<Option<Arc<dyn RelayConnection>>>,
    /// Set by a renewal: the next request opens a connection with the new certificate
    /// (the relay closes the old one when its certificate expires).
    renewed: std::sync::atomic::AtomicBool,
}

impl Relay {
    pub(crate) async fn new(state: &AgentState, creds: &Credentials) -> anyhow::Result<Self> {
        let addr = portcullis_shared::enroll_client::resolve(&state.relay).await?;
        let endpoint =
            quinn::Endpoint::client(local_any(addr)).context("creating the agent's QUIC socket")?;
        Ok(Self {
            endpoint,
            relay: state.relay.clone(),
            addr,
            server_name: state.server_name.clone(),
            config: RwLock::new(creds.client_config()?),
            current: tokio::sync::Mutex::new(None),
            renewed: false.into(),
        })
    }

    /// Uses renewed credentials from the next request on, on a new connection; streams
    /// open on the old one carry on until the relay closes it at the old certificate's
    /// expiry.
    pub(crate) fn update_credentials(&self, creds: &Credentials) -> anyhow::Result<()> {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = creds.client_config()?;
        self.renewed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Moves the connection to a fresh local UDP socket (a new address, as after a network
    /// change); QUIC migration carries every open stream over.
    pub(crate) fn rebind(&self) -> anyhow::Result<SocketAddr> {
        let socket = std::net::UdpSocket::bind(local_any(self.addr))?;
        let local = socket.local_addr()?;
        self.endpoint.rebind(socket)?;
        Ok(local)
    }

    /// The live connection, opened if there is none (for status: RTT, transport).
    pub(crate) async fn connection(&self) -> anyhow::Result<Arc<dyn RelayConnection>> {
        let mut current = self.current.lock().await;
        let renewed = self
            .renewed
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(conn) = current.as_ref()
            && !conn.is_closed()
            && !renewed
        {
            return Ok(conn.clone());
        }
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Resolved again for each new connection: the relay may have moved.
        let addr = portcullis_shared::enroll_client::resolve(&self.relay)
            .await
            .unwrap_or(self.addr);
        let connecting = self
            .endpoint
            .connect_with(config, addr, &self.server_name)
            .context("dialling the relay")?;
        let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => bail!(
                "the relay {addr} refused or failed the connection ({e}); if this device was revoked, ask your administrator"
            ),
            Err(_) => bail!("the relay {addr} is unreachable (no answer in 5 s)"),
        };
        let conn: Arc<dyn RelayConnection> = Arc::new(
            H3Connection::start(conn)
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .context("starting HTTP/3 with the relay")?,
        );
        tracing::info!(relay = %addr, transport = conn.kind().as_str(), "connected to the relay");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Sends a request head; the caller streams the body and reads the response.
    pub(crate) async fn send(&self, req: http::Request<()>) -> anyhow::Result<Stream> {
        // One retry: a connection found dead only now (relay restarted) is reopened.
        for attempt in 0..2 {
            let conn = self.connection().await?;
            match conn.send_request(req.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "relay connection lost; reconnecting");
                    conn.close("reconnecting");
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(e)).context("sending the request to the relay");
                }
            }
        }
        bail!("the relay connection keeps failing")
    }

    /// A tunnel to `target` (`host:port`) through the relay, ready for bytes.
    pub(crate) async fn connect(&self, target: &str) -> anyhow::Result<Stream> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target)
            .body(())?;
        let mut stream = self.send(req).await?;
        let resp = stream
            .recv_response()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if resp.status() != 200 {
            let mut why = Vec::new();
            while let Ok(Some(chunk)) = stream.recv_data().await {
                why.extend_from_slice(&chunk);
            }
            bail!(
                "the relay refused {target}: {} {}",
                resp.status(),
                String::from_utf8_lossy(&why).trim()
            );
        }
        Ok(stream)
    }
}

fn local_any(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}
