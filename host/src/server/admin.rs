//! The admin API (its own key): list the plugins, upload a component into a slot (hot swap
//! through the plugin host: compiled, world-checked and self-tested before it serves), a slot's
//! history, roll back (one install back, or to a digest from the history). Every install is
//! kept in the data directory (`plugins::swaps`), so what serves survives a restart. Every
//! action, accepted or refused, is logged (`admin action`: action, slot, sha256, outcome,
//! reason, peer) and counted (`wanserve_admin_actions_total{action,outcome}`).

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::error_chain::one_line;
use crate::plugins::swaps::{SwapError, SwapSource};
use crate::plugins::{PluginError, PluginInfo, Slot};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use utoipa::ToSchema;

/// Largest component an upload may carry.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginView {
    /// `auth`, `validate` or `postprocess`.
    pub slot: String,
    pub world: String,
    pub sha256: String,
    pub size: usize,
    /// Unix milliseconds.
    pub loaded_at: i64,
    /// Calls that failed closed since start.
    pub failures: u64,
    /// Why the last file dropped into the plugin directory was refused, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the last change to the key file or config file was not applied to this slot (the
    /// config before it keeps serving), if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    pub plugins: Vec<PluginView>,
}

fn view(state: &AppState, info: PluginInfo) -> PluginView {
    PluginView {
        slot: info.slot.to_string(),
        world: info.world,
        sha256: info.sha256,
        size: info.size,
        loaded_at: info.loaded_at_ms,
        failures: state.plugins.failures(info.slot),
        last_error: state.watcher.as_ref().and_then(|w| w.last_error(info.slot)),
        config_error: state
            .watcher
            .as_ref()
            .and_then(|w| w.config_error(info.slot)),
    }
}

fn parse_slot(name: &str) -> Result<Slot, ApiError> {
    Slot::ALL
        .into_iter()
        .find(|s| s.to_string() == name)
        .ok_or(ApiError::NoSuchSlot)
}

/// The audit line and counter every admin action gets.
fn audit(admin: &Admin, action: &'static str, slot: Slot, sha256: &str, refused: Option<&str>) {
    let outcome = if refused.is_some() {
        "refused"
    } else {
        "accepted"
    };
    metrics::counter!("wanserve_admin_actions_total", "action" => action, "outcome" => outcome)
        .increment(1);
    match refused {
        None => {
            tracing::info!(action, slot = %slot, sha256, outcome, peer = %admin.peer, "admin action")
        }
        Some(reason) => {
            tracing::warn!(action, slot = %slot, sha256, outcome, reason, peer = %admin.peer, "admin action")
        }
    }
}

/// The installed plugins.
#[utoipa::path(get, path = "/admin/plugins", tag = "admin",
    responses((status = 200, body = PluginList),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody)),
    security(("admin" = [])))]
pub async fn list(State(state): State<Arc<AppState>>, _: Admin) -> Json<PluginList> {
    let plugins = Slot::ALL
        .into_iter()
        .filter_map(|slot| state.plugins.installed(slot))
        .map(|info| view(&state, info))
        .collect();
    Json(PluginList { plugins })
}

/// Upload a component (the raw .wasm bytes) into a slot. It serves only after it compiles,
/// matches the slot's world and passes its self-test with the config the slot serves with; calls
/// in flight finish on the old one, which is kept for rollback.
#[utoipa::path(put, path = "/admin/plugins/{slot}", tag = "admin",
    params(("slot" = String, Path, description = "auth, validate or postprocess")),
    request_body(description = "The component's bytes, as `application/wasm` or \
        `application/octet-stream`", content(
        (inline(super::api::BinaryBody) = "application/wasm"),
        (inline(super::api::BinaryBody) = "application/octet-stream"))),
    responses((status = 200, description = "Installed", body = PluginView),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 413, description = "Component too large", body = ErrorBody),
        (status = 422, description = "Refused: not a component, wrong world, self-test failed", body = ErrorBody)),
    security(("admin" = [])))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(slot): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PluginView>, ApiError> {
    let slot = parse_slot(&slot)?;
    let bytes = super::api::body_bytes(body, MAX_COMPONENT_BYTES)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let _installing = state.swaps.installing().await;
    let plugins = state.plugins.clone();
    let swaps = state.swaps.clone();
    let runtime = tokio::runtime::Handle::current();
    // Stored once it passes its checks and before it serves: an upload that could not be
    // stored (where a restart and the fleet find it) does not serve either.
    let installed = tokio::task::spawn_blocking(move || {
        plugins.replace_component_then(slot, &bytes, |info| {
            runtime.block_on(swaps.record(slot, &bytes, SwapSource::Upload, info.loaded_at_ms))
        })
    })
    .await
    .map_err(ApiError::internal)?;
    match installed {
        Ok(Ok((info, _))) => {
            audit(&admin, "upload", slot, &info.sha256, None);
            Ok(Json(view(&state, info)))
        }
        Ok(Err(e)) => {
            let reason = format!(
                "not installed: it cannot be stored ({})",
                one_line(&e.to_string(), 200)
            );
            audit(&admin, "upload", slot, &sha256, Some(&reason));
            Err(ApiError::NotReady(reason))
        }
        Err(e @ PluginError::Engine(_)) => {
            audit(&admin, "upload", slot, &sha256, Some(&e.to_string()));
            Err(ApiError::internal(e))
        }
        Err(e) => {
            let reason = one_line(&e.to_string(), 300);
            audit(&admin, "upload", slot, &sha256, Some(&reason));
            Err(ApiError::field("component", reason))
        }
    }
}

