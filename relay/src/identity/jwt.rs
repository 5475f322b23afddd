//! The identity assertion the relay adds to every proxied request: an ES256 JWT in
//! `portcullis-jwt-assertion`, with the public key served as a JWKS so origins can verify
//! who is calling without trusting headers.
//!
//! Rotation is a file convention in the state directory, read the same way by every
//! relay sharing those files (a Kubernetes Secret, read-only): [`KEY_FILE`] signs;
//! [`NEXT_KEY_FILE`], written by [`rotate`] (`portcullis-relay jwt rotate`) with the time
//! it was made beside it ([`NEXT_META_FILE`]), is published in the JWKS at once and signs
//! from `jwt_prepublish` (default 1 h) after it was made, so origins that cache the JWKS
//! know it before they see a token it signed; the key it replaces stays published.
//! [`PREVIOUS_KEY_FILE`], while it exists, is published too. Which key signs is computed
//! from the files and the time, never written, so relays agree without writing to shared
//! files. [`retire`] (`jwt retire`) ends the overlap. A running relay re-reads the files
//! every 2 s ([`JwtSigner::reload`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use crate::clock::{now, rfc3339};

/// File in the state directory holding the signing key (PKCS#8, 0600).
pub(crate) const KEY_FILE: &str = "jwt-signing.key";
/// File in the state directory holding the previous signing key during an overlap: still
/// published, no longer used.
pub(crate) const PREVIOUS_KEY_FILE: &str = "jwt-signing.previous.key";
/// File in the state directory holding the next signing key: published, signing from
/// `jwt_prepublish` after it was made.
pub(crate) const NEXT_KEY_FILE: &str = "jwt-signing.next.key";
/// When the next key was made: `{"created": <unix seconds>}`. A next key without it is
/// published but never signs.
pub(crate) const NEXT_META_FILE: &str = "jwt-signing.next.json";
/// How long an assertion is valid.
const LIFETIME_SECS: i64 = 60;
/// A token is reused for this long for the same claims, so the origin always gets one with
/// at least `LIFETIME_SECS - REUSE_SECS` left, and the relay signs once per caller and
/// host per half-minute instead of once per request.
const REUSE_SECS: i64 = 30;
/// Cached tokens kept at most (one per device, user, groups and hostname in use).
const CACHE_MAX: usize = 10_000;

/// The keys in force: the signing key, and the JWKS listing every published one.
struct Keys {
    key: EcdsaKeyPair,
    kid: String,
    jwks: Arc<str>,
    /// The files' contents these keys were made from, to notice a change.
    files: KeyFiles,
    /// When the pending next key starts signing (Unix seconds), if there is one.
    promote_at: Option<i64>,
}

/// The key files' contents: current, previous, next and the next key's creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyFiles {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
    next: Option<Vec<u8>>,
    next_created: Option<i64>,
}

impl KeyFiles {
    fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(KEY_FILE);
        let meta = read(&state_dir.join(NEXT_META_FILE))?;
        Ok(Self {
            current: read(&path)?.with_context(|| format!("{} is missing", path.display()))?,
            previous: read(&state_dir.join(PREVIOUS_KEY_FILE))?,
            next: read(&state_dir.join(NEXT_KEY_FILE))?,
            next_created: meta
                .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                .and_then(|m| m["created"].as_i64()),
        })
    }

    /// When the next key signs from, if there is one that may sign.
    fn signs_from(&self, prepublish: Duration) -> Option<i64> {
        let created = self.next.as_ref().and(self.next_created)?;
        Some(created.saturating_add(i64::try_from(prepublish.as_secs()).unwrap_or(i64::MAX)))
    }
}

