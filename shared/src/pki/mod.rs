//! The organisation CA and everything made from it: device and connector certificates,
//! the relay's server leaves, PKCS#12 bundles, and the rustls verifier that checks a
//! client certificate's role.
//!
//! The CA key lives in the relay's state directory (`ca.key`, mode 0600) and never leaves
//! it. Certificates name their holder in a SAN URI (see [`crate::identity`]). Storage of
//! who holds what is [`crate::store`]'s job, not this module's.

mod files;
mod verify;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::identity::{Identity, IdentityError};

pub use files::{
    force_private_dir, load_certs, load_key, root_store, server_verifying_client, system_roots,
    write_new_private_file, write_private_file, write_public_file,
};
pub use verify::{IdentityCheck, RoleVerifier};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `ca init` found a CA already in the state directory.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    CaExists(PathBuf),
    /// No CA in the state directory.
    #[error("no CA in {0}: run `portcullis-relay ca init --state {0}` first")]
    NoCa(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rcgen refused to build a certificate or key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("unparseable certificate: {0}")]
    Parse(String),
    /// Building the PKCS#12 bundle failed.
    #[error("PKCS#12 bundle: {0}")]
    Pkcs12(String),
    /// A certificate signing request was refused.
    #[error("certificate request refused: {0}")]
    Csr(String),
    /// The requested validity ends after the year 9999.
    #[error("the requested lifetime is too long: choose a --ttl that ends before the year 9999")]
    TtlTooLong,
    /// A server name outside the CA's name constraints: clients would refuse the
    /// certificate, so it is not issued.
    #[error(
        "{name} is outside the organisation CA's permitted domains ({permitted}): devices would refuse its certificate; publish names under them, or create the CA with --permit-dns for this domain"
    )]
    NameNotPermitted {
        /// The name asked for.
        name: String,
        /// The CA's permitted DNS subtrees, comma-separated.
        permitted: String,
    },
    /// A `--permit-dns` domain that is not a DNS name.
    #[error("--permit-dns {0}: not a DNS domain (give it as .example.com or example.com)")]
    BadPermittedDomain(String),
    /// An id or hostname is not valid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// File names inside the state directory. The root certificate devices and connectors
/// trust (the only CA certificate of a state directory made before the root was split
/// off).
pub const CA_CERT_FILE: &str = "ca.crt";
/// The online signer's private key, mode 0600: the intermediate's (the CA's own in a
/// state directory made before the split).
pub const CA_KEY_FILE: &str = "ca.key";
/// The intermediate certificate the relay signs with, issued by the root.
pub const CA_INTERMEDIATE_FILE: &str = "ca-intermediate.crt";
/// The root's private key, mode 0600, until `ca remove-root-key` takes it off the host.
pub const CA_ROOT_KEY_FILE: &str = "ca-root.key";

/// A freshly issued certificate.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, when the CA generated it (not when it signed a CSR).
    pub key: Option<GeneratedKey>,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// SHA-256 of the certificate's public key, hex.
    pub key_sha256: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// A private key the CA generated for a certificate.
#[derive(Debug)]
pub struct GeneratedKey {
    /// PKCS#8 PEM. Write it with [`write_private_file`].
    pub pem: String,
    /// PKCS#8 DER.
    pub der: Vec<u8>,
}

/// The organisation CA, loaded from the state directory: a root (which devices and
/// connectors trust, its key kept offline once removed) and an intermediate the relay
/// signs with; or, in a state directory made before the split, one CA that is both.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The intermediate between issued certificates and the root (empty without one).
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    /// The DNS subtrees the CA's name constraints permit (no leading dot); `None` for a
    /// CA without name constraints.
    permitted_dns: Option<Vec<String>>,
}

