//! The client side of enrolment and renewal (ALPN `portcullis-enroll/1`), used by the agent
//! and the connector: dial the relay named in a token, trust only a CA whose fingerprint
//! the token pins, send one [`EnrollRequest`], read the [`EnrollResponse`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::proto::{ENROLL_ALPN, EnrollRequest, EnrollResponse, MAX_ENROLL_LEN};
use crate::token::sha256_hex;

/// Why enrolment could not be completed (a refusal by the relay is not an error here: it
/// is an [`EnrollResponse::Refused`]).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The relay's address did not resolve or is malformed.
    #[error("cannot resolve the relay {0}: {1}")]
    Resolve(String, String),
    /// No connection could be made (unreachable, or the relay's certificate is not from
    /// the pinned CA: a fake relay).
    #[error("cannot reach the relay {0}: {1}")]
    Connect(String, String),
    /// The exchange broke off or the answer was not understood.
    #[error("enrolment exchange with {0} failed: {1}")]
    Exchange(String, String),
}

/// Trusts exactly the CA whose SHA-256 is pinned: it must come in the server's chain, and
/// the leaf must be valid for the server name under it.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    ca_sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    /// A verifier pinning `ca_sha256` (hex).
    pub fn new(ca_sha256: &str) -> Arc<Self> {
        Arc::new(Self {
            ca_sha256: ca_sha256.to_ascii_lowercase(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General("the relay's certificate is not from the pinned CA".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Reads an enrolment token from `file`, else `PORTCULLIS_TOKEN`, else standard input:
/// never from the command line, which other local users can read.
pub fn read_token(
    file: Option<&std::path::Path>,
) -> Result<crate::token::EnrollToken, TokenReadError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| TokenReadError::Read(path.display().to_string(), e.to_string()))?,
        None => match std::env::var("PORTCULLIS_TOKEN") {
            Ok(t) => t,
            Err(_) => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| TokenReadError::Read("standard input".into(), e.to_string()))?;
                s
            }
        },
    };
    if text.trim().is_empty() {
        return Err(TokenReadError::Missing);
    }
    Ok(crate::token::EnrollToken::decode(&text)?)
}

/// Why no token could be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenReadError {
    /// The file or stream could not be read.
    #[error("cannot read the token from {0}: {1}")]
    Read(String, String),
    /// Nothing was given.
    #[error(
        "no token given: use --token-file FILE, PORTCULLIS_TOKEN, or pipe it to standard input"
    )]
    Missing,
    /// It is not a token.
    #[error(transparent)]
    Invalid(#[from] crate::token::TokenError),
}

/// Resolves `host:port` to its first address.
pub async fn resolve(relay: &str) -> Result<SocketAddr, EnrollError> {
    tokio::net::lookup_host(relay)
        .await
        .map_err(|e| EnrollError::Resolve(relay.to_owned(), e.to_string()))?
        .next()
        .ok_or_else(|| EnrollError::Resolve(relay.to_owned(), "no addresses".into()))
}

/// [`exchange`] with the first of `relays` that can be reached: a relay that does not
/// resolve or answer is skipped (its error is returned if none answers); a relay that
/// answers, even with a refusal, is the answer.
pub async fn exchange_any(
    relays: &[String],
    server_name: &str,
    ca_sha256: &str,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    request: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let mut last = EnrollError::Resolve(String::new(), "no relay given".into());
    for relay in relays {
        let auth = client_auth
            .as_ref()
            .map(|(certs, key)| (certs.clone(), key.clone_key()));
        match exchange(relay, server_name, ca_sha256, auth, request).await {
            Err(e @ (EnrollError::Resolve(..) | EnrollError::Connect(..))) => {
                tracing::warn!(relay = %relay, error = %e, "relay unreachable; trying the next");
                last = e;
            }
            other => return other,
        }
    }
    Err(last)
}

/// Sends one request on the enrolment ALPN. `client_auth` presents a certificate (renewal).
pub async fn exchange(
    relay: &str,
    server_name: &str,
    ca_sha256: &str,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    request: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let addr = resolve(relay).await?;
    let connect_err =
        |e: &dyn std::fmt::Display| EnrollError::Connect(relay.to_owned(), e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| connect_err(&e))?
    .dangerous()
    .with_custom_certificate_verifier(PinnedCaVerifier::new(ca_sha256));
    let mut tls = match client_auth {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| connect_err(&e))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| connect_err(&e))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(&e))?;
    let config = quinn::ClientConfig::new(Arc::new(quic));
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| connect_err(&e))?,
    )
    .await
    .map_err(|_| connect_err(&"timed out"))?
    .map_err(|e| connect_err(&e))?;
    let exchange_err =
        |e: &dyn std::fmt::Display| EnrollError::Exchange(relay.to_owned(), e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| exchange_err(&e))?;
    let body = serde_json::to_vec(request).map_err(|e| exchange_err(&e))?;
    send.write_all(&body).await.map_err(|e| exchange_err(&e))?;
    send.finish().map_err(|e| exchange_err(&e))?;
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(MAX_ENROLL_LEN))
        .await
        .map_err(|_| exchange_err(&"timed out"))?
        .map_err(|e| exchange_err(&e))?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    serde_json::from_slice(&answer).map_err(|e| exchange_err(&e))
}
