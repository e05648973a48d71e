//! How an ONNX Runtime session is built: the device, its threads and the CUDA provider's memory
//! mode. Shared by the model's graphs (`ort_backend.rs`) and the arithmetic graphs
//! (`arithmetic.rs`), so that neither imports the other for it.

use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// How the CUDA provider trades GPU memory for kernel search (no effect on the CPU).
///
/// Measured on an H100 (real-size bf16 export, 832x480 / 81 frames, 2 steps): `lean` peaked at
/// 35.0 GiB against 46.0 GiB, its first steps took 3.6 s against 5.3 s and its VAE decode 8.0 s
/// against 9.0 s. Its steady step time over a long job is not measured yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaMemory {
    /// cuDNN's heuristic choice of convolution algorithm with a bounded workspace, and arenas
    /// that grow by what is requested.
    #[default]
    Lean,
    /// ONNX Runtime's defaults: cuDNN benchmarks every convolution algorithm with as much
    /// workspace as it likes, and each session's arena grows in powers of two.
    Exhaustive,
}

impl CudaMemory {
    /// The CUDA execution provider configured for this mode.
    fn provider(self) -> ort::ep::CUDA {
        let cuda = ort::ep::CUDA::default();
        match self {
            CudaMemory::Exhaustive => cuda,
            CudaMemory::Lean => cuda
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
                .with_conv_max_workspace(false)
                .with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested),
        }
    }
}

/// How a session is built: where it runs, its intra-op threads (0 lets ORT choose) and, on
/// CUDA, its memory mode.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    pub device: Device,
    pub threads: usize,
    pub cuda_memory: CudaMemory,
}

/// Session options for `config`.
///
/// CPU fallback stays allowed on CUDA: the CUDA EP itself hands shape arithmetic (small int64
/// `Shape`/`Gather`/`Concat` chains feeding `Reshape`) to the CPU EP, and ORT's
/// `session.disable_cpu_ep_fallback` refuses any session with a node on the CPU EP, so every
/// graph with dynamic shapes would fail to load. That no compute node lands on the CPU is checked
/// offline instead (`models/check_ops.py` against the CUDA kernel list) and on a GPU by
/// `scripts/gpu-check`, which keeps ORT's placement warnings from the log.
pub fn session_builder(
    env: &ort::environment::Environment,
    config: SessionConfig,
) -> ort::Result<SessionBuilder> {
    let SessionConfig {
        device,
        threads,
        cuda_memory,
    } = config;
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::<()>::from)?;
    if threads > 0 {
        builder = builder
            .with_intra_threads(threads)
            .map_err(ort::Error::<()>::from)?;
    }
    if device == Device::Cuda {
        builder = builder
            .with_execution_providers([cuda_memory.provider().build().error_on_failure()])
            .map_err(ort::Error::<()>::from)?;
    }
    Ok(builder)
}

/// Whether a failed run ran out of memory. ONNX Runtime has no error code for it: the CUDA and
/// CPU allocators fail a run with `RuntimeException` (or `GenericFailure`, or the provider's
/// `ExecutionProviderFailure`) and say so in the message ("Failed to allocate memory",
/// "CUDA failure 2: out of memory", `std::bad_alloc`). This is the only place that reads it.
pub fn is_out_of_memory(error: &ort::Error) -> bool {
    use ort::ErrorCode;
    let runtime_failure = matches!(
        error.code(),
        ErrorCode::RuntimeException
            | ErrorCode::GenericFailure
            | ErrorCode::ExecutionProviderFailure
    );
    runtime_failure && message_says_out_of_memory(error.message())
}

fn message_says_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("failed to allocate") || m.contains("bad_alloc")
}

#[cfg(test)]
mod tests {
    use super::CudaMemory;

    /// The lean mode's options reach the CUDA provider (read from its option list: no GPU
    /// needed), and the exhaustive mode leaves ORT's defaults alone.
    #[test]
    fn the_lean_cuda_mode_sets_heuristic_convolutions_and_exact_arena_growth() {
        let lean = format!("{:?}", CudaMemory::Lean.provider());
        for (key, value) in [
            ("cudnn_conv_algo_search", "HEURISTIC"),
            ("cudnn_conv_use_max_workspace", "false"),
            ("arena_extend_strategy", "SameAsRequested"),
        ] {
            let at = lean
                .find(key)
                .unwrap_or_else(|| panic!("{key} not set: {lean}"));
            let rest = &lean[at + key.len()..];
            let option_value = rest.split(',').next().unwrap_or_default();
            assert!(
                option_value.contains(value),
                "{key}: {option_value} in {lean}"
            );
        }
        let defaults = format!("{:?}", CudaMemory::Exhaustive.provider());
        assert!(
            !defaults.contains("cudnn") && !defaults.contains("arena"),
            "{defaults}"
        );
    }

    #[test]
    fn allocation_failures_read_as_out_of_memory_and_others_do_not() {
        for oom in [
            "Failed to allocate memory for requested buffer of size 1073741824",
            "CUDA failure 2: out of memory ; GPU=0",
            "std::bad_alloc",
        ] {
            assert!(super::message_says_out_of_memory(oom), "{oom}");
        }
        assert!(!super::message_says_out_of_memory(
            "Got invalid dimensions for input: x"
        ));
    }
}
