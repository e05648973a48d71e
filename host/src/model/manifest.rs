use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `wanserve-model.json`, as `models/export.py` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub dtype: String,
    pub text_encoder: TextEncoderSpec,
    pub tokenizer: TokenizerSpec,
    pub transformer: TransformerSpec,
    pub vae: VaeSpec,
    pub scheduler: UniPcConfig,
    /// MagCache's magnitude ratios for this checkpoint; absent in exports made before step
    /// caching (they run every step in full and refuse `cache` other than `off`).
    #[serde(default)]
    pub step_cache: Option<StepCacheSpec>,
    /// A few-step distilled checkpoint's sampler; absent: UniPC with `scheduler`, guided.
    #[serde(default)]
    pub sampler: Option<FewStepSpec>,
    /// The latent previewer's linear map (latent channels → RGB); absent: no live previews.
    #[serde(default)]
    pub preview: Option<PreviewSpec>,
    pub fps: u32,
    /// File name → SHA-256 (hex) of every file in the directory.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderSpec {
    pub file: String,
    /// `fp32` or `bf16`; the manifest's `dtype` when absent.
    #[serde(default)]
    pub dtype: Option<String>,
    pub dim: usize,
    pub max_length: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerSpec {
    pub file: String,
    pub pad_id: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TransformerSpec {
    pub file: String,
    /// The step-cached pass (embedding, + residual, head; no blocks), with `file`'s second output
    /// `residual`: both come with exports that support step caching.
    #[serde(default)]
    pub skip_file: Option<String>,
    pub dtype: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: [usize; 3],
    pub text_dim: usize,
}

/// A few-step distilled checkpoint's sampler (DMD: FastVideo's FastWan2.1, LightX2V's
/// step-distilled Wan2.1): its fixed timesteps, each step's x0 estimate noised again to the next
/// with fresh seeded noise, no classifier-free guidance (`pipeline::few_step`).
#[derive(Debug, Clone, Deserialize)]
pub struct FewStepSpec {
    /// `dmd`, the only kind.
    pub kind: String,
    /// The timesteps the DiT is run at, in order (FastWan2.1: 1000, 757, 522).
    pub timesteps: Vec<i64>,
    /// The flow shift of the sigma table the timesteps are looked up in (FastWan2.1: 8).
    pub shift: f64,
    /// Where the checkpoint and its settings come from.
    #[serde(default)]
    pub source: Option<String>,
}

/// A live preview's colours from the latents, as latent previewers make them: RGB in [-1, 1] =
/// `bias + Σ_c latent[c] · rgb_factors[c]`, on the normalised latents (what the DiT denoises).
#[derive(Debug, Clone, Deserialize)]
pub struct PreviewSpec {
    /// One `[r, g, b]` row per latent channel (`vae.z_dim` rows).
    pub rgb_factors: Vec<[f32; 3]>,
    pub rgb_bias: [f32; 3],
    /// Where the factors come from.
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepCacheSpec {
    /// `magcache`, the only method.
    pub method: String,
    /// The step count the ratios were measured at (other counts are resampled).
    pub calibrated_steps: usize,
    pub ratios: MagRatios,
    /// Where the ratios come from (published, or how they were calibrated).
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeSpec {
    pub init_file: String,
    pub step_file: String,
    pub z_dim: usize,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
    pub scale_factor_spatial: usize,
    pub scale_factor_temporal: usize,
    pub cache_slots: Vec<CacheSlot>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CacheSlot {
    pub channels: usize,
    pub scale: usize,
}

/// diffusers' `UniPCMultistepScheduler` config (the fields wanserve's port honours; the rest are
/// checked to hold their only supported value in [`Manifest::validate`]).
#[derive(Debug, Clone, Deserialize)]
pub struct UniPcConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default = "default_flow_shift")]
    pub flow_shift: f64,
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub solver_p: Option<serde_json::Value>,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_solver_order() -> usize {
    2
}
fn default_solver_type() -> String {
    "bh2".into()
}
fn default_true() -> bool {
    true
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_flow_shift() -> f64 {
    1.0
}
fn default_final_sigmas_type() -> String {
    "zero".into()
}

impl UniPcConfig {
    /// Everything outside the flow-matching UniPC path that Wan uses is refused rather than
    /// silently run differently from diffusers.
    pub fn validate(&self) -> Result<(), String> {
        let unsupported = |what: &str| Err(format!("scheduler: {what} is not supported"));
        if self.class_name != "UniPCMultistepScheduler" {
            return unsupported(&format!("class {:?}", self.class_name));
        }
        if !self.use_flow_sigmas || self.prediction_type != "flow_prediction" {
            return unsupported("anything but flow sigmas with flow_prediction");
        }
        if !self.predict_x0 {
            return unsupported("predict_x0 = false");
        }
        if !matches!(self.solver_type.as_str(), "bh1" | "bh2") {
            return unsupported(&format!("solver_type {:?}", self.solver_type));
        }
        if !(1..=3).contains(&self.solver_order) {
            return unsupported(&format!("solver_order {}", self.solver_order));
        }
        if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return unsupported(&format!("final_sigmas_type {:?}", self.final_sigmas_type));
        }
        if self.use_dynamic_shifting
            || self.use_karras_sigmas
            || self.use_exponential_sigmas
            || self.use_beta_sigmas
            || self.thresholding
            || self.shift_terminal.is_some()
            || self.solver_p.as_ref().is_some_and(|v| !v.is_null())
        {
            return unsupported(
                "dynamic shifting, karras/exponential/beta sigmas, thresholding, shift_terminal or solver_p",
            );
        }
        if self.solver_type == "bh1" && self.final_sigmas_type == "zero" {
            // diffusers multiplies B(h) = -inf by 0 on the last step and returns NaN.
            return unsupported(
                "solver_type bh1 with final_sigmas_type zero (diffusers yields NaN)",
            );
        }
        if self.num_train_timesteps == 0 || self.flow_shift <= 0.0 {
            return unsupported("num_train_timesteps = 0 or flow_shift <= 0");
        }
        Ok(())
    }
}

impl Manifest {
    pub fn validate(&self) -> Result<(), String> {
        if self.format != "wanserve-model" || self.version != 1 {
            return Err(format!(
                "format {:?} version {} (expected wanserve-model version 1)",
                self.format, self.version
            ));
        }
        let vae = &self.vae;
        if vae.latents_mean.len() != vae.z_dim || vae.latents_std.len() != vae.z_dim {
            return Err("vae latents_mean/latents_std do not have z_dim entries".into());
        }
        if vae.latents_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err("vae latents_std has a zero or non-finite entry".into());
        }
        if vae.scale_factor_spatial == 0 || vae.scale_factor_temporal == 0 {
            return Err("vae scale factors must be positive".into());
        }
        if self.transformer.in_channels != vae.z_dim || self.transformer.out_channels != vae.z_dim {
            return Err("transformer channels do not match the VAE's z_dim".into());
        }
        if self.transformer.patch_size.contains(&0) {
            return Err("transformer patch_size has a zero".into());
        }
        if self.transformer.text_dim != self.text_encoder.dim {
            return Err("transformer text_dim does not match the text encoder".into());
        }
        if self.text_encoder.max_length == 0 || self.fps == 0 {
            return Err("text_encoder.max_length and fps must be positive".into());
        }
        if let Some(cache) = &self.step_cache {
            if cache.method != "magcache" {
                return Err(format!(
                    "step_cache: method {:?} is not supported (magcache)",
                    cache.method
                ));
            }
            let ratios = &cache.ratios;
            for (branch, values) in [("cond", &ratios.cond), ("uncond", &ratios.uncond)] {
                if values.is_empty() || values.iter().any(|r| !r.is_finite() || *r <= 0.0) {
                    return Err(format!(
                        "step_cache: ratios.{branch} must be a non-empty list of positive numbers"
                    ));
                }
            }
        }
        if let Some(sampler) = &self.sampler {
            if sampler.kind != "dmd" {
                return Err(format!(
                    "sampler: kind {:?} is not supported (dmd)",
                    sampler.kind
                ));
            }
            let train = self.scheduler.num_train_timesteps as i64;
            let descending = sampler.timesteps.windows(2).all(|w| w[0] > w[1]);
            if sampler.timesteps.is_empty()
                || !descending
                || sampler.timesteps.iter().any(|t| *t < 1 || *t > train)
            {
                return Err(format!(
                    "sampler: timesteps must be a non-empty, strictly decreasing list within 1..={train}"
                ));
            }
            if !(sampler.shift.is_finite() && sampler.shift > 0.0) {
                return Err("sampler: shift must be a positive number".into());
            }
            if self.step_cache.is_some() {
                return Err("sampler: a few-step model has no step cache".into());
            }
        }
        if let Some(preview) = &self.preview {
            let finite = preview
                .rgb_factors
                .iter()
                .chain(std::iter::once(&preview.rgb_bias))
                .flatten()
                .all(|v| v.is_finite());
            if preview.rgb_factors.len() != vae.z_dim || !finite {
                return Err(format!(
                    "preview: rgb_factors must be {} rows of 3 finite numbers (one per latent \
                     channel) and rgb_bias 3",
                    vae.z_dim
                ));
            }
        }
        self.scheduler.validate()
    }

    /// Whether this export can skip steps: the ratios and the step-cached graph are both there.
    pub fn step_cache(&self) -> Option<&StepCacheSpec> {
        self.step_cache
            .as_ref()
            .filter(|_| self.transformer.skip_file.is_some())
    }

    /// Files the runtime opens (each must carry a checksum).
    pub fn referenced_files(&self) -> Vec<&str> {
        let mut files = vec![
            self.text_encoder.file.as_str(),
            &self.tokenizer.file,
            &self.transformer.file,
            &self.vae.init_file,
            &self.vae.step_file,
        ];
        files.extend(self.transformer.skip_file.as_deref());
        files
    }
}

/// A checkpoint's magnitude ratios, one per step of the run they were measured on, per branch
/// (the manifest's `step_cache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MagRatios {
    /// The conditional branch (and the only one of an unguided job).
    pub cond: Vec<f64>,
    /// The unconditional (negative-prompt) branch.
    pub uncond: Vec<f64>,
}
