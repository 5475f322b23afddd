//! TLS to the PostgreSQL store, with rustls: the libpq `sslmode` and `sslrootcert` URL
//! parameters, read here (tokio-postgres knows neither `verify-ca` nor `verify-full`) and
//! turned into a connector for tokio-postgres.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` | if the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, its chain is (as libpq) |
//! | `verify-ca` | always | its chain, against `sslrootcert` (or the system's roots) |
//! | `verify-full` | always | its chain and the host name |
//!
//! Without `sslmode`, a host on loopback or a Unix socket gets `disable` (as before, for
//! a database beside the relay) and any other host `verify-full`: the store's password
//! never crosses a network in the clear, nor to a server that is not the one named.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// How the store's connection is protected, from the URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`.
    Disable,
    /// `prefer`.
    Prefer,
    /// `require`.
    Require,
    /// `verify-ca`.
    VerifyCa,
    /// `verify-full`.
    VerifyFull,
}

/// A store URL split into what tokio-postgres parses and what TLS needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsUrl {
    /// The URL without `sslmode` and `sslrootcert`.
    pub url: String,
    /// `sslmode`, if given.
    pub mode: Option<TlsMode>,
    /// `sslrootcert`, if given.
    pub root_cert: Option<PathBuf>,
}

/// Decodes `%XX` escapes (a path in a URL may carry them).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query.
///
/// # Errors
/// A sentence naming the bad value: an unknown `sslmode`, an undecodable `sslrootcert`.
pub fn split_url(url: &str) -> Result<TlsUrl, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(TlsUrl {
            url: url.to_owned(),
            mode: None,
            root_cert: None,
        });
    };
    let (mut mode, mut root_cert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                mode = Some(match value {
                    "disable" => TlsMode::Disable,
                    "prefer" | "allow" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                });
            }
            "sslrootcert" => {
                let path = percent_decode(value)
                    .ok_or_else(|| "sslrootcert is not a valid escaped path".to_owned())?;
                root_cert = Some(PathBuf::from(path));
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(TlsUrl {
        url,
        mode,
        root_cert,
    })
}

/// The mode in force for `hosts` (and the `hostaddr` addresses, which are what is dialled
/// when given) when the URL names none: `disable` when every one is on loopback or a Unix
/// socket, `verify-full` otherwise.
pub fn default_mode(hosts: &[Host], hostaddrs: &[std::net::IpAddr]) -> TlsMode {
    if hostaddrs.iter().any(|a| !a.is_loopback()) {
        return TlsMode::VerifyFull;
    }
    let local = |h: &Host| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    };
    if !hosts.is_empty() && hosts.iter().all(local) {
        TlsMode::Disable
    } else {
        TlsMode::VerifyFull
    }
}

/// tokio-postgres's own setting for `mode`.
pub fn ssl_mode(mode: TlsMode) -> SslMode {
    match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    }
}

/// What the server's certificate must satisfy.
#[derive(Debug)]
enum Check {
    /// Nothing: the connection is encrypted, not authenticated (libpq's `require`).
    Nothing,
    /// The chain, not the name.
    Chain,
}

/// Checks what [`Check`] asks of the server's certificate, and the handshake's
/// signatures always.
#[derive(Debug)]
struct Verifier {
    inner: Arc<dyn ServerCertVerifier>,
    check: Check,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check {
            Check::Nothing => Ok(ServerCertVerified::assertion()),
            Check::Chain => match self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            ) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls client settings for `mode` with `root_cert` (else the system's roots).
///
/// # Errors
/// A sentence when `root_cert` cannot be read or holds no usable certificate.
pub fn client_config(
    mode: TlsMode,
    root_cert: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    let roots =
        Arc::new(crate::pki::root_store(root_cert).map_err(|e| format!("sslrootcert: {e}"))?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings refused: {e}"))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let check = match mode {
        TlsMode::VerifyFull => return Ok(config),
        TlsMode::VerifyCa => Check::Chain,
        TlsMode::Require if root_cert.is_some() => Check::Chain,
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => Check::Nothing,
    };
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))?;
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(Verifier { inner, check }));
    Ok(config)
}

/// tokio-postgres's TLS connector over tokio-rustls.
#[derive(Clone)]
pub struct MakeRustls {
    connector: tokio_rustls::TlsConnector,
}

impl MakeRustls {
    /// A connector with `config`.
    pub fn new(config: rustls::ClientConfig) -> Self {
        Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        let name =
            ServerName::try_from(domain.trim_start_matches('[').trim_end_matches(']'))?.to_owned();
        Ok(RustlsConnect {
            connector: self.connector.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream to the store. No channel binding is offered: SCRAM then runs without
/// it (`channel_binding=require` in the URL would refuse the connection).
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S> tokio::io::AsyncRead for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S> tokio::io::AsyncWrite for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let t = split_url(
            "postgres://u:p@db.internal:5432/pc?sslmode=verify-full&application_name=x&sslrootcert=/etc/ca%20file.pem",
        )
        .unwrap();
        assert_eq!(
            t.url,
            "postgres://u:p@db.internal:5432/pc?application_name=x"
        );
        assert_eq!(t.mode, Some(TlsMode::VerifyFull));
        assert_eq!(t.root_cert, Some(PathBuf::from("/etc/ca file.pem")));
        let t = split_url("postgres://db/pc").unwrap();
        assert_eq!((t.mode, t.url.as_str()), (None, "postgres://db/pc"));
        let e = split_url("postgres://db/pc?sslmode=verify").unwrap_err();
        assert!(e.contains("sslmode=verify"), "{e}");
    }

    #[test]
    fn a_host_beyond_loopback_gets_verify_full_by_default() {
        let tcp = |h: &str| Host::Tcp(h.to_owned());
        let default_mode = |hosts: &[Host]| default_mode(hosts, &[]);
        assert_eq!(default_mode(&[tcp("db.internal")]), TlsMode::VerifyFull);
        assert_eq!(default_mode(&[tcp("10.0.0.5")]), TlsMode::VerifyFull);
        assert_eq!(
            default_mode(&[tcp("127.0.0.1"), tcp("db.internal")]),
            TlsMode::VerifyFull
        );
        assert_eq!(default_mode(&[tcp("127.0.0.1")]), TlsMode::Disable);
        assert_eq!(default_mode(&[tcp("[::1]")]), TlsMode::Disable);
        assert_eq!(default_mode(&[tcp("localhost")]), TlsMode::Disable);
        assert_eq!(
            default_mode(&[Host::Unix("/run/postgresql".into())]),
            TlsMode::Disable
        );
    }
}
