//! Enrolment and renewal on the QUIC listener (ALPN `portcullis-enroll/1`; on the HTTPS
//! port too, by the same ALPN, where UDP is blocked): a device or
//! connector redeems a one-time token with a CSR and gets a certificate for the identity
//! the token grants; an enrolled device renews its own certificate with its current key.
//! A token's id and secret are checked for shape before anything else, then attempts are
//! rate-limited per client address (renewals per identity) before any store access.
//! Every refusal is counted and logged; the audit log gets one row per address and minute
//! at most (see [`crate::hardening::refusal_log`]), successes a row each.
//! A connection lives at most `enroll_timeout`, and while the relay sheds new work its
//! requests are refused.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use portcullis_shared::identity::{Identity, Role};
use portcullis_shared::pki;
use portcullis_shared::proto::{CloseCode, EnrollRequest, EnrollResponse, MAX_ENROLL_LEN};
use portcullis_shared::store::{AuditEvent, IdentityRecord, StoreError};
use portcullis_shared::token::{self, sha256_hex};
use portcullis_shared::tunnel_io::{read_prefixed, write_prefixed};
use ring::rand::SecureRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clock::now;
use crate::hardening::overload::Shed;
use crate::hardening::rate_limit::Refusal;
use crate::hardening::refusal_log::{Refused, Row};
use crate::state::State;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer to enrolment and renewal while the store cannot be reached.
const STORE_UNAVAILABLE: &str = "the relay cannot reach its store right now, so it cannot enrol or renew; try again in a minute";
/// The reason sent with the close at the connection's deadline.
pub(crate) const DEADLINE_REASON: &[u8] = b"enrolment deadline passed";

/// Serves enrolment requests on one connection, one stream at a time (the connection
/// keeps a stranger's transport limits: one bidirectional stream, a 64 KiB window), until
/// the peer closes it or `enroll_timeout` after it was accepted, when the relay closes it.
/// A request already being handled at the deadline is answered first.
pub(crate) async fn serve(
    conn: quinn::Connection,
    caller: Option<(Identity, pki::CertInfo)>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let ip = conn.remote_address().ip();
    let deadline = deadline(&state, caller.is_some());
    let expired = || {
        state
            .metrics
            .enroll_deadline_closes
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("enrolment connection closed at its deadline");
        conn.close(
            quinn::VarInt::from_u32(CloseCode::Normal.code()),
            DEADLINE_REASON,
        );
    };
    loop {
        let (mut send, mut recv) = tokio::select! {
            stream = tokio::time::timeout_at(deadline, conn.accept_bi()) => match stream {
                Ok(Ok(stream)) => stream,
                Ok(Err(_)) => break,
                Err(_) => {
                    expired();
                    break;
                }
            },
            () = state.shutdown.wait() => {
                conn.close(
                    quinn::VarInt::from_u32(CloseCode::Shutdown.code()),
                    b"relay shutting down",
                );
                break;
            }
        };
        let mut buf = Vec::new();
        let read = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + REQUEST_TIMEOUT),
            (&mut recv)
                .take(MAX_ENROLL_LEN as u64 + 1)
                .read_to_end(&mut buf),
        )
        .await;
        let response = answer(
            &state,
            ip,
            caller.as_ref(),
            match read {
                Ok(Ok(_)) if buf.len() <= MAX_ENROLL_LEN => Ok(buf),
                Ok(Ok(_)) => Err("enrolment request too large"),
                _ => Err("enrolment request incomplete"),
            },
        )
        .await;
        let body = serde_json::to_vec(&response)?;
        // The answer to a request already handled may take the deadline plus a moment.
        let grace = deadline.max(tokio::time::Instant::now()) + REQUEST_TIMEOUT;
        match tokio::time::timeout_at(grace, send.write_all(&body)).await {
            Ok(written) => written?,
            Err(_) => {
                expired();
                break;
            }
        }
        send.finish()?;
        if tokio::time::Instant::now() >= deadline {
            // Closing discards unsent data: let the answer arrive first.
            let _ = tokio::time::timeout_at(grace, send.stopped()).await;
            expired();
            break;
        }
    }
    Ok(())
}

