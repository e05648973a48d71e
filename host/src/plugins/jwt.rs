//! JWT verification offered to plugins (`host.verify-jwt`), configured by the operator in the
//! plugin's config so that a plugin cannot choose a weaker algorithm than the one pinned there.

use super::bindings::host_api::JwtClaims;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use std::collections::BTreeMap;

/// Config keys read from the plugin's config.
pub const ALGORITHM: &str = "jwt_algorithm";
pub const KEY: &str = "jwt_key";
pub const ISSUER: &str = "jwt_issuer";
pub const AUDIENCE: &str = "jwt_audience";
pub const LEEWAY: &str = "jwt_leeway_seconds";

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    /// `Ok(None)` when the config names no algorithm; an error (for the operator) when the
    /// configuration is incomplete or the key does not parse.
    pub fn from_config(config: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let Some(algorithm) = config.get(ALGORITHM) else {
            return Ok(None);
        };
        let algorithm: Algorithm = algorithm
            .parse()
            .map_err(|_| format!("{ALGORITHM}: unknown algorithm {algorithm:?}"))?;
        let key = config
            .get(KEY)
            .ok_or_else(|| format!("{ALGORITHM} is set but {KEY} is missing"))?;
        let pem_error = |e: jsonwebtoken::errors::Error| format!("{KEY}: not a usable key: {e}");
        let family = |f: AlgorithmFamily| f.algorithms().contains(&algorithm);
        let key = if family(AlgorithmFamily::Hmac) {
            if key.len() < 32 {
                return Err(format!("{KEY}: an HMAC secret needs at least 32 bytes"));
            }
            DecodingKey::from_secret(key.as_bytes())
        } else if family(AlgorithmFamily::Rsa) {
            DecodingKey::from_rsa_pem(key.as_bytes()).map_err(pem_error)?
        } else if family(AlgorithmFamily::Ec) {
            DecodingKey::from_ec_pem(key.as_bytes()).map_err(pem_error)?
        } else if family(AlgorithmFamily::Ed) {
            DecodingKey::from_ed_pem(key.as_bytes()).map_err(pem_error)?
        } else {
            return Err(format!("{ALGORITHM}: {algorithm:?} is not supported"));
        };
        let mut validation = Validation::new(algorithm);
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = match config.get(LEEWAY) {
            Some(s) => s
                .parse()
                .map_err(|_| format!("{LEEWAY}: not a number of seconds: {s:?}"))?,
            None => 0,
        };
        if let Some(issuer) = config.get(ISSUER) {
            validation.set_issuer(&[issuer]);
        }
        if let Some(audience) = config.get(AUDIENCE) {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
        }
        Ok(Some(Self { key, validation }))
    }

    /// Verifies `token`; the error is safe to show a client (it never echoes the token).
    pub fn verify(&self, token: &str) -> Result<JwtClaims, String> {
        use jsonwebtoken::errors::ErrorKind;
        // Name a foreign algorithm as such, `none` included, which jsonwebtoken cannot even
        // parse (it would only say "malformed"): the header is read before anything is trusted.
        if let Some(alg) = header_algorithm(token)
            && !self
                .validation
                .algorithms
                .iter()
                .any(|pinned| format!("{pinned:?}") == alg)
        {
            return Err("the token's algorithm is not accepted".into());
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
                ErrorKind::InvalidAudience => "the token's audience is not accepted",
                ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
                ErrorKind::InvalidSignature => "the token's signature does not verify",
                _ => "the token is malformed",
            }
            .to_string()
        })?;
        let subject = match data.claims.get("sub") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let claims = data
            .claims
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        Ok(JwtClaims { subject, claims })
    }
}

/// The `alg` of a token's header, if the header decodes to a JSON object that has one.
fn header_algorithm(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    match serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("alg")?
    {
        serde_json::Value::String(alg) => Some(alg.clone()),
        _ => None,
    }
}
