//! How long a job's remaining denoising steps should take, knowing which of them skip the
//! transformer's blocks (step caching decides that before the job runs).
//!
//! A step costs one DiT pass per guidance branch; a pass that skips the blocks costs a fraction
//! of a full one. Steps are timed by how many of their passes skip; a kind of step not seen yet
//! in this job is estimated from the full passes' cost and the skipped pass's fraction of it
//! (measured on an earlier job, else [`DEFAULT_SKIP_FRACTION`]).

use crate::pipeline::step_cache::SkipPlan;

/// A skipped pass's cost relative to a full one, before any job has measured it (on the bundled
/// model a skipped pass still pays the patch and time embeddings, the head and the update).
pub const DEFAULT_SKIP_FRACTION: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct StepClock {
    plan: SkipPlan,
    branches: usize,
    /// Seconds and count of finished steps, by how many of their passes skipped (0, 1, 2).
    by_skipped: [(f64, u32); 3],
}

impl StepClock {
    pub fn new(plan: SkipPlan) -> Self {
        let branches = if plan.uncond.is_empty() { 1 } else { 2 };
        Self {
            plan,
            branches,
            by_skipped: [(0.0, 0); 3],
        }
    }

    fn skipped_in(&self, step: usize) -> usize {
        let skips = |branch: &[bool]| usize::from(branch.get(step).copied().unwrap_or(false));
        skips(&self.plan.cond) + skips(&self.plan.uncond)
    }

    /// Step `step` (0-based) took `seconds`.
    pub fn record(&mut self, step: usize, seconds: f64) {
        let kind = &mut self.by_skipped[self.skipped_in(step).min(2)];
        kind.0 += seconds;
        kind.1 += 1;
    }

    fn observed(&self, skipped: usize) -> Option<f64> {
        let (sum, n) = self.by_skipped[skipped.min(2)];
        (n > 0).then(|| sum / f64::from(n))
    }

    /// A full pass's seconds, from the steps that skipped nothing.
    fn full_pass(&self) -> Option<f64> {
        self.observed(0).map(|s| s / self.branches as f64)
    }

    /// A skipped pass's cost as a fraction of a full one, as this job measured it.
    pub fn skip_fraction(&self) -> Option<f64> {
        let full = self.full_pass()?;
        (1..=self.branches).find_map(|k| {
            let step = self.observed(k)?;
            let skipped = (step - (self.branches - k) as f64 * full) / k as f64;
            (full > 0.0).then(|| (skipped / full).clamp(0.01, 1.0))
        })
    }

    /// Expected seconds of a step with `skipped` skipped passes.
    fn estimate(&self, skipped: usize, earlier_fraction: Option<f64>) -> Option<f64> {
        if let Some(seen) = self.observed(skipped) {
            return Some(seen);
        }
        if let Some(full) = self.full_pass() {
            let fraction = self
                .skip_fraction()
                .or(earlier_fraction)
                .unwrap_or(DEFAULT_SKIP_FRACTION);
            return Some(full * ((self.branches - skipped) as f64 + skipped as f64 * fraction));
        }
        // Only skipped steps seen so far (no retained steps): their mean, whatever the kind.
        let (sum, n) = self
            .by_skipped
            .iter()
            .fold((0.0, 0), |(s, c), (sum, n)| (s + sum, c + n));
        (n > 0).then(|| sum / f64::from(n))
    }

    /// Seconds left after `done` steps, `in_step` seconds into the next one.
    pub fn remaining(
        &self,
        done: usize,
        in_step: f64,
        earlier_fraction: Option<f64>,
    ) -> Option<f64> {
        let mut total = 0.0;
        for step in done..self.plan.steps() {
            let estimate = self.estimate(self.skipped_in(step), earlier_fraction)?;
            // The current step is partly done already.
            total += if step == done {
                (estimate - in_step).max(0.0)
            } else {
                estimate
            };
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cond: &[bool], uncond: &[bool]) -> SkipPlan {
        SkipPlan {
            cond: cond.to_vec(),
            uncond: uncond.to_vec(),
        }
    }

    #[test]
    fn without_skips_it_is_the_mean_step_times_the_steps_left() {
        let mut clock = StepClock::new(SkipPlan::none(5, true));
        clock.record(0, 2.0);
        clock.record(1, 4.0);
        assert_eq!(clock.remaining(2, 0.0, None), Some(9.0));
        assert_eq!(clock.remaining(2, 1.0, None), Some(8.0));
        assert_eq!(SkipPlan::none(5, true).passes(), 10);
    }

    /// Two full steps of 2 s, then skipped steps: before one is seen they are estimated at the
    /// default fraction, afterwards at what they took.
    #[test]
    fn skipped_steps_are_estimated_then_measured() {
        let skips = [false, false, true, true, false];
        let mut clock = StepClock::new(plan(&skips, &skips));
        clock.record(0, 2.0);
        clock.record(1, 2.0);
        // 2 skipped steps at 2 × 1 s × 0.25, one full step of 2 s.
        assert_eq!(clock.remaining(2, 0.0, None), Some(3.0));
        // An earlier job measured a skipped pass at 10 % of a full one.
        let earlier = clock.remaining(2, 0.0, Some(0.1)).unwrap();
        assert!((earlier - 2.4).abs() < 1e-9, "{earlier}");
        clock.record(2, 0.2);
        assert!((clock.skip_fraction().unwrap() - 0.1).abs() < 1e-9);
        assert!((clock.remaining(3, 0.0, None).unwrap() - 2.2).abs() < 1e-9);
    }

    /// One branch skipping while the other computes costs a full pass and a skipped one.
    #[test]
    fn a_step_where_one_branch_skips_costs_between_the_two() {
        let mut clock = StepClock::new(plan(&[false, true, true], &[false, false, true]));
        clock.record(0, 2.0);
        clock.record(2, 0.4);
        // full pass 1 s, skipped pass (0.4 − 0) / 2 = 0.2 s: the mixed step is 1.2 s.
        let left = clock.remaining(1, 0.0, None).unwrap();
        assert!((left - 1.6).abs() < 1e-9, "{left}");
    }
}