/// The answer to one request, or to what stood in for one (`Err`: why it could not be read).
async fn answer(
    state: &Arc<State>,
    ip: IpAddr,
    caller: Option<&(Identity, pki::CertInfo)>,
    request: Result<Vec<u8>, &str>,
) -> EnrollResponse {
    let malformed = |why: &str| {
        state.metrics.enroll_refused(Refused::Malformed);
        tracing::info!(client.addr = %ip, reason = why, "enrolment refused");
        refused(why)
    };
    let buf = match request {
        Ok(buf) => buf,
        Err(why) => return malformed(why),
    };
    match serde_json::from_slice::<EnrollRequest>(&buf) {
        Ok(_) if state.overload.sheds_handshakes() => {
            state.metrics.shed(Shed::Enrolment);
            refused("the relay is overloaded; try again in a minute")
        }
        Ok(req) => handle(state, ip, caller, req).await,
        Err(_) => malformed("malformed enrolment request"),
    }
}

/// Serves one enrolment request on a TLS connection to the HTTPS port (ALPN
/// `portcullis-enroll/1`, for clients whose UDP is blocked): a length-prefixed JSON
/// request, a length-prefixed JSON answer, within `enroll_timeout`.
pub(crate) async fn serve_tcp<T>(
    mut io: T,
    ip: IpAddr,
    caller: Option<(Identity, pki::CertInfo)>,
    state: Arc<State>,
) -> anyhow::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = deadline(&state, caller.is_some());
    let read = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + REQUEST_TIMEOUT),
        read_prefixed(&mut io, MAX_ENROLL_LEN),
    )
    .await;
    let request = match read {
        Ok(Ok(buf)) => Ok(buf),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err("enrolment request too large")
        }
        _ => Err("enrolment request incomplete"),
    };
    let response = answer(&state, ip, caller.as_ref(), request).await;
    let body = serde_json::to_vec(&response)?;
    let grace = deadline.max(tokio::time::Instant::now()) + REQUEST_TIMEOUT;
    tokio::time::timeout_at(grace, async {
        write_prefixed(&mut io, &body).await?;
        io.shutdown().await
    })
    .await
    .context("enrolment answer timed out")??;
    Ok(())
}

/// When an enrolment connection is closed: `enroll_timeout` from now, and no later than
/// `unauthenticated_lifetime` for a caller without a certificate.
fn deadline(state: &State, has_certificate: bool) -> tokio::time::Instant {
    let limits = &state.config.limits;
    let allowed = if has_certificate {
        limits.enroll_timeout
    } else {
        limits.enroll_timeout.min(limits.unauthenticated_lifetime)
    };
    tokio::time::Instant::now() + allowed
}

fn refused(reason: &str) -> EnrollResponse {
    EnrollResponse::Refused {
        reason: reason.to_owned(),
    }
}

