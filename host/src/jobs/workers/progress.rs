//! The jobs this process runs now: their cancel tokens, stage and step, and the ETA estimated
//! from this job's step times and what earlier jobs took to decode.

use crate::jobs::StoredProgress;
use crate::jobs::eta::StepClock;
use crate::pipeline::step_cache::SkipPlan;
use crate::pipeline::{CancelToken, Stage};
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// What a running job is doing, for `/video/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveProgress {
    pub stage: &'static str,
    pub step: u32,
    pub total: u32,
    /// Seconds until the video should be ready (an estimate from this job's step times and
    /// earlier jobs' decoding).
    pub eta_seconds: Option<f64>,
}

struct Running {
    attempt: i64,
    cancel: CancelToken,
    stage: Stage,
    step: usize,
    total: usize,
    last_step: Option<Instant>,
    /// The denoising steps' times, knowing which skip the blocks.
    steps: StepClock,
    /// Frames × pixels this job decodes, to scale earlier jobs' decode times.
    work: f64,
}

#[derive(Default)]
struct Timing {
    /// Seconds of VAE decoding + encoding per frame-pixel, from the last finished job.
    decode_per_unit: Option<f64>,
    /// Wall seconds of the last finished jobs (for Retry-After).
    last_job_seconds: Option<f64>,
    /// A block-skipping DiT pass's cost relative to a full one, from the last job that had both.
    skip_fraction: Option<f64>,
}

#[derive(Default)]
pub(super) struct RunningJobs {
    running: Mutex<HashMap<String, Running>>,
    timing: Mutex<Timing>,
}

impl RunningJobs {
    /// Adds attempt `attempt` of `id`; `work` is its frames × pixels.
    pub(super) fn start(
        &self,
        id: &str,
        attempt: i64,
        cancel: CancelToken,
        plan: SkipPlan,
        work: f64,
    ) {
        let mut running = lock(&self.running);
        // Alone, this job's peak is the process's from here (see `peak_memory`).
        if running.is_empty() {
            crate::peak_memory::reset();
        }
        running.insert(
            id.to_string(),
            Running {
                attempt,
                cancel,
                stage: Stage::EncodingText,
                step: 0,
                total: 1,
                last_step: None,
                steps: StepClock::new(plan),
                work,
            },
        );
    }

    pub(super) fn finish(&self, id: &str) {
        lock(&self.running).remove(id);
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.running).len()
    }

    /// Cancels `id` if it runs here.
    pub(super) fn cancel(&self, id: &str) -> bool {
        match lock(&self.running).get(id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub(super) fn cancel_all(&self) {
        for r in lock(&self.running).values() {
            r.cancel.cancel();
        }
    }

    /// Every running job with its attempt (for lease renewal).
    pub(super) fn held(&self) -> Vec<(String, i64)> {
        lock(&self.running)
            .iter()
            .map(|(id, r)| (id.clone(), r.attempt))
            .collect()
    }

    /// The attempt of `id` if it runs here.
    pub(super) fn attempt(&self, id: &str) -> Option<i64> {
        lock(&self.running).get(id).map(|r| r.attempt)
    }

    pub(super) fn job_finished(&self, seconds: f64) {
        lock(&self.timing).last_job_seconds = Some(seconds);
    }

    pub(super) fn decoded(&self, seconds: f64, pixel_frames: usize) {
        lock(&self.timing).decode_per_unit = Some(seconds / pixel_frames.max(1) as f64);
    }

    pub(super) fn retry_after_seconds(&self, slots: usize) -> u64 {
        let last = lock(&self.timing).last_job_seconds.unwrap_or(30.0);
        (last / slots.max(1) as f64).ceil().clamp(1.0, 3600.0) as u64
    }

    /// Records that attempt `attempt` of `id` reached `step` of `total` in `stage`, and returns
    /// what to store (with the ETA, rounded, so other hosts of a fleet can report it). `None`
    /// when the job no longer runs here as that attempt.
    pub(super) fn record(
        &self,
        id: &str,
        attempt: i64,
        stage: Stage,
        step: usize,
        total: usize,
    ) -> Option<StoredProgress> {
        let now = Instant::now();
        {
            let mut running = lock(&self.running);
            let r = running.get_mut(id).filter(|r| r.attempt == attempt)?;
            if stage == Stage::Denoising
                && step > 0
                && let Some(last) = r.last_step.filter(|_| r.stage == Stage::Denoising)
            {
                let seconds = (now - last).as_secs_f64();
                metrics::histogram!("wanserve_step_duration_seconds").record(seconds);
                r.steps.record(step - 1, seconds);
                if step == total
                    && let Some(fraction) = r.steps.skip_fraction()
                {
                    lock(&self.timing).skip_fraction = Some(fraction);
                }
            }
            r.stage = stage;
            r.step = step;
            r.total = total;
            r.last_step = Some(now);
        }
        Some(StoredProgress {
            stage: stage.as_str().into(),
            step: step as u32,
            total: total as u32,
            eta_seconds: self
                .live(id)
                .and_then(|p| p.eta_seconds)
                .map(|s| (s * 10.0).round() / 10.0),
        })
    }

    /// Progress of `id` if this process runs it, with the ETA.
    pub(super) fn live(&self, id: &str) -> Option<LiveProgress> {
        let (decode_per_unit, skip_fraction) = {
            let timing = lock(&self.timing);
            (timing.decode_per_unit, timing.skip_fraction)
        };
        let running = lock(&self.running);
        let r = running.get(id)?;
        let decode_estimate = decode_per_unit.map(|per| per * r.work);
        let eta_seconds = match (r.stage, r.last_step) {
            (Stage::Denoising, Some(last)) if r.step > 0 => {
                let in_step = last.elapsed().as_secs_f64();
                // Before any job has been decoded, the estimate covers denoising only.
                r.steps
                    .remaining(r.step, in_step, skip_fraction)
                    .map(|left| left + decode_estimate.unwrap_or(0.0))
            }
            (Stage::Decoding, Some(last)) if r.step > 0 => decode_estimate.map(|d| {
                let done = r.step as f64 / r.total.max(1) as f64;
                (d * (1.0 - done) - last.elapsed().as_secs_f64()).max(0.0)
            }),
            _ => None,
        };
        Some(LiveProgress {
            stage: r.stage.as_str(),
            step: r.step as u32,
            total: r.total as u32,
            eta_seconds,
        })
    }
}
