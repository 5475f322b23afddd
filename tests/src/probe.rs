//! A TLS probe of the relay's HTTPS port, as a stranger or a device sees it: which
//! certificate the relay presents for a name (checked by the test, not by the client), and
//! what a request on that connection gets.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::World;

/// What one probe saw.
#[derive(Debug)]
pub struct Probe {
    /// The DNS names in the certificate the relay presented.
    pub names: Vec<String>,
    /// The status of `GET /` with `Host` set to the probed name, if a response came.
    pub status: Option<u16>,
}

/// Records the presented certificate and accepts it; signatures are still checked.
#[derive(Debug)]
struct Recorder {
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The DNS names in a DER certificate's subject alternative names.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// Connects to `https` with SNI `sni` (HTTP/1.1), as device `device` if given, offering
/// only `versions`; returns the presented certificate's names and the status of `GET /`
/// for `sni`. An error if the handshake fails.
pub async fn tls_probe(
    w: &World,
    https: std::net::SocketAddr,
    sni: &str,
    device: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Probe> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(None));
    let recorder = Arc::new(Recorder {
        seen: seen.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(recorder);
    let mut cfg = match device {
        Some(d) => {
            let out = w.path("out");
            let certs = CertificateDer::pem_file_iter(out.join(format!("{d}.crt")))?
                .collect::<Result<Vec<_>, _>>()?;
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(out.join(format!("{d}.key")))?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(https).await?;
    let name = ServerName::try_from(sni.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let names = seen
        .lock()
        .unwrap()
        .as_deref()
        .map(dns_names)
        .unwrap_or_default();
    let status = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header(http::header::HOST, sni)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        anyhow::Ok(status)
    }
    .await
    .ok();
    Ok(Probe { names, status })
}
