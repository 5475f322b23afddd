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
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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
/// answers, even with a refusal, is the answer. `tcp_port`: the relays' HTTPS port, for
/// the fallback over TLS on TCP (`None`: the QUIC port).
pub async fn exchange_any(
    relays: &[String],
    tcp_port: Option<u16>,
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
        match exchange(relay, tcp_port, server_name, ca_sha256, auth, request).await {
            Err(e @ (EnrollError::Resolve(..) | EnrollError::Connect(..))) => {
                tracing::warn!(relay = %relay, error = %e, "relay unreachable; trying the next");
                last = e;
            }
            other => return other,
        }
    }
    Err(last)
}

/// Where to renew a certificate and with what: the relays (as in [`exchange_any`]), the
/// pinned CA and the current certificate chain and key.
pub struct Renewal<'a> {
    /// The relays, `host:port`, tried in order.
    pub relays: &'a [String],
    /// The relays' HTTPS port for the fallback over TCP (`None`: the QUIC port).
    pub tcp_port: Option<u16>,
    /// The relays' TLS name.
    pub server_name: &'a str,
    /// SHA-256 (hex) of the organisation CA the relay's certificate must come from.
    pub ca_sha256: &'a str,
    /// The certificate held now (its chain), presented as client authentication.
    pub certs: Vec<CertificateDer<'static>>,
    /// Its private key, kept: the renewed certificate is for the same key.
    pub key: PrivateKeyDer<'static>,
}

/// Why a renewal did not give a certificate.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The certificate, key or answer cannot be used.
    #[error("{0}")]
    Local(String),
    /// No relay could be asked.
    #[error(transparent)]
    Exchange(#[from] EnrollError),
    /// The relay said no, with its reason.
    #[error("the relay refused renewal: {0}")]
    Refused(String),
}

/// Renews the certificate of `r` for the same key: a CSR sent on the enrolment ALPN with
/// the current certificate as client authentication. Returns the new certificate (PEM),
/// checked to be for that key, and its expiry (Unix seconds).
pub async fn renew(r: Renewal<'_>) -> Result<(String, i64), RenewError> {
    let local = |e: crate::pki::PkiError| RenewError::Local(e.to_string());
    let leaf = r
        .certs
        .first()
        .ok_or_else(|| RenewError::Local("no certificate to renew".into()))?;
    let info = crate::pki::inspect(leaf).map_err(local)?;
    let identity = info
        .identity
        .clone()
        .ok_or_else(|| RenewError::Local("the certificate names no identity".into()))?;
    let csr = crate::pki::csr_for_existing_key(&identity, r.key.secret_der()).map_err(local)?;
    let answer = exchange_any(
        r.relays,
        r.tcp_port,
        r.server_name,
        r.ca_sha256,
        Some((r.certs.clone(), r.key.clone_key())),
        &EnrollRequest::Renew { csr },
    )
    .await?;
    let (cert, not_after) = match answer {
        EnrollResponse::Issued {
            cert, not_after, ..
        } => (cert, not_after),
        EnrollResponse::Refused { reason } => return Err(RenewError::Refused(reason)),
    };
    // Never hand on what would not load: the answer must be a certificate for this key.
    let issued = <CertificateDer<'static> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        cert.as_bytes(),
    )
    .next()
    .ok_or_else(|| RenewError::Local("the relay's answer holds no certificate".into()))?
    .map_err(|e| RenewError::Local(format!("the relay's answer is not PEM: {e}")))?;
    let issued = crate::pki::inspect(&issued).map_err(local)?;
    if issued.key_sha256 != info.key_sha256 {
        return Err(RenewError::Local(
            "the relay's answer is for another key".into(),
        ));
    }
    Ok((cert, not_after))
}

/// How long a QUIC handshake may take before enrolment goes over TLS on TCP instead.
const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends one request on the enrolment ALPN: over QUIC, or where QUIC cannot connect (UDP
/// blocked), over TLS on TCP to the relay's HTTPS port (`tcp_port`, else the QUIC port).
/// `client_auth` presents a certificate (renewal).
pub async fn exchange(
    relay: &str,
    tcp_port: Option<u16>,
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
    let tls = Arc::new(tls);
    let body = serde_json::to_vec(request)
        .map_err(|e| EnrollError::Exchange(relay.to_owned(), e.to_string()))?;
    match over_quic(relay, addr, server_name, tls.clone(), &body).await {
        Err(EnrollError::Connect(_, quic_error)) => {
            let tcp = SocketAddr::new(addr.ip(), tcp_port.unwrap_or(addr.port()));
            tracing::info!(relay = %relay, error = %quic_error, "QUIC to the relay failed; enrolling over TLS on TCP to {tcp}");
            over_tcp(relay, tcp, server_name, tls, &body)
                .await
                .map_err(|e| match e {
                    EnrollError::Connect(r, tcp_error) => {
                        EnrollError::Connect(r, format!("{quic_error}; over TCP: {tcp_error}"))
                    }
                    other => other,
                })
        }
        other => other,
    }
}

async fn over_quic(
    relay: &str,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &[u8],
) -> Result<EnrollResponse, EnrollError> {
    let connect_err =
        |e: &dyn std::fmt::Display| EnrollError::Connect(relay.to_owned(), e.to_string());
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
        QUIC_CONNECT_TIMEOUT,
        endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| connect_err(&e))?,
    )
    .await
    .map_err(|_| connect_err(&"QUIC handshake timed out"))?
    .map_err(|e| connect_err(&e))?;
    let exchange_err =
        |e: &dyn std::fmt::Display| EnrollError::Exchange(relay.to_owned(), e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| exchange_err(&e))?;
    send.write_all(body).await.map_err(|e| exchange_err(&e))?;
    send.finish().map_err(|e| exchange_err(&e))?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv.read_to_end(MAX_ENROLL_LEN))
        .await
        .map_err(|_| exchange_err(&"timed out"))?
        .map_err(|e| exchange_err(&e))?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    serde_json::from_slice(&answer).map_err(|e| exchange_err(&e))
}

/// The same exchange on a TLS connection to the relay's HTTPS port: the request and the
/// answer each prefixed by their length.
async fn over_tcp(
    relay: &str,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &[u8],
) -> Result<EnrollResponse, EnrollError> {
    let connect_err =
        |e: &dyn std::fmt::Display| EnrollError::Connect(relay.to_owned(), e.to_string());
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| connect_err(&e))?;
    let mut stream = tokio::time::timeout(TCP_CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
    })
    .await
    .map_err(|_| connect_err(&"TLS over TCP timed out"))?
    .map_err(|e| connect_err(&e))?;
    let exchange_err =
        |e: &dyn std::fmt::Display| EnrollError::Exchange(relay.to_owned(), e.to_string());
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
        crate::tunnel_io::write_prefixed(&mut stream, body).await?;
        crate::tunnel_io::read_prefixed(&mut stream, MAX_ENROLL_LEN).await
    })
    .await
    .map_err(|_| exchange_err(&"timed out"))?
    .map_err(|e| exchange_err(&e))?;
    serde_json::from_slice(&answer).map_err(|e| exchange_err(&e))
}
