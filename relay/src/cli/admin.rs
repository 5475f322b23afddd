//! Offline admin commands run on the relay host: CA creation, direct issuance,
//! revocation and listing. They share the state directory (and its SQLite store) with a
//! running relay, which picks their changes up within a second.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use portcullis_shared::identity::{HostPattern, Identity, Role};
use portcullis_shared::pki::{self, Ca};
use portcullis_shared::store::{
    AuditEvent, AuditQuery, IdentityRecord, Store, TokenGrant, TokenRecord,
};
use portcullis_shared::text::printable;
use portcullis_shared::token::{self, EnrollToken, sha256_hex};

use crate::cli::{StateArgs, TokenCommand, TokenCreate};
use crate::clock::{now, rfc3339};

/// Opens the store the command names: `--store URL` (or `PORTCULLIS_STORE`), else the
/// one `--config`'s relay.toml names, else the state directory's SQLite file.
pub fn open_store(at: &StateArgs) -> anyhow::Result<Arc<dyn Store>> {
    let from_config = match (&at.store, &at.config) {
        (None, Some(path)) => portcullis_shared::config::RelayConfig::store_url_of(path)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        _ => None,
    };
    crate::identity::store::open(&at.state, at.store.as_deref().or(from_config.as_deref()))
}

fn audit(store: &dyn Store, action: &str, subject: &str, detail: String) -> anyhow::Result<()> {
    store
        .audit(&AuditEvent {
            at: now(),
            action: action.into(),
            subject: subject.into(),
            detail,
            actor: local_actor(),
        })
        .context("writing the audit log")
}

/// Who runs this command on the relay host: `local:<user>`, the user behind `sudo` when
/// there is one, with the uid the command runs as.
fn local_actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let name = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|n| !n.is_empty()));
    let actor = match (name, uid) {
        (Some(n), Some(uid)) => format!("local:{n} (uid {uid})"),
        (Some(n), None) => format!("local:{n}"),
        (None, Some(uid)) => format!("local:uid {uid}"),
        (None, None) => "local".to_owned(),
    };
    printable(&actor).into_owned()
}

/// Writes one line of a command's output. A reader that went away (`| head`) ends the
/// command quietly: the error it returns is recognised by [`crate::is_broken_pipe`].
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))?
    };
}

fn emit(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}")
}

/// The hostname patterns a connector asks to publish, each checked against the CA's name
/// constraints (a name outside them would get a certificate no device accepts).
fn publishable(at: &StateArgs, hostnames: &[String]) -> anyhow::Result<Vec<HostPattern>> {
    let ca = Ca::load(&at.state)?;
    hostnames
        .iter()
        .map(|h| {
            let pattern = HostPattern::parse(h)?;
            ca.check_server_name(&pattern.to_string())?;
            Ok(pattern)
        })
        .collect()
}

/// `ca export-root`: the root's key, to a file of the operator's (0600, never replacing
/// one), to keep offline.
pub fn ca_export_root(at: &StateArgs, out: &Path) -> anyhow::Result<()> {
    let key = at.state.join(pki::CA_ROOT_KEY_FILE);
    let pem = std::fs::read(&key).with_context(|| {
        format!(
            "reading {} (a CA made before the root was split off has none; a removed one is gone)",
            key.display()
        )
    })?;
    pki::write_new_private_file(out, &pem)?;
    let store = open_store(at)?;
    audit(
        &*store,
        "ca.export-root",
        "ca",
        format!("to {}", out.display()),
    )?;
    out!(
        "wrote the root key to {}: keep it offline, then `portcullis-relay ca remove-root-key`",
        out.display()
    );
    Ok(())
}

/// `ca remove-root-key`: deletes the root's key from the state directory; the relay
/// keeps signing with the intermediate.
pub fn ca_remove_root_key(at: &StateArgs) -> anyhow::Result<()> {
    let key = at.state.join(pki::CA_ROOT_KEY_FILE);
    if !key.exists() {
        bail!(
            "{} does not exist: there is no root key here to remove",
            key.display()
        );
    }
    std::fs::remove_file(&key).with_context(|| format!("removing {}", key.display()))?;
    let store = open_store(at)?;
    audit(&*store, "ca.remove-root-key", "ca", String::new())?;
    out!(
        "removed the root key from {}; `ca rotate-intermediate --root-key FILE` needs your offline copy",
        at.state.display()
    );
    Ok(())
}

