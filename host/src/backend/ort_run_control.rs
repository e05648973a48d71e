//! A job's ORT run options: how a cancel reaches the run in progress, and which runs shrink
//! the arenas.

use super::contract::RunControl;
use super::session::Device;
use ort::session::RunOptions;
use std::sync::Arc;

/// One job's ORT run options: terminating them stops the session run in progress (ORT checks
/// the flag between kernels) and fails every later run made with them.
#[derive(Clone)]
pub struct OrtRunControl {
    pub(super) options: Arc<JobRunOptions>,
    pub(super) releasing: bool,
}

pub(super) struct JobRunOptions {
    pub(super) steady: RunOptions,
    /// The same, plus arena shrinkage at the end of the run, per device (index: `Device as
    /// usize`): ORT fails a run whose shrink list names a device the session has no arena on.
    pub(super) releasing: [RunOptions; 2],
}

impl OrtRunControl {
    pub(super) fn new() -> ort::Result<Self> {
        let releasing = |devices: &str| -> ort::Result<RunOptions> {
            let mut options = RunOptions::new()?;
            options.set("memory.enable_memory_arena_shrinkage", devices)?;
            Ok(options)
        };
        Ok(Self {
            options: Arc::new(JobRunOptions {
                steady: RunOptions::new()?,
                releasing: [releasing("cpu:0")?, releasing("gpu:0")?],
            }),
            releasing: false,
        })
    }

    /// The options for a run of a session on `device`.
    pub(super) fn for_device(&self, device: Device) -> &RunOptions {
        if self.releasing {
            &self.options.releasing[device as usize]
        } else {
            &self.options.steady
        }
    }
}

impl RunControl for OrtRunControl {
    fn interrupt(&self) {
        let all = [&self.options.steady]
            .into_iter()
            .chain(&self.options.releasing);
        for options in all {
            if let Err(e) = options.terminate() {
                tracing::warn!(error = %e, "cannot interrupt a run; it stops at the end of its step");
            }
        }
    }

    fn releasing(&self) -> Self {
        Self {
            options: self.options.clone(),
            releasing: true,
        }
    }
}
