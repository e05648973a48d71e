//! Text → frames: tokenize, encode text, seeded noise, denoise with classifier-free guidance and
//! UniPC, de-normalise, decode chunk by chunk, and hand uint8 RGB frames to a sink as they come.
//!
//! Mirrors diffusers' `WanPipeline.__call__` step for step so a seed gives the same video in both
//! (see `tests/parity.rs`). One difference by design: a frame count that is not `4k+1` is rounded
//! *up* to the next one and the extra frames are dropped, where diffusers rounds down.

mod error;
pub mod few_step;
mod job;
pub mod noise;
mod planning;
pub mod preview;
pub mod prompt;
pub mod step_cache;
mod step_turns;
pub mod unipc;

pub use error::{PipelineError, SinkError};
pub use job::{CancelToken, FrameChunk, GenerateRequest, Generated, Plan, Progress, Stage};
pub use planning::{guided, plan, size_multiple, skip_plan, skip_plan_or_none};
use step_turns::StepTurns;

use crate::backend::{Backend, BackendError, RunControl};
use crate::model::{Manifest, ModelDir};
use crate::tensor::TensorArithmetic;
use ndarray::{Array3, Array5, ArrayView5, Axis, s};
use prompt::PromptTokenizer;

use step_cache::CacheMode;

/// How a job's latents go from one step to the next.
enum Sampler<T> {
    /// The base model: UniPC over the manifest's scheduler config.
    UniPc(unipc::UniPcScheduler<T>),
    /// A few-step distilled model: x0 estimates noised again to fixed timesteps.
    FewStep(few_step::FewStepSampler),
}

impl<T> Sampler<T> {
    fn timesteps(&self) -> &[i64] {
        match self {
            Sampler::UniPc(scheduler) => scheduler.timesteps(),
            Sampler::FewStep(sampler) => sampler.timesteps(),
        }
    }
}

/// The first latents from `generator`: `torch.randn(latent_shape, generator=g)`.
fn initial_noise(
    generator: &mut noise::TorchRandn,
    plan: &Plan,
) -> Result<Array5<f32>, PipelineError> {
    let count = plan.latent_shape.iter().product();
    Ok(Array5::from_shape_vec(
        plan.latent_shape,
        generator.draw(count)?,
    )?)
}

/// A job's seeded noise, drawn in the order its model's reference draws it: diffusers' (batch,
/// channels, frames, …) for the base model, FastVideo's (batch, frames, channels, …) for a
/// few-step one.
fn draw_noise(
    generator: &mut noise::TorchRandn,
    plan: &Plan,
    few_step: bool,
) -> Result<Array5<f32>, PipelineError> {
    if few_step {
        let count = plan.latent_shape.iter().product();
        Ok(few_step::noise_in_frame_major_order(
            generator.draw(count)?,
            plan.latent_shape,
        )?)
    } else {
        initial_noise(generator, plan)
    }
}

/// The text contexts of one job, as its denoising loop uses them.
enum Contexts<C> {
    /// Guidance scale ≤ 1: the conditional pass only.
    Unguided(C),
    /// Two DiT calls per step, then a weighted sum.
    TwoCalls { cond: C, uncond: C },
    /// One batch-2 DiT call per step (`Backend::predict_guided`).
    Batched(C),
}

pub struct Pipeline<B> {
    backend: B,
    /// Classifier-free guidance as one batch-2 DiT call per step instead of two calls.
    batched_guidance: bool,
    tokenizer: PromptTokenizer,
    manifest: Manifest,
    denoise_turns: StepTurns,
    /// Live previews of the x0 estimate (none unless asked for and the manifest has factors).
    previewer: Option<preview::LatentPreviewer>,
}

impl<B: Backend> Pipeline<B> {
    pub fn new(backend: B, model: &ModelDir) -> Result<Self, PipelineError> {
        let m = &model.manifest;
        let tokenizer = PromptTokenizer::load(
            &model.file(&m.tokenizer.file),
            m.text_encoder.max_length,
            m.tokenizer.pad_id,
        )?;
        Ok(Self {
            backend,
            tokenizer,
            manifest: m.clone(),
            denoise_turns: StepTurns::default(),
            batched_guidance: false,
            previewer: None,
        })
    }

