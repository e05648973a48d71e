//! The admin API (its own key): list the plugins, upload a component into a slot (hot swap
//! through the plugin host: compiled, world-checked and self-tested before it serves), roll
//! back. An uploaded component serves until the next start; to keep it, put the file in the
//! plugin directory (the watcher installs it the same way).

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::plugins::{PluginError, PluginInfo, Slot};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use serde::Serialize;
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
        .ok_or(ApiError::NotFound)
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
    _: Admin,
    Path(slot): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PluginView>, ApiError> {
    let slot = parse_slot(&slot)?;
    let bytes = super::api::body_bytes(body, MAX_COMPONENT_BYTES)?;
    let plugins = state.plugins.clone();
    let installed = tokio::task::spawn_blocking(move || plugins.replace_component(slot, &bytes))
        .await
        .map_err(ApiError::internal)?;
    match installed {
        Ok(info) => {
            tracing::info!(slot = %slot, sha256 = %info.sha256, "plugin installed through the admin API");
            Ok(Json(view(&state, info)))
        }
        Err(e @ PluginError::Engine(_)) => Err(ApiError::internal(e)),
        Err(e) => Err(ApiError::field("component", e.to_string())),
    }
}

/// Put the slot's previous component back.
#[utoipa::path(post, path = "/admin/plugins/{slot}/rollback", tag = "admin",
    params(("slot" = String, Path, description = "auth, validate or postprocess")),
    responses((status = 200, description = "Rolled back", body = PluginView),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 409, description = "No previous component", body = ErrorBody)),
    security(("admin" = [])))]
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(slot): Path<String>,
) -> Result<Json<PluginView>, ApiError> {
    let slot = parse_slot(&slot)?;
    match state.plugins.rollback(slot) {
        Ok(info) => Ok(Json(view(&state, info))),
        Err(e) => Err(ApiError::Conflict(e.to_string())),
    }
}
