//! A rustls client-certificate verifier that adds what webpki leaves out: the certificate
//! must carry the client-auth EKU, name exactly one identity of an allowed role, and that
//! identity must pass the relay's live registry check (not revoked, current serial).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{PkiError, inspect};
use crate::identity::{Identity, Role};

/// The relay's live view of identities, consulted on every handshake.
pub trait IdentityCheck: Send + Sync + fmt::Debug {
    /// `Ok` if `identity` with certificate `serial` for the key with fingerprint
    /// `key_sha256` may connect now; otherwise the reason, for the log.
    fn check(&self, identity: &Identity, serial: &str, key_sha256: &str) -> Result<(), String>;
}

#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(reason: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        reason,
    )))))
}

/// Verifies client certificates against the org CA, their role and the registry.
#[derive(Debug)]
pub struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// The CA's intermediates, added to what a client presents (a browser's PKCS#12 may
    /// hold only its leaf).
    intermediates: Vec<CertificateDer<'static>>,
    roles: Vec<Role>,
    check: Arc<dyn IdentityCheck>,
    mandatory: bool,
}

impl RoleVerifier {
    /// A verifier accepting certificates issued by `ca` for one of `roles`. With
    /// `mandatory` false, a client may connect without a certificate (the relay then
    /// answers 403 to everything but public endpoints).
    pub fn new(
        ca: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
        roles: &[Role],
        check: Arc<dyn IdentityCheck>,
        mandatory: bool,
    ) -> Result<Arc<Self>, PkiError> {
        let mut store = RootCertStore::empty();
        store
            .add(ca.clone())
            .map_err(|e| PkiError::Parse(format!("CA certificate: {e}")))?;
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Parse(format!("client verifier: {e}")))?;
        Ok(Arc::new(Self {
            inner,
            intermediates: intermediates.to_vec(),
            roles: roles.to_vec(),
            check,
            mandatory,
        }))
    }
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let mut chain: Vec<CertificateDer<'_>> = intermediates.to_vec();
        chain.extend(self.intermediates.iter().cloned());
        let verified = self
            .inner
            .verify_client_cert(end_entity, &chain, now)
            .inspect_err(|e| tracing::info!(reason = %e, "client certificate refused"))?;
        let info = inspect(end_entity).map_err(|e| refuse(e.to_string()))?;
        let result = match &info.identity {
            None => Err("certificate names no Portcullis identity".to_owned()),
            Some(_) if !info.client_auth => {
                Err("certificate lacks the client-authentication EKU".to_owned())
            }
            Some(id) if !self.roles.contains(&id.role()) => {
                Err(format!("a {} certificate cannot be used here", id.role()))
            }
            Some(id) => self.check.check(id, &info.serial, &info.key_sha256),
        };
        match result {
            Ok(()) => Ok(verified),
            Err(reason) => {
                tracing::info!(
                    identity = info.identity.as_ref().map(tracing::field::display),
                    %reason,
                    "client certificate refused"
                );
                Err(refuse(reason))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