/// The X.509 name constraints of a CA limited to `domains`: server names only under them,
/// and no IP address at all (IPv4 and IPv6 excluded whole), so a device that trusts the
/// CA cannot be impersonated for any other site. Client identities (SAN URIs) are not
/// constrained.
fn name_constraints(domains: &[String]) -> rcgen::NameConstraints {
    rcgen::NameConstraints {
        permitted_subtrees: domains
            .iter()
            .map(|d| rcgen::GeneralSubtree::DnsName(d.clone()))
            .collect(),
        excluded_subtrees: vec![
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
        ],
    }
}

/// `--permit-dns` domains as they go into the certificate: lower case, without the
/// leading dot (an RFC 5280 DNS constraint covers the domain and every name below it).
fn permitted_domains(domains: &[String]) -> Result<Vec<String>, PkiError> {
    let mut out = Vec::new();
    for d in domains {
        let bare = d.strip_prefix('.').unwrap_or(d).to_ascii_lowercase();
        crate::identity::Hostname::parse(&bare)
            .map_err(|_| PkiError::BadPermittedDomain(d.clone()))?;
        if !out.contains(&bare) {
            out.push(bare);
        }
    }
    Ok(out)
}

/// The permitted DNS subtrees in a CA certificate's name constraints, if it has any.
fn read_permitted_dns(cert_der: &[u8]) -> Result<Option<Vec<String>>, PkiError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    for ext in cert.extensions() {
        if let ParsedExtension::NameConstraints(nc) = ext.parsed_extension() {
            let dns = nc
                .permitted_subtrees
                .iter()
                .flatten()
                .filter_map(|s| match &s.base {
                    GeneralName::DNSName(d) => Some(d.trim_start_matches('.').to_ascii_lowercase()),
                    _ => None,
                })
                .collect();
            return Ok(Some(dns));
        }
    }
    Ok(None)
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA in `state_dir` (created if missing, and made 0700 either way).
    /// Refuses if one exists.
    pub fn init(state_dir: &Path, org: &str) -> Result<Self, PkiError> {
        Self::init_constrained(state_dir, org, &[])
    }

    /// Like [`Ca::init`], with X.509 name constraints when `permit_dns` names domains
    /// (`.internal`, `corp.example.com`): the CA then vouches for server names only under
    /// them, and for no IP address. Fails with [`PkiError::BadPermittedDomain`] for a
    /// domain that is not a DNS name.
    pub fn init_constrained(
        state_dir: &Path,
        org: &str,
        permit_dns: &[String],
    ) -> Result<Self, PkiError> {
        let permitted = permitted_domains(permit_dns)?;
        let key_path = state_dir.join(CA_KEY_FILE);
        if key_path.exists() || state_dir.join(CA_CERT_FILE).exists() {
            return Err(PkiError::CaExists(state_dir.to_owned()));
        }
        files::create_private_dir(state_dir)?;
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(
            &format!("{org} Portcullis Root CA"),
            org,
            1,
            &permitted,
            time::Duration::days(3650),
        );
        let root = root_params.self_signed(&root_key)?;
        // create_new: two concurrent `ca init` runs cannot overwrite each other's key.
        write_new_private_file(
            &state_dir.join(CA_ROOT_KEY_FILE),
            root_key.serialize_pem().as_bytes(),
        )
        .map_err(|e| match e {
            PkiError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                PkiError::CaExists(state_dir.to_owned())
            }
            other => other,
        })?;
        write_public_file(&state_dir.join(CA_CERT_FILE), root.pem().as_bytes())?;
        let root_issuer = Issuer::new(root_params, root_key);
        Self::make_intermediate(state_dir, &root_issuer, org, &permitted)?;
        Self::load(state_dir)
    }

    /// A new intermediate signed by `root`, written as the online signer (its key
    /// [`CA_KEY_FILE`], its certificate [`CA_INTERMEDIATE_FILE`]).
    fn make_intermediate(
        state_dir: &Path,
        root: &Issuer<'_, KeyPair>,
        org: &str,
        permitted: &[String],
    ) -> Result<(), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(
            &format!("{org} Portcullis Intermediate CA"),
            org,
            0,
            permitted,
            time::Duration::days(5 * 365),
        );
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, root)?;
        write_private_file(&state_dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes())?;
        write_public_file(&state_dir.join(CA_INTERMEDIATE_FILE), cert.pem().as_bytes())?;
        Ok(())
    }

    /// `ca rotate-intermediate`: a new intermediate signed with the root key in
    /// `root_key` (PEM), keeping the root's name constraints. Devices and connectors trust
    /// the root, so nothing needs enrolling again; certificates already issued keep
    /// verifying through the intermediate they carry. Restart the relays to sign with it.
    ///
    /// # Errors
    /// A key that is not the root's, a state directory without a split root, I/O.
    pub fn rotate_intermediate(state_dir: &Path, root_key: &Path) -> Result<(), PkiError> {
        let root_path = state_dir.join(CA_CERT_FILE);
        if !state_dir.join(CA_INTERMEDIATE_FILE).exists() {
            return Err(PkiError::BadFile {
                path: root_path,
                what: "this CA has no intermediate (it was made before the root was split off): there is nothing to rotate".into(),
            });
        }
        let key = KeyPair::from_pem(&files::read_to_string(root_key)?).map_err(|e| {
            PkiError::BadFile {
                path: root_key.to_owned(),
                what: format!("not a usable private key ({e})"),
            }
        })?;
        let root_der =
            load_certs(&root_path)?
                .into_iter()
                .next()
                .ok_or_else(|| PkiError::BadFile {
                    path: root_path.clone(),
                    what: "no certificate in file".into(),
                })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        if *parsed.public_key().subject_public_key.data != *key.public_key_raw() {
            return Err(PkiError::BadFile {
                path: root_key.to_owned(),
                what: format!("not the key of the root in {}", root_path.display()),
            });
        }
        let org = parsed
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .unwrap_or("Portcullis")
            .to_owned();
        let permitted = read_permitted_dns(&root_der)?.unwrap_or_default();
        let root = Issuer::from_ca_cert_der(&root_der, key).map_err(|e| PkiError::BadFile {
            path: root_path,
            what: format!("not a usable CA certificate ({e})"),
        })?;
        Self::make_intermediate(state_dir, &root, &org, &permitted)
    }

    /// Loads the CA from `state_dir`, and makes the directory private (0700) if it is
    /// not.
    pub fn load(state_dir: &Path) -> Result<Self, PkiError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        if !key_path.exists() {
            return Err(PkiError::NoCa(state_dir.to_owned()));
        }
        force_private_dir(state_dir);
        let key_pem = files::read_to_string(&key_path)?;
        let cert_pem = files::read_to_string(&cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadFile {
            path: key_path.clone(),
            what: format!("not a usable private key ({e})"),
        })?;
        let cert_der =
            load_certs(&cert_path)?
                .into_iter()
                .next()
                .ok_or_else(|| PkiError::BadFile {
                    path: cert_path.clone(),
                    what: "no certificate in file".into(),
                })?;
        let permitted_dns = read_permitted_dns(&cert_der)?;
        // The online signer: the intermediate where there is one, else the CA itself.
        let intermediate_path = state_dir.join(CA_INTERMEDIATE_FILE);
        let (signer_path, signer_der, chain, chain_pem) = if intermediate_path.exists() {
            let pem = files::read_to_string(&intermediate_path)?;
            let der = load_certs(&intermediate_path)?
                .into_iter()
                .next()
                .ok_or_else(|| PkiError::BadFile {
                    path: intermediate_path.clone(),
                    what: "no certificate in file".into(),
                })?;
            (intermediate_path, der.clone(), vec![der], pem)
        } else {
            (cert_path, cert_der.clone(), Vec::new(), String::new())
        };
        let issuer = Issuer::from_ca_cert_der(&signer_der, key).map_err(|e| PkiError::BadFile {
            path: signer_path,
            what: format!("not a usable CA certificate, or not the key's ({e})"),
        })?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
            chain,
            chain_pem,
            permitted_dns,
        })
    }

    /// The CA certificate, PEM, as clients and connectors trust it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificates between an issued certificate and the root (the intermediate),
    /// DER: sent with every certificate the relay presents, and added to every chain it
    /// verifies. Empty for a CA made before the root was split off.
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The domains the CA's name constraints permit server names under; `None` for a CA
    /// without name constraints (it vouches for any name).
    pub fn permitted_dns(&self) -> Option<&[String]> {
        self.permitted_dns.as_deref()
    }

    /// Checks that a server name (or `*.pattern`) is one the CA may vouch for.
    ///
    /// # Errors
    /// [`PkiError::NameNotPermitted`] when the CA's name constraints leave it out.
    pub fn check_server_name(&self, name: &str) -> Result<(), PkiError> {
        let Some(permitted) = &self.permitted_dns else {
            return Ok(());
        };
        let bare = name.strip_prefix("*.").unwrap_or(name).to_ascii_lowercase();
        let under = |d: &String| bare == *d || bare.ends_with(&format!(".{d}"));
        if permitted.iter().any(under) {
            Ok(())
        } else {
            Err(PkiError::NameNotPermitted {
                name: name.to_owned(),
                permitted: permitted.join(", "),
            })
        }
    }

    /// Issues a client certificate for `identity`, valid for `ttl`, with a new P-256 key.
    /// Its SAN URI names the identity and its EKU is client authentication only.
    pub fn issue_client(&self, identity: &Identity, ttl: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut issued = self.sign(client_params(identity)?, &key, ttl)?;
        issued.key = Some(GeneratedKey {
            pem: key.serialize_pem(),
            der: key.serialize_der(),
        });
        Ok(issued)
    }

    /// Issues a client certificate for `identity` to the key in a PEM certificate signing
    /// request. The CSR's signature must verify (proof the requester holds the key) and
    /// any names it asks for must be exactly `identity`'s URI; its other contents are
    /// ignored: what the certificate says is decided here.
    pub fn issue_for_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(format!("not a valid, self-signed CSR ({e})")))?;
        let wanted = identity.uri();
        for san in &csr.params.subject_alt_names {
            let ok = matches!(san, SanType::URI(uri) if uri.as_str() == wanted);
            if !ok {
                return Err(PkiError::Csr(format!(
                    "the CSR asks for names other than {wanted}"
                )));
            }
        }
        self.sign(client_params(identity)?, &csr.public_key, ttl)
    }

    /// Mints a server certificate for `hostnames` (the relay's own name and the published
    /// names it terminates TLS for).
    pub fn issue_server(&self, hostnames: &[String], ttl: Duration) -> Result<Issued, PkiError> {
        for name in hostnames {
            self.check_server_name(name)?;
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(hostnames.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(first) = hostnames.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut issued = self.sign(params, &key, ttl)?;
        issued.key = Some(GeneratedKey {
            pem: key.serialize_pem(),
            der: key.serialize_der(),
        });
        Ok(issued)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = time::Duration::try_from(ttl)
            .ok()
            .and_then(|d| now.checked_add(d))
            .filter(|t| t.year() <= 9999)
            .ok_or(PkiError::TtlTooLong)?;
        params.use_authority_key_identifier_extension = true;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let cert = params.signed_by(key, &self.issuer)?;
        let info = inspect(cert.der())?;
        Ok(Issued {
            // The leaf and the intermediate: what a client presents, and what a file holds.
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_der: cert.der().clone(),
            key: None,
            serial: serial_hex,
            key_sha256: info.key_sha256,
            not_after: params.not_after.unix_timestamp(),
        })
    }
}

/// The parameters of a CA certificate: `cn` and `org` as its name, `path_len` CAs
/// allowed below it, valid for `validity`, with name constraints when `permitted` names
/// domains.
fn ca_params(
    cn: &str,
    org: &str,
    path_len: u8,
    permitted: &[String],
    validity: time::Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
    params.serial_number = Some(random_serial().0);
    if !permitted.is_empty() {
        params.name_constraints = Some(name_constraints(permitted));
    }
    params
}

/// How far before its issue every certificate's validity starts, for clocks a little
/// behind the CA's. A certificate's lifetime, as renewal counts it, starts this long after
/// its `not_before`.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

fn client_params(identity: &Identity) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.id());
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// A new P-256 key and a CSR for `identity` signed with it: what a device or connector
/// sends to enrol. Returns (key PKCS#8 DER, CSR PEM).
pub fn generate_csr(identity: &Identity) -> Result<(Vec<u8>, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    csr_for_key(identity, &key).map(|csr| (key.serialize_der(), csr))
}