/// `ca rotate-intermediate`.
pub fn ca_rotate_intermediate(at: &StateArgs, root_key: Option<&Path>) -> anyhow::Result<()> {
    let in_state = at.state.join(pki::CA_ROOT_KEY_FILE);
    let root_key = root_key.unwrap_or(&in_state);
    Ca::rotate_intermediate(&at.state, root_key)?;
    let store = open_store(at)?;
    audit(&*store, "ca.rotate-intermediate", "ca", String::new())?;
    out!(
        "a new intermediate signs from the next relay start (restart the relays); devices and connectors trust the root, so none enrols again"
    );
    Ok(())
}

/// `ca init`.
pub fn ca_init(at: &StateArgs, org: &str, permit_dns: &[String]) -> anyhow::Result<()> {
    let state = &at.state;
    let ca = Ca::init_constrained(state, org, permit_dns)?;
    let store = open_store(at)?;
    let constraints = match ca.permitted_dns() {
        Some(domains) => format!("; server names only under {}", domains.join(", ")),
        None => String::new(),
    };
    audit(
        &*store,
        "ca.init",
        "ca",
        format!("organisation {org}{constraints}"),
    )?;
    out!(
        "created the {org} CA in {}; clients and connectors trust its root, {}",
        state.display(),
        state.join(pki::CA_CERT_FILE).display()
    );
    out!(
        "the relay signs with an intermediate; keep the root key offline: `portcullis-relay ca export-root --state {} --out FILE`, then `ca remove-root-key`",
        state.display()
    );
    match ca.permitted_dns() {
        Some(domains) => out!(
            "the CA vouches for server names under {} only, and for no IP address",
            domains.join(", ")
        ),
        None => eprintln!(
            "note: this CA is not name-constrained, so a device that trusts it trusts it for every name on the internet; create it with --permit-dns DOMAIN (repeatable) to limit it to your private domains"
        ),
    }
    Ok(())
}

fn issue(
    at: &StateArgs,
    identity: &Identity,
    ttl: Duration,
    out: &Path,
    record: impl FnOnce(&pki::Issued) -> IdentityRecord,
) -> anyhow::Result<pki::Issued> {
    let ca = Ca::load(&at.state)?;
    let store = open_store(at)?;
    if let Some(existing) = store
        .identities()?
        .into_iter()
        .find(|r| &r.identity == identity)
        && existing.revoked_at.is_some()
    {
        bail!("{identity} is revoked; issue a certificate under a new id");
    }
    let issued = ca.issue_client(identity, ttl)?;
    let id = identity.id();
    let key = issued
        .key
        .as_ref()
        .context("the CA generated no key for this certificate")?;
    // Recorded first: a store that cannot be written (a full or read-only disk) leaves no
    // certificate behind that the relay would not know.
    store.put_identity(&record(&issued))?;
    audit(
        &*store,
        "issue",
        &identity.to_string(),
        format!("serial {} valid until {}", issued.serial, issued.not_after),
    )?;
    pki::write_public_file(&out.join(format!("{id}.crt")), issued.cert_pem.as_bytes())?;
    pki::write_private_file(&out.join(format!("{id}.key")), key.pem.as_bytes())?;
    pki::write_public_file(&out.join(pki::CA_CERT_FILE), ca.cert_pem().as_bytes())?;
    if identity.role() == Role::Device {
        let mut cas = ca.chain_der().to_vec();
        cas.push(ca.cert_der().clone());
        let p12 = pki::pkcs12(id, &issued.cert_der, &key.der, &cas)?;
        pki::write_private_file(&out.join(format!("{id}.p12")), &p12)?;
    }
    Ok(issued)
}

