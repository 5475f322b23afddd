//! `portcullis-connector enroll`: redeem a connector token for a key (made here, never
//! sent), a certificate and a ready configuration in a state directory.

#![allow(clippy::print_stdout)] // the command's output is its product

use std::path::Path;

use anyhow::bail;
use portcullis_shared::enroll_client;
use portcullis_shared::pki;
use portcullis_shared::proto::{EnrollRequest, EnrollResponse};

/// Enrols and writes `connector.key`, `connector.crt`, `ca.crt` and `connector.toml`.
pub(crate) async fn enroll(token_file: Option<&Path>, state: &Path) -> anyhow::Result<()> {
    let token = enroll_client::read_token(token_file)?;
    if state.join("connector.key").exists() {
        bail!(
            "{} already holds an enrolled connector; use another --state directory",
            state.display()
        );
    }
    let (key, csr) = pki::generate_enrolment_csr()?;
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
    let (identity, cert, ca, hostnames) = match answer {
        EnrollResponse::Issued {
            identity,
            cert,
            ca,
            hostnames,
            ..
        } => (identity, cert, ca, hostnames),
        EnrollResponse::Refused { reason } => bail!("the relay refused enrolment: {reason}"),
    };
    pki::write_private_file(
        &state.join("connector.key"),
        pki::pkcs8_pem(&key).as_bytes(),
    )?;
    pki::write_public_file(&state.join("connector.crt"), cert.as_bytes())?;
    pki::write_public_file(&state.join("ca.crt"), ca.as_bytes())?;
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
