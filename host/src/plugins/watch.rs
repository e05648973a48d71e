//! Hot swap from the plugin directory: when a slot's file changes (debounced, so a copy in
//! progress is read once it has settled), it is installed through [`PluginHost::replace`]. A
//! file that does not check leaves the old plugin serving; why is logged and kept for
//! [`PluginWatcher::last_error`].

use super::config::{PluginsConfig, SlotSpec};
use super::{PluginHost, Slot};
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a file must be quiet before it is read.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Outcomes {
    last_error: BTreeMap<Slot, String>,
    swaps: u64,
    /// SHA-256 of each slot's file as the watcher last read it. Only a file whose content
    /// changed is installed: inotify also reports opens (another process reading the file),
    /// and reinstalling on those would undo a plugin uploaded through the admin API.
    seen_files: BTreeMap<Slot, String>,
}

/// Watches the plugin directory while it lives.
pub struct PluginWatcher {
    _debouncer: Debouncer<RecommendedWatcher>,
    outcomes: Arc<Mutex<Outcomes>>,
}

impl PluginWatcher {
    pub fn start(host: Arc<PluginHost>, config: &PluginsConfig) -> Result<Self, String> {
        let specs: Vec<SlotSpec> = config.slots.clone();
        // The files as they are now (what start-up installed from them).
        let seen_files = specs
            .iter()
            .filter_map(|spec| {
                let bytes = std::fs::read(&spec.path).ok()?;
                Some((spec.slot, hex::encode(Sha256::digest(&bytes))))
            })
            .collect();
        let outcomes = Arc::new(Mutex::new(Outcomes {
            seen_files,
            ..Outcomes::default()
        }));
        let seen = outcomes.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, move |events: DebounceEventResult| {
            let paths: Vec<PathBuf> = match events {
                Ok(events) => events.into_iter().map(|e| e.path).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "plugin directory watch error");
                    return;
                }
            };
            for spec in &specs {
                if paths.iter().any(|p| same_file_name(p, &spec.path)) {
                    reload(&host, spec, &seen);
                }
            }
        })
        .map_err(|e| format!("cannot watch {}: {e}", config.dir.display()))?;
        // Watch the directory, not the files: editors and `cp` replace files by renaming, which
        // a watch on the old inode would never see.
        debouncer
            .watcher()
            .watch(&config.dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", config.dir.display()))?;
        Ok(Self {
            _debouncer: debouncer,
            outcomes,
        })
    }

    /// Why the last change to `slot`'s file was not installed (cleared by a successful swap).
    pub fn last_error(&self, slot: Slot) -> Option<String> {
        lock(&self.outcomes).last_error.get(&slot).cloned()
    }

    /// Successful swaps since the watch started.
    pub fn swaps(&self) -> u64 {
        lock(&self.outcomes).swaps
    }
}

fn lock(outcomes: &Mutex<Outcomes>) -> std::sync::MutexGuard<'_, Outcomes> {
    outcomes.lock().unwrap_or_else(|p| p.into_inner())
}

fn same_file_name(event: &Path, watched: &Path) -> bool {
    event.file_name().is_some() && event.file_name() == watched.file_name()
}

fn reload(host: &PluginHost, spec: &SlotSpec, outcomes: &Mutex<Outcomes>) {
    let bytes = match std::fs::read(&spec.path) {
        Ok(bytes) => bytes,
        // Removed (or mid-rename): the plugin that is serving stays.
        Err(e) => {
            let reason = format!("{}: {e}", spec.path.display());
            tracing::warn!(slot = %spec.slot, %reason, "plugin file unreadable; the old plugin keeps serving");
            lock(outcomes).last_error.insert(spec.slot, reason);
            return;
        }
    };
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if lock(outcomes).seen_files.insert(spec.slot, sha256.clone()) == Some(sha256.clone()) {
        return;
    }
    let unchanged = host
        .installed(spec.slot)
        .is_some_and(|info| info.sha256 == sha256);
    if unchanged {
        return;
    }
    match host.install_bytes(spec, &bytes) {
        Ok(_) => {
            let mut outcomes = lock(outcomes);
            outcomes.last_error.remove(&spec.slot);
            outcomes.swaps += 1;
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(slot = %spec.slot, file = %spec.path.display(), %reason, "changed plugin refused; the old plugin keeps serving");
            lock(outcomes).last_error.insert(spec.slot, reason);
        }
    }
}
