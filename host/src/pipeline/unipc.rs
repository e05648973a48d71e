//! A port of diffusers' `UniPCMultistepScheduler` (0.42.1) for flow matching: flow sigmas with
//! `flow_shift`, `flow_prediction` converted to x0, the UniP predictor and UniC corrector in the
//! `bh1`/`bh2` variants, solver orders 1–3 and `lower_order_final`.
//!
//! diffusers keeps sigmas in float32 tensors and applies the update with 0-dim float32 tensors,
//! so the per-step coefficients here are computed in f32 in the same order; only the tiny linear
//! solve for orders ≥ 3 is done in f64 (torch.linalg.solve in f32 may differ in the last bit).
//!
//! Every update UniPC makes to a tensor is a weighted sum of tensors it already has (the sample,
//! the model output, its history). The scheduler computes the weights and leaves the sums to a
//! [`TensorArithmetic`] (`crate::tensor`), so the same code runs over host memory, or, in a
//! backend that keeps latents on the GPU, over device buffers. diffusers forms the differences
//! `(m_i - m_0) / r_k` first; the expanded sums round differently, by about 1e-7 per step.

use crate::model::UniPcConfig;
use crate::tensor::{ArithmeticError, HostTensors, TensorArithmetic};

#[derive(Debug, thiserror::Error)]
pub enum UniPcError {
    #[error("infer_steps must be at least 1")]
    NoSteps,
    #[error("step {0} called after the last of {1} steps")]
    Finished(usize, usize),
    #[error("model output has {0} values but the sample has {1}")]
    ShapeMismatch(usize, usize),
    #[error("no model output {0} steps back")]
    MissingHistory(usize),
    #[error(transparent)]
    Arithmetic(#[from] ArithmeticError),
}

pub struct UniPcScheduler<T = Vec<f32>> {
    solver_order: usize,
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    timesteps: Vec<i64>,
    sigmas: Vec<f32>,
    /// Converted (x0) model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<T>>,
    lower_order_nums: usize,
    last_sample: Option<T>,
    this_order: usize,
    step_index: usize,
}

/// `numpy.linspace(start, stop, num)` exactly as numpy computes it in f64.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

impl<T> UniPcScheduler<T> {
    /// `UniPCMultistepScheduler.from_config(config).set_timesteps(num_steps)`; the config must
    /// already have passed [`UniPcConfig::validate`].
    pub fn new(config: &UniPcConfig, num_steps: usize) -> Result<Self, UniPcError> {
        if num_steps == 0 {
            return Err(UniPcError::NoSteps);
        }
        let train = config.num_train_timesteps as f64;
        let shift = config.flow_shift;
        let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / train, num_steps + 1)[..num_steps]
            .iter()
            .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        // numpy float64 → torch int64 truncates toward zero.
        let timesteps = sigmas.iter().map(|s| (s * train) as i64).collect();
        let sigma_last = match config.final_sigmas_type.as_str() {
            "sigma_min" => sigmas[num_steps - 1],
            _ => 0.0,
        };
        let sigmas = sigmas
            .iter()
            .chain(std::iter::once(&sigma_last))
            .map(|s| *s as f32)
            .collect();
        Ok(Self {
            solver_order: config.solver_order,
            bh2: config.solver_type == "bh2",
            lower_order_final: config.lower_order_final,
            disable_corrector: config.disable_corrector.clone(),
            timesteps,
            sigmas,
            model_outputs: (0..config.solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
            step_index: 0,
        })
    }

    /// The timesteps the model is called with, one per step.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// One denoising step with `arithmetic` doing the tensor math (wherever its tensors live).
    pub fn step_with<A: TensorArithmetic<Tensor = T>>(
        &mut self,
        arithmetic: &A,
        model_output: T,
        sample: T,
    ) -> Result<T, UniPcError> {
        let steps = self.timesteps.len();
        if self.step_index >= steps {
            return Err(UniPcError::Finished(self.step_index, steps));
        }
        let use_corrector = self.step_index > 0
            && !self.disable_corrector.contains(&(self.step_index - 1))
            && self.last_sample.is_some();

        // flow_prediction → x0
        let sigma = self.sigmas[self.step_index];
        let converted = arithmetic.weighted_sum(&[(1.0, &sample), (-sigma, &model_output)])?;

        let sample = match (use_corrector, self.last_sample.as_ref()) {
            (true, Some(last)) => {
                let terms = self.corrector_terms(self.this_order);
                let mut operands = vec![(terms.last_sample, last), (terms.model_t, &converted)];
                for (back, weight) in terms.history.iter().enumerate() {
                    operands.push((*weight, self.output(back)?));
                }
                arithmetic.weighted_sum(&operands)?
            }
            _ => sample,
        };

        self.model_outputs.rotate_left(1);
        let newest = self.model_outputs.len() - 1;
        self.model_outputs[newest] = Some(converted);

        let this_order = if self.lower_order_final {
            self.solver_order.min(steps - self.step_index)
        } else {
            self.solver_order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let (x_weight, history) = self.predictor_terms(self.this_order);
        let mut operands = vec![(x_weight, &sample)];
        for (back, weight) in history.iter().enumerate() {
            operands.push((*weight, self.output(back)?));
        }
        let prev = arithmetic.weighted_sum(&operands)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }

    fn lambda(&self, index: usize) -> f32 {
        let sigma = self.sigmas[index];
        (1.0 - sigma).ln() - sigma.ln()
    }

    /// The i-th most recent converted output (0 = newest).
    fn output(&self, back: usize) -> Result<&T, UniPcError> {
        self.model_outputs
            .len()
            .checked_sub(1 + back)
            .and_then(|i| self.model_outputs[i].as_ref())
            .ok_or(UniPcError::MissingHistory(back))
    }

    /// h·φ and B(h) coefficients shared by predictor and corrector: returns (h_phi_1, B_h, R, b).
    fn coefficients(
        &self,
        h: f32,
        rks: &[f32],
        order: usize,
    ) -> (f32, f32, Vec<Vec<f32>>, Vec<f32>) {
        let hh = -h; // predict_x0
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, r, b)
    }

