//! `wanserve serve` settings: flags, each with an environment variable, over an optional TOML
//! file's `[server]` table, over defaults. Secrets are `SecretString`s, so printing or logging
//! the config shows `[REDACTED]` for them whatever the caller does.

use crate::engine::{ModelArgs, ModelSettings, ModelTable, SettingError, named};
use crate::pipeline::step_cache::CacheMode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The seed's largest job: 832 × 480 pixels × 120 frames.
pub const DEFAULT_MAX_PIXEL_FRAMES: u64 = 832 * 480 * 120;
/// The seed's largest step count.
pub const DEFAULT_MAX_STEPS: u32 = 100;
/// Steps between live previews unless told otherwise: ten previews of a 50-step job.
pub const DEFAULT_PREVIEW_EVERY: usize = 5;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with a [server] table (these settings) and a [plugins] table.
    #[arg(long, env = "WANSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0, all interfaces].
    #[arg(long, env = "WANSERVE_HOST")]
    pub host: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 8088].
    #[arg(long, env = "WANSERVE_PORT")]
    pub port: Option<u16>,
    /// Where the job database, the local video store, keys and secrets live [default: ./data].
    #[arg(long, env = "WANSERVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// A model to serve, `NAME=DIR` (repeatable; a submit's `model` picks one by NAME; the
    /// first is the default). Without it, the one model is --model-dir's, named
    /// Wan2.1-T2V-1.3B.
    #[arg(
        long = "model",
        env = "WANSERVE_MODELS",
        value_delimiter = ',',
        value_name = "NAME=DIR"
    )]
    pub models: Vec<String>,
    /// Jobs that run at once [default: 2].
    #[arg(long, env = "WANSERVE_SLOTS")]
    pub slots: Option<usize>,
    /// Queued jobs accepted before submit answers 429 [default: 100].
    #[arg(long, env = "WANSERVE_QUEUE_LIMIT")]
    pub queue_limit: Option<u64>,
    /// Object store for videos: file:///dir or s3://bucket[/prefix] (credentials, region and
    /// endpoint from the standard AWS_* variables) [default: <data-dir>/videos].
    #[arg(long, env = "WANSERVE_STORE")]
    pub store: Option<String>,
    /// Directory of the policy plugins [default: the components built by scripts/setup].
    #[arg(long, env = "WANSERVE_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Base of the video URLs handed to clients [default: http://<listen address>].
    #[arg(long, env = "WANSERVE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Retention when the post-process plugin fails [default: 3600].
    #[arg(long, env = "WANSERVE_DEFAULT_RETENTION_SECONDS")]
    pub default_retention_seconds: Option<u64>,
    /// How often expired videos are looked for, in milliseconds [default: 30000].
    #[arg(long, env = "WANSERVE_SWEEP_INTERVAL_MS")]
    pub sweep_interval_ms: Option<u64>,
    /// Largest width × height × frames of a job, whatever the validate plugin accepts
    /// [default: 47923200 = 832 × 480 × 120].
    #[arg(long, env = "WANSERVE_MAX_PIXEL_FRAMES")]
    pub max_pixel_frames: Option<u64>,
    /// Largest step count of a job, whatever the validate plugin accepts [default: 100].
    #[arg(long, env = "WANSERVE_MAX_STEPS")]
    pub max_steps: Option<u32>,
    /// Step caching for a job whose submit body has no `cache`: `off`, `fast` or `faster`
    /// [default: off]. A mode other than off needs a model exported with step-cache ratios.
    #[arg(long, env = "WANSERVE_CACHE_DEFAULT", value_enum)]
    pub cache_default: Option<CacheMode>,
    /// A live preview of a running job (its `preview` events on /video/events) after every Nth
    /// denoising step and after the last; 0: none [default: 5]. Only for models whose manifest
    /// has preview factors (`models/previews.py`).
    #[arg(long, env = "WANSERVE_PREVIEW_EVERY")]
    pub preview_every: Option<usize>,
    /// Largest request body in bytes (submit, status, cancel) [default: 65536].
    #[arg(long, env = "WANSERVE_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// How long a client has to send a request's headers, and how long an idle kept-alive
    /// connection stays open; then the connection is closed [default: 30000].
    #[arg(long, env = "WANSERVE_HEADER_TIMEOUT_MS")]
    pub header_timeout_ms: Option<u64>,
    /// How long a client has to send a request's whole body once its headers arrived; then the
    /// request is answered 408 and the connection closed [default: 60000].
    #[arg(long, env = "WANSERVE_BODY_TIMEOUT_MS")]
    pub body_timeout_ms: Option<u64>,
    /// Connections served at once; past it a connection gets only `/health` or 503
    /// `overloaded` (64 such at once), then is closed [default: 4096].
    #[arg(long, env = "WANSERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How long an S3 request is retried (connection errors, 5xx) before the job that needs
    /// it fails; the job's slot waits meanwhile [default: 60].
    #[arg(long, env = "WANSERVE_STORE_RETRY_SECONDS")]
    pub store_retry_seconds: Option<u64>,
    /// Key for the admin API, at least 16 characters, sent as `Authorization: Bearer <key>`
    /// [default: the one in <data-dir>/admin-key, generated and printed once when there is none].
    #[arg(long, env = "WANSERVE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<SecretString>,
    /// API keys, comma-separated (hashed at start, never stored).
    #[arg(long, env = "WANSERVE_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<SecretString>,
    /// The job queue: the embedded SQLite database in the data directory, or a PostgreSQL URL
    /// (postgres://user:password@host/db) that every host of a fleet shares [default: sqlite].
    #[arg(long, env = "WANSERVE_QUEUE", hide_env_values = true)]
    pub queue: Option<SecretString>,
    /// What this process does: `all` (API and jobs), `api` (takes requests, serves status,
    /// runs no jobs), `worker` (runs jobs; only /health, /ready, /metrics and the admin API) [default: all].
    #[arg(long, env = "WANSERVE_ROLE", value_enum)]
    pub role: Option<Role>,
    /// How long a worker holds a job it runs without renewing its lease (PostgreSQL queue): a
    /// dead host's job is taken over this long after its last renewal [default: 10000].
    #[arg(long, env = "WANSERVE_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Networks webhooks may reach although they are loopback/private/internal, comma-separated
    /// CIDRs (e.g. 10.1.0.0/16,127.0.0.1/32) [default: none; public addresses are always allowed].
    #[arg(long, env = "WANSERVE_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Option<Vec<String>>,
    /// Wait before the first webhook retry, in milliseconds; doubled for each next one (at most
    /// 10 minutes) [default: 5000].
    #[arg(long, env = "WANSERVE_WEBHOOK_FIRST_RETRY_MS")]
    pub webhook_first_retry_ms: Option<u64>,
    /// Webhook retries stop this long after the job ended [default: 3600].
    #[arg(long, env = "WANSERVE_WEBHOOK_GIVE_UP_SECONDS")]
    pub webhook_give_up_seconds: Option<u64>,
    /// An HTTP(S) proxy for webhook deliveries, `http://[user:pass@]host:port` [default: none:
    /// deliveries connect directly, whatever HTTP(S)_PROXY/ALL_PROXY say]. Through a proxy the
    /// address checks resolve the target's name before each attempt and the proxy resolves it
    /// again itself.
    #[arg(long, env = "WANSERVE_WEBHOOK_PROXY", hide_env_values = true)]
    pub webhook_proxy: Option<SecretString>,
    /// The webhook signing secret, `whsec_<base64>` (every host of a fleet needs the same)
    /// [default: <data-dir>/webhook-secret, generated once].
    #[arg(long, env = "WANSERVE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    All,
    Api,
    Worker,
}

