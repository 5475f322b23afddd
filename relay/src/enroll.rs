//! Enrolment and renewal on the QUIC listener (ALPN `portcullis-enroll/1`): a device or
//! connector redeems a one-time token with a CSR and gets a certificate for the identity
//! the token grants; an enrolled device renews its own certificate with its current key.
//! Attempts are rate-limited per client address and every one is written to the audit log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use portcullis_shared::identity::{Identity, Role};
use portcullis_shared::proto::{EnrollRequest, EnrollResponse, MAX_ENROLL_LEN};
use portcullis_shared::store::{AuditEvent, IdentityRecord, StoreError};
use portcullis_shared::token::sha256_hex;
use ring::rand::SecureRandom;
use tokio::io::AsyncReadExt;

use crate::admin::now;
use crate::server::State;

/// Enrolment attempts allowed per client address per window.
const ATTEMPTS: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-address attempt counters.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimit {
    fn allow(&self, ip: IpAddr) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if seen.len() > 10_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, count) = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= ATTEMPTS
    }
}

/// Serves enrolment requests on one connection until the peer closes it.
pub(crate) async fn serve(
    conn: quinn::Connection,
    caller: Option<(Identity, String)>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let ip = conn.remote_address().ip();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            (&mut recv)
                .take(MAX_ENROLL_LEN as u64 + 1)
                .read_to_end(&mut buf),
        )
        .await;
        let response = match read {
            Ok(Ok(_)) if buf.len() <= MAX_ENROLL_LEN => {
                match serde_json::from_slice::<EnrollRequest>(&buf) {
                    Ok(req) => handle(&state, ip, caller.as_ref().map(|(id, _)| id), req).await,
                    Err(_) => refused("malformed enrolment request"),
                }
            }
            Ok(Ok(_)) => refused("enrolment request too large"),
            _ => refused("enrolment request incomplete"),
        };
        let body = serde_json::to_vec(&response)?;
        send.write_all(&body).await?;
        send.finish()?;
    }
    Ok(())
}

fn refused(reason: &str) -> EnrollResponse {
    EnrollResponse::Refused {
        reason: reason.to_owned(),
    }
}

async fn handle(
    state: &Arc<State>,
    ip: IpAddr,
    caller: Option<&Identity>,
    req: EnrollRequest,
) -> EnrollResponse {
    let state = state.clone();
    let caller = caller.cloned();
    let result = tokio::task::spawn_blocking(move || match req {
        EnrollRequest::Enroll {
            token_id,
            secret,
            csr,
            name,
        } => {
            if !state.enroll_limit.allow(ip) {
                audit(
                    &state,
                    "enroll.refused",
                    &format!("token:{token_id}"),
                    &format!("from {ip}: rate limited"),
                );
                return refused("too many enrolment attempts from your address; wait a minute");
            }
            enroll(&state, ip, &token_id, &secret, &csr, name.as_deref())
        }
        EnrollRequest::Renew { csr } => match caller {
            Some(identity) if identity.role() == Role::Device => renew(&state, ip, &identity, &csr),
            _ => refused("renewal needs the device's current certificate"),
        },
    })
    .await;
    result.unwrap_or_else(|_| refused("internal error"))
}

