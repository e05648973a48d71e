//! The plugin slots, their limits and errors, and what a loaded component reports.

use std::time::Duration;

/// The package every plugin is built against.
pub const WIT_PACKAGE: &str = "wanserve:policy@0.1.0";
/// The version part of [`WIT_PACKAGE`].
pub const WIT_VERSION: &str = "0.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Slot {
    Auth,
    Validate,
    Postprocess,
}

impl Slot {
    pub const ALL: [Slot; 3] = [Slot::Auth, Slot::Validate, Slot::Postprocess];

    pub fn world(self) -> &'static str {
        match self {
            Slot::Auth => "auth-plugin",
            Slot::Validate => "validate-plugin",
            Slot::Postprocess => "postprocess-plugin",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::Auth => "auth",
            Slot::Validate => "validate",
            Slot::Postprocess => "postprocess",
        })
    }
}

/// Resource limits for one plugin call.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Linear-memory cap per instance.
    pub memory_bytes: usize,
    /// Wall-clock budget per call.
    pub deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            // Wall-clock time (epochs), so it must cover a thread waiting for a core: on a
            // 2-core host running two jobs, calls that take 20 µs alone missed 50 ms.
            deadline: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("does not fit the {slot} slot (world {WIT_PACKAGE}/{world}): {reason}", world = slot.world())]
    WrongWorld { slot: Slot, reason: String },
    #[error("self-test failed: {0}")]
    SelfTest(String),
    #[error("no {0} plugin is installed")]
    NotInstalled(Slot),
    #[error("{slot} plugin ran past its {ms} ms deadline")]
    Deadline { slot: Slot, ms: u128 },
    #[error("{slot} plugin exceeded its memory limit")]
    OutOfMemory { slot: Slot },
    #[error("{slot} plugin failed: {reason}")]
    Trapped { slot: Slot, reason: String },
    #[error("no previous {0} plugin to roll back to")]
    NoPrevious(Slot),
    #[error("{slot} plugin returned an unusable result: {reason}")]
    BadResult { slot: Slot, reason: String },
    #[error("bad configuration for the {slot} plugin: {reason}")]
    Config { slot: Slot, reason: String },
    #[error("cannot set up the plugin engine: {0}")]
    Engine(String),
}

/// What `replace` and `plugin check` report about a component.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub slot: Slot,
    pub world: String,
    pub sha256: String,
    pub size: usize,
    /// When the component was compiled and checked, Unix milliseconds.
    pub loaded_at_ms: i64,
}