impl Role {
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }

    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }
}

/// The `[server]` table: the same settings, minus secrets (keep those in the environment).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerTable {
    host: Option<IpAddr>,
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    model_dir: Option<PathBuf>,
    /// `["NAME=DIR", …]`, as `--model` takes them.
    models: Option<Vec<String>>,
    verify_model: Option<bool>,
    device: Option<String>,
    text_encoder_device: Option<String>,
    batch_cfg: Option<bool>,
    threads: Option<usize>,
    cuda_memory: Option<String>,
    slots: Option<usize>,
    queue_limit: Option<u64>,
    store: Option<String>,
    public_url: Option<String>,
    default_retention_seconds: Option<u64>,
    sweep_interval_ms: Option<u64>,
    max_pixel_frames: Option<u64>,
    max_steps: Option<u32>,
    cache_default: Option<String>,
    preview_every: Option<usize>,
    body_limit: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    store_retry_seconds: Option<u64>,
    webhook_allow: Option<Vec<String>>,
    webhook_first_retry_ms: Option<u64>,
    webhook_give_up_seconds: Option<u64>,
    role: Option<Role>,
    lease_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    server: ServerTable,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeConfigError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{}: {reason}", setting_name(key))]
    Invalid { key: &'static str, reason: String },
}

/// `NAME=DIR` of `--model`: a name of 1–64 letters, digits, `.`, `_` and `-` (starting with a
/// letter or digit), and a directory.
fn parse_model_entry(entry: &str) -> Result<(String, Option<PathBuf>), ServeConfigError> {
    let invalid = |reason: String| ServeConfigError::Invalid {
        key: "model",
        reason,
    };
    let (name, dir) = entry
        .split_once('=')
        .ok_or_else(|| invalid(format!("{entry:?} is not NAME=DIR")))?;
    let (name, dir) = (name.trim(), dir.trim());
    let good_name = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !good_name {
        return Err(invalid(format!(
            "{name:?}: a model name is 1 to 64 letters, digits, '.', '_' and '-'"
        )));
    }
    if dir.is_empty() {
        return Err(invalid(format!("{name}: no directory after '='")));
    }
    Ok((name.to_string(), Some(PathBuf::from(dir))))
}

