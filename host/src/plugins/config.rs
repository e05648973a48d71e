//! Which component serves each slot, with what config: a `[plugins]` table in the server's
//! TOML file, overridden by environment variables, resolved against a plugin directory.
//!
//! ```toml
//! [plugins]
//! dir = "/var/lib/wanserve/plugins"   # WANSERVE_PLUGIN_DIR
//! memory_mib = 64                      # per-instance memory cap
//!
//! [plugins.auth]                       # file: WANSERVE_AUTH_PLUGIN
//! file = "auth_apikey.wasm"            # relative to dir
//! deadline_ms = 250                    # WANSERVE_AUTH_DEADLINE_MS
//! [plugins.auth.config]                # the plugin's own key/value config
//! jwt_algorithm = "RS256"
//! ```

use super::host::PluginHost;
use super::slot::{PluginInfo, PluginLimits, Slot};
use super::swaps::{SwapEntry, SwapStore};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{var}: {reason}")]
    Env { var: String, reason: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{slot} plugin {path}: {reason}")]
    Plugin {
        slot: Slot,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Keys(#[from] super::api_keys::KeysError),
    #[error("{0}")]
    Engine(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotFile {
    pub file: Option<String>,
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsFile {
    pub dir: Option<PathBuf>,
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub auth: SlotFile,
    #[serde(default)]
    pub validate: SlotFile,
    #[serde(default)]
    pub postprocess: SlotFile,
}

/// The server's config file; other sections belong to other parts of the server.
#[derive(Debug, Default, Deserialize)]
struct ServerFile {
    #[serde(default)]
    plugins: PluginsFile,
}

/// One slot, resolved: the file to load and watch, its budget and its config.
#[derive(Debug, Clone)]
pub struct SlotSpec {
    pub slot: Slot,
    pub path: PathBuf,
    pub deadline: Duration,
    pub config: BTreeMap<String, String>,
}

/// Every slot, resolved.
#[derive(Debug, Clone)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub limits: PluginLimits,
    pub slots: Vec<SlotSpec>,
}

/// Where `scripts/setup` (`cd plugins && cargo build --release`) leaves the default components:
/// the plugin directory when none is configured.
pub fn bundled_plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("plugins")
        .join("target")
        .join("wasm32-unknown-unknown")
        .join("release")
}

impl Slot {
    /// The component a slot loads unless configured otherwise (the default plugins' names).
    pub fn default_file(self) -> &'static str {
        match self {
            Slot::Auth => "auth_apikey.wasm",
            Slot::Validate => "validate_seed.wasm",
            Slot::Postprocess => "postprocess_retention.wasm",
        }
    }

    fn env_prefix(self) -> &'static str {
        match self {
            Slot::Auth => "WANSERVE_AUTH",
            Slot::Validate => "WANSERVE_VALIDATE",
            Slot::Postprocess => "WANSERVE_POSTPROCESS",
        }
    }
}

impl PluginsConfig {
    /// Reads the `[plugins]` table of `file` (when given), then applies the environment as
    /// `env` reports it (a function, so tests need not touch the process environment).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let parsed = match file {
            None => PluginsFile::default(),
            Some(path) => {
                let file_error = |reason: String| ConfigError::File {
                    path: path.to_path_buf(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
                toml::from_str::<ServerFile>(&text)
                    .map_err(|e| file_error(e.to_string()))?
                    .plugins
            }
        };
        Self::resolve(parsed, env)
    }

    fn resolve(
        parsed: PluginsFile,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env_number = |var: String| -> Result<Option<u64>, ConfigError> {
            env(&var)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| ConfigError::Env {
                        var: var.clone(),
                        reason: format!("not a whole number: {v:?}"),
                    })
                })
                .transpose()
        };
        let dir = env("WANSERVE_PLUGIN_DIR")
            .map(PathBuf::from)
            .or(parsed.dir)
            .unwrap_or_else(bundled_plugin_dir);
        let defaults = PluginLimits::default();
        let memory_bytes =
            match env_number("WANSERVE_PLUGIN_MEMORY_MIB".into())?.or(parsed.memory_mib) {
                Some(0) => {
                    return Err(ConfigError::Invalid {
                        key: "plugins.memory_mib".into(),
                        reason: "must be at least 1".into(),
                    });
                }
                Some(mib) => usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
                None => defaults.memory_bytes,
            };
        let mut slots = Vec::new();
        for (slot, spec) in [
            (Slot::Auth, parsed.auth),
            (Slot::Validate, parsed.validate),
            (Slot::Postprocess, parsed.postprocess),
        ] {
            let prefix = slot.env_prefix();
            let file = env(&format!("{prefix}_PLUGIN"))
                .or(spec.file)
                .unwrap_or_else(|| slot.default_file().to_string());
            let deadline_ms = env_number(format!("{prefix}_DEADLINE_MS"))?.or(spec.deadline_ms);
            let deadline = match deadline_ms {
                Some(0) => {
                    return Err(ConfigError::Invalid {
                        key: format!("plugins.{slot}.deadline_ms"),
                        reason: "must be at least 1".into(),
                    });
                }
                Some(ms) => Duration::from_millis(ms),
                None => defaults.deadline,
            };
            slots.push(SlotSpec {
                slot,
                path: dir.join(file),
                deadline,
                config: spec.config,
            });
        }
        Ok(Self {
            dir,
            limits: PluginLimits {
                memory_bytes,
                deadline: defaults.deadline,
            },
            slots,
        })
    }

    pub fn slot(&self, slot: Slot) -> Option<&SlotSpec> {
        self.slots.iter().find(|s| s.slot == slot)
    }

    pub fn slot_mut(&mut self, slot: Slot) -> Option<&mut SlotSpec> {
        self.slots.iter_mut().find(|s| s.slot == slot)
    }
}

