//! The identity assertion the relay adds to every proxied request: an ES256 JWT in
//! `portcullis-jwt-assertion`, with the public key served as a JWKS so origins can verify
//! who is calling without trusting headers.

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// File in the state directory holding the signing key (PKCS#8, 0600).
const KEY_FILE: &str = "jwt-signing.key";
/// How long an assertion is valid.
const LIFETIME_SECS: i64 = 60;
/// A token is reused for this long for the same claims, so the origin always gets one with
/// at least `LIFETIME_SECS - REUSE_SECS` left, and the relay signs once per caller and
/// host per half-minute instead of once per request.
const REUSE_SECS: i64 = 30;
/// Cached tokens kept at most (one per device, user, groups and hostname in use).
const CACHE_MAX: usize = 10_000;

pub(crate) struct JwtSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    issuer: String,
    jwks: String,
    /// Tokens by what they say apart from their times (see [`JwtSigner::token`]).
    cache: std::sync::Mutex<std::collections::HashMap<String, (i64, std::sync::Arc<str>)>>,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
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

impl JwtSigner {
    /// Loads the signing key from the state directory, creating it on first use.
    pub(crate) fn load_or_create(state_dir: &Path, issuer: String) -> anyhow::Result<Self> {
        let path = state_dir.join(KEY_FILE);
        let rng = SystemRandom::new();
        let pkcs8 = if path.exists() {
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        } else {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| anyhow::anyhow!("cannot generate the JWT signing key"))?;
            portcullis_shared::pki::write_private_file(&path, doc.as_ref())?;
            doc.as_ref().to_vec()
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| anyhow::anyhow!("{}: not a P-256 PKCS#8 key ({e})", path.display()))?;
        // Uncompressed point: 0x04 || x || y.
        let public = key.public_key().as_ref();
        let (x, y) = public[1..].split_at(32);
        let digest = ring::digest::digest(&ring::digest::SHA256, public);
        let kid = B64.encode(&digest.as_ref()[..12]);
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                "kid": kid, "x": B64.encode(x), "y": B64.encode(y),
            }]
        })
        .to_string();
        Ok(Self {
            key,
            rng,
            kid,
            issuer,
            jwks,
            cache: std::sync::Mutex::default(),
        })
    }

    pub(crate) fn jwks(&self) -> &str {
        &self.jwks
    }

    /// A token for `c`: a cached one issued less than `REUSE_SECS` ago, or a new one.
    pub(crate) fn token(&self, c: &Claims<'_>) -> Option<std::sync::Arc<str>> {
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
        let token: std::sync::Arc<str> = self.sign(c)?.into();
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
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
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
        let sig = self.key.sign(&self.rng, signing_input.as_bytes()).ok()?;
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
        let jwks: serde_json::Value = serde_json::from_str(signer.jwks()).unwrap();
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