/// Where a setting comes from, as an operator would look for it: `queue` is `--queue /
/// WANSERVE_QUEUE / queue in [server]`. A dotted key (`server.device`) is the config file's own.
fn setting_name(key: &str) -> String {
    if key.contains('.') || key == "flags" {
        return key.to_string();
    }
    if key == "model" {
        return "--model / WANSERVE_MODELS / models in [server]".into();
    }
    format!(
        "--{} / WANSERVE_{} / {key} in [server]",
        key.replace('_', "-"),
        key.to_uppercase()
    )
}

impl From<SettingError> for ServeConfigError {
    fn from(e: SettingError) -> Self {
        ServeConfigError::Invalid {
            key: e.key,
            reason: e.reason,
        }
    }
}

/// Every setting, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub config_file: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub model: ModelSettings,
    /// The models served, the default first: name and directory (`None`: the bundled tiny
    /// model).
    pub models: Vec<(String, Option<PathBuf>)>,
    pub slots: usize,
    pub queue_limit: u64,
    pub store: Option<String>,
    pub plugin_dir: Option<PathBuf>,
    pub public_url: Option<String>,
    pub default_retention: Duration,
    pub sweep_interval: Duration,
    pub max_pixel_frames: u64,
    pub max_steps: u32,
    pub cache_default: CacheMode,
    /// Steps between live previews (`None`: no previews).
    pub preview_every: Option<std::num::NonZeroUsize>,
    pub body_limit: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub store_retry: Duration,
    pub admin_key: Option<SecretString>,
    pub api_keys: Option<SecretString>,
    pub webhook_allow: Vec<ipnet::IpNet>,
    pub webhook_first_retry: Duration,
    pub webhook_give_up: Duration,
    pub webhook_proxy: Option<SecretString>,
    pub webhook_secret: Option<SecretString>,
    /// A PostgreSQL URL (secret: it may carry a password); `None`: SQLite in the data dir.
    pub queue: Option<SecretString>,
    pub role: Role,
    pub lease: Duration,
}