async fn handle(
    state: &Arc<State>,
    ip: IpAddr,
    caller: Option<&(Identity, pki::CertInfo)>,
    req: EnrollRequest,
) -> EnrollResponse {
    let state = state.clone();
    let caller = caller.cloned();
    if state.registry.is_store_unreadable() {
        return refused(STORE_UNAVAILABLE);
    }
    let result = tokio::task::spawn_blocking(move || match req {
        EnrollRequest::Enroll {
            token_id,
            secret,
            csr,
            name,
        } => {
            // The shape first: nothing else a stranger sends as a token is ever looked
            // up, logged or stored.
            if !token::is_token_id(&token_id) || !token::is_token_secret(&secret) {
                reject(
                    &state,
                    ip,
                    Refused::Malformed,
                    "enroll.refused",
                    "token:?",
                    "not a token's id and secret",
                );
                return refused("malformed enrolment token: copy the whole token again");
            }
            if let Err(why) = state.enroll_limit.check(ip, std::time::Instant::now()) {
                reject(
                    &state,
                    ip,
                    Refused::RateLimited,
                    "enroll.refused",
                    &format!("token:{token_id}"),
                    &format!("rate limited ({why:?})"),
                );
                return refused(match why {
                    Refusal::Address => {
                        "too many enrolment attempts from your address; wait a minute"
                    }
                    Refusal::Global => "the relay is busy enrolling; try again in a few seconds",
                });
            }
            enroll(&state, ip, &token_id, &secret, &csr, name.as_deref())
        }
        EnrollRequest::Renew { csr } => match caller {
            Some((identity, cert)) if matches!(identity.role(), Role::Device | Role::Connector) => {
                let subject = identity.to_string();
                if state
                    .renew_limit
                    .check_identity(&subject, std::time::Instant::now())
                    .is_err()
                {
                    reject(
                        &state,
                        ip,
                        Refused::RateLimited,
                        "renew.refused",
                        &subject,
                        "rate limited",
                    );
                    return refused("too many renewal attempts; wait a minute");
                }
                renew(&state, ip, &identity, &cert, &csr)
            }
            _ => refused("renewal needs the device's or connector's current certificate"),
        },
    })
    .await;
    result.unwrap_or_else(|_| refused("internal error"))
}

/// Writes an audit row for something that happened (an enrolment, a renewal).
fn audit(state: &State, ip: IpAddr, action: &str, subject: &str, detail: &str) {
    write_row(state, ip, action, subject, detail.to_owned());
    tracing::info!(action, subject, detail, "enrolment");
}

/// A refused attempt: always counted and logged, but written to the audit log only as
/// the refusal log allows (one row per address and minute, a bounded number in all), so
/// refusals never grow the store by a row each.
fn reject(state: &State, ip: IpAddr, why: Refused, action: &str, subject: &str, detail: &str) {
    state.metrics.enroll_refused(why);
    tracing::info!(client.addr = %ip, reason = why.label(), action, subject, detail, "enrolment refused");
    let detail = match state.refusal_log.note(ip, std::time::Instant::now()) {
        Row::Skip => return,
        Row::Write => format!(
            "from {ip}: {detail} (more refusals from this address this minute are counted, not written)"
        ),
        Row::WriteLast => format!(
            "from {ip}: {detail} (the relay writes no more refusals this minute; see portcullis_relay_enrolment_refusals_total)"
        ),
    };
    write_row(state, ip, action, subject, detail);
}