impl PluginHost {
    /// Installs every configured slot from its file (with its deadline and config).
    pub fn install_all(&self, config: &PluginsConfig) -> Result<Vec<PluginInfo>, ConfigError> {
        config.slots.iter().map(|spec| self.install(spec)).collect()
    }

    /// Installs one slot from its file.
    pub fn install(&self, spec: &SlotSpec) -> Result<PluginInfo, ConfigError> {
        let bytes = std::fs::read(&spec.path).map_err(|e| ConfigError::Plugin {
            slot: spec.slot,
            path: spec.path.clone(),
            reason: e.to_string(),
        })?;
        self.install_bytes(spec, &bytes)
    }

    /// Installs `bytes` as `spec`'s slot, with its config and deadline.
    pub fn install_bytes(&self, spec: &SlotSpec, bytes: &[u8]) -> Result<PluginInfo, ConfigError> {
        let info = self
            .replace(spec.slot, bytes, spec.config.clone())
            .map_err(|e| ConfigError::Plugin {
                slot: spec.slot,
                path: spec.path.clone(),
                reason: e.to_string(),
            })?;
        self.set_deadline(spec.slot, spec.deadline);
        Ok(info)
    }
}

/// Everything the server needs from its plugin configuration, loaded and installed.
pub struct StartedPlugins {
    pub host: std::sync::Arc<PluginHost>,
    pub config: PluginsConfig,
    pub installed: Vec<PluginInfo>,
    /// A key generated because none was configured: print it once, then forget it.
    pub generated_key: Option<String>,
    /// The slots installed from their files (bytes, when): for the swap history to record.
    pub from_files: Vec<(Slot, Vec<u8>, i64)>,
}

/// What the swap history says serves in each slot instead of its file, read before the plugins
/// start (see [`SwapStore::stored_current`]); a slot not here serves its file.
#[derive(Default)]
pub struct StoredSwaps(HashMap<Slot, Result<(SwapEntry, Vec<u8>), String>>);

impl StoredSwaps {
    pub async fn read(swaps: &SwapStore) -> Self {
        let mut stored = HashMap::new();
        for slot in Slot::ALL {
            match swaps.stored_current(slot).await {
                Ok(Some(found)) => {
                    stored.insert(slot, Ok(found));
                }
                Ok(None) => {}
                Err(e) => {
                    stored.insert(slot, Err(e.to_string()));
                }
            }
        }
        Self(stored)
    }
}

