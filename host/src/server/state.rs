//! What every handler shares: [`AppState`] and the model's state.

use super::{admission_locks, config, job_feeds, plugin_pool, readiness, webhooks};
use crate::jobs::JobStore;
use crate::jobs::workers::Workers;
use crate::plugins::PluginHost;
use crate::plugins::watch::PluginWatcher;
use crate::storage::VideoStore;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Limits the host enforces whatever the validate plugin says.
#[derive(Debug, Clone)]
pub struct HostLimits {
    pub max_pixel_frames: u64,
    pub max_steps: u32,
    /// Step caching for a submit body without `cache`.
    pub cache_default: crate::pipeline::step_cache::CacheMode,
    pub body_limit: usize,
    pub models: ServedModels,
    /// Steps between a job's live previews (`--preview-every`; `None`: no previews).
    pub preview_every: Option<std::num::NonZeroUsize>,
}

/// One model the server serves.
#[derive(Debug)]
pub struct ServedModel {
    /// What a submit's `model` names it by.
    pub name: String,
    pub manifest: crate::model::Manifest,
    /// `None`: the bundled tiny random-weight model.
    pub dir: Option<std::path::PathBuf>,
    /// How much the process's resident memory grew while it loaded (0: not loaded here).
    pub resident_bytes: std::sync::atomic::AtomicU64,
}

/// The models the server serves, its default first.
#[derive(Debug, Clone)]
pub struct ServedModels(pub Arc<[ServedModel]>);

impl ServedModels {
    pub fn get(&self, name: &str) -> Option<&ServedModel> {
        self.0.iter().find(|m| m.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|m| m.name.clone()).collect()
    }
}

pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub videos: Arc<VideoStore>,
    pub plugins: Arc<PluginHost>,
    /// Where request-path plugin calls (auth, validate) run.
    pub plugin_calls: plugin_pool::PluginPool,
    pub watcher: Option<PluginWatcher>,
    /// What each slot has served (survives restarts; `GET /admin/plugins/{slot}/history`).
    pub swaps: Arc<crate::plugins::swaps::SwapStore>,
    /// Per-caller admission: lock stripes and the streams open on this host.
    pub admission: admission_locks::AdmissionLocks,
    /// One reader per followed job, fanned out to its streams.
    pub feeds: job_feeds::JobFeeds,
    pub workers: Arc<Workers>,
    pub limits: HostLimits,
    pub queue_limit: u64,
    pub admin_key_hash: [u8; 32],
    pub metrics: PrometheusHandle,
    /// Loading, ready (sessions loaded and warmed up), or failed: then the server stays up (jobs'
    /// statuses and videos remain reachable) but will not run jobs until restarted.
    pub model: ModelStatus,
    /// Signs the tokens that open live progress streams (`events-secret` in the data dir).
    pub events_secret: secrecy::SecretSlice<u8>,
    /// Becomes true when shutdown begins: live progress streams end then, since a graceful
    /// shutdown waits for every open response.
    pub shutting_down: tokio::sync::watch::Receiver<bool>,
    /// Where jobs' final states are POSTed, and where they may be.
    pub webhooks: webhooks::Webhooks,
    pub role: config::Role,
    /// Whether the object store took the last probe's write (every 5 s).
    pub store_readiness: Arc<readiness::StoreReadiness>,
}

/// Where the model is, one state in one atomic: loading (0, the default) until the loading
/// thread sets it once.
#[derive(Default)]
pub struct ModelStatus(AtomicU8);

impl ModelStatus {
    pub const READY: u8 = 1;
    pub const FAILED: u8 = 2;
    /// An API-only host: it never loads the model.
    pub const NOT_LOADED: u8 = 3;

    pub fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }

    /// As `/ready` says it.
    pub fn name(&self) -> &'static str {
        match self.0.load(Ordering::Acquire) {
            Self::READY => "ready",
            Self::FAILED => "failed",
            Self::NOT_LOADED => "not_loaded",
            _ => "loading",
        }
    }
}
