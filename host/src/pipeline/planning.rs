//! What a request needs from the model, known before anything runs: its shapes, the frame
//! count the model generates, and which steps the step cache will skip.

use super::error::PipelineError;
use super::job::{GenerateRequest, Plan};
use super::step_cache::SkipPlan;
use crate::model::Manifest;

/// Width and height must be multiples of this for `manifest`'s model (VAE scale × patch size).
pub fn size_multiple(manifest: &Manifest) -> usize {
    let p = manifest.transformer.patch_size;
    manifest.vae.scale_factor_spatial * p[1].max(p[2])
}

/// Whether `req` runs with classifier-free guidance on `manifest`'s model: a guidance scale
/// above 1, on a model that guides (a few-step distilled one does not).
pub fn guided(manifest: &Manifest, req: &GenerateRequest) -> bool {
    req.guidance_scale > 1.0 && manifest.sampler.is_none()
}

/// The shapes `req` needs on `manifest`'s model, or why the model cannot run it (what the
/// server checks at submit time, before any session is loaded).
pub fn plan(manifest: &Manifest, req: &GenerateRequest) -> Result<Plan, PipelineError> {
    let invalid = |field, reason: String| Err(PipelineError::InvalidRequest { field, reason });
    let multiple = size_multiple(manifest);

    for (field, value) in [("width", req.width), ("height", req.height)] {
        if value == 0 || value % multiple != 0 {
            return invalid(
                field,
                format!("{value} is not a positive multiple of {multiple}"),
            );
        }
    }
    if req.num_frames == 0 {
        return invalid("num_frames", "must be at least 1".into());
    }
    if req.infer_steps == 0 {
        return invalid("infer_steps", "must be at least 1".into());
    }
    if !req.guidance_scale.is_finite() {
        return invalid("guidance_scale", "must be a finite number".into());
    }
    if let Some(sampler) = &manifest.sampler
        && req.infer_steps != sampler.timesteps.len()
    {
        return invalid(
            "infer_steps",
            format!(
                "this model is distilled to sample in exactly {} steps, got {}",
                sampler.timesteps.len(),
                req.infer_steps
            ),
        );
    }
    skip_plan(manifest, req)?;
    let vae = &manifest.vae;
    let ts = vae.scale_factor_temporal;
    let generated_frames = (req.num_frames - 1).div_ceil(ts) * ts + 1;
    let latent_frames = (generated_frames - 1) / ts + 1;
    let pt = manifest.transformer.patch_size[0];
    if !latent_frames.is_multiple_of(pt) {
        return invalid(
            "num_frames",
            format!("{latent_frames} latent frames are not a multiple of the temporal patch {pt}"),
        );
    }
    Ok(Plan {
        generated_frames,
        latent_shape: [
            1,
            vae.z_dim,
            latent_frames,
            req.height / vae.scale_factor_spatial,
            req.width / vae.scale_factor_spatial,
        ],
    })
}

/// Which DiT passes of `req` skip the blocks on `manifest`'s model (known before it runs), or
/// why its `cache` mode cannot be used.
/// [`skip_plan`], or no skipped step where the model cannot cache (submit refuses those; a
/// report or an ETA still needs a plan).
pub fn skip_plan_or_none(manifest: &Manifest, req: &GenerateRequest) -> SkipPlan {
    skip_plan(manifest, req)
        .unwrap_or_else(|_| SkipPlan::none(req.infer_steps, guided(manifest, req)))
}

pub fn skip_plan(manifest: &Manifest, req: &GenerateRequest) -> Result<SkipPlan, PipelineError> {
    let guided = guided(manifest, req);
    let Some(settings) = req.cache.settings() else {
        return Ok(SkipPlan::none(req.infer_steps, guided));
    };
    let spec = manifest
        .step_cache()
        .ok_or_else(|| PipelineError::InvalidRequest {
            field: "cache",
            reason: format!(
                "{:?}: this model's export has no step cache (export it again with \
                 models/export.py); use \"off\"",
                req.cache.as_str()
            ),
        })?;
    Ok(SkipPlan::new(
        &spec.ratios,
        settings,
        req.infer_steps,
        guided,
    ))
}
