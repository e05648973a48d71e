//! The default auth plugin's rules (`auth-apikey` is [`authenticate`] and [`self_test`]), as
//! functions an auth plugin can call before or after its own:
//!
//! - API keys: config `api_keys` is a comma-separated list of `name=<sha256 hex of the key>`.
//!   The presented key is hashed by the host and compared with *every* configured hash in
//!   constant time (no early exit, so timing does not say which key, or how much of one,
//!   matched). Optional `tier.<name>` gives a key's `tier` attribute (default `standard`).
//! - JWTs: when the operator configures `jwt_algorithm` and `jwt_key`, a token with the JWT shape
//!   (three dot-separated parts) is verified by the host (`verify-jwt`); the principal is
//!   `jwt:<sub>`, with the token's `tier` claim as its tier.
//! - `public_paths` (comma-separated; a trailing `*` matches a prefix) are let through as the
//!   principal `anonymous`. Default: none.
//! - `reuse_ms` (default 10000; 0: never): how long the host may give an accepted request's
//!   principal to later requests with the same method, path and `Authorization` header without
//!   calling the plugin (`host.reuse-principal`). Sound because the answer depends on nothing
//!   else: the keys are the plugin's config, and a config change installs a new instance,
//!   which starts with nothing reused. A JWT's acceptance is never reused past its `exp`. A
//!   plugin whose own rules look at anything else (the peer, the time) must not let these
//!   functions allow reuse: call [`api_key_principal`] and [`bearer_token`] and decide itself.
//!
//! Refusals never echo the credential.

use crate::host;
use crate::types::Principal;

/// Why a request is refused: the reason the client reads, and the `WWW-Authenticate` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub challenge: Option<String>,
}

/// A configured API key: its name and the SHA-256 of the key.
pub struct ApiKey {
    pub name: String,
    pub sha256: Vec<u8>,
}

/// Parses `api_keys`; an entry that is not `name=<64 hex digits>` is a configuration error.
pub fn configured_keys() -> Result<Vec<ApiKey>, String> {
    let Some(list) = host::config_get("api_keys") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            let (name, hash) = entry
                .split_once('=')
                .ok_or_else(|| format!("api_keys entry {}: expected name=<sha256 hex>", i + 1))?;
            let sha256 = decode_hex(hash.trim())
                .filter(|h| h.len() == 32)
                .ok_or_else(|| {
                    format!(
                        "api_keys entry {} ({}): not 64 hex digits",
                        i + 1,
                        name.trim()
                    )
                })?;
            Ok(ApiKey {
                name: name.trim().to_string(),
                sha256,
            })
        })
        .collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `reuse_ms` when unset: long enough that a client polling status is answered without a plugin
/// call, short next to how long a key lives.
const DEFAULT_REUSE_MS: u32 = 10_000;

fn reuse_ms() -> Result<u32, String> {
    host::config_get("reuse_ms").map_or(Ok(DEFAULT_REUSE_MS), |v| {
        v.trim().parse().map_err(|_| {
            format!(
                "reuse_ms: expected a whole number of milliseconds, got \"{}\"",
                v.trim()
            )
        })
    })
}

/// Lets the host reuse this acceptance for requests with the same method, path and, when
/// `credential` is set, `Authorization` header values, for at most `limit_ms`.
fn allow_reuse(credential: bool, limit_ms: u32) {
    let ms = reuse_ms().unwrap_or(0).min(limit_ms);
    if ms > 0 {
        let vary = if credential {
            vec!["authorization".to_string()]
        } else {
            Vec::new()
        };
        host::reuse_principal(&vary, false, ms);
    }
}

fn jwt_configured() -> bool {
    host::config_get("jwt_algorithm").is_some()
}

/// The `WWW-Authenticate` value for a refusal, with RFC 6750's `error` when there is one.
pub fn challenge(error: Option<&str>) -> Option<String> {
    Some(match error {
        None => r#"Bearer realm="wanserve""#.to_string(),
        Some(e) => format!(r#"Bearer realm="wanserve", error="{e}""#),
    })
}

/// A refusal with the Bearer challenge.
pub fn refuse(reason: &str, error: Option<&str>) -> Refusal {
    Refusal {
        reason: reason.to_string(),
        challenge: challenge(error),
    }
}

/// Whether `path` is one of `public_paths`.
pub fn is_public(path: &str) -> bool {
    host::config_get("public_paths").is_some_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => !prefix.is_empty() && path.starts_with(prefix),
                None => !p.is_empty() && p == path,
            })
    })
}

