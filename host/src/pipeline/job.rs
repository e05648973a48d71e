//! What a caller hands the pipeline and gets back: the request, its stages and progress,
//! decoded frames, the cancel token, the plan and the result.

use super::preview::Preview;
use super::step_cache;
use ndarray::Array5;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Empty means diffusers' default (`""`).
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub num_frames: usize,
    pub infer_steps: usize,
    pub guidance_scale: f32,
    pub seed: u64,
    /// Step caching (MagCache): which steps may skip the transformer's blocks.
    pub cache: step_cache::CacheMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    EncodingText,
    Denoising,
    Decoding,
}

impl Stage {
    /// The stage's name in the API, the job store and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::EncodingText => "encoding_text",
            Stage::Denoising => "denoising",
            Stage::Decoding => "decoding",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    /// Steps (or decoded chunks) finished so far.
    pub step: usize,
    pub total: usize,
    /// What the video looks like after this denoising step, when the pipeline makes previews
    /// and this step is due one.
    pub preview: Option<Arc<Preview>>,
}

impl Progress {
    pub fn at(stage: Stage, step: usize, total: usize) -> Self {
        Self {
            stage,
            step,
            total,
            preview: None,
        }
    }
}

/// Decoded frames, packed RGB24, `count` frames of `width × height`.
pub struct FrameChunk<'a> {
    pub rgb: &'a [u8],
    pub count: usize,
    pub width: usize,
    pub height: usize,
}

/// Cancels a running job: the pipeline checks it between runs, and the hooks it registers
/// interrupt the backend's run in progress. Clones share the flag and the hooks.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: AtomicBool,
    hooks: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        for hook in self.hooks().iter() {
            hook();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Runs `hook` on cancel (at once if already cancelled). A hook may run twice.
    pub fn on_cancel(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks().push(Box::new(hook));
        // After the push: a cancel that set the flag before it may not have seen the hook.
        if self.is_cancelled()
            && let Some(hook) = self.hooks().last()
        {
            hook();
        }
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Fn() + Send + Sync>>> {
        self.0.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Shapes derived from a request and the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Frames the model generates (`4k+1 >= num_frames`).
    pub generated_frames: usize,
    /// `[1, z_dim, latent_frames, latent_height, latent_width]`
    pub latent_shape: [usize; 5],
}

/// What a finished run leaves besides the frames it streamed.
pub struct Generated {
    /// Final latents, before de-normalisation (what diffusers' `output_type="latent"` returns).
    pub latents: Array5<f32>,
    pub frames: usize,
}