impl ServeConfig {
    pub fn resolve(args: ServeArgs) -> Result<Self, ServeConfigError> {
        let file = match &args.config {
            None => ConfigFile::default(),
            Some(path) => read_file(path)?,
        };
        let t = file.server;
        let listed = if args.models.is_empty() {
            t.models.unwrap_or_default()
        } else {
            args.models
        };
        if !listed.is_empty() && (args.model.model_dir.is_some() || t.model_dir.is_some()) {
            return Err(ServeConfigError::Invalid {
                key: "model",
                reason: "give either --model NAME=DIR (any number) or --model-dir (one), not both"
                    .into(),
            });
        }
        let mut models = listed
            .iter()
            .map(|entry| parse_model_entry(entry))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, (name, _)) in models.iter().enumerate() {
            if models[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ServeConfigError::Invalid {
                    key: "model",
                    reason: format!("{name:?} is given twice"),
                });
            }
        }
        let model = args.model.resolve(ModelTable {
            model_dir: t.model_dir,
            verify_model: t.verify_model,
            device: t.device,
            text_encoder_device: t.text_encoder_device,
            batch_cfg: t.batch_cfg,
            threads: t.threads,
            cuda_memory: t.cuda_memory,
        })?;
        if models.is_empty() {
            models.push((
                crate::wire::DEFAULT_MODEL.to_string(),
                model.model_dir.clone(),
            ));
        }
        let slots = args.slots.or(t.slots).unwrap_or(2);
        let body_limit = args.body_limit.or(t.body_limit).unwrap_or(64 << 10);
        if body_limit < 1024 {
            return Err(ServeConfigError::Invalid {
                key: "body_limit",
                reason: "must be at least 1024 bytes".into(),
            });
        }
        let header_timeout_ms = args
            .header_timeout_ms
            .or(t.header_timeout_ms)
            .unwrap_or(30_000);
        if header_timeout_ms == 0 {
            return Err(ServeConfigError::Invalid {
                key: "header_timeout_ms",
                reason: "must be at least 1".into(),
            });
        }
        let header_timeout = Duration::from_millis(header_timeout_ms);
        let body_timeout_ms = args.body_timeout_ms.or(t.body_timeout_ms).unwrap_or(60_000);
        if body_timeout_ms == 0 {
            return Err(ServeConfigError::Invalid {
                key: "body_timeout_ms",
                reason: "must be at least 1".into(),
            });
        }
        let max_connections = args.max_connections.or(t.max_connections).unwrap_or(4096);
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&max_connections) {
            return Err(ServeConfigError::Invalid {
                key: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        let sweep_ms = args
            .sweep_interval_ms
            .or(t.sweep_interval_ms)
            .unwrap_or(30_000);
        if sweep_ms == 0 {
            return Err(ServeConfigError::Invalid {
                key: "sweep_interval_ms",
                reason: "must be at least 1".into(),
            });
        }
        let public_url = args.public_url.or(t.public_url);
        if let Some(url) = &public_url {
            let parsed = url::Url::parse(url).ok();
            if !parsed.is_some_and(|u| {
                matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none()
            }) {
                return Err(ServeConfigError::Invalid {
                    key: "public_url",
                    reason: format!("{url:?} is not an http(s) URL without a query"),
                });
            }
        }
        let queue = args.queue.filter(|q| q.expose_secret() != "sqlite");
        if let Some(url) = &queue {
            let url = url.expose_secret();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ServeConfigError::Invalid {
                    key: "queue",
                    reason: "must be sqlite or a postgres:// URL".into(),
                });
            }
        }
        let role = args.role.or(t.role).unwrap_or(Role::All);
        if role.runs_jobs() && slots == 0 {
            return Err(ServeConfigError::Invalid {
                key: "slots",
                reason: "must be at least 1 on a host that runs jobs".into(),
            });
        }
        if role != Role::All && queue.is_none() {
            return Err(ServeConfigError::Invalid {
                key: "role",
                reason: "api and worker hosts share a queue: set --queue postgres://…".into(),
            });
        }
        let cache_default = match (args.cache_default, t.cache_default.as_deref()) {
            (Some(mode), _) => mode,
            (None, Some(name)) => named("server.cache_default", name)?,
            (None, None) => CacheMode::Off,
        };
        let lease_ms = args.lease_ms.or(t.lease_ms).unwrap_or(10_000);
        if lease_ms < 300 {
            return Err(ServeConfigError::Invalid {
                key: "lease_ms",
                reason: "must be at least 300".into(),
            });
        }
        let webhook_allow = args
            .webhook_allow
            .or(t.webhook_allow)
            .unwrap_or_default()
            .iter()
            .map(|net| parse_network(net))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config_file: args.config,
            host: args
                .host
                .or(t.host)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port: args.port.or(t.port).unwrap_or(8088),
            data_dir: args
                .data_dir
                .or(t.data_dir)
                .unwrap_or_else(|| PathBuf::from("data")),
            model,
            models,
            slots,
            queue_limit: args.queue_limit.or(t.queue_limit).unwrap_or(100),
            store: args.store.or(t.store),
            plugin_dir: args.plugin_dir,
            public_url,
            default_retention: Duration::from_secs(
                args.default_retention_seconds
                    .or(t.default_retention_seconds)
                    .unwrap_or(3600),
            ),
            sweep_interval: Duration::from_millis(sweep_ms),
            max_pixel_frames: args
                .max_pixel_frames
                .or(t.max_pixel_frames)
                .unwrap_or(DEFAULT_MAX_PIXEL_FRAMES),
            max_steps: args.max_steps.or(t.max_steps).unwrap_or(DEFAULT_MAX_STEPS),
            cache_default,
            preview_every: std::num::NonZeroUsize::new(
                args.preview_every
                    .or(t.preview_every)
                    .unwrap_or(DEFAULT_PREVIEW_EVERY),
            ),
            body_limit,
            header_timeout,
            body_timeout: Duration::from_millis(body_timeout_ms),
            max_connections,
            store_retry: Duration::from_secs(
                args.store_retry_seconds
                    .or(t.store_retry_seconds)
                    .unwrap_or(60),
            ),
            admin_key: args.admin_key,
            api_keys: args.api_keys,
            webhook_allow,
            webhook_first_retry: Duration::from_millis(
                args.webhook_first_retry_ms
                    .or(t.webhook_first_retry_ms)
                    .unwrap_or(5_000)
                    .max(1),
            ),
            webhook_give_up: Duration::from_secs(
                args.webhook_give_up_seconds
                    .or(t.webhook_give_up_seconds)
                    .unwrap_or(3600),
            ),
            webhook_proxy: args.webhook_proxy,
            webhook_secret: args.webhook_secret,
            queue,
            role,
            lease: Duration::from_millis(lease_ms),
        })
    }
}