    /// What both updates share between steps `s0` and `t`: (c_x, c_m0, c_res, r_k, R, b).
    fn update(&self, s0: usize, t: usize, order: usize) -> Update {
        let sigma_t = self.sigmas[t];
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = self.lambda(s0);
        let h = self.lambda(t) - lambda_s0;
        let mut rks: Vec<f32> = (1..order)
            .map(|i| (self.lambda(s0 - i) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        Update {
            c_x: sigma_t / self.sigmas[s0],
            c_m0: alpha_t * h_phi_1,
            c_res: alpha_t * b_h,
            rks,
            r,
            b,
        }
    }

    /// UniP: x_t = c_x·x − c_m0·m0 − c_res·Σ ρ_k (m_k − m0) / r_k, as weights of x and of the
    /// history (newest first).
    fn predictor_terms(&self, order: usize) -> (f32, Vec<f32>) {
        let u = self.update(self.step_index, self.step_index + 1, order);
        let rhos: Vec<f32> = match order {
            1 => vec![],
            2 => vec![0.5],
            _ => solve(&truncate(&u.r, order - 1), &u.b[..order - 1]),
        };
        (u.c_x, u.history_weights(&rhos))
    }

    /// UniC: x_t = c_x·x_last − c_m0·m0 − c_res·(Σ ρ_k (m_k − m0) / r_k + ρ_t (model_t − m0)).
    fn corrector_terms(&self, order: usize) -> CorrectorTerms {
        let u = self.update(self.step_index - 1, self.step_index, order);
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            solve(&u.r, &u.b)
        };
        let (rho_t, rhos) = rhos.split_last().map_or((0.5, &[][..]), |(t, r)| (*t, r));
        let mut history = u.history_weights(rhos);
        history[0] += u.c_res * rho_t;
        CorrectorTerms {
            last_sample: u.c_x,
            model_t: -u.c_res * rho_t,
            history,
        }
    }
}

impl UniPcScheduler<Vec<f32>> {
    /// One denoising step on host vectors: the model's (guided) prediction at the current
    /// timestep and the current sample in, the sample for the next timestep out.
    pub fn step(
        &mut self,
        model_output: Vec<f32>,
        sample: Vec<f32>,
    ) -> Result<Vec<f32>, UniPcError> {
        if model_output.len() != sample.len() {
            return Err(UniPcError::ShapeMismatch(model_output.len(), sample.len()));
        }
        self.step_with(&HostTensors, model_output, sample)
    }
}

struct Update {
    c_x: f32,
    c_m0: f32,
    c_res: f32,
    rks: Vec<f32>,
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl Update {
    /// Weights of m0, m1, … in −c_m0·m0 − c_res·Σ ρ_k (m_k − m0) / r_k.
    fn history_weights(&self, rhos: &[f32]) -> Vec<f32> {
        let mut weights = vec![-self.c_m0];
        for (rho, rk) in rhos.iter().zip(&self.rks) {
            let w = self.c_res * rho / rk;
            weights[0] += w;
            weights.push(-w);
        }
        weights
    }
}

struct CorrectorTerms {
    last_sample: f32,
    model_t: f32,
    /// Weights of the history before this step's output was added (newest first).
    history: Vec<f32>,
}

fn truncate(r: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    r[..n].iter().map(|row| row[..n].to_vec()).collect()
}

/// Solves the small dense system `a · x = b` by Gaussian elimination with partial pivoting.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, bi)| {
            row.iter()
                .map(|v| f64::from(*v))
                .chain([f64::from(*bi)])
                .collect()
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|i, j| m[*i][col].abs().total_cmp(&m[*j][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (value, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *value -= f * p;
            }
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x.into_iter().map(|v| v as f32).collect()
}
