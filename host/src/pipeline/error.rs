//! Why a generation stopped.

use super::prompt::PromptError;
use super::{noise, unipc};
use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    UniPc(#[from] unipc::UniPcError),
    #[error(transparent)]
    Arithmetic(#[from] crate::tensor::ArithmeticError),
    #[error(transparent)]
    Noise(#[from] noise::NoiseError),
    /// The frame sink (the video encoder) refused frames.
    #[error("the frame sink failed: {0}")]
    Sink(SinkError),
    /// A tensor could not take the shape the plan gave it (a bug, not the request's fault).
    #[error("tensor shape: {0}")]
    Shape(#[from] ndarray::ShapeError),
}

impl PipelineError {
    /// Whether the run failed for want of memory (the runtime's or the arithmetic's).
    pub fn is_out_of_memory(&self) -> bool {
        use crate::tensor::ArithmeticError;
        matches!(
            self,
            PipelineError::Backend(BackendError::OutOfMemory { .. })
                | PipelineError::Backend(BackendError::Arithmetic(ArithmeticError::OutOfMemory(_)))
                | PipelineError::Arithmetic(ArithmeticError::OutOfMemory(_))
                | PipelineError::UniPc(unipc::UniPcError::Arithmetic(
                    ArithmeticError::OutOfMemory(_)
                ))
        )
    }
}

/// Why the frame sink refused frames: its own error, whatever it is (the pipeline only passes
/// it on).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;