/// Checks an enrolment CSR before anything is spent on it: well-formed, its signature
/// verifies (the requester holds the key), and it names nobody (the relay decides the
/// identity from the token; a CSR asking for a name is trying to choose its own).
pub fn check_enrolment_csr(csr_pem: &str) -> Result<(), PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Csr(format!("not a valid, self-signed CSR ({e})")))?;
    if !csr.params.subject_alt_names.is_empty() {
        return Err(PkiError::Csr(
            "an enrolment CSR must not name an identity: the token decides it".into(),
        ));
    }
    Ok(())
}

/// A new P-256 key and a CSR naming nobody: for enrolment, where the relay decides the
/// identity from the token. Returns (key PKCS#8 DER, CSR PEM).
pub fn generate_enrolment_csr() -> Result<(Vec<u8>, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_der();
    let csr = enrolment_csr_for_key(&key)?;
    Ok((key, csr))
}

/// An enrolment CSR (naming no identity) signed with an existing PKCS#8 key: a retried
/// enrolment asks with the key it made before.
pub fn enrolment_csr_for_key(key_der: &[u8]) -> Result<String, PkiError> {
    let key = KeyPair::try_from(key_der)
        .map_err(|e| PkiError::Csr(format!("unusable private key ({e})")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "portcullis enrolment");
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A CSR for `identity` signed with an existing PKCS#8 key (renewal keeps the key).
pub fn csr_for_existing_key(identity: &Identity, key_der: &[u8]) -> Result<String, PkiError> {
    let key = KeyPair::try_from(key_der)
        .map_err(|e| PkiError::Csr(format!("unusable private key ({e})")))?;
    csr_for_key(identity, &key)
}

fn csr_for_key(identity: &Identity, key: &KeyPair) -> Result<String, PkiError> {
    // The same fields the certificate will have; the CA decides them anyway.
    Ok(client_params(identity)?.serialize_request(key)?.pem()?)
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails if the OS has no entropy source; a zero serial is then still
    // unique enough combined with the key, and never a panic.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    (SerialNumber::from_slice(&bytes), hex(&bytes))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    push_hex(&mut out, bytes);
    out
}

/// Appends the lower-case hex of `bytes` to `out`, without an allocation of its own:
/// trace ids are written several times per request.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// What the relay needs to know about a presented certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The identity named by the certificate's SAN URI, if it has exactly one valid one.
    pub identity: Option<Identity>,
    /// The DNS names it is for (subject alternative names), lower case.
    pub dns_names: Vec<String>,
    /// Whether the EKU extension is present and includes client authentication.
    pub client_auth: bool,
    /// Serial number, lower-case hex without leading zero bytes.
    pub serial: String,
    /// SHA-256 of the subject public key info, hex.
    pub key_sha256: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// Whether a server certificate for `dns_names` is valid for every name `pattern` stands
/// for, as a TLS client judges: an exact name by an equal name or a wildcard one label
/// above it, `*.suffix` by the same wildcard.
pub fn certificate_covers(dns_names: &[String], pattern: &crate::identity::HostPattern) -> bool {
    use crate::identity::HostPattern;
    match pattern {
        HostPattern::Exact(host) => {
            let host = host.as_str();
            dns_names.iter().any(|n| {
                n == host
                    || n.strip_prefix("*.").is_some_and(|suffix| {
                        host.split_once('.').is_some_and(|(_, rest)| rest == suffix)
                    })
            })
        }
        HostPattern::Wildcard(suffix) => {
            let wildcard = format!("*.{}", suffix.as_str());
            dns_names.contains(&wildcard)
        }
    }
}

/// Parses the fields of a certificate that decide what it may be used for.
pub fn inspect(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let identity = match uris.as_slice() {
        [one] => Identity::from_uri(one).ok(),
        _ => None,
    };
    let client_auth = matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
    let raw = cert.raw_serial();
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        identity,
        dns_names,
        client_auth,
        serial: hex(&raw[first..]),
        key_sha256: hex(
            ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw).as_ref(),
        ),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Builds a PKCS#12 bundle (empty password, PBES2/AES-256, HMAC-SHA256) holding the key,
/// its certificate and the CA, for importing into a browser or keychain.
pub fn pkcs12(
    alias: &str,
    cert: &CertificateDer<'_>,
    key_der: &[u8],
    cas: &[CertificateDer<'_>],
) -> Result<Vec<u8>, PkiError> {
    let err = |e: p12_keystore::error::Error| PkiError::Pkcs12(e.to_string());
    let key = p12_keystore::PrivateKey::from_der(key_der).map_err(err)?;
    let mut certs = vec![p12_keystore::Certificate::from_der(cert).map_err(err)?];
    for ca in cas {
        certs.push(p12_keystore::Certificate::from_der(ca).map_err(err)?);
    }
    let chain = p12_keystore::PrivateKeyChain::new(alias, key, certs);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(alias, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    store.writer("").write().map_err(err)
}

/// Wraps a PKCS#8 DER key for rustls.
pub fn pkcs8(der: Vec<u8>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
}

/// PEM of a PKCS#8 DER private key.
pub fn pkcs8_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn issued_client_certs_carry_role_and_client_auth() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(&dir.path().join("state"), "Acme").unwrap();
        let id = Identity::new(Role::Device, "alice").unwrap();
        let issued = ca.issue_client(&id, Duration::from_secs(3600)).unwrap();
        let info = inspect(&issued.cert_der).unwrap();
        assert_eq!(info.identity, Some(id));
        assert!(info.client_auth);
        assert_eq!(info.serial, issued.serial.trim_start_matches("00"));
    }

    #[test]
    fn server_certs_have_no_identity_and_no_client_auth() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "Acme").unwrap();
        let issued = ca
            .issue_server(&["relay.acme.test".into()], Duration::from_secs(60))
            .unwrap();
        let info = inspect(&issued.cert_der).unwrap();
        assert_eq!(info.identity, None);
        assert!(!info.client_auth);
    }

    #[test]
    fn ca_init_refuses_to_overwrite_and_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "Acme").unwrap();
        assert!(matches!(
            Ca::init(dir.path(), "Acme"),
            Err(PkiError::CaExists(_))
        ));
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let id = Identity::new(Role::Connector, "c1").unwrap();
        assert!(loaded.issue_client(&id, Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn load_without_ca_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ca init"), "{err}");
    }

    #[test]
    fn private_files_are_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Ca::init(dir.path(), "Acme").unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn csrs_get_certificates_for_the_granted_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "Acme").unwrap();
        let alice = Identity::new(Role::Device, "alice-laptop").unwrap();
        let (key, csr) = generate_csr(&alice).unwrap();
        let issued = ca
            .issue_for_csr(&alice, &csr, Duration::from_secs(60))
            .unwrap();
        let info = inspect(&issued.cert_der).unwrap();
        assert_eq!(info.identity, Some(alice.clone()));
        assert!(issued.key.is_none());
        // Renewal with the same key keeps the key fingerprint.
        let again = csr_for_existing_key(&alice, &key).unwrap();
        let renewed = ca
            .issue_for_csr(&alice, &again, Duration::from_secs(60))
            .unwrap();
        assert_eq!(renewed.key_sha256, issued.key_sha256);
        assert_ne!(renewed.serial, issued.serial);
        // A CSR naming someone else is refused; garbage is refused.
        let mallory = Identity::new(Role::Device, "mallory").unwrap();
        assert!(matches!(
            ca.issue_for_csr(&mallory, &csr, Duration::from_secs(60)),
            Err(PkiError::Csr(_))
        ));
        assert!(
            ca.issue_for_csr(&alice, "not a csr", Duration::from_secs(60))
                .is_err()
        );
    }

    #[test]
    fn pkcs12_bundle_is_produced() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "Acme").unwrap();
        let id = Identity::new(Role::Device, "alice").unwrap();
        let issued = ca.issue_client(&id, Duration::from_secs(60)).unwrap();
        let key = issued.key.as_ref().unwrap();
        let p12 = pkcs12(
            "alice",
            &issued.cert_der,
            &key.der,
            std::slice::from_ref(ca.cert_der()),
        )
        .unwrap();
        let back = p12_keystore::KeyStore::from_pkcs12(
            &p12,
            "",
            p12_keystore::Pkcs12ImportPolicy::default(),
        )
        .unwrap();
        assert!(back.private_key_chain().is_some());
    }
}