/// RFC 6750 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// The request's Bearer credential (its one `Authorization` header), or why there is none
/// usable.
pub fn bearer_token(headers: &[(String, String)]) -> Result<&str, Refusal> {
    let mut values = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim_matches([' ', '\t']));
    let Some(value) = values.next() else {
        return Err(refuse(
            "an API key is required (Authorization: Bearer <key>)",
            None,
        ));
    };
    if values.next().is_some() {
        return Err(refuse(
            "more than one Authorization header",
            Some("invalid_request"),
        ));
    }
    // credentials = auth-scheme [ 1*SP token68 ]; the scheme is case-insensitive.
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(refuse(
            "the Authorization scheme must be Bearer",
            Some("invalid_request"),
        ));
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() {
        return Err(refuse(
            "the Bearer credential is empty",
            Some("invalid_request"),
        ));
    }
    if !is_b64token(token) {
        return Err(refuse(
            "the Bearer credential is not a valid token",
            Some("invalid_token"),
        ));
    }
    Ok(token)
}

/// The principal of the configured key `token` is (`key:<name>`, its tier), compared with
/// every key in constant time; `None` when it is none of them. Allows no reuse.
pub fn api_key_principal(token: &str, keys: &[ApiKey]) -> Option<Principal> {
    let presented = host::sha256(token.as_bytes());
    // Compare with every key, whatever matched before: no early exit.
    let mut matched: Option<&ApiKey> = None;
    for key in keys {
        if host::constant_time_eq(&presented, &key.sha256) && matched.is_none() {
            matched = Some(key);
        }
    }
    let key = matched?;
    let tier = host::config_get(&format!("tier.{}", key.name)).unwrap_or_else(|| "standard".into());
    Some(Principal {
        id: format!("key:{}", key.name),
        display_name: key.name.clone(),
        attributes: vec![("auth".into(), "api-key".into()), ("tier".into(), tier)],
    })
}

/// The default rule for a Bearer token that is not a JWT: one of `api_keys` (reuse allowed).
pub fn by_api_key(token: &str) -> Result<Principal, Refusal> {
    let keys = match configured_keys() {
        Ok(keys) => keys,
        Err(problem) => {
            host::log(
                host::LogLevel::Error,
                "bad api_keys config",
                &[("problem".into(), problem)],
            );
            return Err(refuse("authentication is misconfigured", None));
        }
    };
    match api_key_principal(token, &keys) {
        Some(principal) => {
            allow_reuse(true, u32::MAX);
            Ok(principal)
        }
        None => Err(refuse("the API key is not valid", Some("invalid_token"))),
    }
}

/// The default rule for a JWT: verified by the host with the configured algorithm and key
/// (reuse allowed until its `exp`).
pub fn by_jwt(token: &str) -> Result<Principal, Refusal> {
    match host::verify_jwt(token) {
        Ok(verified) => {
            let Some(subject) = verified.subject.filter(|s| !s.is_empty()) else {
                return Err(refuse("the token has no subject", Some("invalid_token")));
            };
            let tier = verified
                .claims
                .iter()
                .find(|(k, _)| k == "tier")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "standard".into());
            // Never past the token's expiry: seconds since the epoch as JSON text, whole
            // seconds taken (rounding down; no float parsing, which doubles the component).
            let left_ms = verified
                .claims
                .iter()
                .find(|(k, _)| k == "exp")
                .and_then(|(_, v)| v.trim().split('.').next()?.parse::<u64>().ok())
                .and_then(|exp| exp.checked_mul(1000)?.checked_sub(host::now_unix_ms()));
            if let Some(left_ms) = left_ms.filter(|ms| *ms > 0) {
                allow_reuse(true, u32::try_from(left_ms).unwrap_or(u32::MAX));
            }
            Ok(Principal {
                id: format!("jwt:{subject}"),
                display_name: subject,
                attributes: vec![("auth".into(), "jwt".into()), ("tier".into(), tier)],
            })
        }
        Err(reason) => Err(refuse(&reason, Some("invalid_token"))),
    }
}

/// The default plugin's whole answer: a public path, else the Bearer token as a JWT (when one
/// is configured and the token has its shape) or an API key.
pub fn authenticate(path: &str, headers: &[(String, String)]) -> Result<Principal, Refusal> {
    if is_public(path) {
        allow_reuse(false, u32::MAX);
        return Ok(Principal {
            id: "anonymous".into(),
            display_name: "anonymous".into(),
            attributes: vec![("auth".into(), "public-path".into())],
        });
    }
    let token = bearer_token(headers)?;
    if jwt_configured() && token.split('.').count() == 3 {
        by_jwt(token)
    } else {
        by_api_key(token)
    }
}

/// The default plugin's self-test: refuses a configuration it could not use (so a typo never
/// replaces a working one), warns when nothing could ever get in, and checks that a request
/// without credentials to a path that is not public is refused.
pub fn self_test() -> Result<(), String> {
    let keys = configured_keys()?;
    reuse_ms()?;
    if keys.is_empty() && !jwt_configured() {
        host::log(
            host::LogLevel::Warn,
            "no API key and no JWT configured: every request will be refused",
            &[],
        );
    }
    let probe = "/video/status";
    if !is_public(probe) && authenticate(probe, &[]).is_ok() {
        return Err("a request without credentials was let in".into());
    }
    Ok(())
}