/// Reads the config (see [`ConfigSource::read`]) and installs every slot (its plugins told the
/// server serves `models`, its default first): from `stored` when
/// the swap history says a stored component serves (an upload, a rollback), else from its file.
/// A stored component that will not load falls back to the file. The log names the plugin
/// directory and each slot's source.
pub fn start_plugins(
    source: &ConfigSource,
    stored: &StoredSwaps,
    models: &[String],
) -> Result<StartedPlugins, ConfigError> {
    let (config, generated_key) = source.read(true)?;
    let host = PluginHost::serving(config.limits, models)
        .map_err(|e| ConfigError::Engine(e.to_string()))?;
    tracing::info!(dir = %config.dir.display(), "plugin directory");
    let mut installed = Vec::new();
    let mut from_files = Vec::new();
    for spec in &config.slots {
        let from_store = match stored.0.get(&spec.slot) {
            Some(Ok((entry, bytes))) => match host.install_bytes(spec, bytes) {
                Ok(info) => {
                    tracing::info!(slot = %spec.slot, source = "stored swap", sha256 = %entry.sha256, "plugin slot installed");
                    Some(info)
                }
                Err(e) => {
                    tracing::warn!(slot = %spec.slot, sha256 = %entry.sha256, error = %e, "the stored swap does not load; using the plugin directory's file");
                    None
                }
            },
            Some(Err(e)) => {
                tracing::warn!(slot = %spec.slot, error = %e, "cannot read the slot's swap history; using the plugin directory's file");
                None
            }
            None => None,
        };
        let info = match from_store {
            Some(info) => info,
            None => {
                let bytes = std::fs::read(&spec.path).map_err(|e| ConfigError::Plugin {
                    slot: spec.slot,
                    path: spec.path.clone(),
                    reason: e.to_string(),
                })?;
                let info = host.install_bytes(spec, &bytes)?;
                tracing::info!(slot = %spec.slot, source = "file", file = %spec.path.display(), sha256 = %info.sha256, "plugin slot installed");
                from_files.push((spec.slot, bytes, info.loaded_at_ms));
                info
            }
        };
        installed.push(info);
    }
    Ok(StartedPlugins {
        host: std::sync::Arc::new(host),
        config,
        installed,
        generated_key,
        from_files,
    })
}

/// Reads one environment variable (the process's, or flags standing in for it).
type EnvLookup = dyn Fn(&str) -> Option<String> + Send + Sync;

/// Where the plugin config comes from, kept so it can be read again while the server runs:
/// the TOML file, the data directory (its key file) and the environment as the server saw it
/// at start (flags included).
#[derive(Clone)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub data_dir: PathBuf,
    env: std::sync::Arc<EnvLookup>,
}

impl ConfigSource {
    pub fn new(
        file: Option<&Path>,
        data_dir: &Path,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            file: file.map(Path::to_path_buf),
            data_dir: data_dir.to_path_buf(),
            env: std::sync::Arc::new(env),
        }
    }

    /// The key file this source reads.
    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join(super::api_keys::KEY_FILE)
    }

    /// Reads the config (`file`, then the environment) and completes the auth plugin's key
    /// list (see [`super::api_keys`]). With `generate_key`, a server with no key at all gets
    /// one, returned to be printed once; a reload never generates one (an operator who removed
    /// every key meant it).
    pub fn read(&self, generate_key: bool) -> Result<(PluginsConfig, Option<String>), ConfigError> {
        let env = |var: &str| (self.env)(var);
        let mut config = PluginsConfig::load(self.file.as_deref(), env)?;
        let mut generated_key = None;
        if let Some(auth) = config.slot_mut(Slot::Auth) {
            generated_key = super::api_keys::seed_api_keys(
                &mut auth.config,
                env("WANSERVE_API_KEYS").as_deref(),
                &self.data_dir,
                generate_key,
            )?;
        }
        Ok((config, generated_key))
    }
}