/// `10.0.0.0/8`, or one address (`127.0.0.1`, `::1`) for just that address.
fn parse_network(text: &str) -> Result<ipnet::IpNet, ServeConfigError> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| ServeConfigError::Invalid {
            key: "webhook_allow",
            reason: format!("{text:?} is not a network (CIDR) or an address"),
        })
}

fn read_file(path: &Path) -> Result<ConfigFile, ServeConfigError> {
    let fail = |reason: String| ServeConfigError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    // Other tables ([plugins]) belong to the plugin host; only [server] is read here.
    let value: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if let Some(unknown) = value
        .keys()
        .find(|k| !matches!(k.as_str(), "server" | "plugins"))
    {
        return Err(fail(format!("unknown table [{unknown}]")));
    }
    toml::from_str(&text).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CudaMemory, Device};
    use crate::model::Verify;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn resolve(flags: &[&str], toml: &str) -> Result<ServeConfig, ServeConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wanserve.toml");
        std::fs::write(&path, toml).expect("config file");
        let mut argv = vec!["wanserve", "--config", path.to_str().expect("utf-8 path")];
        argv.extend_from_slice(flags);
        ServeConfig::resolve(Cli::try_parse_from(argv).expect("flags parse").serve)
    }

    #[test]
    fn the_text_encoder_follows_the_device_unless_it_is_named() {
        let default = resolve(&[], "").expect("config");
        assert_eq!(
            (default.model.device, default.model.text_encoder_device),
            (Device::Cpu, None)
        );
        let split = resolve(
            &["--device", "cuda"],
            "[server]\ntext_encoder_device = \"cpu\"\n",
        )
        .expect("config");
        assert_eq!(
            (split.model.device, split.model.text_encoder_device),
            (Device::Cuda, Some(Device::Cpu))
        );
        // The flag wins over the file.
        let flag = resolve(
            &["--text-encoder-device", "cuda"],
            "[server]\ntext_encoder_device = \"cpu\"\n",
        )
        .expect("config");
        assert_eq!(flag.model.text_encoder_device, Some(Device::Cuda));
        match resolve(&[], "[server]\ntext_encoder_device = \"tpu\"\n") {
            Err(e) => assert!(
                e.to_string().contains("server.text_encoder_device"),
                "names the key: {e}"
            ),
            Ok(_) => panic!("an unknown device was accepted"),
        }
    }

    #[test]
    fn batched_guidance_is_off_unless_the_flag_or_the_file_turns_it_on() {
        assert!(!resolve(&[], "").expect("config").model.batch_cfg);
        assert!(
            resolve(&["--batch-cfg"], "")
                .expect("config")
                .model
                .batch_cfg
        );
        assert!(
            resolve(&[], "[server]\nbatch_cfg = true\n")
                .expect("config")
                .model
                .batch_cfg
        );
    }

    #[test]
    fn the_cuda_memory_mode_comes_from_the_flag_or_the_file_and_a_bad_one_is_named() {
        let mode =
            |flags: &[&str], file: &str| resolve(flags, file).expect("config").model.cuda_memory;
        assert_eq!(mode(&[], ""), CudaMemory::Lean);
        let file = "[server]\ncuda_memory = \"exhaustive\"\n";
        assert_eq!(mode(&[], file), CudaMemory::Exhaustive);
        assert_eq!(mode(&["--cuda-memory", "lean"], file), CudaMemory::Lean);
        match resolve(&[], "[server]\ncuda_memory = \"small\"\n") {
            Err(e) => assert!(e.to_string().contains("server.cuda_memory"), "{e}"),
            Ok(_) => panic!("an unknown CUDA memory mode was accepted"),
        }
    }

    #[test]
    fn verify_model_comes_from_the_flag_or_the_file() {
        assert_eq!(
            resolve(&[], "").expect("config").model.verify_model,
            Verify::Changed
        );
        assert_eq!(
            resolve(&["--verify-model"], "")
                .expect("config")
                .model
                .verify_model,
            Verify::Full
        );
        assert_eq!(
            resolve(&[], "[server]\nverify_model = true\n")
                .expect("config")
                .model
                .verify_model,
            Verify::Full
        );
    }
}
