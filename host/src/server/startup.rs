//! `wanserve serve` from start to stop: the admin key, the job store (in a fleet it holds the
//! plugin swap history), the plugins, the model's files checked, the listener, the object
//! store, the job workers, the model loaded beside the listener, then the graceful drain. Every
//! way start-up can fail is a [`StartupError`].

use super::config::ServeConfig;
use super::routes::{overflow_router, router};
use super::state::{AppState, HostLimits, ModelStatus, ServedModel, ServedModels};
use super::{auth, connections, events};
use super::{plugin_pool, readiness, webhook_delivery, webhooks};
use crate::engine::{Engine, LoadError, Renderers, load_warm_pipeline};
use crate::jobs::postgres::PgJobStore;
use crate::jobs::retention::Sweeper;
use crate::jobs::sqlite::SqliteJobStore;
use crate::jobs::workers::{WorkerConfig, Workers};
use crate::jobs::{JobStore, StoreError};
use crate::model::{ModelDir, ModelError};
use crate::pipeline::step_cache::CacheMode;
use crate::plugins::config::{ConfigError, ConfigSource, StoredSwaps, start_plugins};
use crate::plugins::fleet_follow;
use crate::plugins::swaps::{SwapSource, SwapStore};
use crate::plugins::watch::{FileRecorder, PluginWatcher};
use crate::storage::{StorageError, VideoStore};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use secrecy::ExposeSecret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "--cache-default {mode}: {model_dir} has no step cache (export it again with models/export.py)"
    )]
    NoStepCache { mode: CacheMode, model_dir: PathBuf },
    #[error(transparent)]
    Plugins(#[from] ConfigError),
    #[error(transparent)]
    AdminKey(#[from] auth::AdminKeyError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    JobStore(#[from] StoreError),
    #[error("--queue / WANSERVE_QUEUE: cannot open the PostgreSQL queue: {0}")]
    Queue(StoreError),
    #[error(transparent)]
    Webhooks(#[from] webhooks::WebhookError),
    #[error(transparent)]
    VideoStore(#[from] StorageError),
    #[error("cannot start the {what}: {source}")]
    Threads {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0} panicked")]
    Panicked(&'static str),
}

fn prometheus() -> Result<PrometheusHandle, StartupError> {
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0, 300.0, 600.0, 1800.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.install_recorder())
        .map_err(|e| StartupError::Metrics(e.to_string()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: no new connections; running jobs go back to the queue");
}

/// Loads and warms each model in turn, recording how much resident memory each took (the log,
/// `wanserve_model_resident_bytes{model}` and `GET /models`).
fn load_models(
    state: &AppState,
    models: &[(String, Option<PathBuf>, ModelDir)],
    config: &ServeConfig,
) -> Result<Renderers, (String, LoadError)> {
    let mut renderers = Renderers::default();
    for (name, _, model) in models {
        let before = crate::peak_memory::resident_bytes().unwrap_or(0);
        let pipeline = load_warm_pipeline(model, &config.model)
            .map_err(|e| (name.clone(), e))?
            .with_previews(config.preview_every);
        let grew = crate::peak_memory::resident_bytes()
            .unwrap_or(0)
            .saturating_sub(before);
        if let Some(served) = state.limits.models.get(name) {
            served
                .resident_bytes
                .store(grew, std::sync::atomic::Ordering::Relaxed);
        }
        metrics::gauge!("wanserve_model_resident_bytes", "model" => name.clone()).set(grew as f64);
        tracing::info!(model = %name, resident_mib = grew >> 20, "model ready");
        renderers.insert(name, Arc::new(Engine::h264(pipeline)));
    }
    Ok(renderers)
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn serve(config: ServeConfig) -> Result<(), StartupError> {
    tracing::info!(?config, "starting");
    let handle = prometheus()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartupError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    // Configuration first, before anything heavy loads: the admin key (its length, or the
    // stored hash), the job queue (in a fleet it holds the plugin swap history), then the
    // plugins (their files compile and self-test), then the model's files (hashed).
    let (admin_key_hash, generated_admin) =
        auth::admin_key_hash(config.admin_key.as_ref(), &config.data_dir)?;
    let (store, swaps): (Arc<dyn JobStore>, SwapStore) = match &config.queue {
        Some(url) => {
            let shared = PgJobStore::open(url.expose_secret(), config.lease)
                .await
                .map_err(StartupError::Queue)?;
            let history = Arc::new(shared.swap_history());
            (shared, SwapStore::new(history))
        }
        None => (
            Arc::new(SqliteJobStore::open(&config.data_dir.join("jobs.db")).await?),
            SwapStore::local(&config.data_dir),
        ),
    };
    let swaps = Arc::new(swaps);
    let unlisted_videos = VideoStore::open_unlisted(
        config.store.as_deref(),
        &config.data_dir,
        config.store_retry,
    )?;
    tracing::info!(history = swaps.place(), "plugin swaps are kept in");

    // Plugins: flags/env override the [plugins] table the same way the env does.
    let overrides = [
        (
            "WANSERVE_PLUGIN_DIR",
            config.plugin_dir.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "WANSERVE_API_KEYS",
            config
                .api_keys
                .as_ref()
                .map(|k| k.expose_secret().to_string()),
        ),
    ];
    let env = move |var: &str| {
        overrides
            .iter()
            .find(|(name, _)| *name == var)
            .and_then(|(_, value)| value.clone())
            .or_else(|| std::env::var(var).ok())
    };
    let plugin_source = ConfigSource::new(config.config_file.as_deref(), &config.data_dir, env);
    let model_names: Vec<String> = config.models.iter().map(|(name, _)| name.clone()).collect();
    let started = start_plugins(
        &plugin_source,
        &StoredSwaps::read(&swaps).await,
        &model_names,
    )?;
    for (slot, bytes, loaded_at_ms) in &started.from_files {
        if let Err(e) = swaps
            .record(*slot, bytes, SwapSource::File, *loaded_at_ms)
            .await
        {
            tracing::warn!(slot = %slot, error = %e, "cannot record the install in the slot's history");
        }
    }
    if let Some(key) = &started.generated_key {
        println!(
            "No API key was configured; generated one (shown only now, stored hashed in {}):",
            config.data_dir.display()
        );
        println!("api key: {key}");
    }

    // Each model's files are checked here: hashed unless unchanged since they last verified on
    // this machine (`--verify-model` hashes them all).
    let verify = config.model.verify_model;
    let mut models = Vec::new();
    for (name, dir) in &config.models {
        let path = dir.clone().unwrap_or_else(crate::model::bundled_model_dir);
        let opened = path.clone();
        let model = tokio::task::spawn_blocking(move || ModelDir::open_with(&opened, verify))
            .await
            .map_err(|_| StartupError::Panicked("opening the model"))??;
        if dir.is_none() {
            tracing::warn!(model = %name, dir = %path.display(),
                "serving the BUNDLED TINY RANDOM-WEIGHT stand-in model: videos are textured noise. \
                 Export real weights with models/export.py and pass --model-dir");
        } else {
            tracing::info!(model = %name, dir = %path.display(), dtype = %model.manifest.dtype, "serving the exported model");
        }
        match model.manifest.step_cache() {
            Some(cache) => tracing::info!(
                model = %name,
                default = %config.cache_default,
                ratios = cache.source.as_deref().unwrap_or("unnamed"),
                "step caching available (\"cache\": off | fast | faster)"
            ),
            None if config.cache_default != crate::pipeline::step_cache::CacheMode::Off => {
                return Err(StartupError::NoStepCache {
                    mode: config.cache_default,
                    model_dir: path,
                });
            }
            None => {
                tracing::info!(model = %name, "this model has no step cache: \"cache\" other than off is refused")
            }
        }
        models.push((name.clone(), dir.clone(), model));
    }

    let (shutdown_begun, shutting_down) = tokio::sync::watch::channel(false);
    if let Some(key) = generated_admin {
        println!("No admin key was configured; generated one (shown only now, stored hashed):");
        println!("admin key: {key}");
    }
    let watcher = match PluginWatcher::start(
        started.host.clone(),
        &started.config,
        Some(FileRecorder {
            swaps: swaps.clone(),
            runtime: tokio::runtime::Handle::current(),
        }),
    ) {
        Ok(mut w) => {
            if let Err(e) = w.watch_config(plugin_source) {
                tracing::warn!(error = %e, "not watching the key file and config: key changes take a restart");
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "not watching the plugin directory, key file and config");
            None
        }
    };

    let listener = tokio::net::TcpListener::bind((config.host, config.port))
        .await
        .map_err(|source| StartupError::Listen {
            address: SocketAddr::new(config.host, config.port),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartupError::Listen {
            address: SocketAddr::new(config.host, config.port),
            source,
        })?;
    let shown_host = if local.ip().is_unspecified() {
        "localhost".to_string()
    } else if local.is_ipv6() {
        format!("[{}]", local.ip())
    } else {
        local.ip().to_string()
    };
    let base_url = format!("http://{shown_host}:{}", local.port());
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| base_url.clone());

    // A fleet's hosts must sign alike: with a shared queue its database keeps the secrets.
    let shared_secret = |name: &'static str| {
        let store = store.clone();
        async move {
            let fresh = webhooks::fresh_secret()?;
            Ok::<_, StartupError>(store.shared_secret(name, &fresh).await?)
        }
    };
    let events_secret = match shared_secret("events").await? {
        Some(bytes) => bytes.into(),
        None => crate::storage::load_or_create_secret(
            &config.data_dir.join(events::EVENTS_SECRET_FILE),
        )?,
    };
    let shared_webhook_secret = match config.webhook_secret {
        Some(_) => None,
        None => shared_secret("webhooks").await?,
    };
    let webhooks = webhooks::Webhooks::new(
        webhooks::WebhookSettings {
            policy: webhooks::WebhookPolicy {
                allowed: config.webhook_allow.clone(),
            },
            first_retry: config.webhook_first_retry,
            give_up_after: config.webhook_give_up,
            proxy: config.webhook_proxy.clone(),
        },
        webhooks::load_secret(
            config.webhook_secret.as_ref(),
            shared_webhook_secret,
            &config.data_dir,
        )?,
    )?;
    let videos = Arc::new(unlisted_videos.served_at(&public_url));
    // Jobs that were running when the last process died go back to the queue; whatever their
    // attempt may have published is removed so the re-run publishes the only copy.
    let recovered = store.recover().await?;
    for job in &recovered {
        if let Some(key) = &job.pending_key
            && let Err(e) = videos.delete(key).await
        {
            tracing::warn!(request_id = %job.id, error = %e, "cannot remove an interrupted attempt's video");
        }
    }
    if !recovered.is_empty() {
        tracing::info!(
            jobs = recovered.len(),
            "jobs interrupted by the last stop are queued again"
        );
    }

    let workers = Workers::start(
        store.clone(),
        videos.clone(),
        started.host.clone(),
        tokio::runtime::Handle::current(),
        WorkerConfig {
            slots: if config.role.runs_jobs() {
                config.slots
            } else {
                0
            },
            work_dir: config.data_dir.join("work"),
            default_retention: config.default_retention,
            idle_poll: std::time::Duration::from_millis(500),
            lease_renewal: config.lease / 3,
        },
    )
    .map_err(|source| StartupError::Threads {
        what: "job workers",
        source,
    })?;

    let store_readiness = readiness::StoreReadiness::start(videos.clone());
    let state = Arc::new(AppState {
        store: store.clone(),
        videos: videos.clone(),
        plugins: started.host.clone(),
        plugin_calls: plugin_pool::PluginPool::start(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )
        .map_err(|source| StartupError::Threads {
            what: "plugin threads",
            source,
        })?,
        watcher,
        swaps,
        admission: Default::default(),
        feeds: Default::default(),
        workers: workers.clone(),
        limits: HostLimits {
            max_pixel_frames: config.max_pixel_frames,
            max_steps: config.max_steps,
            cache_default: config.cache_default,
            preview_every: config.preview_every,
            body_limit: config.body_limit,
            models: ServedModels(
                models
                    .iter()
                    .map(|(name, dir, model)| ServedModel {
                        name: name.clone(),
                        manifest: model.manifest.clone(),
                        dir: dir.clone(),
                        resident_bytes: Default::default(),
                    })
                    .collect::<Vec<_>>()
                    .into(),
            ),
        },
        queue_limit: config.queue_limit,
        admin_key_hash,
        metrics: handle,
        model: ModelStatus::default(),
        events_secret,
        shutting_down,
        webhooks,
        role: config.role,
        store_readiness,
    });

    // The models load beside the listener: /health answers at once, /ready once every one is
    // warm.
    if !config.role.runs_jobs() {
        state.model.set(ModelStatus::NOT_LOADED);
    } else {
        let state = state.clone();
        let config = config.clone();
        std::thread::Builder::new()
            .name("wanserve-load".into())
            .spawn(move || match load_models(&state, &models, &config) {
                Ok(renderers) => {
                    state.workers.set_renderers(renderers);
                    state.model.set(ModelStatus::READY);
                }
                Err((name, e)) => {
                    tracing::error!(model = %name, error = %e, "cannot load the model; /ready says failed");
                    state.model.set(ModelStatus::FAILED);
                }
            })
            .map_err(|source| StartupError::Threads {
                what: "model loader",
                source,
            })?;
    }

    // The exporter keeps histogram samples until they are drained: without this, a server
    // nobody scrapes would grow without bound.
    {
        let metrics = state.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(
        Sweeper {
            store: store.clone(),
            videos: videos.clone(),
            plugins: started.host.clone(),
            interval: config.sweep_interval,
        }
        .run(stop_rx),
    );

    let webhook_sender = tokio::spawn(webhook_delivery::run(state.clone()));
    let follower = fleet_follow::start(
        started.host.clone(),
        state.swaps.clone(),
        state.shutting_down.clone(),
    );

    println!("listening on http://{local}");
    println!("docs: {base_url}/docs");
    tracing::info!(%local, public_url, store = videos.describe(), slots = config.slots, "listening; docs at {base_url}/docs");

    let app = router(state.clone());
    let limits = connections::ConnectionLimits {
        header_timeout: config.header_timeout,
        body_timeout: config.body_timeout,
        max_connections: config.max_connections,
    };
    connections::serve(listener, app, overflow_router(), limits, async move {
        shutdown_signal().await;
        let _ = shutdown_begun.send(true);
    })
    .await;

    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    let _ = webhook_sender.await;
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    tokio::task::spawn_blocking(move || workers.shutdown())
        .await
        .map_err(|_| StartupError::Panicked("stopping the job workers"))?;
    tracing::info!("stopped");
    Ok(())
}
