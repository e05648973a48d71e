//! Step caching (MagCache): which denoising steps skip the transformer's blocks.
//!
//! A skipped step runs only the DiT's embedding and output head and adds the residual (output of
//! the last block minus input of the first) its branch left at its last computed step. Whether a
//! step skips depends only on the checkpoint's magnitude ratios (the mean ratio of successive
//! residuals' norms, measured once per checkpoint) and the mode's threshold, so the whole plan is
//! known when a job is submitted: progress and ETA use it.
//!
//! The rule is diffusers' `MagCacheHeadHook` (hooks/mag_cache.py, diffusers 0.42.1), applied per
//! guidance branch as diffusers applies it per cache context: past the retention steps, multiply
//! the accumulated ratio by the step's ratio, add `|1 − ratio|` to the accumulated error, and skip
//! while the error is within the threshold and at most `max_skip_steps` steps were skipped in a
//! row; otherwise compute and start accumulating afresh. Ratios calibrated for another step count
//! are resampled to the job's by diffusers' `nearest_interp`.

pub use crate::model::MagRatios;
use serde::{Deserialize, Serialize};

/// What a request asks for (`"cache"` in the submit body).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Every step runs the whole transformer: the result diffusers gives without caching.
    #[default]
    Off,
    /// MagCache E0.12 K2 R0.2, MagCache's published setting for Wan2.1-T2V-1.3B at 480p
    /// (189 s → 87 s on their A800).
    Fast,
    /// MagCache E0.12 K4 R0.2, their faster published setting for the same model (→ 68 s).
    Faster,
}

impl CacheMode {
    pub const NAMES: [&'static str; 3] = ["off", "fast", "faster"];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Off => "off",
            CacheMode::Fast => "fast",
            CacheMode::Faster => "faster",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => CacheMode::Off,
            "fast" => CacheMode::Fast,
            "faster" => CacheMode::Faster,
            _ => return None,
        })
    }

    /// The MagCache settings of this mode; `None` for `Off`.
    pub fn settings(self) -> Option<CacheSettings> {
        match self {
            CacheMode::Off => None,
            CacheMode::Fast => Some(CacheSettings {
                threshold: 0.12,
                max_skip_steps: 2,
                retention_ratio: 0.2,
            }),
            CacheMode::Faster => Some(CacheSettings {
                threshold: 0.12,
                max_skip_steps: 4,
                retention_ratio: 0.2,
            }),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// diffusers' `MagCacheConfig` fields, less the ratios (the checkpoint's) and the step count (the
/// job's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSettings {
    /// Accumulated error up to which steps are skipped.
    pub threshold: f64,
    /// At most this many skipped steps in a row (K).
    pub max_skip_steps: usize,
    /// The first `round(retention_ratio × steps)` steps always compute.
    pub retention_ratio: f64,
}

/// Which steps of one job skip the blocks, per branch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SkipPlan {
    /// `cond[i]`: step `i`'s conditional pass skips the blocks.
    pub cond: Vec<bool>,
    /// Empty for an unguided job.
    pub uncond: Vec<bool>,
}

impl SkipPlan {
    /// Nothing skipped: `steps` full steps.
    pub fn none(steps: usize, guided: bool) -> Self {
        Self {
            cond: vec![false; steps],
            uncond: if guided {
                vec![false; steps]
            } else {
                Vec::new()
            },
        }
    }

    /// The plan for a job of `steps` steps.
    pub fn new(ratios: &MagRatios, settings: CacheSettings, steps: usize, guided: bool) -> Self {
        Self {
            cond: branch_plan(&ratios.cond, settings, steps),
            uncond: if guided {
                branch_plan(&ratios.uncond, settings, steps)
            } else {
                Vec::new()
            },
        }
    }

    pub fn steps(&self) -> usize {
        self.cond.len()
    }

