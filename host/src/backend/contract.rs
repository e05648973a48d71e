//! What every runtime implements for the pipeline: [`Backend`], its error and its run control.
//! It names no runtime types, so the pipeline never sees ONNX Runtime's.

use super::runtime;
use crate::tensor::{ArithmeticError, TensorArithmetic};
use ndarray::{Array3, Array5, ArrayView5};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("cannot load {graph}: {reason}")]
    Load { graph: String, reason: String },
    #[error("{graph} failed: {reason}")]
    Run { graph: &'static str, reason: String },
    /// The runtime could not allocate what the run needs (read from its error once, in
    /// `session::is_out_of_memory`).
    #[error("{graph} ran out of memory: {reason}")]
    OutOfMemory { graph: &'static str, reason: String },
    #[error("{graph} returned an unexpected output: {reason}")]
    Output { graph: &'static str, reason: String },
    /// Moving or converting a tensor between host and device, or between dtypes.
    #[error("{what}: {reason}")]
    Device { what: &'static str, reason: String },
    #[error(transparent)]
    Arithmetic(#[from] ArithmeticError),
}

/// One job's handle on its runs.
pub trait RunControl: Clone + Send + Sync + 'static {
    /// Stops the job's runs: the graph running now fails within a kernel or two (not at the end
    /// of the step), and so does every later run made with this control or one derived from it.
    fn interrupt(&self);
    /// The same job's control for a run after which the backend gives back the memory it keeps
    /// cached for that graph (ORT: shrinks the session's arena). For the job's last run of each
    /// graph, so that memory returns between jobs without a cost inside the loop.
    fn releasing(&self) -> Self;
}

pub trait Backend: Send + Sync {
    /// Latents while denoising, where the backend keeps them: for ONNX Runtime, tensors on the
    /// sessions' device, so that between steps nothing crosses to the host but a few weights.
    type Latents;
    /// Prompt embeddings as the transformer takes them (prepared once per job).
    type Context;
    /// Weighted sums of latents: guidance and every scheduler update.
    type Arithmetic: TensorArithmetic<Tensor = Self::Latents>;
    /// The VAE decoder's causal cache between chunks, opaque to the pipeline.
    type VaeCache;
    /// One job's handle on its runs (see [`RunControl`]).
    type RunControl: RunControl;
    /// The transformer blocks' residual of a guidance branch's last computed step (step
    /// caching), kept where the latents are.
    type Residual;

    /// A fresh control for one job's runs.
    fn run_control(&self) -> Result<Self::RunControl, BackendError>;

    /// UMT5 encoder: `[batch, len]` ids and mask → `[batch, len, dim]` hidden states.
    fn encode_text(
        &self,
        input_ids: &[i64],
        attention_mask: &[i64],
        batch: usize,
        run: &Self::RunControl,
    ) -> Result<Array3<f32>, BackendError>;
    fn arithmetic(&self) -> &Self::Arithmetic;
    fn upload_latents(&self, latents: &Array5<f32>) -> Result<Self::Latents, BackendError>;
    fn download_latents(&self, latents: &Self::Latents) -> Result<Array5<f32>, BackendError>;
    /// `[1, L, D]` prompt embeddings → what [`Backend::predict`] takes as context.
    fn prepare_context(&self, context: &Array3<f32>) -> Result<Self::Context, BackendError>;
    /// Conditional and unconditional `[1, L, D]` embeddings as one batch-2 context for
    /// [`Backend::predict_guided`].
    fn prepare_context_pair(
        &self,
        cond: &Array3<f32>,
        uncond: &Array3<f32>,
    ) -> Result<Self::Context, BackendError>;
    /// Classifier-free guidance from one batch-2 DiT call on a context from
    /// [`Backend::prepare_context_pair`]: `uncond + g·(cond − uncond)`, as two [`Backend::predict`]
    /// calls and a weighted sum would give.
    fn predict_guided(
        &self,
        latents: &Self::Latents,
        timestep: i64,
        pair: &Self::Context,
        guidance_scale: f32,
        run: &Self::RunControl,
    ) -> Result<Self::Latents, BackendError>;
    /// DiT: latents `[1, C, F, H, W]`, timestep and text context → a prediction like latents.
    fn predict(
        &self,
        latents: &Self::Latents,
        timestep: i64,
        context: &Self::Context,
        run: &Self::RunControl,
    ) -> Result<Self::Latents, BackendError>;
    /// Whether the model can skip steps: its export has the step-cached pass.
    fn supports_step_cache(&self) -> bool;
    /// [`Backend::predict`], also returning the blocks' residual for later skipped passes.
    fn predict_keeping_residual(
        &self,
        latents: &Self::Latents,
        timestep: i64,
        context: &Self::Context,
        run: &Self::RunControl,
    ) -> Result<(Self::Latents, Self::Residual), BackendError>;
    /// A step-cached pass: the patch and time embeddings, `residual` in place of the blocks, and
    /// the output head (no text context: only the blocks read it).
    fn predict_skipping_blocks(
        &self,
        latents: &Self::Latents,
        timestep: i64,
        residual: &Self::Residual,
        run: &Self::RunControl,
    ) -> Result<Self::Latents, BackendError>;
    /// A residual's shape and values on the host as f32 (for calibration runs only).
    fn residual_to_host(
        &self,
        residual: &Self::Residual,
    ) -> Result<(Vec<usize>, Vec<f32>), BackendError>;
    /// First latent frame `[1, Z, 1, h, w]` → one video frame `[1, 3, 1, H, W]` and the cache.
    fn decode_first(
        &self,
        latent: ArrayView5<f32>,
        run: &Self::RunControl,
    ) -> Result<(Array5<f32>, Self::VaeCache), BackendError>;
    /// Next latent frame and the cache → `[1, 3, T, H, W]` frames (T = temporal scale) and the cache.
    fn decode_next(
        &self,
        latent: ArrayView5<f32>,
        cache: Self::VaeCache,
        run: &Self::RunControl,
    ) -> Result<(Array5<f32>, Self::VaeCache), BackendError>;
}