#[cfg(test)]
mod name_constraint_tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Whether a client trusting only `ca` accepts `leaf` for `name`, as rustls does.
    fn accepted(ca: &Ca, leaf: &Issued, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert_der,
                ca.chain_der(),
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(drop)
    }

    /// A server certificate for `names`, signed with the CA's key without the CA's own
    /// check: what a thief of the key could make.
    fn forged(ca: &Ca, names: &[&str]) -> Issued {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        ca.sign(params, &key, DAY).unwrap()
    }

    #[test]
    fn a_name_constrained_ca_vouches_only_for_its_domains() {
        let dir = tempfile::tempdir().unwrap();
        let permit = [".internal".to_owned(), "Corp.Example.com".to_owned()];
        Ca::init_constrained(dir.path(), "Acme", &permit).unwrap();
        // The constraints are in the certificate: a reload reads them back.
        let ca = Ca::load(dir.path()).unwrap();
        assert_eq!(
            ca.permitted_dns(),
            Some(&["internal".to_owned(), "corp.example.com".to_owned()][..])
        );
        // Inside: issued, and accepted.
        for (name, sni) in [
            ("app.internal", "app.internal"),
            ("*.eng.internal", "ci.eng.internal"),
            ("git.corp.example.com", "git.corp.example.com"),
        ] {
            let leaf = ca.issue_server(&[name.into()], DAY).unwrap();
            accepted(&ca, &leaf, sni).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // Outside: the CA refuses to issue...
        for name in ["www.bank.example", "example.com", "internal.evil.test"] {
            let err = ca.issue_server(&[name.into()], DAY).unwrap_err();
            assert!(
                matches!(err, PkiError::NameNotPermitted { .. }),
                "{name}: {err}"
            );
        }
        // ...and a certificate made with its key anyway is refused by clients.
        for (names, sni) in [
            (&["www.bank.example"][..], "www.bank.example"),
            (&["app.internal", "www.bank.example"], "app.internal"),
            (&["*.bank.example"], "www.bank.example"),
        ] {
            let err = accepted(&ca, &forged(&ca, names), sni).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{names:?}: {err:?}"
            );
        }
        // No IP address, ever.
        let ip = forged(&ca, &["10.0.0.1"]);
        assert!(accepted(&ca, &ip, "10.0.0.1").is_err());
        // Client identities (SAN URIs) are not constrained.
        let device = Identity::new(crate::identity::Role::Device, "alice").unwrap();
        assert!(ca.issue_client(&device, DAY).is_ok());
        // A domain that is not one is refused at init.
        let other = tempfile::tempdir().unwrap();
        let err = Ca::init_constrained(other.path(), "Acme", &["not a domain".into()]);
        assert!(matches!(err, Err(PkiError::BadPermittedDomain(_))));
    }

    #[test]
    fn a_ca_without_constraints_issues_for_any_name_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "Acme").unwrap();
        assert_eq!(ca.permitted_dns(), None);
        let leaf = ca.issue_server(&["www.bank.example".into()], DAY).unwrap();
        accepted(&ca, &leaf, "www.bank.example").unwrap();
    }
}