pub(crate) struct JwtSigner {
    state_dir: PathBuf,
    rng: SystemRandom,
    issuer: String,
    /// `jwt_prepublish`: how long a next key is published before it signs.
    prepublish: Duration,
    keys: RwLock<Arc<Keys>>,
    /// Tokens by what they say apart from their times (see [`JwtSigner::token`]).
    cache: std::sync::Mutex<std::collections::HashMap<String, (i64, Arc<str>)>>,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.keys().kid)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Claims<'a> {
    pub(crate) user: &'a str,
    pub(crate) device: &'a str,
    pub(crate) groups: &'a [String],
    pub(crate) hostname: &'a str,
    pub(crate) now: i64,
}

fn new_key(rng: &SystemRandom) -> anyhow::Result<Vec<u8>> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
        .map_err(|_| anyhow::anyhow!("cannot generate a JWT signing key"))?;
    Ok(doc.as_ref().to_vec())
}

fn read(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A key pair from PKCS#8 and its JWK and key id.
fn parse(
    path: &Path,
    pkcs8: &[u8],
    rng: &SystemRandom,
) -> anyhow::Result<(EcdsaKeyPair, String, serde_json::Value)> {
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, rng)
        .map_err(|e| anyhow::anyhow!("{}: not a P-256 PKCS#8 key ({e})", path.display()))?;
    // Uncompressed point: 0x04 || x || y.
    let public = key.public_key().as_ref();
    let (x, y) = public[1..].split_at(32);
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    let kid = B64.encode(&digest.as_ref()[..12]);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
        "kid": kid, "x": B64.encode(x), "y": B64.encode(y),
    });
    Ok((key, kid, jwk))
}

/// What `jwt rotate` made: the new key's id and when it signs from.
#[derive(Debug)]
pub(crate) struct Rotation {
    pub(crate) kid: String,
    pub(crate) signs_from: i64,
}