/// `issue connector`.
pub fn issue_connector(
    at: &StateArgs,
    name: &str,
    hostnames: &[String],
    ttl: Duration,
    out: &Path,
) -> anyhow::Result<()> {
    let identity = Identity::new(Role::Connector, name)?;
    let patterns = publishable(at, hostnames)?;
    issue(at, &identity, ttl, out, |i| IdentityRecord {
        identity: identity.clone(),
        user: None,
        groups: vec![],
        hostnames: patterns.clone(),
        serial: i.serial.clone(),
        previous_serial: None,
        key_sha256: i.key_sha256.clone(),
        not_after: i.not_after,
        issued_at: now(),
        revoked_at: None,
    })?;
    out!(
        "issued connector {name} for {}: {}",
        hostnames.join(", "),
        out.join(format!("{name}.crt")).display()
    );
    Ok(())
}

/// `issue device`.
pub fn issue_device(
    at: &StateArgs,
    id: &str,
    user: &str,
    groups: &[String],
    ttl: Duration,
    out: &Path,
) -> anyhow::Result<()> {
    let identity = Identity::new(Role::Device, id)?;
    // Users and groups travel in headers (groups comma-separated): keep them plain.
    check_plain("--user", user)?;
    for g in groups {
        check_plain("--group", g)?;
    }
    issue(at, &identity, ttl, out, |i| IdentityRecord {
        identity: identity.clone(),
        user: Some(user.to_owned()),
        groups: groups.to_vec(),
        hostnames: vec![],
        serial: i.serial.clone(),
        previous_serial: None,
        key_sha256: i.key_sha256.clone(),
        not_after: i.not_after,
        issued_at: now(),
        revoked_at: None,
    })?;
    out!(
        "issued device {id} for user {user}: {} (browser bundle {})",
        out.join(format!("{id}.crt")).display(),
        out.join(format!("{id}.p12")).display()
    );
    Ok(())
}

/// `revoke device|connector`.
pub fn revoke(at: &StateArgs, role: Role, id: &str) -> anyhow::Result<()> {
    let identity = Identity::new(role, id)?;
    let store = open_store(at)?;
    store.revoke(&identity, now())?;
    audit(&*store, "revoke", &identity.to_string(), String::new())?;
    out!("revoked {identity}; a running relay drops its connections within a second");
    Ok(())
}

/// `jwt rotate`.
pub fn jwt_rotate(at: &StateArgs) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let prepublish = jwt_prepublish(at.config.as_deref())?;
    let rotation = crate::identity::jwt::rotate(&at.state, prepublish, now())?;
    let (kid, from) = (&rotation.kid, rfc3339(rotation.signs_from));
    audit(
        &*store,
        "jwt.rotate",
        "jwt",
        format!("next signing key {kid}, published now, signing from {from}"),
    )?;
    out!(
        "key {kid} is in the JWKS now (a running relay follows within 2 s) and signs from {from} (jwt_prepublish {}); the key it replaces stays published until `portcullis-relay jwt retire`",
        humantime::format_duration(prepublish)
    );
    Ok(())
}

/// `jwt_prepublish` from the relays' relay.toml, or its default.
fn jwt_prepublish(config: Option<&Path>) -> anyhow::Result<Duration> {
    Ok(match config {
        Some(path) => {
            portcullis_shared::config::RelayConfig::load(path)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .jwt_prepublish
        }
        None => Duration::from_secs(3600),
    })
}

/// `jwt retire`.
pub fn jwt_retire(at: &StateArgs) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let prepublish = jwt_prepublish(at.config.as_deref())?;
    if crate::identity::jwt::retire(&at.state, prepublish, now())? {
        audit(&*store, "jwt.retire", "jwt", String::new())?;
        out!("the previous JWT signing key is no longer published");
    } else {
        out!("there is no previous JWT signing key to retire");
    }
    Ok(())
}

/// What `audit` shows.
pub struct AuditFilter {
    pub identity: Option<String>,
    pub action: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
}