fn write_row(state: &State, ip: IpAddr, action: &str, subject: &str, detail: String) {
    let event = AuditEvent {
        at: now(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail,
        actor: format!("client:{ip}"),
    };
    if let Err(e) = state.store.audit(&event) {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
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
    // Check the request before spending the one-time token on it.
    if let Err(e) = pki::check_enrolment_csr(csr) {
        reject(
            state,
            ip,
            Refused::Request,
            "enroll.refused",
            &subject,
            &e.to_string(),
        );
        return refused(&e.to_string());
    }
    let token = match state
        .store
        .redeem_token(token_id, &sha256_hex(secret.as_bytes()), now())
    {
        Ok(t) => t,
        Err(StoreError::TokenRefused(why)) => {
            if let Some(resp) = answer_again(state, ip, token_id, secret, csr) {
                return resp;
            }
            reject(state, ip, Refused::Token, "enroll.refused", &subject, &why);
            return refused(&format!("{why}: ask your administrator for a new one"));
        }
        Err(e @ StoreError::Unavailable { .. }) => {
            tracing::warn!(error = %e, "enrolment refused: the store is unavailable");
            return refused(STORE_UNAVAILABLE);
        }
        Err(e) => {
            tracing::warn!(error = %e, "enrolment store error");
            return refused("the relay could not check the token; try again");
        }
    };
    let grant = token.grant;
    let ttl = Duration::from_secs(grant.cert_ttl_secs);
    let result = match grant.role {
        Role::Connector => match grant
            .name
            .as_deref()
            .map(|n| Identity::new(Role::Connector, n))
        {
            // An admin's token for a named connector replaces that connector (a rebuilt
            // host re-enrolling); devices never replace anyone.
            Some(Ok(identity)) => issue(state, &identity, csr, ttl, false, |i| {
                record(&identity, &grant, i)
            }),
            _ => Err(anyhow::anyhow!("the token grants no valid identity")),
        },
        Role::Device => enroll_device(state, &grant, csr, ttl, name),
    };
    match result {
        Ok((identity, resp)) => {
            audit(
                state,
                ip,
                "enroll",
                &identity.to_string(),
                &format!("from {ip} with {subject}"),
            );
            resp
        }
        Err(e) => {
            reject(
                state,
                ip,
                Refused::Request,
                "enroll.refused",
                &subject,
                &format!("{e:#}"),
            );
            refused(&format!("{e:#}"))
        }
    }
}

/// How long after a connector's token was used the same request (same token, same key)
/// is answered again: its first answer was lost (the connector crashed or its
/// connection broke before it wrote its certificate).
const ANSWER_AGAIN_SECS: i64 = 3600;

/// A connector token already used, presented again with its secret and a CSR for the key
/// the connector it named holds now, within [`ANSWER_AGAIN_SECS`]: the connector lost the
/// answer, so it gets a certificate for that key again (a new serial; the one it never
/// received is replaced). Anything else is `None`, and refused as before.
fn answer_again(
    state: &State,
    ip: IpAddr,
    token_id: &str,
    secret: &str,
    csr: &str,
) -> Option<EnrollResponse> {
    let token = state
        .store
        .tokens()
        .ok()?
        .into_iter()
        .find(|t| t.id == token_id)?;
    let secret_ok = token.secret_sha256 == sha256_hex(secret.as_bytes());
    let used = token.used_at?;
    if !secret_ok || token.revoked_at.is_some() || now() - used > ANSWER_AGAIN_SECS {
        return None;
    }
    let identity = match (token.grant.role, token.grant.name.as_deref()) {
        (Role::Connector, Some(name)) => Identity::new(Role::Connector, name).ok()?,
        _ => return None,
    };
    let current = state.registry.snapshot().active(&identity).cloned()?;
    if current.issued_at < used {
        return None;
    }
    let lifetime = Duration::from_secs(token.grant.cert_ttl_secs);
    let issued = state.ca.issue_for_csr(&identity, csr, lifetime).ok()?;
    if issued.key_sha256 != current.key_sha256 {
        return None;
    }
    let rec = IdentityRecord {
        serial: issued.serial.clone(),
        previous_serial: Some(current.serial.clone()),
        not_after: issued.not_after,
        issued_at: now(),
        ..current
    };
    state.store.put_identity(&rec).ok()?;
    state.registry.reload(&*state.store).ok()?;
    audit(
        state,
        ip,
        "enroll",
        &identity.to_string(),
        &format!("from {ip} with token:{token_id}, answered again (the first answer was lost)"),
    );
    let hostnames = rec.hostnames.iter().map(ToString::to_string).collect();
    Some(EnrollResponse::Issued {
        identity: identity.to_string(),
        cert: issued.cert_pem,
        ca: state.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
        hostnames,
    })
}

fn record(
    identity: &Identity,
    grant: &portcullis_shared::store::TokenGrant,
    i: &pki::Issued,
) -> IdentityRecord {
    IdentityRecord {
        identity: identity.clone(),
        user: grant.user.clone(),
        groups: grant.groups.clone(),
        hostnames: grant.hostnames.clone(),
        serial: i.serial.clone(),
        previous_serial: None,
        key_sha256: i.key_sha256.clone(),
        not_after: i.not_after,
        issued_at: now(),
        revoked_at: None,
    }
}

/// A device's id is its user's part, `_`, then the device's name (see [`device_id`]), so
/// a token for one user can never claim an id (and the `devices` policy rules naming it)
/// that belongs to someone else.
fn enroll_device(
    state: &State,
    grant: &portcullis_shared::store::TokenGrant,
    csr: &str,
    ttl: Duration,
    name: Option<&str>,
) -> anyhow::Result<(Identity, EnrollResponse)> {
    let user = grant.user.as_deref().unwrap_or("device");
    for _ in 0..5 {
        let identity = device_id(user, name)?;
        match issue(state, &identity, csr, ttl, true, |i| {
            record(&identity, grant, i)
        }) {
            Err(e)
                if e.chain().any(|c| {
                    matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Exists(_)))
                }) =>
            {
                anyhow::ensure!(
                    name.is_none(),
                    "device name {} is taken: choose another --name",
                    identity.id()
                );
            }
            other => return other,
        }
    }
    anyhow::bail!("could not find a free device id; try again")
}