/// Makes a next key that has finished its pre-publication the signing key in the files
/// (the key it replaces becomes the previous one), as the relays already treat it.
/// Refuses while a next key is still being pre-published.
fn fold_due_next(state_dir: &Path, prepublish: Duration, now: i64) -> anyhow::Result<()> {
    let files = KeyFiles::read(state_dir)?;
    let Some(next) = &files.next else {
        return Ok(());
    };
    match files.signs_from(prepublish) {
        Some(from) if from <= now => {}
        Some(from) => anyhow::bail!(
            "the next JWT signing key is still being pre-published: it signs from {}; run this again after that",
            rfc3339(from)
        ),
        None => anyhow::bail!(
            "{} has no {} beside it, so it never signs: remove it, or put it back with its creation time",
            state_dir.join(NEXT_KEY_FILE).display(),
            NEXT_META_FILE
        ),
    }
    let write = portcullis_shared::pki::write_private_file;
    write(&state_dir.join(PREVIOUS_KEY_FILE), &files.current)?;
    write(&state_dir.join(KEY_FILE), next)?;
    for f in [NEXT_KEY_FILE, NEXT_META_FILE] {
        remove_if_present(&state_dir.join(f))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// `jwt rotate`: a new key, published at once and signing from `prepublish` after `now`;
/// the key it will replace stays published. A next key whose pre-publication is over is
/// first made the signing key (the one it replaced becomes the previous one).
pub(crate) fn rotate(state_dir: &Path, prepublish: Duration, now: i64) -> anyhow::Result<Rotation> {
    let rng = SystemRandom::new();
    fold_due_next(state_dir, prepublish, now)?;
    let fresh = new_key(&rng)?;
    let path = state_dir.join(NEXT_KEY_FILE);
    let (_, kid, _) = parse(&path, &fresh, &rng)?;
    // The time first: a next key without it would never sign.
    portcullis_shared::pki::write_private_file(
        &state_dir.join(NEXT_META_FILE),
        serde_json::json!({ "created": now }).to_string().as_bytes(),
    )?;
    portcullis_shared::pki::write_private_file(&path, &fresh)?;
    let signs_from = KeyFiles::read(state_dir)?
        .signs_from(prepublish)
        .unwrap_or(now);
    Ok(Rotation { kid, signs_from })
}

/// `jwt retire`: stops publishing the previous key (after making a next key whose
/// pre-publication is over the signing one). Returns whether there was one.
pub(crate) fn retire(state_dir: &Path, prepublish: Duration, now: i64) -> anyhow::Result<bool> {
    fold_due_next(state_dir, prepublish, now)?;
    remove_if_present(&state_dir.join(PREVIOUS_KEY_FILE))
}

/// Makes the signing key in `state_dir` unless it holds one (`ca init` makes it, so that a
/// new state directory is complete and relays given copies of it sign alike from the
/// start; a relay makes it on first start otherwise).
pub(crate) fn create_key(state_dir: &Path) -> anyhow::Result<()> {
    let path = state_dir.join(KEY_FILE);
    if read(&path)?.is_none() {
        portcullis_shared::pki::write_private_file(&path, &new_key(&SystemRandom::new())?)?;
    }
    Ok(())
}

impl JwtSigner {
    /// Loads the signing keys from the state directory, creating the signing key on first
    /// use; a next key signs from `prepublish` after it was made.
    pub(crate) fn load_or_create(
        state_dir: &Path,
        issuer: String,
        prepublish: Duration,
    ) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        create_key(state_dir)?;
        let keys = Self::load_keys(state_dir, &rng, prepublish, now())?;
        Ok(Self {
            state_dir: state_dir.to_owned(),
            rng,
            issuer,
            prepublish,
            keys: RwLock::new(Arc::new(keys)),
            cache: std::sync::Mutex::default(),
        })
    }

    /// The keys the files say are in force at `now`: the next key signs once its
    /// pre-publication is over, else the current one; every key on file is published,
    /// the signing one first.
    fn load_keys(
        state_dir: &Path,
        rng: &SystemRandom,
        prepublish: Duration,
        now: i64,
    ) -> anyhow::Result<Keys> {
        let files = KeyFiles::read(state_dir)?;
        let signs_from = files.signs_from(prepublish);
        if files.next.is_some() && signs_from.is_none() {
            tracing::warn!(
                file = %state_dir.join(NEXT_KEY_FILE).display(),
                "a next JWT signing key without its creation time is published but never signs"
            );
        }
        let next_signs = signs_from.is_some_and(|t| t <= now);
        let current = (state_dir.join(KEY_FILE), files.current.clone());
        let next = files
            .next
            .clone()
            .map(|bytes| (state_dir.join(NEXT_KEY_FILE), bytes));
        let previous = files
            .previous
            .clone()
            .map(|bytes| (state_dir.join(PREVIOUS_KEY_FILE), bytes));
        let (signing, others) = match next {
            Some(next) if next_signs => (next, vec![Some(current), previous]),
            next => (current, vec![next, previous]),
        };
        let (key, kid, jwk) = parse(&signing.0, &signing.1, rng)?;
        let mut kids = vec![kid.clone()];
        let mut jwks = vec![jwk];
        for (path, bytes) in others.into_iter().flatten() {
            let (_, other_kid, other) = parse(&path, &bytes, rng)?;
            if !kids.contains(&other_kid) {
                kids.push(other_kid);
                jwks.push(other);
            }
        }
        Ok(Keys {
            key,
            kid,
            jwks: serde_json::json!({ "keys": jwks }).to_string().into(),
            files,
            promote_at: signs_from.filter(|_| !next_signs),
        })
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the key files; if they changed, or a pre-published next key's time to
    /// sign has come, signs with the key now in force and publishes the new set. Returns
    /// whether anything changed. Unreadable or invalid files keep the keys in force.
    pub(crate) fn reload(&self) -> anyhow::Result<bool> {
        self.reload_at(now())
    }

    fn reload_at(&self, now: i64) -> anyhow::Result<bool> {
        let files = KeyFiles::read(&self.state_dir)?;
        let keys = self.keys();
        let promoting = keys.promote_at.is_some_and(|t| t <= now);
        if files == keys.files && !promoting {
            return Ok(false);
        }
        let fresh = Self::load_keys(&self.state_dir, &self.rng, self.prepublish, now)?;
        tracing::info!(
            kid = %fresh.kid,
            published = fresh.jwks.matches("\"kid\"").count(),
            "JWT signing keys reloaded"
        );
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        // Cached tokens were signed with the old key: sign anew.
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        Ok(true)
    }

    /// The JWKS: the signing key, and the next and previous ones while they exist.
    pub(crate) fn jwks(&self) -> Arc<str> {
        self.keys().jwks.clone()
    }

    /// A token for `c`: a cached one issued less than `REUSE_SECS` ago, or a new one.
    pub(crate) fn token(&self, c: &Claims<'_>) -> Option<Arc<str>> {
        // Each claim prefixed by its length, so no two claim sets make the same key.
        let mut key = String::new();
        for part in [c.user, c.device, c.hostname]
            .into_iter()
            .chain(c.groups.iter().map(String::as_str))
        {
            let _ = std::fmt::Write::write_fmt(&mut key, format_args!("{}:{part}", part.len()));
        }
        let fresh = |issued: i64| (0..REUSE_SECS).contains(&(c.now - issued));
        if let Ok(cache) = self.cache.lock()
            && let Some((issued, token)) = cache.get(&key)
            && fresh(*issued)
        {
            return Some(token.clone());
        }
        let token: Arc<str> = self.sign(c)?.into();
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (issued, _)| fresh(*issued));
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (c.now, token.clone()));
        }
        Some(token)
    }

    fn sign(&self, c: &Claims<'_>) -> Option<String> {
        let keys = self.keys();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": keys.kid});
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": c.hostname,
            "sub": c.user,
            "device": c.device,
            "groups": c.groups,
            "iat": c.now,
            "nbf": c.now - 5,
            "exp": c.now + LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = keys.key.sign(&self.rng, signing_input.as_bytes()).ok()?;
        Some(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn tokens_verify_against_the_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let signer =
            JwtSigner::load_or_create(dir.path(), "https://relay.test".into(), Duration::ZERO)
                .unwrap();
        let token = signer
            .sign(&Claims {
                user: "alice",
                device: "laptop",
                groups: &["eng".into()],
                hostname: "app.internal",
                now: 1000,
            })
            .unwrap();
        let jwks: serde_json::Value = serde_json::from_str(&signer.jwks()).unwrap();
        let key = &jwks["keys"][0];
        let mut point = vec![4u8];
        point.extend(B64.decode(key["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(key["y"].as_str().unwrap()).unwrap());
        let (input, sig) = token.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &B64.decode(sig).unwrap())
            .unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(input.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], "app.internal");
        // The same key is found again after a restart.
        let again =
            JwtSigner::load_or_create(dir.path(), "https://relay.test".into(), Duration::ZERO)
                .unwrap();
        assert_eq!(again.jwks(), signer.jwks());
    }

    /// Verifies `token` against the key in `jwks` named by its `kid`; the kid.
    fn verify(jwks: &str, token: &str) -> Result<String, String> {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(input.split('.').next().unwrap()).unwrap()).unwrap();
        let kid = header["kid"].as_str().unwrap();
        let jwks: serde_json::Value = serde_json::from_str(jwks).unwrap();
        let key = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid)
            .ok_or(format!("{kid} is not published"))?;
        let mut point = vec![4u8];
        point.extend(B64.decode(key["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(key["y"].as_str().unwrap()).unwrap());
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &B64.decode(sig).unwrap())
            .map_err(|_| "bad signature".to_owned())?;
        Ok(kid.to_owned())
    }

    #[test]
    fn a_rotated_key_is_published_first_signs_after_the_prepublication_and_the_old_one_stays_until_retired()
     {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let signer =
            JwtSigner::load_or_create(dir.path(), "https://relay.test".into(), hour).unwrap();
        let claims = |now| Claims {
            user: "alice",
            device: "laptop",
            groups: &[],
            hostname: "app.internal",
            now,
        };
        let t0 = now();
        let old = signer.token(&claims(t0)).unwrap();
        let old_kid = verify(&signer.jwks(), &old).unwrap();
        assert!(!signer.reload_at(t0).unwrap(), "nothing changed yet");

        // Rotation: the new key is published at once, but the old one still signs.
        let rotation = rotate(dir.path(), hour, t0).unwrap();
        assert_eq!(rotation.signs_from, t0 + 3600);
        let new_kid = rotation.kid;
        assert_ne!(new_kid, old_kid);
        assert!(signer.reload_at(t0).unwrap());
        assert!(signer.jwks().contains(&new_kid));
        let during = signer.token(&claims(t0 + 1)).unwrap();
        assert_eq!(verify(&signer.jwks(), &during).unwrap(), old_kid);
        // A second rotation must wait for this one.
        let err = rotate(dir.path(), hour, t0 + 60).unwrap_err().to_string();
        assert!(err.contains("still being pre-published"), "{err}");
        assert!(retire(dir.path(), hour, t0 + 60).is_err());

        // An hour later the new key signs (no file written), the old one stays published.
        assert!(!signer.reload_at(t0 + 3599).unwrap());
        assert!(signer.reload_at(t0 + 3600).unwrap());
        let jwks = signer.jwks();
        let new = signer.token(&claims(t0 + 3601)).unwrap();
        assert_eq!(verify(&jwks, &new).unwrap(), new_kid);
        assert_eq!(verify(&jwks, &old).unwrap(), old_kid);
        // A relay started then agrees.
        let again =
            JwtSigner::load_keys(dir.path(), &SystemRandom::new(), hour, t0 + 3601).unwrap();
        assert_eq!(again.jwks, jwks);

        // Retiring makes the files say so, and stops publishing the old key.
        assert!(retire(dir.path(), hour, t0 + 3700).unwrap());
        assert!(!retire(dir.path(), hour, t0 + 3700).unwrap());
        assert!(signer.reload_at(t0 + 3700).unwrap());
        let jwks = signer.jwks();
        assert_eq!(verify(&jwks, &new).unwrap(), new_kid);
        assert!(verify(&jwks, &old).is_err());
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    }

    #[test]
    fn a_next_key_without_its_creation_time_is_published_and_never_signs() {
        let dir = tempfile::tempdir().unwrap();
        let signer =
            JwtSigner::load_or_create(dir.path(), "https://relay.test".into(), Duration::ZERO)
                .unwrap();
        let first = signer.keys().kid.clone();
        let rotation = rotate(dir.path(), Duration::ZERO, now()).unwrap();
        std::fs::remove_file(dir.path().join(NEXT_META_FILE)).unwrap();
        assert!(signer.reload_at(now() + 10).unwrap());
        assert_eq!(signer.keys().kid, first);
        assert!(signer.jwks().contains(&rotation.kid));
    }

    #[test]
    fn tokens_are_reused_for_the_same_claims_within_half_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let signer =
            JwtSigner::load_or_create(dir.path(), "https://relay.test".into(), Duration::ZERO)
                .unwrap();
        let (eng, ops) = (vec!["eng".to_owned()], vec!["ops".to_owned()]);
        let token = |now: i64, hostname: &str, groups: &[String]| {
            signer
                .token(&Claims {
                    user: "alice",
                    device: "laptop",
                    groups,
                    hostname,
                    now,
                })
                .unwrap()
        };
        let first = token(1000, "app.internal", &eng);
        assert_eq!(token(1029, "app.internal", &eng), first);
        // Other claims, or half a minute later: a new token.
        assert_ne!(token(1001, "db.internal", &eng), first);
        assert_ne!(token(1001, "app.internal", &ops), first);
        assert_ne!(token(1030, "app.internal", &eng), first);
    }
}