/// Which component a rollback installs.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
pub struct RollbackTo {
    /// A SHA-256 from the slot's history; without it, the install before the one serving.
    pub sha256: Option<String>,
}

/// Put an earlier component back: the install before the one serving (again: the one before
/// that), or the one with `?sha256=` from the slot's history. It serves across restarts.
#[utoipa::path(post, path = "/admin/plugins/{slot}/rollback", tag = "admin",
    params(("slot" = String, Path, description = "auth, validate or postprocess"), RollbackTo),
    responses((status = 200, description = "Rolled back", body = PluginView),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 409, description = "No earlier component", body = ErrorBody),
        (status = 422, description = "sha256 is not in the slot's history, or the stored component no longer installs", body = ErrorBody)),
    security(("admin" = [])))]
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(slot): Path<String>,
    Query(to): Query<RollbackTo>,
) -> Result<Json<PluginView>, ApiError> {
    let slot = parse_slot(&slot)?;
    let wanted = to.sha256.clone().unwrap_or_default();
    let _installing = state.swaps.installing().await;
    let done = match state
        .swaps
        .rollback_target(slot, to.sha256.as_deref())
        .await
    {
        Err(e) => Err(RollbackError::Swap(e)),
        Ok((entry, bytes)) => {
            let plugins = state.plugins.clone();
            let swaps = state.swaps.clone();
            let runtime = tokio::runtime::Handle::current();
            let sha256 = entry.sha256.clone();
            tokio::task::spawn_blocking(move || {
                plugins.replace_component_then(slot, &bytes, |_| {
                    runtime.block_on(swaps.rolled_back_to(slot, &entry))
                })
            })
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| RollbackError::Install(sha256, e))
            .and_then(|marked| marked.map(|(info, ())| info).map_err(RollbackError::Swap))
        }
    };
    match done {
        Ok(info) => {
            audit(&admin, "rollback", slot, &info.sha256, None);
            Ok(Json(view(&state, info)))
        }
        Err(e) => {
            let reason = one_line(&e.to_string(), 300);
            let sha256 = match &e {
                RollbackError::Install(sha256, _) => sha256.clone(),
                _ => wanted,
            };
            audit(&admin, "rollback", slot, &sha256, Some(&reason));
            Err(match e {
                RollbackError::Swap(SwapError::NothingEarlier(_)) => ApiError::Conflict(reason),
                RollbackError::Swap(SwapError::UnknownDigest { .. }) => {
                    ApiError::field("sha256", reason)
                }
                RollbackError::Install(_, _) | RollbackError::Swap(SwapError::Damaged { .. }) => {
                    ApiError::field("component", reason)
                }
                // Another host recorded past it meanwhile: ask again.
                RollbackError::Swap(SwapError::Gone { .. }) => ApiError::Conflict(reason),
                RollbackError::Swap(SwapError::Shared(_) | SwapError::Io { .. }) => {
                    ApiError::NotReady(format!("not rolled back: {reason}"))
                }
                RollbackError::Swap(other) => ApiError::internal(other),
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RollbackError {
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error("the stored component {0} does not install: {1}")]
    Install(String, PluginError),
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub sha256: String,
    pub size: usize,
    /// Unix milliseconds.
    pub installed_at: i64,
    /// `upload` (the admin API) or `file` (the plugin directory).
    pub source: String,
    /// The one serving now.
    pub current: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginHistory {
    /// Newest first, at most 8.
    pub history: Vec<HistoryEntry>,
}

/// What the slot has served, newest first: the installs a rollback can go back to.
#[utoipa::path(get, path = "/admin/plugins/{slot}/history", tag = "admin",
    params(("slot" = String, Path, description = "auth, validate or postprocess")),
    responses((status = 200, body = PluginHistory),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such slot", body = ErrorBody)),
    security(("admin" = [])))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(slot): Path<String>,
) -> Result<Json<PluginHistory>, ApiError> {
    let slot = parse_slot(&slot)?;
    let history = state
        .swaps
        .history(slot)
        .await
        .map_err(ApiError::internal)?;
    let current = history.current;
    let history = history
        .entries
        .into_iter()
        .enumerate()
        .rev()
        .map(|(i, e)| HistoryEntry {
            sha256: e.sha256,
            size: e.size,
            installed_at: e.installed_at,
            source: match e.source {
                SwapSource::Upload => "upload".into(),
                SwapSource::File => "file".into(),
            },
            current: i == current,
        })
        .collect();
    Ok(Json(PluginHistory { history }))
}