    /// Whether every branch of step `i` skips.
    pub fn all_skip(&self, i: usize) -> bool {
        self.cond.get(i).copied().unwrap_or(false)
            && (self.uncond.is_empty() || self.uncond.get(i).copied().unwrap_or(false))
    }

    /// Whether any branch of step `i` skips.
    pub fn any_skip(&self, i: usize) -> bool {
        self.cond.get(i).copied().unwrap_or(false) || self.uncond.get(i).copied().unwrap_or(false)
    }

    /// DiT passes that skip the blocks, over all branches.
    pub fn skipped_passes(&self) -> usize {
        self.cond.iter().chain(&self.uncond).filter(|s| **s).count()
    }

    /// DiT passes in all (one per branch per step).
    pub fn passes(&self) -> usize {
        self.cond.len() + self.uncond.len()
    }

    /// Steps where every branch skips, in order.
    pub fn skipped_steps(&self) -> Vec<usize> {
        (0..self.steps()).filter(|&i| self.all_skip(i)).collect()
    }

    /// Full and block-skipping passes left after `done` steps.
    pub fn remaining_passes(&self, done: usize) -> (usize, usize) {
        let mut full = 0;
        let mut skipped = 0;
        for branch in [&self.cond, &self.uncond] {
            for &skip in branch.iter().skip(done) {
                if skip {
                    skipped += 1;
                } else {
                    full += 1;
                }
            }
        }
        (full, skipped)
    }
}

/// diffusers' `nearest_interp`: `src` resampled to `len` entries by nearest index
/// (`round(i · (n−1)/(len−1))`, numpy's round half to even).
pub fn nearest_interp(src: &[f64], len: usize) -> Vec<f64> {
    let Some(&last) = src.last() else {
        return vec![1.0; len];
    };
    if src.len() == len {
        return src.to_vec();
    }
    if len == 1 {
        return vec![last];
    }
    let scale = (src.len() - 1) as f64 / (len - 1) as f64;
    (0..len)
        .map(|i| {
            let at = (i as f64 * scale).round_ties_even() as usize;
            src[at.min(src.len() - 1)]
        })
        .collect()
}