/// `audit`.
pub fn audit_list(at: &StateArgs, filter: &AuditFilter, json: bool) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let events = store.audit_log(&AuditQuery {
        since: filter.since,
        until: filter.until,
    })?;
    let about = |subject: &str| match &filter.identity {
        None => true,
        Some(want) => subject == want || subject.split_once(':').is_some_and(|(_, id)| id == want),
    };
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| about(&e.subject))
        .filter(|e| filter.action.as_ref().is_none_or(|a| &e.action == a))
        .collect();
    if json {
        let rows: Vec<_> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "at": e.at,
                    "time": rfc3339(e.at),
                    "action": e.action,
                    "subject": e.subject,
                    "detail": e.detail,
                    "actor": e.actor,
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!(
        "{:<20} {:<22} {:<32} {:<24} DETAIL",
        "TIME (UTC)",
        "ACTION",
        "SUBJECT",
        "ACTOR"
    );
    for e in &events {
        out!(
            "{:<20} {:<22} {:<32} {:<24} {}",
            rfc3339(e.at),
            printable(&e.action),
            printable(&e.subject),
            printable(if e.actor.is_empty() { "-" } else { &e.actor }),
            printable(&e.detail)
        );
    }
    Ok(())
}

/// `list`.
pub fn list(at: &StateArgs, json: bool) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let records = store.identities()?;
    if json {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "role": r.identity.role().as_str(),
                    "id": r.identity.id(),
                    "user": r.user,
                    "groups": r.groups,
                    "hostnames": r.hostnames,
                    "serial": r.serial,
                    "not_after": r.not_after,
                    "revoked_at": r.revoked_at,
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!(
        "{:<10} {:<24} {:<32} {:<20} STATUS",
        "ROLE",
        "ID",
        "USER/GROUPS OR HOSTNAMES",
        "EXPIRES (UTC)"
    );
    for r in &records {
        let who = match r.identity.role() {
            Role::Device => format!(
                "{} [{}]",
                r.user.as_deref().unwrap_or("-"),
                r.groups.join(",")
            ),
            Role::Connector => r
                .hostnames
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let expires = rfc3339(r.not_after);
        let status = if r.revoked_at.is_some() {
            "revoked"
        } else if r.not_after < now() {
            "expired"
        } else {
            "active"
        };
        out!(
            "{:<10} {:<24} {:<32} {:<20} {status}",
            r.identity.role().as_str(),
            r.identity.id(),
            printable(&who),
            expires
        );
    }
    Ok(())
}

fn random_b64(len: usize) -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness available"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn endpoint(
    state: &Path,
    args: &crate::cli::EndpointArgs,
) -> anyhow::Result<(Vec<String>, String, Option<u16>)> {
    let recorded: Option<serde_json::Value> =
        std::fs::read(state.join(crate::server::ENDPOINT_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let field = |k: &str| {
        recorded
            .as_ref()
            .and_then(|v| v[k].as_str())
            .map(str::to_owned)
    };
    let relays = if args.relay.is_empty() {
        vec![field("relay").context(
            "no relay address known: pass --relay HOST:PORT (the relay's public QUIC address), \
             or start the relay once so it records it",
        )?]
    } else {
        args.relay.clone()
    };
    let server_name = args
        .server_name
        .clone()
        .or_else(|| field("server_name"))
        .or_else(|| relays[0].rsplit_once(':').map(|(h, _)| h.to_owned()))
        .context("pass --server-name")?;
    // Left out of the token when it is the QUIC port (the usual 443 on both), which is
    // what agents and connectors assume without it.
    let quic_port = relays[0]
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let tcp_port = args
        .relay_tcp_port
        .or_else(|| {
            recorded
                .as_ref()
                .and_then(|v| v["tcp_port"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
        })
        .filter(|p| Some(*p) != quic_port);
    Ok((relays, server_name, tcp_port))
}

/// `token ...`.
/// `token create|list|revoke`.
pub fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create(create) => token_create(&create),
        TokenCommand::List { state, json } => token_list(&state, json),
        TokenCommand::Revoke { id, state } => token_revoke(&state, &id),
    }
}

/// Creates a one-time enrolment token and prints it (last line of standard output).
fn token_create(create: &TokenCreate) -> anyhow::Result<()> {
    let (state, ttl, endpoint_args, grant) = match &create {
        TokenCreate::Device {
            user,
            groups,
            ttl,
            cert_ttl,
            endpoint,
            state,
        } => {
            check_plain("--user", user)?;
            for g in groups {
                check_plain("--group", g)?;
            }
            (
                state,
                ttl,
                endpoint,
                TokenGrant {
                    role: Role::Device,
                    user: Some(user.clone()),
                    groups: groups.clone(),
                    name: None,
                    hostnames: vec![],
                    cert_ttl_secs: cert_ttl.as_secs(),
                },
            )
        }
        TokenCreate::Connector {
            name,
            hostnames,
            ttl,
            cert_ttl,
            endpoint,
            state,
        } => {
            Identity::new(Role::Connector, name)?;
            let patterns = publishable(state, hostnames)?;
            (
                state,
                ttl,
                endpoint,
                TokenGrant {
                    role: Role::Connector,
                    user: None,
                    groups: vec![],
                    name: Some(name.clone()),
                    hostnames: patterns,
                    cert_ttl_secs: cert_ttl.as_secs(),
                },
            )
        }
    };
    let store = open_store(state)?;
    let ca = Ca::load(&state.state)?;
    let (relays, server_name, tcp_port) = endpoint(&state.state, endpoint_args)?;
    let id = random_b64(token::ID_BYTES)?;
    let secret = random_b64(token::SECRET_BYTES)?;
    let created = now();
    store.create_token(&TokenRecord {
        id: id.clone(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        grant: grant.clone(),
        created_at: created,
        expires_at: created + ttl.as_secs() as i64,
        used_at: None,
        revoked_at: None,
    })?;
    audit(
        &*store,
        "token.create",
        &format!("token:{id}"),
        format!("{} token", grant.role),
    )?;
    let token = EnrollToken {
        id: id.clone(),
        secret,
        relay: relays[0].clone(),
        more_relays: relays[1..].to_vec(),
        server_name,
        tcp_port,
        ca_sha256: sha256_hex(ca.cert_der()),
    };
    eprintln!(
        "token {id}: enrols one {} via {}, usable for {}; hand it over privately",
        grant.role,
        relays.join(", "),
        humantime::format_duration(*ttl)
    );
    out!("{}", token.encode());
    Ok(())
}

/// Lists tokens with their status, as a table or JSON.
fn token_list(at: &StateArgs, json: bool) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let tokens = store.tokens()?;
    let now = now();
    let status = |t: &TokenRecord| {
        if t.revoked_at.is_some() {
            "revoked"
        } else if t.used_at.is_some() {
            "used"
        } else if t.expires_at <= now {
            "expired"
        } else {
            "active"
        }
    };
    if json {
        let rows: Vec<_> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id, "role": t.grant.role, "user": t.grant.user,
                    "groups": t.grant.groups, "name": t.grant.name,
                    "hostnames": t.grant.hostnames, "expires_at": t.expires_at,
                    "status": status(t),
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!(
        "{:<10} {:<10} {:<32} {:<20} STATUS",
        "ID",
        "ROLE",
        "GRANTS",
        "EXPIRES (UTC)"
    );
    for t in &tokens {
        let grants = match t.grant.role {
            Role::Device => format!(
                "{} [{}]",
                t.grant.user.as_deref().unwrap_or("-"),
                t.grant.groups.join(",")
            ),
            Role::Connector => format!(
                "{} ({})",
                t.grant.name.as_deref().unwrap_or("-"),
                t.grant
                    .hostnames
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        out!(
            "{:<10} {:<10} {:<32} {:<20} {}",
            printable(&t.id),
            t.grant.role,
            printable(&grants),
            rfc3339(t.expires_at),
            status(t)
        );
    }
    Ok(())
}

/// Revokes an unused token.
fn token_revoke(at: &StateArgs, id: &str) -> anyhow::Result<()> {
    let store = open_store(at)?;
    store.revoke_token(id, now())?;
    audit(
        &*store,
        "token.revoke",
        &format!("token:{id}"),
        String::new(),
    )?;
    out!("revoked token {id}");
    Ok(())
}

fn check_plain(flag: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b));
    if !ok {
        bail!("invalid {flag} {s:?}: use 1 to 128 characters from A-Z a-z 0-9 . _ @ + -");
    }
    Ok(())
}
