//! The identity assertion the relay adds to every proxied request: an ES256 JWT in
//! `portcullis-jwt-assertion`, with the public key served as a JWKS so origins can verify
//! who is calling without trusting headers.
//!
//! Rotation is a file convention in the state directory: [`KEY_FILE`] signs, and
//! [`PREVIOUS_KEY_FILE`], while it exists, is published in the JWKS beside it so tokens
//! it signed keep verifying. [`rotate`] (`portcullis-relay jwt rotate`) moves the signing
//! key to the previous one and makes a new one; [`retire`] (`jwt retire`) ends the
//! overlap. A running relay re-reads both files every 2 s ([`JwtSigner::reload`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// File in the state directory holding the signing key (PKCS#8, 0600).
pub(crate) const KEY_FILE: &str = "jwt-signing.key";
/// File in the state directory holding the previous signing key during an overlap: still
/// published, no longer used.
pub(crate) const PREVIOUS_KEY_FILE: &str = "jwt-signing.previous.key";
/// How long an assertion is valid.
const LIFETIME_SECS: i64 = 60;
/// A token is reused for this long for the same claims, so the origin always gets one with
/// at least `LIFETIME_SECS - REUSE_SECS` left, and the relay signs once per caller and
/// host per half-minute instead of once per request.
const REUSE_SECS: i64 = 30;
/// Cached tokens kept at most (one per device, user, groups and hostname in use).
const CACHE_MAX: usize = 10_000;

/// The keys in force: the signing key, and the JWKS listing it and the previous one.
struct Keys {
    key: EcdsaKeyPair,
    kid: String,
    jwks: Arc<str>,
    /// The files' contents these keys were made from, to notice a change.
    files: (Vec<u8>, Option<Vec<u8>>),
}

pub(crate) struct JwtSigner {
    state_dir: PathBuf,
    rng: SystemRandom,
    issuer: String,
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

/// `jwt rotate`: the signing key becomes the previous one (replacing any earlier previous
/// key) and a new key signs. Returns the new key's id.
pub(crate) fn rotate(state_dir: &Path) -> anyhow::Result<String> {
    let rng = SystemRandom::new();
    let current = state_dir.join(KEY_FILE);
    if let Some(old) = read(&current)? {
        parse(&current, &old, &rng)?;
        portcullis_shared::pki::write_private_file(&state_dir.join(PREVIOUS_KEY_FILE), &old)?;
    }
    let fresh = new_key(&rng)?;
    let (_, kid, _) = parse(&current, &fresh, &rng)?;
    portcullis_shared::pki::write_private_file(&current, &fresh)?;
    Ok(kid)
}

/// `jwt retire`: stops publishing the previous key. Returns whether there was one.
pub(crate) fn retire(state_dir: &Path) -> anyhow::Result<bool> {
    let path = state_dir.join(PREVIOUS_KEY_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

impl JwtSigner {
    /// Loads the signing keys from the state directory, creating the signing key on first
    /// use.
    pub(crate) fn load_or_create(state_dir: &Path, issuer: String) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let path = state_dir.join(KEY_FILE);
        if read(&path)?.is_none() {
            portcullis_shared::pki::write_private_file(&path, &new_key(&rng)?)?;
        }
        let keys = Self::load_keys(state_dir, &rng)?;
        Ok(Self {
            state_dir: state_dir.to_owned(),
            rng,
            issuer,
            keys: RwLock::new(Arc::new(keys)),
            cache: std::sync::Mutex::default(),
        })
    }

    fn load_keys(state_dir: &Path, rng: &SystemRandom) -> anyhow::Result<Keys> {
        let path = state_dir.join(KEY_FILE);
        let current = read(&path)?.with_context(|| format!("{} is missing", path.display()))?;
        let (key, kid, jwk) = parse(&path, &current, rng)?;
        let mut jwks = vec![jwk];
        let previous_path = state_dir.join(PREVIOUS_KEY_FILE);
        let previous = read(&previous_path)?;
        if let Some(bytes) = &previous {
            let (_, old_kid, old) = parse(&previous_path, bytes, rng)?;
            if old_kid != kid {
                jwks.push(old);
            }
        }
        Ok(Keys {
            key,
            kid,
            jwks: serde_json::json!({ "keys": jwks }).to_string().into(),
            files: (current, previous),
        })
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the key files; if they changed, signs with the new key from now on and
    /// publishes the new set. Returns whether anything changed. Unreadable or invalid
    /// files keep the keys in force.
    pub(crate) fn reload(&self) -> anyhow::Result<bool> {
        let current = read(&self.state_dir.join(KEY_FILE))?;
        let previous = read(&self.state_dir.join(PREVIOUS_KEY_FILE))?;
        let keys = self.keys();
        if current.as_ref() == Some(&keys.files.0) && previous == keys.files.1 {
            return Ok(false);
        }
        let fresh = Self::load_keys(&self.state_dir, &self.rng)?;
        tracing::info!(
            kid = %fresh.kid,
            previous_published = fresh.files.1.is_some(),
            "JWT signing keys reloaded"
        );
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        // Cached tokens were signed with the old key: sign anew.
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        Ok(true)
    }

    /// The JWKS: the signing key, and the previous one during an overlap.
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
        let signer = JwtSigner::load_or_create(dir.path(), "https://relay.test".into()).unwrap();
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
        let again = JwtSigner::load_or_create(dir.path(), "https://relay.test".into()).unwrap();
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
    fn a_rotated_key_signs_while_the_previous_one_stays_published_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JwtSigner::load_or_create(dir.path(), "https://relay.test".into()).unwrap();
        let claims = |now| Claims {
            user: "alice",
            device: "laptop",
            groups: &[],
            hostname: "app.internal",
            now,
        };
        let old = signer.token(&claims(1000)).unwrap();
        let old_kid = verify(&signer.jwks(), &old).unwrap();
        assert!(!signer.reload().unwrap(), "nothing changed yet");

        let new_kid = rotate(dir.path()).unwrap();
        assert_ne!(new_kid, old_kid);
        assert!(signer.reload().unwrap());
        // The overlap: new tokens carry the new key, old ones still verify.
        let jwks = signer.jwks();
        let new = signer.token(&claims(1001)).unwrap();
        assert_eq!(verify(&jwks, &new).unwrap(), new_kid);
        assert_eq!(verify(&jwks, &old).unwrap(), old_kid);
        // A restarted relay sees the same pair.
        let again = JwtSigner::load_or_create(dir.path(), "https://relay.test".into()).unwrap();
        assert_eq!(again.jwks(), jwks);

        assert!(retire(dir.path()).unwrap());
        assert!(!retire(dir.path()).unwrap());
        assert!(signer.reload().unwrap());
        let jwks = signer.jwks();
        assert_eq!(verify(&jwks, &new).unwrap(), new_kid);
        assert!(verify(&jwks, &old).is_err());
    }

    #[test]
    fn tokens_are_reused_for_the_same_claims_within_half_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JwtSigner::load_or_create(dir.path(), "https://relay.test".into()).unwrap();
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
