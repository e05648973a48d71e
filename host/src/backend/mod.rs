//! What the pipeline needs from a runtime, and the ONNX Runtime implementation of it.
//!
//! The pipeline (tokenizer, noise, scheduler, guidance, chunk loop) is runtime-independent and
//! talks to the model only through [`Backend`], which shows it no runtime types;
//! `ort_backend.rs` runs the exported graphs.

pub mod arithmetic;
mod contract;
pub mod device_io;
#[cfg(test)]
pub(crate) mod fake;
mod ort_backend;
mod ort_graph;
mod ort_run_control;
pub mod runtime;
pub mod session;

pub use contract::{Backend, BackendError, RunControl};
pub use ort_backend::{LoadOptions, OrtBackend, OrtVaeCache};
pub use ort_run_control::OrtRunControl;
pub use session::{CudaMemory, Device};
