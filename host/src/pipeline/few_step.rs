//! Few-step distilled sampling (DMD), as FastVideo runs FastWan2.1-T2V-1.3B
//! (`fastvideo/pipelines/stages/denoising.py`, `DmdDenoisingStage.forward`, and SGLang's copy in
//! `sglang/multimodal_gen/runtime/pipelines_core/stages/denoising_dmd.py`):
//!
//! - the DiT runs at each of the checkpoint's fixed timesteps (FastWan2.1: 1000, 757, 522),
//!   on the conditional prompt only (no classifier-free guidance);
//! - its flow prediction `v` gives the clean estimate `x0 = x_t − σ(t)·v`
//!   (`fastvideo/models/utils.py::pred_noise_to_pred_video`);
//! - before the next timestep `t'`, `x0` is noised again with fresh noise from the job's seeded
//!   generator, `x = (1 − σ(t'))·x0 + σ(t')·ε` (the scheduler's `add_noise`); the last step's
//!   `x0` is the result.
//!
//! `σ(t)` is looked up as both functions do: the entry of the sigma table that
//! `FlowMatchEulerDiscreteScheduler(shift)` builds at construction (1000 training steps,
//! float32, `σ = shift·s / (1 + (shift − 1)·s)` for `s` = 1000/1000 … 1/1000) whose timestep
//! (`1000·σ`) is nearest `t`, the first on a tie: the training-noise table, which FastVideo's
//! DMD pipeline gives the stage separately from the inference scheduler
//! (`fastvideo/pipelines/basic/wan/wan_dmd_pipeline.py`). That pipeline holds latents as (batch,
//! frames, channels, height, width) (`LatentPreparationStage(use_btchw_layout=True)`): the
//! initial latents and each fresh noise are `torch.randn` of that shape from the job's seeded
//! CPU generator, which this pipeline draws in the same order and lays out as its (batch,
//! channels, frames, height, width). `models/reference_dmd.py` is the reference the parity test
//! compares with.

use crate::model::FewStepSpec;
use ndarray::Array5;

/// The training schedule's length the sigma table is built over.
const TRAIN_TIMESTEPS: usize = 1000;

#[derive(Debug, Clone)]
pub struct FewStepSampler {
    timesteps: Vec<i64>,
    /// σ at each timestep.
    sigmas: Vec<f32>,
}

impl FewStepSampler {
    pub fn new(spec: &FewStepSpec) -> Self {
        let (table_timesteps, table_sigmas) = sigma_table(spec.shift);
        let sigmas = spec
            .timesteps
            .iter()
            .map(|&t| {
                let t = t as f64;
                // The first nearest entry, as torch.argmin picks it.
                let mut best = 0;
                for (i, candidate) in table_timesteps.iter().enumerate() {
                    if (f64::from(*candidate) - t).abs()
                        < (f64::from(table_timesteps[best]) - t).abs()
                    {
                        best = i;
                    }
                }
                table_sigmas[best]
            })
            .collect();
        Self {
            timesteps: spec.timesteps.clone(),
            sigmas,
        }
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// σ at step `i`'s timestep.
    pub fn sigma(&self, i: usize) -> f32 {
        self.sigmas[i]
    }

    /// σ of the step after `i`, `None` after the last.
    pub fn next_sigma(&self, i: usize) -> Option<f32> {
        self.sigmas.get(i + 1).copied()
    }
}

/// `FlowMatchEulerDiscreteScheduler(shift=shift)`'s `timesteps` and `sigmas` as its constructor
/// leaves them, in float32 as torch computes them.
fn sigma_table(shift: f64) -> (Vec<f32>, Vec<f32>) {
    let n = TRAIN_TIMESTEPS;
    let shift = shift as f32;
    let mut timesteps = Vec::with_capacity(n);
    let mut sigmas = Vec::with_capacity(n);
    for k in (1..=n).rev() {
        // np.linspace(1, n, n, dtype=float32) is exactly k; / n in float32.
        let s = k as f32 / n as f32;
        let sigma = shift * s / (1.0 + (shift - 1.0) * s);
        sigmas.push(sigma);
        timesteps.push(sigma * n as f32);
    }
    (timesteps, sigmas)
}

/// Noise drawn in FastVideo's (batch, frames, channels, height, width) order, laid out in
/// `shape` = (batch, channels, frames, height, width).
pub fn noise_in_frame_major_order(
    values: Vec<f32>,
    shape: [usize; 5],
) -> Result<Array5<f32>, ndarray::ShapeError> {
    let [b, c, f, h, w] = shape;
    let drawn = Array5::from_shape_vec((b, f, c, h, w), values)?;
    Ok(drawn
        .permuted_axes([0, 2, 1, 3, 4])
        .as_standard_layout()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(timesteps: &[i64], shift: f64) -> FewStepSpec {
        FewStepSpec {
            kind: "dmd".into(),
            timesteps: timesteps.to_vec(),
            shift,
            source: None,
        }
    }

    #[test]
    fn sigmas_are_the_shifted_tables_nearest_entries() {
        let sampler = FewStepSampler::new(&spec(&[1000, 757, 522], 8.0));
        // t = 1000 is the table's first entry: s = 1, σ = 1.
        assert_eq!(sampler.sigma(0), 1.0);
        // The table's timestep is 1000·σ, so σ(t) is within half a table step of t / 1000.
        for (i, t) in [(1, 757.0f32), (2, 522.0)] {
            let sigma = sampler.sigma(i);
            assert!((sigma * 1000.0 - t).abs() < 1.0, "σ({t}) = {sigma}");
        }
        assert_eq!(sampler.next_sigma(0), Some(sampler.sigma(1)));
        assert_eq!(sampler.next_sigma(2), None);
        // With shift 1 the table is s itself: σ(500) = 0.5 exactly.
        assert_eq!(FewStepSampler::new(&spec(&[500], 1.0)).sigma(0), 0.5);
    }

    #[test]
    fn frame_major_noise_lands_where_fastvideo_puts_it() {
        // (b, c, f, h, w) = (1, 2, 3, 1, 1): drawn as f0c0 f0c1 f1c0 f1c1 f2c0 f2c1.
        let values: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let noise = noise_in_frame_major_order(values, [1, 2, 3, 1, 1]).expect("shape");
        assert_eq!(noise[[0, 0, 1, 0, 0]], 2.0);
        assert_eq!(noise[[0, 1, 2, 0, 0]], 5.0);
        assert_eq!(noise[[0, 1, 0, 0, 0]], 1.0);
    }
}
