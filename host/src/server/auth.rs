//! Who is calling: the auth plugin for the API (`Caller`), a separate admin key for the admin
//! API (`Admin`). Both run before the body is read.

use super::error::ApiError;
use super::state::AppState;
use crate::plugins::{Principal, RequestParts, Slot};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The principal the auth plugin established for this request.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = peer_of(parts);
        let seen = RequestParts {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            peer: &peer,
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())))
                .collect(),
        };
        if let Some(principal) = state.plugins.reused_principal(&seen) {
            metrics::counter!("wanserve_auth_reused_total").increment(1);
            return Ok(Caller(principal));
        }
        let request = seen.into_request();
        let plugins = state.plugins.clone();
        metrics::counter!("wanserve_plugin_calls_total", "slot" => "auth").increment(1);
        let answer = state
            .plugin_calls
            .run(move || plugins.authenticate(&request))
            .await
            .map_err(ApiError::internal)?;
        match answer {
            Ok(Ok(principal)) => Ok(Caller(principal)),
            Ok(Err(denial)) => {
                // For operators watching for probing (fail2ban and the like): who, where, why;
                // never what was presented.
                tracing::info!(peer = %peer_of(parts), path = %parts.uri.path(), reason = %denial.reason, "request refused: not authenticated");
                Err(ApiError::Unauthorized {
                    reason: denial.reason,
                    challenge: denial.challenge,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "refusing the request: auth plugin failed closed");
                Err(ApiError::PluginUnavailable { slot: Slot::Auth })
            }
        }
    }
}

/// The client's address, `ip:port` (empty if the listener did not record it).
fn peer_of(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default()
}

/// A request that presented the admin key.
pub struct Admin {
    /// Where the request came from, for the audit log.
    pub peer: String,
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let denied = |reason: &str| ApiError::Unauthorized {
            reason: reason.into(),
            challenge: Some("Bearer realm=\"wanserve-admin\"".into()),
        };
        let mut values = parts
            .headers
            .get_all(axum::http::header::AUTHORIZATION)
            .iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(denied(
                "the admin API needs `Authorization: Bearer <admin key>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| denied("the admin API needs `Authorization: Bearer <admin key>`"))?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let peer = peer_of(parts);
        if bool::from(presented.ct_eq(&state.admin_key_hash)) {
            Ok(Admin { peer })
        } else {
            metrics::counter!("wanserve_admin_actions_total", "action" => "authenticate", "outcome" => "refused").increment(1);
            tracing::warn!(%peer, path = %parts.uri.path(), "admin request refused: invalid admin key");
            Err(denied("invalid admin key"))
        }
    }
}

/// The admin key file in the data directory: the key's SHA-256, hex.
pub const ADMIN_KEY_FILE: &str = "admin-key";
const ADMIN_PREFIX: &str = "wsa_";

/// Why the admin key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    #[error("--admin-key / WANSERVE_ADMIN_KEY must be at least 16 characters (it has {0})")]
    TooShort(usize),
    #[error("{path}: not a SHA-256 in hex")]
    NotAHash { path: std::path::PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no randomness for a new admin key: {0}")]
    NoRandomness(getrandom::Error),
}

/// The SHA-256 of the admin key: the configured one, else the stored hash, else a new key
/// (stored hashed; returned to be printed once).
pub fn admin_key_hash(
    configured: Option<&SecretString>,
    data_dir: &Path,
) -> Result<([u8; 32], Option<String>), AdminKeyError> {
    if let Some(key) = configured {
        let key = key.expose_secret().trim();
        if key.chars().count() < 16 {
            return Err(AdminKeyError::TooShort(key.chars().count()));
        }
        return Ok((Sha256::digest(key.as_bytes()).into(), None));
    }
    let path = data_dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hash = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .and_then(|l| hex::decode(l).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| AdminKeyError::NotAHash { path: path.clone() })?;
            Ok((hash, None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(AdminKeyError::NoRandomness)?;
            let key = format!("{ADMIN_PREFIX}{}", hex::encode(secret));
            let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            let text = format!(
                "# wanserve admin key: its SHA-256, read at start-up.\n{}\n",
                hex::encode(hash)
            );
            crate::private_file::write_private_file(&path, text.as_bytes()).map_err(|source| {
                AdminKeyError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok((hash, Some(key)))
        }
        Err(source) => Err(AdminKeyError::Io { path, source }),
    }
}