/// MagCache's calibration measure between two residuals of `dim`-wide token vectors: the mean
/// over tokens of ‖current‖ / (‖previous‖ + 1e-8), as diffusers' `_perform_calibration_step`.
pub fn magnitude_ratio(current: &[f32], previous: &[f32], dim: usize) -> f64 {
    let dim = dim.max(1);
    let norm = |token: &[f32]| {
        token
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let tokens = current.len() / dim;
    if tokens == 0 {
        return 1.0;
    }
    let sum: f64 = current
        .chunks_exact(dim)
        .zip(previous.chunks_exact(dim))
        .map(|(c, p)| norm(c) / (norm(p) + 1e-8))
        .sum();
    sum / tokens as f64
}

fn branch_plan(ratios: &[f64], settings: CacheSettings, steps: usize) -> Vec<bool> {
    let ratios = nearest_interp(ratios, steps);
    // Python's int(x + 0.5) on a non-negative float.
    let retention = (settings.retention_ratio * steps as f64 + 0.5).floor() as usize;
    let mut plan = Vec::with_capacity(steps);
    let (mut ratio, mut skipped_in_row, mut error) = (1.0f64, 0usize, 0.0f64);
    let mut has_residual = false;
    for (i, &scale) in ratios.iter().enumerate() {
        let mut skip = false;
        if i >= retention {
            ratio *= scale;
            skipped_in_row += 1;
            error += (1.0 - ratio).abs();
            if has_residual
                && error <= settings.threshold
                && skipped_in_row <= settings.max_skip_steps
            {
                skip = true;
            } else {
                ratio = 1.0;
                skipped_in_row = 0;
                error = 0.0;
            }
        }
        // A computed step leaves the residual the next skipped one reuses.
        has_residual |= !skip;
        plan.push(skip);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(threshold: f64, k: usize, retention: f64) -> CacheSettings {
        CacheSettings {
            threshold,
            max_skip_steps: k,
            retention_ratio: retention,
        }
    }

    #[test]
    fn interpolation_picks_the_nearest_index_as_numpy_rounds() {
        let src: Vec<f64> = (0..5).map(f64::from).collect();
        assert_eq!(nearest_interp(&src, 5), src);
        assert_eq!(nearest_interp(&src, 1), vec![4.0]);
        // scale 4/2 = 2: indices 0, 2, 4.
        assert_eq!(nearest_interp(&src, 3), vec![0.0, 2.0, 4.0]);
        // scale 4/8 = 0.5: 0, 0.5→0, 1, 1.5→2, 2, 2.5→2, 3, 3.5→4, 4 (half to even).
        assert_eq!(
            nearest_interp(&src, 9),
            vec![0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
        );
    }

    /// Ratios of exactly 1 accumulate no error: past the retention steps the plan is K skips,
    /// then one computed step, repeated.
    #[test]
    fn unit_ratios_skip_k_in_a_row_after_the_retained_steps() {
        let ratios = MagRatios {
            cond: vec![1.0; 10],
            uncond: vec![1.0; 10],
        };
        let plan = SkipPlan::new(&ratios, settings(0.1, 2, 0.2), 10, true);
        let expected = [
            false, false, true, true, false, true, true, false, true, true,
        ];
        assert_eq!(plan.cond, expected);
        assert_eq!(plan.uncond, expected);
        assert_eq!(plan.skipped_steps(), vec![2, 3, 5, 6, 8, 9]);
        assert_eq!(plan.skipped_passes(), 12);
        assert_eq!(plan.remaining_passes(8), (0, 4));
        assert_eq!(plan.remaining_passes(7), (2, 4));
    }

    /// Error accumulates as |1 − Π ratios|: with ratio 0.9 the first step past retention adds
    /// 0.1 (within 0.15), the second 0.19 more (over): skip one, compute one.
    #[test]
    fn accumulated_error_past_the_threshold_computes_and_starts_afresh() {
        let ratios = MagRatios {
            cond: vec![0.9; 6],
            uncond: vec![],
        };
        let plan = SkipPlan::new(&ratios, settings(0.15, 5, 0.0), 6, false);
        // Step 0 has no residual yet, so it computes even within the threshold.
        assert_eq!(plan.cond, [false, true, false, true, false, true]);
        assert!(plan.uncond.is_empty());
        assert!(plan.all_skip(1) && !plan.all_skip(2));
    }

    #[test]
    fn branches_follow_their_own_ratios() {
        let ratios = MagRatios {
            cond: vec![1.0; 4],
            uncond: vec![0.5; 4],
        };
        let plan = SkipPlan::new(&ratios, settings(0.2, 3, 0.25), 4, true);
        assert_eq!(plan.cond, [false, true, true, true]);
        assert_eq!(plan.uncond, [false, false, false, false]);
        assert!(plan.any_skip(1) && !plan.all_skip(1));
        assert!(plan.skipped_steps().is_empty());
    }

    #[test]
    fn the_magnitude_ratio_is_the_mean_of_per_token_norm_ratios() {
        // Two tokens of dim 2: norms 5 / 1 and 2 / 2.
        let current = [3.0, 4.0, 0.0, 2.0];
        let previous = [1.0, 0.0, 2.0, 0.0];
        let ratio = magnitude_ratio(&current, &previous, 2);
        assert!((ratio - 3.0).abs() < 1e-6, "{ratio}");
    }

    #[test]
    fn modes_parse_their_names_only() {
        for name in CacheMode::NAMES {
            assert_eq!(CacheMode::parse(name).map(CacheMode::as_str), Some(name));
        }
        assert_eq!(CacheMode::parse("Fast"), None);
        assert!(CacheMode::Off.settings().is_none());
        assert!(CacheMode::Faster.settings().unwrap().max_skip_steps > 2);
    }
}