/// Longest user part and device name in an enrolled device's id (with the `_` between
/// them, 61 of the 64 characters an id may have).
const PART_LEN: usize = 30;

/// The characters of `s` a device id may hold, but never `_`, the separator.
fn id_chars(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect()
}

/// The user's part of a device id: the user's name itself when an id can hold it (1 to 30
/// of `A-Z a-z 0-9 . -`); otherwise what of it can be kept, a dot and 10 hex digits of
/// the name's SHA-256, so that two users whose names differ only in what an id cannot
/// hold still get different ids.
fn user_part(user: &str) -> String {
    let kept = id_chars(user);
    if kept == user && (1..=PART_LEN).contains(&user.len()) {
        return kept;
    }
    let digest = sha256_hex(user.as_bytes());
    let kept: String = kept.chars().take(PART_LEN - 11).collect();
    format!("{kept}.{}", &digest[..10])
}

/// `<user part>_<name>`: `_` is never part of either side, so the id says whose device
/// it is and no user can choose a name that lands in another user's ids. Without a
/// usable name, 6 random hex digits.
fn device_id(user: &str, name: Option<&str>) -> anyhow::Result<Identity> {
    let suffix = match name.map(|n| id_chars(n).chars().take(PART_LEN).collect::<String>()) {
        Some(n) if !n.is_empty() => n,
        _ => {
            let mut bytes = [0u8; 3];
            let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
            pki::hex(&bytes)
        }
    };
    Ok(Identity::new(
        Role::Device,
        &format!("{}_{suffix}", user_part(user)),
    )?)
}

fn issue(
    state: &State,
    identity: &Identity,
    csr: &str,
    ttl: Duration,
    new_only: bool,
    record: impl FnOnce(&pki::Issued) -> IdentityRecord,
) -> anyhow::Result<(Identity, EnrollResponse)> {
    let issued = state.ca.issue_for_csr(identity, csr, ttl)?;
    let rec = record(&issued);
    let hostnames = rec.hostnames.iter().map(ToString::to_string).collect();
    if new_only {
        state.store.create_identity(&rec)?;
    } else {
        state
            .store
            .put_identity(&rec)
            .context("recording the identity")?;
    }
    state.registry.reload(&*state.store)?;
    Ok((
        identity.clone(),
        EnrollResponse::Issued {
            identity: identity.to_string(),
            cert: issued.cert_pem,
            ca: state.ca.cert_pem().to_owned(),
            not_after: issued.not_after,
            hostnames,
        },
    ))
}

