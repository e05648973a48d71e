//! Hot swap from the plugin directory: when a slot's file changes (debounced, so a copy in
//! progress is read once it has settled), it is installed through
//! [`PluginHost::replace_component`]. A file that does not check leaves the old plugin serving;
//! why is logged and kept for [`PluginWatcher::last_error`].
//!
//! Config changes without a restart ([`PluginWatcher::watch_config`]): when the key file
//! (`<data dir>/api-keys`) or the TOML config file changes, the whole plugin config is read
//! again and every slot whose config or deadline changed gets it
//! ([`PluginHost::reconfigure`]), so a removed key is refused as soon as the change settles
//! (the debounce, then one self-test). What cannot change live (the plugin directory, a
//! slot's file name, the memory cap) is logged as needing a restart. A config that does not
//! read or check leaves the old one serving; why is kept for [`PluginWatcher::config_error`].

use super::config::{ConfigSource, PluginsConfig, SlotSpec};
use super::host::PluginHost;
use super::slot::Slot;
use super::swaps::{SwapSource, SwapStore};
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the watcher records the files it installs: the swap history, written from the watch's
/// own thread through the server's runtime.
pub struct FileRecorder {
    pub swaps: Arc<SwapStore>,
    pub runtime: tokio::runtime::Handle,
}

impl FileRecorder {
    fn record(&self, slot: Slot, bytes: &[u8], loaded_at_ms: i64) {
        let recorded =
            self.runtime.block_on(
                self.swaps
                    .record(slot, bytes, SwapSource::File, loaded_at_ms),
            );
        if let Err(e) = recorded {
            tracing::warn!(slot = %slot, error = %e, "cannot record the install in the slot's history");
        }
    }
}

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
    /// Why the last config change was not applied to a slot (cleared by one that is).
    config_error: BTreeMap<Slot, String>,
    config_reloads: u64,
}

/// Watches the plugin directory (and, once asked, the key file and config file) while it lives.
pub struct PluginWatcher {
    debouncers: Vec<Debouncer<RecommendedWatcher>>,
    outcomes: Arc<Mutex<Outcomes>>,
    host: Arc<PluginHost>,
    /// The slots as start-up installed them: what a config reload may not change live.
    started: PluginsConfig,
}

impl PluginWatcher {
    /// A file that installs is recorded through `recorder` (so a restart keeps what was last
    /// installed, whichever way it came).
    pub fn start(
        host: Arc<PluginHost>,
        config: &PluginsConfig,
        recorder: Option<FileRecorder>,
    ) -> Result<Self, String> {
        let watched_host = host.clone();
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
                    reload(&watched_host, spec, &seen, recorder.as_ref());
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
            debouncers: vec![debouncer],
            outcomes,
            host,
            started: config.clone(),
        })
    }

    /// Also watches what `source` reads: its TOML file and its key file. Each directory is
    /// watched (not the file: editors and deploy tools replace files by renaming), and only
    /// those two names in it count.
    pub fn watch_config(&mut self, source: ConfigSource) -> Result<(), String> {
        let mut files: Vec<PathBuf> = vec![source.key_file()];
        files.extend(source.file.clone());
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.dedup();
        let host = self.host.clone();
        let outcomes = self.outcomes.clone();
        let started = self.started.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, move |events: DebounceEventResult| {
            let changed = match events {
                Ok(events) => events
                    .iter()
                    .any(|e| files.iter().any(|f| same_file_name(&e.path, f))),
                Err(e) => {
                    tracing::warn!(error = %e, "config watch error");
                    return;
                }
            };
            if changed {
                reload_config(&host, &source, &started, &outcomes);
            }
        })
        .map_err(|e| format!("cannot watch the config: {e}"))?;
        for dir in &dirs {
            debouncer
                .watcher()
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
        self.debouncers.push(debouncer);
        Ok(())
    }

    /// Why the last config change was not applied to `slot` (cleared by one that is).
    pub fn config_error(&self, slot: Slot) -> Option<String> {
        lock(&self.outcomes).config_error.get(&slot).cloned()
    }

    /// Config changes applied since the watch started (one per change that altered anything).
    pub fn config_reloads(&self) -> u64 {
        lock(&self.outcomes).config_reloads
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

fn reload(
    host: &PluginHost,
    spec: &SlotSpec,
    outcomes: &Mutex<Outcomes>,
    recorder: Option<&FileRecorder>,
) {
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
    match host.replace_component(spec.slot, &bytes) {
        Ok(info) => {
            if let Some(recorder) = recorder {
                recorder.record(spec.slot, &bytes, info.loaded_at_ms);
            }
            let mut outcomes = lock(outcomes);
            outcomes.last_error.remove(&spec.slot);
            outcomes.swaps += 1;
        }
        Err(e) => {
            let reason = format!("{} plugin {}: {e}", spec.slot, spec.path.display());
            tracing::warn!(slot = %spec.slot, file = %spec.path.display(), %reason, "changed plugin refused; the old plugin keeps serving");
            lock(outcomes).last_error.insert(spec.slot, reason);
        }
    }
}

/// Reads the whole plugin config again and gives each slot what changed.
fn reload_config(
    host: &PluginHost,
    source: &ConfigSource,
    started: &PluginsConfig,
    outcomes: &Mutex<Outcomes>,
) {
    let config = match source.read(false) {
        Ok((config, _)) => config,
        Err(e) => {
            let reason = format!("config not reloaded: {e}");
            tracing::warn!(%reason, "the config that serves stays");
            let mut outcomes = lock(outcomes);
            for slot in Slot::ALL {
                outcomes.config_error.insert(slot, reason.clone());
            }
            return;
        }
    };
    if config.dir != started.dir || config.limits.memory_bytes != started.limits.memory_bytes {
        tracing::warn!("the plugin directory or memory cap changed: that takes a restart");
    }
    let mut changed = false;
    for spec in &config.slots {
        if started
            .slot(spec.slot)
            .is_some_and(|was| was.path != spec.path)
        {
            tracing::warn!(slot = %spec.slot, file = %spec.path.display(), "a slot's file name changed: that takes a restart");
        }
        if host.installed(spec.slot).is_none() {
            continue;
        }
        if host.deadline(spec.slot) != spec.deadline {
            host.set_deadline(spec.slot, spec.deadline);
            changed = true;
        }
        match host.reconfigure(spec.slot, spec.config.clone()) {
            Ok(reconfigured) => {
                changed |= reconfigured;
                lock(outcomes).config_error.remove(&spec.slot);
            }
            Err(e) => {
                let reason = format!("{} config not applied: {e}", spec.slot);
                tracing::warn!(slot = %spec.slot, %reason, "the config that serves stays");
                lock(outcomes).config_error.insert(spec.slot, reason);
            }
        }
    }
    if changed {
        lock(outcomes).config_reloads += 1;
    }
}
