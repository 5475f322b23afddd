//! `portcullis-connector enroll`: redeem a connector token for a key (made here, never
//! sent), a certificate and a ready configuration in a state directory.

#![allow(clippy::print_stdout)] // the command's output is its product

use std::path::Path;

use anyhow::{Context, bail};
use portcullis_shared::config::ConnectorConfig;
use portcullis_shared::enroll_client;
use portcullis_shared::pki;
use portcullis_shared::proto::{EnrollRequest, EnrollResponse};

/// What a redeemed token gave: the key made here, and the relay's answer.
struct Enrolled {
    token: portcullis_shared::token::EnrollToken,
    identity: String,
    key: Vec<u8>,
    cert: String,
    ca: String,
    hostnames: Vec<String>,
}

/// The key an enrolment uses, kept beside where the key goes (`<key>.pending`, 0600)
/// before the token is spent: a connector that crashes before it has written its
/// certificate finds the same key at its next start and asks again with the same token,
/// which the relay answers again for that key (instead of a second token).
fn pending_key(key: &Path) -> anyhow::Result<Vec<u8>> {
    let pending = pending_path(key);
    if pending.exists() {
        let der = pki::load_key(&pending)?;
        return Ok(der.secret_der().to_vec());
    }
    let (key_der, _) = pki::generate_enrolment_csr()?;
    if let Some(dir) = pending.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    pki::write_private_file(&pending, pki::pkcs8_pem(&key_der).as_bytes())?;
    Ok(key_der)
}

fn pending_path(key: &Path) -> std::path::PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".pending");
    key.with_file_name(name)
}

/// Redeems the token from `token_file` (or `PORTCULLIS_TOKEN`, or standard input) for a
/// certificate of the enrolment key for `key_path` (see [`pending_key`]).
async fn redeem(token_file: Option<&Path>, key_path: &Path) -> anyhow::Result<Enrolled> {
    let token = enroll_client::read_token(token_file)?;
    let key = pending_key(key_path)?;
    let csr = pki::enrolment_csr_for_key(&key)?;
    let request = EnrollRequest::Enroll {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        csr,
        name: None,
    };
    let answer = enroll_client::exchange_any(
        &token.relays(),
        token.tcp_port,
        &token.server_name,
        &token.ca_sha256,
        None,
        &request,
    )
    .await?;
    match answer {
        EnrollResponse::Issued {
            identity,
            cert,
            ca,
            hostnames,
            ..
        } => Ok(Enrolled {
            token,
            identity,
            key,
            cert,
            ca,
            hostnames,
        }),
        EnrollResponse::Refused { reason } => bail!("the relay refused enrolment: {reason}"),
    }
}

/// Writes the key, certificate and CA where `key`, `cert` and `ca` say (creating their
/// directories), the key first and readable by its owner only.
fn write_credentials(e: &Enrolled, key: &Path, cert: &Path, ca: &Path) -> anyhow::Result<()> {
    for path in [key, cert, ca] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    // The certificate and CA first, then the key moves into place: a crash leaves either
    // the pending key (asked again at the next start) or all three.
    pki::write_public_file(cert, e.cert.as_bytes())?;
    pki::write_public_file(ca, e.ca.as_bytes())?;
    // What the relay granted, for `check` (the relay's registry decides; this is a copy).
    let mut granted = e.hostnames.join("\n");
    granted.push('\n');
    pki::write_public_file(
        &portcullis_shared::config::granted_hostnames_path(cert),
        granted.as_bytes(),
    )?;
    pki::write_private_file(key, pki::pkcs8_pem(&e.key).as_bytes())?;
    let _ = std::fs::remove_file(pending_path(key));
    Ok(())
}

/// `run --enroll-token-file`: when the configuration's `key` does not exist yet, redeems
/// the token and writes the key, certificate and CA at the configuration's paths (a
/// first start, such as a new pod with an empty volume). Once enrolled the token is
/// spent and not read again; the certificate then renews itself in place.
pub(crate) async fn enroll_if_new(
    token_file: &Path,
    config: &ConnectorConfig,
) -> anyhow::Result<()> {
    if config.key.exists() {
        if !config.cert.exists() {
            bail!(
                "{} exists but {} does not: restore the certificate, or remove the key to enrol again with a new token",
                config.key.display(),
                config.cert.display()
            );
        }
        tracing::debug!(key = %config.key.display(), "already enrolled; the token is not used");
        return Ok(());
    }
    let enrolled = redeem(Some(token_file), &config.key).await?;
    write_credentials(&enrolled, &config.key, &config.cert, &config.ca)?;
    tracing::info!(
        identity = %enrolled.identity,
        hostnames = ?enrolled.hostnames,
        cert = %config.cert.display(),
        "enrolled with the token; starting"
    );
    Ok(())
}

/// Enrols and writes `connector.key`, `connector.crt`, `ca.crt` and `connector.toml`.
pub(crate) async fn enroll(token_file: Option<&Path>, state: &Path) -> anyhow::Result<()> {
    if state.join("connector.key").exists() {
        bail!(
            "{} already holds an enrolled connector; use another --state directory",
            state.display()
        );
    }
    let enrolled = redeem(token_file, &state.join("connector.key")).await?;
    write_credentials(
        &enrolled,
        &state.join("connector.key"),
        &state.join("connector.crt"),
        &state.join("ca.crt"),
    )?;
    let Enrolled {
        token,
        identity,
        hostnames,
        ..
    } = enrolled;
    let relays = match token.relays().as_slice() {
        [one] => format!("{one:?}"),
        many => format!("{many:?}"),
    };
    let mut config = format!(
        "# Written by `portcullis-connector enroll` for {identity}.\n\
         relay = {relays}\nserver_name = \"{}\"\nca = \"ca.crt\"\ncert = \"connector.crt\"\nkey = \"connector.key\"\n",
        token.server_name
    );
    if let Some(port) = token.tcp_port {
        config.push_str(&format!(
            "# The relays' HTTPS port, for the tunnel over TLS on TCP where UDP is blocked.\nrelay_tcp_port = {port}\n"
        ));
    }
    for h in &hostnames {
        config.push_str(&format!(
            "\n# Point this at the private service to publish as {h}.\n[[ingress]]\nhostname = \"{h}\"\nservice = \"http://127.0.0.1:8080\"\n"
        ));
    }
    pki::write_public_file(&state.join("connector.toml"), config.as_bytes())?;
    println!(
        "enrolled {identity}; edit the services in {} and run: portcullis-connector run --config {}",
        state.join("connector.toml").display(),
        state.join("connector.toml").display()
    );
    Ok(())
}