    /// Makes a preview after every `every`-th denoising step and after the last (`None`: no
    /// previews). A model without the manifest's `preview` factors makes none.
    pub fn with_previews(mut self, every: Option<std::num::NonZeroUsize>) -> Self {
        self.previewer = every.and_then(|every| {
            self.manifest
                .preview
                .as_ref()
                .map(|spec| preview::LatentPreviewer::new(spec, every))
        });
        self
    }

    /// Whether this pipeline's jobs come with previews.
    pub fn makes_previews(&self) -> bool {
        self.previewer.is_some()
    }

    /// Runs guidance as one batch-2 DiT call per step (conditional and unconditional contexts
    /// stacked) instead of two calls. Same result within float rounding; which is faster
    /// depends on the device (see ARCHITECTURE.md).
    pub fn with_batched_guidance(mut self, batched: bool) -> Self {
        self.batched_guidance = batched;
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs one tiny guided job (one step, one frame, the smallest size) through every graph,
    /// so that the first real job does not pay for ONNX Runtime's lazy initialisation.
    pub fn warm_up(&self) -> Result<(), PipelineError> {
        let side = self.size_multiple();
        let warm = GenerateRequest {
            prompt: "warm-up".into(),
            negative_prompt: String::new(),
            width: side,
            height: side,
            num_frames: 1,
            // A few-step model runs its own count (each step is the same graph).
            infer_steps: self
                .manifest
                .sampler
                .as_ref()
                .map_or(1, |sampler| sampler.timesteps.len()),
            guidance_scale: 2.0,
            seed: 0,
            cache: CacheMode::Off,
        };
        self.generate(&warm, &CancelToken::default(), &mut |_| {}, &mut |_| Ok(()))
            .map(|_| ())
    }

    /// Width and height must be multiples of this (VAE scale × patch size).
    pub fn size_multiple(&self) -> usize {
        size_multiple(&self.manifest)
    }

    pub fn plan(&self, req: &GenerateRequest) -> Result<Plan, PipelineError> {
        plan(&self.manifest, req)
    }

    /// The initial latents: `torch.randn(latent_shape, generator=Generator().manual_seed(seed))`
    /// (drawn frame-major for a few-step model, as FastVideo draws them).
    pub fn initial_noise(&self, plan: &Plan, seed: u64) -> Result<Array5<f32>, PipelineError> {
        draw_noise(
            &mut noise::TorchRandn::new(seed),
            plan,
            self.manifest.sampler.is_some(),
        )
    }

    /// The cleaned prompt's token ids and mask, as the text encoder receives them.
    pub fn tokenize(&self, prompt: &str) -> Result<prompt::TokenizedPrompt, PipelineError> {
        Ok(self.tokenizer.encode(prompt)?)
    }

    /// Prompt embeddings `[1, max_length, dim]`, zero past the prompt's tokens (as diffusers).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Array3<f32>, PipelineError> {
        self.encode_prompt_with(prompt, &self.backend.run_control()?)
    }

    fn encode_prompt_with(
        &self,
        prompt: &str,
        run: &B::RunControl,
    ) -> Result<Array3<f32>, PipelineError> {
        let tokens = self.tokenizer.encode(prompt)?;
        // The encoder runs once or twice per job: its working memory goes back after each run.
        let mut hidden = self.backend.encode_text(
            &tokens.input_ids,
            &tokens.attention_mask,
            1,
            &run.releasing(),
        )?;
        hidden.slice_mut(s![.., tokens.len.., ..]).fill(0.0);
        Ok(hidden)
    }

