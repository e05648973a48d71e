//! Tensor math the pipeline needs, independent of any runtime: weighted sums of same-shaped
//! tensors (classifier-free guidance and every UniPC update are one each). The pipeline and its
//! scheduler call a [`TensorArithmetic`]; a backend supplies one over its own tensors (ONNX
//! Runtime over device memory in `backend::arithmetic`), and [`HostTensors`] does it over host
//! vectors. Neither `pipeline` nor `backend` imports the other's internals through this.

#[derive(Debug, thiserror::Error)]
pub enum ArithmeticError {
    #[error("tensors of {0} and {1} values cannot be summed")]
    ShapeMismatch(usize, usize),
    #[error("tensor arithmetic failed: {0}")]
    Failed(String),
    /// The runtime could not allocate the result (device or host memory).
    #[error("tensor arithmetic ran out of memory: {0}")]
    OutOfMemory(String),
}

/// Weighted sums of same-shaped tensors.
pub trait TensorArithmetic {
    type Tensor;
    /// Σ weight · tensor. `terms` is never empty.
    fn weighted_sum(&self, terms: &[(f32, &Self::Tensor)])
    -> Result<Self::Tensor, ArithmeticError>;
}

/// [`TensorArithmetic`] over `Vec<f32>` in host memory.
pub struct HostTensors;

impl TensorArithmetic for HostTensors {
    type Tensor = Vec<f32>;

    fn weighted_sum(&self, terms: &[(f32, &Vec<f32>)]) -> Result<Vec<f32>, ArithmeticError> {
        let len = terms.first().map_or(0, |(_, t)| t.len());
        if let Some((_, t)) = terms.iter().find(|(_, t)| t.len() != len) {
            return Err(ArithmeticError::ShapeMismatch(t.len(), len));
        }
        // Block by block so that each block of the output stays in L1 while every term is
        // added to it: one pass over memory instead of one per term.
        const BLOCK: usize = 2048;
        let mut out = vec![0f32; len];
        for (b, block) in out.chunks_mut(BLOCK).enumerate() {
            let start = b * BLOCK;
            for (weight, tensor) in terms {
                let part = &tensor[start..start + block.len()];
                for (o, x) in block.iter_mut().zip(part) {
                    *o += weight * x;
                }
            }
        }
        Ok(out)
    }
}