fn audit(state: &State, action: &str, subject: &str, detail: &str) {
    let event = AuditEvent {
        at: now(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
    };
    if let Err(e) = state.store.audit(&event) {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
    tracing::info!(action, subject, detail, "enrolment");
}

fn enroll(
    state: &State,
    ip: IpAddr,
    token_id: &str,
    secret: &str,
    csr: &str,
    name: Option<&str>,
) -> EnrollResponse {
    let subject = format!("token:{token_id}");
    let token = match state
        .store
        .redeem_token(token_id, &sha256_hex(secret.as_bytes()), now())
    {
        Ok(t) => t,
        Err(StoreError::TokenRefused(why)) => {
            audit(
                state,
                "enroll.refused",
                &subject,
                &format!("from {ip}: {why}"),
            );
            return refused(&format!("{why}: ask your administrator for a new one"));
        }
        Err(e) => {
            tracing::warn!(error = %e, "enrolment store error");
            return refused("the relay could not check the token; try again");
        }
    };
    let grant = token.grant;
    let identity = match grant.role {
        Role::Connector => grant
            .name
            .as_deref()
            .map(|n| Identity::new(Role::Connector, n)),
        Role::Device => Some(device_id(
            state,
            grant.user.as_deref().unwrap_or("device"),
            name,
        )),
    };
    let Some(Ok(identity)) = identity else {
        audit(
            state,
            "enroll.refused",
            &subject,
            "token grants no valid identity",
        );
        return refused("the token grants no valid identity");
    };
    let result = issue(
        state,
        &identity,
        csr,
        Duration::from_secs(grant.cert_ttl_secs),
        |i| IdentityRecord {
            identity: identity.clone(),
            user: grant.user.clone(),
            groups: grant.groups.clone(),
            hostnames: grant.hostnames.clone(),
            serial: i.serial.clone(),
            key_sha256: i.key_sha256.clone(),
            not_after: i.not_after,
            issued_at: now(),
            revoked_at: None,
        },
    );
    match result {
        Ok(resp) => {
            audit(
                state,
                "enroll",
                &identity.to_string(),
                &format!("from {ip} with {subject}"),
            );
            resp
        }
        Err(e) => {
            audit(
                state,
                "enroll.refused",
                &subject,
                &format!("from {ip}: {e:#}"),
            );
            refused(&format!("{e:#}"))
        }
    }
}

fn device_id(
    state: &State,
    user: &str,
    name: Option<&str>,
) -> Result<Identity, portcullis_shared::IdentityError> {
    let taken = |id: &Identity| {
        state
            .registry
            .snapshot()
            .records()
            .any(|r| &r.identity == id)
    };
    if let Some(name) = name {
        let id = Identity::new(Role::Device, name)?;
        if !taken(&id) {
            return Ok(id);
        }
    }
    let base: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect();
    let mut suffix = [0u8; 3];
    let _ = ring::rand::SystemRandom::new().fill(&mut suffix);
    Identity::new(
        Role::Device,
        &format!(
            "{}-{}",
            if base.is_empty() { "device" } else { &base },
            portcullis_shared::pki::hex(&suffix)
        ),
    )
}

fn issue(
    state: &State,
    identity: &Identity,
    csr: &str,
    ttl: Duration,
    record: impl FnOnce(&portcullis_shared::pki::Issued) -> IdentityRecord,
) -> anyhow::Result<EnrollResponse> {
    let issued = state.ca.issue_for_csr(identity, csr, ttl)?;
    let rec = record(&issued);
    let hostnames = rec.hostnames.iter().map(ToString::to_string).collect();
    state
        .store
        .put_identity(&rec)
        .context("recording the identity")?;
    state.registry.reload(&*state.store)?;
    Ok(EnrollResponse::Issued {
        identity: identity.to_string(),
        cert: issued.cert_pem,
        ca: state.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
        hostnames,
    })
}

fn renew(state: &State, ip: IpAddr, identity: &Identity, csr: &str) -> EnrollResponse {
    let Some(current) = state.registry.snapshot().active(identity).cloned() else {
        return refused("this device is revoked or unknown");
    };
    // Same lifetime as the certificate being renewed.
    let ttl = Duration::from_secs((current.not_after - current.issued_at).max(5) as u64);
    let result = issue(state, identity, csr, ttl, |i| IdentityRecord {
        serial: i.serial.clone(),
        key_sha256: i.key_sha256.clone(),
        not_after: i.not_after,
        issued_at: now(),
        ..current.clone()
    });
    match result {
        Ok(resp) => {
            audit(state, "renew", &identity.to_string(), &format!("from {ip}"));
            resp
        }
        Err(e) => {
            audit(
                state,
                "renew.refused",
                &identity.to_string(),
                &format!("from {ip}: {e:#}"),
            );
            refused(&format!("{e:#}"))
        }
    }
}