    pub fn generate(
        &self,
        req: &GenerateRequest,
        cancel: &CancelToken,
        on_progress: &mut dyn FnMut(Progress),
        on_frames: &mut dyn FnMut(FrameChunk<'_>) -> Result<(), SinkError>,
    ) -> Result<Generated, PipelineError> {
        // A cancel interrupts the run in progress; a run it interrupted fails, and that failure
        // is the cancel.
        let run = self.backend.run_control()?;
        let interrupt = run.clone();
        cancel.on_cancel(move || interrupt.interrupt());
        let interrupted = |e: PipelineError| match e {
            PipelineError::Backend(_) if cancel.is_cancelled() => PipelineError::Cancelled,
            other => other,
        };
        self.run_job(req, cancel, &run, on_progress, on_frames, None)
            .map_err(interrupted)
    }

    /// MagCache's calibration run (diffusers' `MagCacheConfig(calibrate=True)`): `req`
    /// denoised with every step in full, measuring per branch the mean over tokens of
    /// ‖residual‖ / ‖previous step's residual‖ (1.0 for the first step). Nothing is decoded.
    pub fn calibrate_step_cache(
        &self,
        req: &GenerateRequest,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<step_cache::MagRatios, PipelineError> {
        if !self.backend.supports_step_cache() {
            return Err(PipelineError::InvalidRequest {
                field: "model",
                reason: "this export has no residual output and step-cached pass: export it \
                         again with models/export.py"
                    .into(),
            });
        }
        let req = GenerateRequest {
            cache: CacheMode::Off,
            ..req.clone()
        };
        let run = self.backend.run_control()?;
        let mut calibration = Calibration::default();
        self.run_job(
            &req,
            &CancelToken::default(),
            &run,
            on_progress,
            &mut |_| Ok(()),
            Some(&mut calibration),
        )?;
        let [cond, uncond] = calibration.ratios;
        Ok(step_cache::MagRatios { cond, uncond })
    }

    fn run_job(
        &self,
        req: &GenerateRequest,
        cancel: &CancelToken,
        run: &B::RunControl,
        on_progress: &mut dyn FnMut(Progress),
        on_frames: &mut dyn FnMut(FrameChunk<'_>) -> Result<(), SinkError>,
        mut calibration: Option<&mut Calibration>,
    ) -> Result<Generated, PipelineError> {
        let plan = self.plan(req)?;
        let guided = guided(&self.manifest, req);
        let mut sampler = match &self.manifest.sampler {
            Some(spec) => Sampler::FewStep(few_step::FewStepSampler::new(spec)),
            None => Sampler::UniPc(unipc::UniPcScheduler::new(
                &self.manifest.scheduler,
                req.infer_steps,
            )?),
        };
        let started = std::time::Instant::now();
        on_progress(Progress::at(
            Stage::EncodingText,
            0,
            1 + usize::from(guided),
        ));
        let cond = self.encode_prompt_with(&req.prompt, run)?;
        let skips = skip_plan(&self.manifest, req)?;
        let caching = skips.skipped_passes() > 0;
        if caching && !self.backend.supports_step_cache() {
            return Err(PipelineError::InvalidRequest {
                field: "cache",
                reason: "this model's sessions have no step-cached pass".into(),
            });
        }
        let contexts = if !guided {
            Contexts::Unguided(self.backend.prepare_context(&cond)?)
        } else {
            let uncond = self.encode_prompt_with(&req.negative_prompt, run)?;
            // A step-cached job keeps one residual per branch, so its branches run as two calls.
            if self.batched_guidance && !caching {
                Contexts::Batched(self.backend.prepare_context_pair(&cond, &uncond)?)
            } else {
                Contexts::TwoCalls {
                    cond: self.backend.prepare_context(&cond)?,
                    uncond: self.backend.prepare_context(&uncond)?,
                }
            }
        };
        check(cancel)?;

        let text_done = std::time::Instant::now();
        // From here to the last step the latents stay with the backend (on the GPU with CUDA).
        // A few-step sampler draws its fresh noise from the same generator, after these.
        let mut generator = noise::TorchRandn::new(req.seed);
        let few_step = matches!(sampler, Sampler::FewStep(_));
        let mut latents =
            self.backend
                .upload_latents(&draw_noise(&mut generator, &plan, few_step)?)?;
        let arithmetic = self.backend.arithmetic();
        let timesteps = sampler.timesteps().to_vec();
        on_progress(Progress::at(Stage::Denoising, 0, timesteps.len()));
        // Calibration decodes nothing and shows nothing.
        let previewer = self.previewer.as_ref().filter(|_| calibration.is_none());
        let member = self.denoise_turns.join();
        // Each branch's residual from its last computed step, for the steps it skips.
        let mut residuals: [Option<B::Residual>; 2] = [None, None];
        for (i, &t) in timesteps.iter().enumerate() {
            let turn = member.take();
            check(cancel)?;
            // The last step gives the DiT's working memory back (ORT's arena) for between jobs.
            let run = &if i + 1 == timesteps.len() {
                run.releasing()
            } else {
                run.clone()
            };
            let g = req.guidance_scale;
            // One branch's pass: the whole DiT, or its embedding and head around the residual.
            let mut pass = |branch: usize, skips: &[bool], context: &B::Context| {
                let residual = &mut residuals[branch];
                if let Some(calibration) = calibration.as_deref_mut() {
                    let (prediction, fresh) = self
                        .backend
                        .predict_keeping_residual(&latents, t, context, run)?;
                    calibration.record(branch, self.backend.residual_to_host(&fresh)?);
                    Ok(prediction)
                } else if !caching {
                    self.backend.predict(&latents, t, context, run)
                } else if skips.get(i).copied().unwrap_or(false) {
                    let kept = residual.as_ref().ok_or(BackendError::Run {
                        graph: "transformer (step-cached pass)",
                        reason: format!("step {i} skips before any computed step"),
                    })?;
                    self.backend.predict_skipping_blocks(&latents, t, kept, run)
                } else {
                    let (prediction, fresh) = self
                        .backend
                        .predict_keeping_residual(&latents, t, context, run)?;
                    *residual = Some(fresh);
                    Ok(prediction)
                }
            };
            let prediction = match &contexts {
                Contexts::Unguided(context) => pass(0, &skips.cond, context)?,
                Contexts::TwoCalls { cond, uncond } => {
                    let cond = pass(0, &skips.cond, cond)?;
                    check(cancel)?;
                    let uncond = pass(1, &skips.uncond, uncond)?;
                    // uncond + g·(cond − uncond)
                    arithmetic.weighted_sum(&[(1.0 - g, &uncond), (g, &cond)])?
                }
                Contexts::Batched(pair) => {
                    self.backend.predict_guided(&latents, t, pair, g, run)?
                }
            };
            let done = i + 1;
            let mut preview = None;
            // Whether this step is due a preview, decided once for both samplers.
            let previewing = previewer.filter(|p| p.due(done, timesteps.len()));
            let mut show = |x0: &B::Latents| -> Result<(), PipelineError> {
                if let Some(previewer) = previewing {
                    let host = self.backend.download_latents(x0)?;
                    preview = previewer
                        .preview(host.view(), done, timesteps.len())
                        .map(std::sync::Arc::new);
                }
                Ok(())
            };
            latents = match &mut sampler {
                Sampler::UniPc(scheduler) => {
                    if previewing.is_some() {
                        // The x0 UniPC converts the prediction to (flow prediction).
                        let sigma = scheduler.sigmas()[i];
                        show(&arithmetic.weighted_sum(&[(1.0, &latents), (-sigma, &prediction)])?)?;
                    }
                    scheduler.step_with(arithmetic, prediction, latents)?
                }
                Sampler::FewStep(sampler) => {
                    // x0 = x_t − σ(t)·v, then noised again to the next timestep.
                    let x0 = arithmetic
                        .weighted_sum(&[(1.0, &latents), (-sampler.sigma(i), &prediction)])?;
                    show(&x0)?;
                    match sampler.next_sigma(i) {
                        None => x0,
                        Some(next) => {
                            let fresh = draw_noise(&mut generator, &plan, true)?;
                            let fresh = self.backend.upload_latents(&fresh)?;
                            arithmetic.weighted_sum(&[(1.0 - next, &x0), (next, &fresh)])?
                        }
                    }
                }
            };
            drop(turn);
            on_progress(Progress {
                preview,
                ..Progress::at(Stage::Denoising, done, timesteps.len())
            });
        }
        drop(member);
        let latents = self.backend.download_latents(&latents)?;

        let denoise_done = std::time::Instant::now();
        if calibration.is_some() {
            return Ok(Generated { latents, frames: 0 });
        }
        let frames = self.decode(&latents, req, cancel, run, on_progress, on_frames)?;
        tracing::info!(
            text_s = (text_done - started).as_secs_f32(),
            denoise_s = (denoise_done - text_done).as_secs_f32(),
            decode_and_sink_s = denoise_done.elapsed().as_secs_f32(),
            steps = timesteps.len(),
            cache = %req.cache,
            skipped_passes = skips.skipped_passes(),
            latent_shape = ?plan.latent_shape,
            "generated"
        );
        Ok(Generated { latents, frames })
    }

    fn decode(
        &self,
        latents: &Array5<f32>,
        req: &GenerateRequest,
        cancel: &CancelToken,
        run: &B::RunControl,
        on_progress: &mut dyn FnMut(Progress),
        on_frames: &mut dyn FnMut(FrameChunk<'_>) -> Result<(), SinkError>,
    ) -> Result<usize, PipelineError> {
        let vae = &self.manifest.vae;
        // diffusers: latents / (1 / std) + mean, in float32.
        let mut scaled = latents.clone();
        for (c, mut channel) in scaled.axis_iter_mut(Axis(1)).enumerate() {
            let inv_std = 1.0f32 / vae.latents_std[c];
            let mean = vae.latents_mean[c];
            channel.mapv_inplace(|x| x / inv_std + mean);
        }
        // One latent frame per chunk.
        let chunks = latents.shape()[2];
        let mut cache = None;
        let mut emitted = 0usize;
        let mut rgb = Vec::new();
        on_progress(Progress::at(Stage::Decoding, 0, chunks));
        for i in 0..chunks {
            check(cancel)?;
            let latent: ArrayView5<f32> = scaled.slice(s![.., .., i..i + 1, .., ..]);
            // The first-chunk graph runs once per job, the other one until the last chunk: each
            // gives its working memory back after its last run.
            let (video, next) = match cache.take() {
                None => self.backend.decode_first(latent, &run.releasing())?,
                Some(c) if i + 1 == chunks => {
                    self.backend.decode_next(latent, c, &run.releasing())?
                }
                Some(c) => self.backend.decode_next(latent, c, run)?,
            };
            cache = Some(next);
            let wanted = (req.num_frames - emitted).min(video.shape()[2]);
            to_rgb24(&video, wanted, &mut rgb);
            on_frames(FrameChunk {
                rgb: &rgb,
                count: wanted,
                width: video.shape()[4],
                height: video.shape()[3],
            })
            .map_err(PipelineError::Sink)?;
            emitted += wanted;
            on_progress(Progress::at(Stage::Decoding, i + 1, chunks));
        }
        Ok(emitted)
    }
}

/// A calibration run's state: each branch's last residual on the host and its ratios so far.
#[derive(Default)]
struct Calibration {
    previous: [Option<(Vec<usize>, Vec<f32>)>; 2],
    ratios: [Vec<f64>; 2],
}

impl Calibration {
    fn record(&mut self, branch: usize, residual: (Vec<usize>, Vec<f32>)) {
        let dim = residual.0.last().copied().unwrap_or(1);
        let ratio = match &self.previous[branch] {
            Some(previous) if previous.0 == residual.0 => {
                step_cache::magnitude_ratio(&residual.1, &previous.1, dim)
            }
            _ => 1.0,
        };
        self.ratios[branch].push(ratio);
        self.previous[branch] = Some(residual);
    }
}

fn check(cancel: &CancelToken) -> Result<(), PipelineError> {
    if cancel.is_cancelled() {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}

/// `[1, 3, T, H, W]` in [-1, 1] → the first `count` frames as packed RGB24, rounding
/// `(x / 2 + 0.5).clamp(0, 1) * 255` to the nearest integer.
pub fn to_rgb24(video: &Array5<f32>, count: usize, out: &mut Vec<u8>) {
    let (h, w) = (video.shape()[3], video.shape()[4]);
    out.clear();
    out.reserve(count * h * w * 3);
    for t in 0..count {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let v = (video[[0, c, t, y, x]] / 2.0 + 0.5).clamp(0.0, 1.0);
                    out.push((v * 255.0).round() as u8);
                }
            }
        }
    }
}