#[cfg(test)]
mod split_tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Whether a client trusting only the root in `root_pem` accepts the chain in
    /// `chain_pem` (leaf first, as the relay presents it) for `name`.
    fn accepted(root: &CertificateDer<'static>, chain_pem: &str, name: &str) -> bool {
        let chain: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok()
    }

    #[test]
    fn the_relay_signs_with_an_intermediate_the_root_can_replace_without_reenrolment() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init_constrained(dir.path(), "Acme", &[".internal".into()]).unwrap();
        for f in [
            CA_CERT_FILE,
            CA_KEY_FILE,
            CA_INTERMEDIATE_FILE,
            CA_ROOT_KEY_FILE,
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let root = ca.cert_der().clone();
        assert_eq!(ca.chain_der().len(), 1);
        let old = ca.issue_server(&["app.internal".into()], DAY).unwrap();
        assert!(accepted(&root, &old.cert_pem, "app.internal"));
        // Only the leaf: not enough for a client that trusts the root alone.
        let leaf_only = old
            .cert_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap();
        assert!(!accepted(&root, leaf_only, "app.internal"));

        // The root key goes offline; the relay still signs.
        let offline = dir.path().join("offline-root.key");
        std::fs::copy(dir.path().join(CA_ROOT_KEY_FILE), &offline).unwrap();
        std::fs::remove_file(dir.path().join(CA_ROOT_KEY_FILE)).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        assert!(ca.issue_server(&["db.internal".into()], DAY).is_ok());

        // A new intermediate from the offline root: the same root, new leaves and old ones
        // both accepted, and the constraints kept.
        let stranger = dir.path().join("not-the-root.key");
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&stranger, other.serialize_pem()).unwrap();
        assert!(Ca::rotate_intermediate(dir.path(), &stranger).is_err());
        Ca::rotate_intermediate(dir.path(), &offline).unwrap();
        let rotated = Ca::load(dir.path()).unwrap();
        assert_eq!(rotated.cert_der(), &root);
        assert_ne!(rotated.chain_der(), ca.chain_der());
        let new = rotated.issue_server(&["app.internal".into()], DAY).unwrap();
        assert!(accepted(&root, &new.cert_pem, "app.internal"));
        assert!(accepted(&root, &old.cert_pem, "app.internal"));
        assert!(
            rotated
                .issue_server(&["www.bank.example".into()], DAY)
                .is_err()
        );
        assert_eq!(rotated.permitted_dns(), Some(&["internal".to_owned()][..]));
    }

    #[test]
    fn a_state_directory_with_one_ca_keeps_working_as_root_and_signer() {
        let dir = tempfile::tempdir().unwrap();
        Ca::init(dir.path(), "Acme").unwrap();
        // What an earlier release made: the root's key as ca.key, no intermediate.
        std::fs::rename(
            dir.path().join(CA_ROOT_KEY_FILE),
            dir.path().join(CA_KEY_FILE),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join(CA_INTERMEDIATE_FILE)).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        assert!(ca.chain_der().is_empty());
        let leaf = ca.issue_server(&["app.internal".into()], DAY).unwrap();
        assert!(accepted(ca.cert_der(), &leaf.cert_pem, "app.internal"));
        assert!(Ca::rotate_intermediate(dir.path(), &dir.path().join(CA_KEY_FILE)).is_err());
    }
}
