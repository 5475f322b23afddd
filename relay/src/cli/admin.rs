//! Offline admin commands run on the relay host: CA creation, direct issuance,
//! revocation and listing. They share the state directory (and its SQLite store) with a
//! running relay, which picks their changes up within a second.

use std::path::{Path, PathBuf};
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
use crate::identity::state_dir::{check_caller, hand_back, same_dir};
use crate::identity::store::{AdminOpen, open_for_admin};

/// Where an admin command works: the state directory and the store, resolved once from
/// `--state`, `--store`, `--config` (or their environment variables) and the directory's
/// record of its relay's store.
#[derive(Debug)]
pub struct Place {
    /// The relay's state directory.
    pub state: PathBuf,
    /// The shared store's URL, when one was named.
    store: Option<String>,
    /// The relay.toml given, if any.
    config: Option<PathBuf>,
    /// Its `jwt_prepublish`, or the default.
    jwt_prepublish: Duration,
}

impl Place {
    /// Resolves `at`: the state directory is `--state` or `state_dir` of `--config`'s
    /// file (both given: they must agree); the store is `--store`, else the file's.
    pub fn resolve(at: &StateArgs) -> anyhow::Result<Self> {
        let view = match &at.config {
            Some(path) => Some(
                portcullis_shared::config::RelayConfig::for_admin(path)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            None => None,
        };
        let state = match (&at.state, &view) {
            (Some(state), Some(view)) if !same_dir(state, &view.state_dir) => bail!(
                "--state {} is not the state_dir of {} ({}): give one of them",
                state.display(),
                at.config.as_deref().unwrap_or(Path::new("")).display(),
                view.state_dir.display()
            ),
            (Some(state), _) => state.clone(),
            (None, Some(view)) => view.state_dir.clone(),
            (None, None) => bail!(
                "which relay? give its relay.toml with --config FILE (or PORTCULLIS_CONFIG), or its state directory with --state DIR"
            ),
        };
        check_caller(&state)?;
        let store = at
            .store
            .clone()
            .or_else(|| view.as_ref().and_then(|v| v.store_url.clone()));
        Ok(Self {
            state,
            store,
            config: at.config.clone(),
            jwt_prepublish: view.map_or(Duration::from_secs(3600), |v| v.jwt_prepublish),
        })
    }

    /// Opens the relay's store (never a stray SQLite file: [`open_for_admin`]).
    fn open(&self, mode: AdminOpen) -> anyhow::Result<Arc<dyn Store>> {
        open_for_admin(
            &self.state,
            self.store.as_deref(),
            self.config.as_deref(),
            mode,
        )
    }
}

/// Runs `command` on the relay `at` names. Run as a user who neither owns the state
/// directory nor is root, it is refused before anything happens; run as root, what it
/// wrote there is given back to the directory's owner, so the relay can read it.
pub fn with_place(
    at: &StateArgs,
    command: impl FnOnce(&Place) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let place = Place::resolve(at)?;
    let result = command(&place);
    let handed = hand_back(&place.state);
    result?;
    Ok(handed?)
}

/// Opens the store of an existing relay.
fn open_store(at: &Place) -> anyhow::Result<Arc<dyn Store>> {
    at.open(AdminOpen::Existing)
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
fn publishable(at: &Place, hostnames: &[String]) -> anyhow::Result<Vec<HostPattern>> {
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
pub fn ca_export_root(at: &Place, out: &Path) -> anyhow::Result<()> {
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
pub fn ca_remove_root_key(at: &Place) -> anyhow::Result<()> {
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
pub fn ca_rotate_intermediate(at: &Place, root_key: Option<&Path>) -> anyhow::Result<()> {
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
pub fn ca_init(at: &Place, org: &str, permit_dns: &[String]) -> anyhow::Result<()> {
    let state = &at.state;
    let ca = Ca::init_constrained(state, org, permit_dns)?;
    crate::identity::jwt::create_key(state)?;
    let store = at.open(AdminOpen::Create)?;
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
    at: &Place,
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
    at: &Place,
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
    let cert = out.join(format!("{name}.crt"));
    let granted: String = patterns.iter().map(|p| format!("{p}\n")).collect();
    pki::write_public_file(
        &portcullis_shared::config::granted_hostnames_path(&cert),
        granted.as_bytes(),
    )?;
    out!(
        "issued connector {name} for {}: {} (keep {} beside it: `portcullis-connector check` reads it)",
        hostnames.join(", "),
        cert.display(),
        portcullis_shared::config::granted_hostnames_path(&cert).display()
    );
    Ok(())
}

/// `issue device`.
pub fn issue_device(
    at: &Place,
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
pub fn revoke(at: &Place, role: Role, id: &str) -> anyhow::Result<()> {
    let identity = Identity::new(role, id)?;
    let store = open_store(at)?;
    store.revoke(&identity, now())?;
    audit(&*store, "revoke", &identity.to_string(), String::new())?;
    out!("revoked {identity}; a running relay drops its connections within a second");
    Ok(())
}

/// `revoke user`: every device of `user` that is not revoked yet.
pub fn revoke_user(at: &Place, user: &str) -> anyhow::Result<()> {
    check_plain("user", user)?;
    let store = open_store(at)?;
    let devices: Vec<IdentityRecord> = store
        .identities()?
        .into_iter()
        .filter(|r| r.identity.role() == Role::Device && r.user.as_deref() == Some(user))
        .collect();
    if devices.is_empty() {
        bail!(
            "no device belongs to user {user}: `portcullis-relay list` shows who has which; nothing was changed"
        );
    }
    let active: Vec<&IdentityRecord> = devices.iter().filter(|r| r.revoked_at.is_none()).collect();
    if active.is_empty() {
        out!(
            "every device of user {user} was already revoked ({})",
            devices.len()
        );
        return Ok(());
    }
    let at_time = now();
    for record in &active {
        store.revoke(&record.identity, at_time)?;
        audit(
            &*store,
            "revoke",
            &record.identity.to_string(),
            format!("every device of user {user}"),
        )?;
        out!("revoked {}", record.identity);
    }
    out!(
        "revoked {} device(s) of user {user}; a running relay drops their connections within a second",
        active.len()
    );
    Ok(())
}

/// `jwt rotate`.
pub fn jwt_rotate(at: &Place) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let prepublish = at.jwt_prepublish;
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

/// `jwt retire`.
pub fn jwt_retire(at: &Place) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let prepublish = at.jwt_prepublish;
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
pub fn audit_list(at: &Place, filter: &AuditFilter, json: bool) -> anyhow::Result<()> {
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
pub fn list(at: &Place, json: bool) -> anyhow::Result<()> {
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
        TokenCommand::Create(create) => {
            let state = match &create {
                TokenCreate::Device { state, .. } | TokenCreate::Connector { state, .. } => state,
            };
            with_place(state, |at| token_create(at, &create))
        }
        TokenCommand::List { state, json } => with_place(&state, |at| token_list(at, json)),
        TokenCommand::Revoke { id, state } => with_place(&state, |at| token_revoke(at, &id)),
    }
}

/// Creates a one-time enrolment token and prints it (last line of standard output).
fn token_create(state: &Place, create: &TokenCreate) -> anyhow::Result<()> {
    let (ttl, endpoint_args, grant) = match &create {
        TokenCreate::Device {
            user,
            groups,
            ttl,
            cert_ttl,
            endpoint,
            ..
        } => {
            check_plain("--user", user)?;
            for g in groups {
                check_plain("--group", g)?;
            }
            (
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
            ..
        } => {
            Identity::new(Role::Connector, name)?;
            let patterns = publishable(state, hostnames)?;
            (
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
    // An id that began with `-` would read as a flag in `token revoke ID`.
    let id = loop {
        let id = random_b64(token::ID_BYTES)?;
        if !id.starts_with('-') {
            break id;
        }
    };
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
fn token_list(at: &Place, json: bool) -> anyhow::Result<()> {
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
fn token_revoke(at: &Place, id: &str) -> anyhow::Result<()> {
    let store = open_store(at)?;
    let used = store
        .tokens()?
        .into_iter()
        .find(|t| t.id == id)
        .and_then(|t| t.used_at);
    store.revoke_token(id, now())?;
    audit(
        &*store,
        "token.revoke",
        &format!("token:{id}"),
        String::new(),
    )?;
    out!("revoked token {id}");
    if let Some(used_at) = used {
        let enrolled = enrolled_with(&*store, id, used_at)?;
        let (who, how) = match &enrolled {
            Some(identity) => (
                identity.to_string(),
                format!(
                    "`portcullis-relay revoke {} {}`",
                    identity.role(),
                    identity.id()
                ),
            ),
            None => (
                "its identity".to_owned(),
                "`portcullis-relay revoke device|connector ID`".to_owned(),
            ),
        };
        eprintln!(
            "note: token {id} was used at {}: revoking it does not revoke {who}, which it enrolled; do that with {how}",
            rfc3339(used_at)
        );
    }
    Ok(())
}

/// The identity a used token enrolled, from the audit log.
fn enrolled_with(store: &dyn Store, id: &str, used_at: i64) -> anyhow::Result<Option<Identity>> {
    let mark = format!("with token:{id}");
    Ok(store
        .audit_log(&AuditQuery {
            since: Some(used_at - 60),
            until: Some(used_at + 60),
        })?
        .into_iter()
        .filter(|e| e.action == "enroll" && e.detail.contains(&mark))
        .find_map(|e| {
            let (role, id) = e.subject.split_once(':')?;
            Identity::new(Role::parse(role)?, id).ok()
        }))
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
