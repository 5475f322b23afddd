//! Renewal of the connector's certificate at two thirds of its lifetime, as the agent
//! renews a device's: the same key, a CSR sent on the relay's enrolment ALPN with the
//! current certificate as client authentication, the answer written over the certificate
//! file (atomically). The reload that follows replaces every tunnel's connection
//! make-before-break, so no tunnel outlives the certificate it was opened with and no
//! stream is dropped. A failed renewal is logged with what to do and tried again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use portcullis_shared::enroll_client;
use portcullis_shared::pki;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::token::sha256_hex;

use crate::live::{Live, Reason, leaf};

/// The longest wait between failed attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When a certificate was issued: its validity starts [`pki::BACKDATE`] earlier.
fn issued_at(not_before: i64, not_after: i64) -> i64 {
    (not_before + pki::BACKDATE.whole_seconds()).min(not_after)
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two thirds of
/// its lifetime.
pub(crate) fn renewal_at(not_before: i64, not_after: i64) -> i64 {
    let start = issued_at(not_before, not_after);
    start + (not_after - start).max(0) * 2 / 3
}

/// The wait before trying again after a failure: a twentieth of the lifetime, between 1 s
/// and a minute, so a short-lived certificate is retried several times before it expires.
pub(crate) fn retry_after(not_before: i64, not_after: i64) -> Duration {
    let lifetime = u64::try_from(not_after - issued_at(not_before, not_after)).unwrap_or(0);
    Duration::from_secs(lifetime / 20).clamp(Duration::from_secs(1), RETRY_MAX)
}

/// Renews the certificate whenever it is due, until `shutdown`.
pub(crate) async fn run(live: Arc<Live>, shutdown: Shutdown) {
    let mut replaced = live.replacements();
    loop {
        let cert = live.current().config.cert.clone();
        let Some(info) = leaf(&cert) else {
            tracing::error!(cert = %cert.display(), "cannot read the connector's certificate; it will not be renewed until the file is fixed");
            tokio::select! {
                _ = replaced.changed() => continue,
                () = tokio::time::sleep(RETRY_MAX) => continue,
                () = shutdown.wait() => return,
            }
        };
        // A certificate the connector cannot replace (a read-only mount, a Kubernetes
        // Secret) is never renewed: the relay would record a certificate nobody holds.
        if let Err(why) = writable(&cert) {
            tracing::warn!(
                cert = %cert.display(),
                not_after = info.not_after,
                "automatic renewal is off: {why}; replace the certificate before it expires (the connector picks up a new file within seconds)"
            );
            tokio::select! {
                _ = replaced.changed() => continue,
                // Looked at again now and then: a mount may become writable.
                () = tokio::time::sleep(Duration::from_secs(3600)) => continue,
                () = shutdown.wait() => return,
            }
        }
        let at = renewal_at(info.not_before, info.not_after);
        let wait = Duration::from_secs(u64::try_from(at - now()).unwrap_or(0));
        tracing::debug!(
            not_after = info.not_after,
            ?wait,
            "next certificate renewal"
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // The certificate was replaced on disk: look at the new one.
            _ = replaced.changed() => continue,
            () = shutdown.wait() => return,
        }
        match renew(&live).await {
            Ok(not_after) => {
                live.metrics.renewal(true);
                tracing::info!(not_after, "certificate renewed");
                live.reload(Reason::Renewed);
            }
            Err(e) => {
                live.metrics.renewal(false);
                let retry = retry_after(info.not_before, info.not_after);
                let expired = now() >= info.not_after;
                tracing::error!(
                    error = %format!("{e:#}"),
                    ?retry,
                    expired,
                    "certificate renewal failed; retrying (if it keeps failing, check that the relay is reachable and the connector is not revoked, or issue a new certificate with `portcullis-relay issue connector`)"
                );
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

/// Whether a renewed certificate could be written over `cert`: the file is written to a
/// temporary file beside it and renamed, so its directory must take a new file.
fn writable(cert: &std::path::Path) -> Result<(), String> {
    let dir = cert
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let probe = dir.join(format!(".portcullis-renew-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{} is not writable ({e})", dir.display())),
    }
}

/// One renewal: returns the new certificate's expiry.
async fn renew(live: &Live) -> anyhow::Result<i64> {
    let current = live.current();
    let config = &current.config;
    let ca = pki::load_certs(&config.ca)?;
    let ca = ca.first().context("the CA file holds no certificate")?;
    let targets = config.relays().context("relay is not host:port")?;
    let server_name = targets
        .first()
        .and_then(|r| config.relay_server_name(r))
        .context("no TLS name for the relay: set server_name")?;
    let relays: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let (cert, not_after) = enroll_client::renew(enroll_client::Renewal {
        relays: &relays,
        tcp_port: config.relay_tcp_port,
        server_name: &server_name,
        ca_sha256: &sha256_hex(ca),
        certs: pki::load_certs(&config.cert)?,
        key: pki::load_key(&config.key)?,
    })
    .await?;
    pki::write_public_file(&config.cert, cert.as_bytes()).with_context(|| {
        format!(
            "writing the renewed certificate to {}",
            config.cert.display()
        )
    })?;
    Ok(not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_needs_a_directory_that_takes_a_new_file() {
        let dir = std::env::temp_dir().join(format!("pc-renew-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(writable(&dir.join("c.crt")), Ok(()));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe is removed"
        );
        std::fs::remove_dir(&dir).unwrap();
        let gone = writable(&dir.join("c.crt")).unwrap_err();
        assert!(gone.contains("is not writable"), "{gone}");
    }

    #[test]
    fn renewal_comes_at_two_thirds_and_retries_scale_with_the_lifetime() {
        // Validity starts five minutes before the issue (see pki::BACKDATE).
        let b = 300;
        assert_eq!(renewal_at(1_000 - b, 1_006), 1_004);
        assert_eq!(renewal_at(-b, 365 * 86_400), 243 * 86_400 + 8 * 3_600);
        // A certificate of another CA, not backdated, shorter than the backdating: due at
        // once rather than never.
        assert_eq!(renewal_at(0, 6), 6);
        assert_eq!(retry_after(-b, 6), Duration::from_secs(1));
        assert_eq!(retry_after(-b, 600), Duration::from_secs(30));
        assert_eq!(retry_after(-b, 365 * 86_400), RETRY_MAX);
    }
}
