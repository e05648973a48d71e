//! A [`Backend`] with no runtime behind it, for tests of what sits above the backend (the
//! pipeline's loop, the job workers): every call returns zeros of the shape the real graph
//! would, after asking a test hook what to do (carry on, fail, block until interrupted, panic).

use super::contract::{Backend, BackendError, RunControl};
use crate::tensor::{ArithmeticError, TensorArithmetic};
use ndarray::{Array3, Array5, ArrayView5};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which graph a call stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeCall {
    EncodeText,
    Predict,
    Decode,
}

/// Run before each call; an error is the call's result.
pub type FakeHook = dyn Fn(FakeCall, &FakeRun) -> Result<(), BackendError> + Send + Sync;

#[derive(Clone, Default)]
pub struct FakeRun(Arc<AtomicBool>);

impl FakeRun {
    pub fn interrupted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Blocks until the job's cancel interrupts this run (what a long graph run looks like to
    /// the layers above), failing as an interrupted run does; gives up after `limit`.
    pub fn wait_for_interrupt(&self, limit: Duration) -> Result<(), BackendError> {
        let until = Instant::now() + limit;
        while !self.interrupted() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(BackendError::Run {
            graph: "fake",
            reason: "interrupted".into(),
        })
    }
}

impl RunControl for FakeRun {
    fn interrupt(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn releasing(&self) -> Self {
        self.clone()
    }
}

pub struct FakeArithmetic;

impl TensorArithmetic for FakeArithmetic {
    type Tensor = Array5<f32>;

    fn weighted_sum(&self, terms: &[(f32, &Array5<f32>)]) -> Result<Array5<f32>, ArithmeticError> {
        let (_, first) = terms[0];
        let mut out = Array5::zeros(first.raw_dim());
        for (weight, t) in terms {
            if t.shape() != first.shape() {
                return Err(ArithmeticError::ShapeMismatch(t.len(), first.len()));
            }
            out.scaled_add(*weight, *t);
        }
        Ok(out)
    }
}

pub struct FakeBackend {
    /// The text encoder's hidden size (the manifest's `text_encoder.dim`).
    pub text_dim: usize,
    pub spatial_scale: usize,
    pub temporal_scale: usize,
    pub hook: Box<FakeHook>,
}

impl FakeBackend {
    /// Shaped like `manifest`'s model, calling `hook` before each run.
    pub fn like(manifest: &crate::model::Manifest, hook: Box<FakeHook>) -> Self {
        Self {
            text_dim: manifest.text_encoder.dim,
            spatial_scale: manifest.vae.scale_factor_spatial,
            temporal_scale: manifest.vae.scale_factor_temporal,
            hook,
        }
    }

    fn call(&self, call: FakeCall, run: &FakeRun) -> Result<(), BackendError> {
        if run.interrupted() {
            return Err(BackendError::Run {
                graph: "fake",
                reason: "interrupted".into(),
            });
        }
        (self.hook)(call, run)
    }

    fn frames(&self, latent: ArrayView5<f32>, count: usize) -> Array5<f32> {
        let s = latent.shape();
        Array5::zeros((
            1,
            3,
            count,
            s[3] * self.spatial_scale,
            s[4] * self.spatial_scale,
        ))
    }
}

impl Backend for FakeBackend {
    type Latents = Array5<f32>;
    type Context = Array3<f32>;
    type Arithmetic = FakeArithmetic;
    type VaeCache = ();
    type RunControl = FakeRun;
    type Residual = Array5<f32>;

    fn run_control(&self) -> Result<FakeRun, BackendError> {
        Ok(FakeRun::default())
    }

    fn encode_text(
        &self,
        input_ids: &[i64],
        _attention_mask: &[i64],
        batch: usize,
        run: &FakeRun,
    ) -> Result<Array3<f32>, BackendError> {
        self.call(FakeCall::EncodeText, run)?;
        Ok(Array3::zeros((
            batch,
            input_ids.len() / batch.max(1),
            self.text_dim,
        )))
    }

    fn arithmetic(&self) -> &FakeArithmetic {
        &FakeArithmetic
    }

    fn upload_latents(&self, latents: &Array5<f32>) -> Result<Array5<f32>, BackendError> {
        Ok(latents.clone())
    }

    fn download_latents(&self, latents: &Array5<f32>) -> Result<Array5<f32>, BackendError> {
        Ok(latents.clone())
    }

    fn prepare_context(&self, context: &Array3<f32>) -> Result<Array3<f32>, BackendError> {
        Ok(context.clone())
    }

    fn prepare_context_pair(
        &self,
        cond: &Array3<f32>,
        _uncond: &Array3<f32>,
    ) -> Result<Array3<f32>, BackendError> {
        Ok(cond.clone())
    }

    fn predict_guided(
        &self,
        latents: &Array5<f32>,
        _timestep: i64,
        _pair: &Array3<f32>,
        _guidance_scale: f32,
        run: &FakeRun,
    ) -> Result<Array5<f32>, BackendError> {
        self.call(FakeCall::Predict, run)?;
        Ok(latents * 0.5)
    }

    fn predict(
        &self,
        latents: &Array5<f32>,
        _timestep: i64,
        _context: &Array3<f32>,
        run: &FakeRun,
    ) -> Result<Array5<f32>, BackendError> {
        self.call(FakeCall::Predict, run)?;
        Ok(latents * 0.5)
    }

    fn supports_step_cache(&self) -> bool {
        false
    }

    fn predict_keeping_residual(
        &self,
        latents: &Array5<f32>,
        timestep: i64,
        context: &Array3<f32>,
        run: &FakeRun,
    ) -> Result<(Array5<f32>, Array5<f32>), BackendError> {
        let prediction = self.predict(latents, timestep, context, run)?;
        Ok((prediction, latents.clone()))
    }

    fn predict_skipping_blocks(
        &self,
        latents: &Array5<f32>,
        _timestep: i64,
        _residual: &Array5<f32>,
        run: &FakeRun,
    ) -> Result<Array5<f32>, BackendError> {
        self.call(FakeCall::Predict, run)?;
        Ok(latents * 0.5)
    }

    fn residual_to_host(
        &self,
        residual: &Array5<f32>,
    ) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
        Ok((
            residual.shape().to_vec(),
            residual.iter().copied().collect(),
        ))
    }

    fn decode_first(
        &self,
        latent: ArrayView5<f32>,
        run: &FakeRun,
    ) -> Result<(Array5<f32>, ()), BackendError> {
        self.call(FakeCall::Decode, run)?;
        Ok((self.frames(latent, 1), ()))
    }

    fn decode_next(
        &self,
        latent: ArrayView5<f32>,
        _cache: (),
        run: &FakeRun,
    ) -> Result<(Array5<f32>, ()), BackendError> {
        self.call(FakeCall::Decode, run)?;
        Ok((self.frames(latent, self.temporal_scale), ()))
    }
}