fn renew(
    state: &State,
    ip: IpAddr,
    identity: &Identity,
    presented: &pki::CertInfo,
    csr: &str,
) -> EnrollResponse {
    let subject = identity.to_string();
    let refuse = |why: String| {
        reject(state, ip, Refused::Request, "renew.refused", &subject, &why);
        refused(&why)
    };
    let Some(current) = state.registry.snapshot().active(identity).cloned() else {
        return refuse(format!(
            "{} is revoked or unknown",
            identity.role().as_str()
        ));
    };
    // Renewal keeps the key, and waits until half the lifetime has passed (the agent
    // renews at two thirds), so a device cannot churn certificates. A device presenting
    // the certificate its last renewal replaced never got the answer (the handshake
    // accepts that certificate only briefly), so it is answered again.
    let lifetime = (current.not_after - current.issued_at).max(5);
    let answer_lost = current.previous_serial.as_deref() == Some(presented.serial.as_str());
    if !answer_lost && now() - current.issued_at < lifetime / 2 {
        return refuse(
            "too early to renew: wait until half the certificate's lifetime has passed".into(),
        );
    }
    let ttl = Duration::from_secs(lifetime as u64);
    let issued = match state.ca.issue_for_csr(identity, csr, ttl) {
        Ok(i) => i,
        Err(e) => return refuse(e.to_string()),
    };
    if issued.key_sha256 != presented.key_sha256 {
        return refuse("renewal must keep the device's current key".into());
    }
    let rec = IdentityRecord {
        serial: issued.serial.clone(),
        // A repeated answer keeps the serial the device holds as the one it replaces.
        previous_serial: Some(if answer_lost {
            presented.serial.clone()
        } else {
            current.serial.clone()
        }),
        key_sha256: issued.key_sha256.clone(),
        not_after: issued.not_after,
        issued_at: now(),
        ..current
    };
    if let Err(e) = state.store.put_identity(&rec).and_then(|()| {
        state
            .registry
            .reload(&*state.store)
            .map_err(|e| StoreError::Corrupt {
                what: "registry".into(),
                why: e.to_string(),
            })
    }) {
        return match e {
            StoreError::Unavailable { .. } => refuse(STORE_UNAVAILABLE.into()),
            e => refuse(e.to_string()),
        };
    }
    audit(state, ip, "renew", &subject, &format!("from {ip}"));
    EnrollResponse::Issued {
        identity: identity.to_string(),
        cert: issued.cert_pem,
        ca: state.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
        hostnames: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, name: &str) -> String {
        device_id(user, Some(name)).unwrap().id().to_owned()
    }

    #[test]
    fn device_ids_name_their_user_and_cannot_collide_across_users() {
        assert_eq!(id("alice", "laptop"), "alice_laptop");
        // Names that would have met under a `-` separator stay apart.
        assert_eq!(id("alice", "dev-x"), "alice_dev-x");
        assert_eq!(id("alice-dev", "x"), "alice-dev_x");
        // A name cannot smuggle in the separator to pose as another user's device.
        assert_eq!(id("mallory", "alice_laptop"), "mallory_alicelaptop");
        assert!(id("mallory", "_").starts_with("mallory_"));
        // Users whose names an id cannot hold keep a readable part and a digest of the
        // whole name, so near-identical names still differ.
        let (a, b) = (id("alice@example.com", "x"), id("alice@example.org", "x"));
        assert!(a.starts_with("aliceexample.com."), "{a}");
        assert_ne!(a, b);
        assert_ne!(id("alice!", "x"), id("alice", "x"));
        assert_ne!(id("alice_x", "y"), id("alicex", "y"));
        let long = "a".repeat(40);
        assert_ne!(id(&long, "x"), id(&"a".repeat(41), "x"));
        assert!(id(&long, &"n".repeat(80)).len() <= 64);
        // Every id splits at its one `_` into the user's part and the name.
        for (user, name) in [("alice", "dev-x"), ("bob@x.y", "a_b"), ("", "x")] {
            let v = id(user, name);
            assert_eq!(v.matches('_').count(), 1, "{v}");
            assert_eq!(v.split_once('_').unwrap().0, user_part(user), "{v}");
        }
    }
}
