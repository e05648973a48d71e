//! Finding and loading the ONNX Runtime shared library (ort's `load-dynamic`), once per process.
//!
//! Search order: `ORT_DYLIB_PATH`; the library `scripts/setup` unpacks under
//! `$WANSERVE_HOME/onnxruntime/` (default `~/.local/share/wanserve`), the CUDA build first when
//! it is installed; then next to the executable.

use std::path::PathBuf;
use std::sync::OnceLock;

pub const ORT_VERSION: &str = "1.31.1";
const LIB_NAME: &str = "libonnxruntime.so.1.31.1";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime {ORT_VERSION} was not found (looked in: {searched}); run `scripts/setup` to install it, or set ORT_DYLIB_PATH"
    )]
    NotFound { searched: String },
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: String, reason: String },
}

/// Candidate library paths, in the order they are tried.
pub fn candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(path)];
    }
    let mut paths = Vec::new();
    if let Some(home) = crate::home::wanserve_home() {
        for package in ["onnxruntime-gpu", "onnxruntime"] {
            paths.push(
                home.join("onnxruntime")
                    .join(format!("{package}-{ORT_VERSION}"))
                    .join(LIB_NAME),
            );
        }
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        paths.push(dir.join(LIB_NAME));
    }
    paths
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, RuntimeError>> = OnceLock::new();

/// The process-wide ORT environment, loading the library on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let paths = candidates();
            let Some(path) = paths.iter().find(|p| p.is_file()) else {
                return Err(RuntimeError::NotFound {
                    searched: paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let load_error = |reason: String| RuntimeError::Load {
                path: path.display().to_string(),
                reason,
            };
            ort::init_from(path)
                .map_err(|e| load_error(e.to_string()))?
                .with_name("wanserve")
                .build()
                .map_err(|e| load_error(e.to_string()))
        })
        .as_ref()
        .map_err(Clone::clone)
}
