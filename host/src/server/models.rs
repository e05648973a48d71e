//! `GET /models`: the models this server serves and what a client choosing one needs to know
//! (a submit's `model` picks one by name).

use super::auth::Caller;
use super::error::ErrorBody;
use super::state::{AppState, ServedModel};
use crate::pipeline::step_cache::CacheMode;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    /// What a submit's `model` names it by.
    #[schema(example = "Wan2.1-T2V-1.3B")]
    pub name: String,
    /// The server's first model (what a plugin's self-test uses).
    pub default: bool,
    /// Weights' precision: `fp32` or `bf16`.
    pub dtype: String,
    /// Width and height must be multiples of this (the validate plugin may allow fewer sizes:
    /// the default allows 832x480 and 480x832).
    pub size_multiple: u32,
    /// The model generates 1 + a multiple of this many frames; `num_frames` rounds up to it.
    pub frame_step: u32,
    pub fps: u32,
    /// How it samples: `unipc` (flow-matching UniPC, as diffusers' Wan pipeline) or `dmd` (a
    /// few-step distilled checkpoint).
    pub sampler: String,
    /// A distilled model's exact step count (`infer_steps` must be it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance applies (`guidance_scale` above 1 costs a second pass per step;
    /// a distilled model ignores it).
    pub guidance: bool,
    /// The `cache` values it accepts.
    pub cache_modes: Vec<String>,
    /// This server's limit on `infer_steps` (the validate plugin's range may be narrower: the
    /// default's is 20–100).
    pub max_steps: u32,
    /// This server's limit on width × height × frames.
    pub max_pixel_frames: u64,
    /// How much this host's resident memory grew while it loaded, in MiB; absent where it is
    /// not loaded (an API host, or still loading). On a GPU most of a model's memory is the
    /// device's, which this does not count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_mib: Option<u64>,
    /// Steps between a running job's live previews (`preview` events on
    /// `/video/events/{requestId}`, and after the last step); absent: this model makes none (no
    /// preview factors in its manifest, or `--preview-every 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_every: Option<u32>,
    /// The bundled tiny random-weight stand-in: its videos are textured noise.
    pub bundled: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// The default first.
    pub models: Vec<ModelView>,
}

fn view(state: &AppState, index: usize, model: &ServedModel) -> ModelView {
    let manifest = &model.manifest;
    let cache_modes = CacheMode::NAMES
        .into_iter()
        .filter(|name| *name == "off" || manifest.step_cache().is_some())
        .map(String::from)
        .collect();
    let resident = model.resident_bytes.load(Ordering::Relaxed);
    ModelView {
        name: model.name.clone(),
        default: index == 0,
        dtype: manifest.dtype.clone(),
        size_multiple: crate::pipeline::size_multiple(manifest) as u32,
        frame_step: manifest.vae.scale_factor_temporal as u32,
        fps: manifest.fps,
        sampler: manifest
            .sampler
            .as_ref()
            .map_or_else(|| "unipc".to_string(), |s| s.kind.clone()),
        steps: manifest.sampler.as_ref().map(|s| s.timesteps.len() as u32),
        guidance: manifest.sampler.is_none(),
        cache_modes,
        max_steps: state.limits.max_steps,
        max_pixel_frames: state.limits.max_pixel_frames,
        resident_mib: (resident > 0).then_some(resident >> 20),
        preview_every: state
            .limits
            .preview_every
            .filter(|_| manifest.preview.is_some())
            .map(|every| u32::try_from(every.get()).unwrap_or(u32::MAX)),
        bundled: model.dir.is_none(),
    }
}

/// The models this server serves.
#[utoipa::path(get, path = "/models", tag = "video",
    responses((status = 200, body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<Arc<AppState>>, _: Caller) -> Json<ModelList> {
    let models = state
        .limits
        .models
        .0
        .iter()
        .enumerate()
        .map(|(i, model)| view(&state, i, model))
        .collect();
    Json(ModelList { models })
}
