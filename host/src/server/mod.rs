//! `wanserve serve`: the seed's REST API over the job store, the scheduler, the plugins and the
//! object store. A request's path: `auth::Caller` (auth plugin) → handler in `api.rs`
//! (validate plugin, host limits, store) → `error.rs` maps every failure to HTTP in one place.

pub mod admin;
pub mod admission;
pub mod api;
pub mod auth;
pub mod config;
pub mod connections;
pub mod error;
pub mod events;
pub mod job_feeds;
pub mod playground;
pub mod plugin_pool;
pub mod readiness;
pub mod webhooks;

use crate::backend::{LoadOptions, OrtBackend};
use crate::jobs::postgres::PgJobStore;
use crate::jobs::retention::Sweeper;
use crate::jobs::scheduler::{Scheduler, SchedulerConfig};
use crate::jobs::sqlite::SqliteJobStore;
use crate::jobs::{JobRequest, JobStore};
use crate::model::ModelDir;
use crate::pipeline::Pipeline;
use crate::plugins::config::{ConfigSource, start_plugins};
use crate::plugins::watch::PluginWatcher;
use crate::plugins::{PluginHost, Slot};
use crate::storage::VideoStore;
use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use config::ServeConfig;
use error::{ApiError, FieldProblem};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use secrecy::ExposeSecret;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

/// Limits the host enforces whatever the validate plugin says.
#[derive(Debug, Clone)]
pub struct HostLimits {
    pub max_pixel_frames: u64,
    pub max_steps: u32,
    /// Step caching for a submit body without `cache`.
    pub cache_default: crate::pipeline::step_cache::CacheMode,
    pub body_limit: usize,
    pub manifest: crate::model::Manifest,
}

impl HostLimits {
    /// 422 for a job too large for this server or one the model cannot run.
    pub fn check(&self, r: &JobRequest) -> Result<(), ApiError> {
        let mut fields = Vec::new();
        let pixel_frames = u64::from(r.width)
            .checked_mul(u64::from(r.height))
            .and_then(|p| p.checked_mul(u64::from(r.num_frames)));
        match pixel_frames {
            Some(n) if n <= self.max_pixel_frames => {}
            _ => {
                let reason = format!(
                    "width × height × frames ({} × {} × {}) exceeds this server's limit of {}",
                    r.width, r.height, r.num_frames, self.max_pixel_frames
                );
                fields.push(FieldProblem {
                    field: "image_size".into(),
                    reason: reason.clone(),
                });
                fields.push(FieldProblem {
                    field: "num_frames".into(),
                    reason,
                });
            }
        }
        if r.infer_steps > self.max_steps {
            fields.push(FieldProblem {
                field: "infer_steps".into(),
                reason: format!(
                    "{} exceeds this server's limit of {}",
                    r.infer_steps, self.max_steps
                ),
            });
        }
        if !fields.is_empty() {
            return Err(ApiError::invalid(fields));
        }
        crate::pipeline::plan(&self.manifest, &r.generate_request()).map_err(|e| match e {
            crate::pipeline::PipelineError::InvalidRequest { field, reason } => {
                let field = match field {
                    "width" | "height" => "image_size",
                    other => other,
                };
                ApiError::field(field, format!("the model cannot run this: {reason}"))
            }
            other => ApiError::internal(other),
        })?;
        Ok(())
    }
}

pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub videos: Arc<VideoStore>,
    pub plugins: Arc<PluginHost>,
    /// Where request-path plugin calls (auth, validate) run.
    pub plugin_calls: plugin_pool::PluginPool,
    pub watcher: Option<PluginWatcher>,
    /// Per-caller admission: lock stripes and the streams open on this host.
    pub admission: admission::Admission,
    /// One reader per followed job, fanned out to its streams.
    pub feeds: job_feeds::JobFeeds,
    pub scheduler: Arc<Scheduler>,
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

#[derive(OpenApi)]
#[openapi(
    info(title = "wanserve", description = "Text-to-video with Wan2.1-T2V-1.3B. \
        Every /video endpoint needs `Authorization: Bearer <API key>`; video URLs are signed and \
        need none. Errors: `{\"error\": {\"code\", \"message\", \"fields\"}}`."),
    paths(api::submit, api::status, api::cancel, api::cancel_delete, events::events_token,
        events::events, api::video,
        health, ready, metrics_text, admin::list, admin::upload, admin::rollback),
    components(schemas(error::ErrorBody, error::ErrorDetail, error::FieldProblem)),
    modifiers(&SecuritySchemes),
    tags((name = "video", description = "The seed's API"),
        (name = "ops", description = "Health, readiness, metrics"),
        (name = "admin", description = "Plugin administration (admin key)"))
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [("bearer", "API key"), ("admin", "admin key")] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(format!("Authorization: Bearer <{what}>")))
                        .build(),
                ),
            );
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    ready: bool,
    model: bool,
    /// `loading`, `ready`, `failed` (it will not become ready without a restart; the log
    /// says why), or `not_loaded` (an API-only host).
    #[schema(example = "loading")]
    model_state: &'static str,
    plugins: bool,
    store: bool,
}

/// Ready to serve: model sessions loaded and warmed up, every plugin slot installed, the
/// object store writable.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let model_state = state.model.name();
    let model = model_state == "ready" || !state.role.runs_jobs();
    let plugins = Slot::ALL
        .into_iter()
        .all(|s| state.plugins.installed(s).is_some());
    // The background probe's last result (readiness.rs): a probe never writes.
    let store = state.store_readiness.writable();
    let body = Readiness {
        ready: model && plugins && store,
        model,
        model_state,
        plugins,
        store,
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics: queue depth, running jobs, job and step durations, plugin calls and
/// failures by slot, HTTP requests by route and status.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    match state.store.counts().await {
        Ok(counts) => {
            metrics::gauge!("wanserve_queue_depth").set(counts.queued as f64);
            metrics::gauge!("wanserve_jobs_running").set(counts.running as f64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot count jobs for /metrics"),
    }
    for slot in Slot::ALL {
        metrics::gauge!("wanserve_plugin_failures", "slot" => slot.to_string())
            .set(state.plugins.failures(slot) as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts every request by route and status, and times it.
async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("wanserve_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("wanserve_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A request's method as a metric label, from a closed set: a label taken from what a client
/// sent would let anyone, with no key, add a series to `/metrics` per made-up method name, kept
/// until restart.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// The whole HTTP surface.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.body_limit;
    let api = Router::new()
        .route("/video/submit", post(api::submit))
        .route("/video/status", post(api::status))
        .route("/video/events-token", post(events::events_token))
        .route("/video/events/{request_id}", get(events::events))
        .route(
            "/video/cancel",
            post(api::cancel).delete(api::cancel_delete),
        )
        .layer(DefaultBodyLimit::max(body_limit));
    let admin = Router::new()
        .route("/admin/plugins", get(admin::list))
        .route(
            "/admin/plugins/{slot}",
            put(admin::upload).layer(DefaultBodyLimit::max(admin::MAX_COMPONENT_BYTES)),
        )
        .route("/admin/plugins/{slot}/rollback", post(admin::rollback));
    // A worker takes no client requests: operations, and the admin API (its plugins are
    // swapped like any host's).
    let public = if state.role.serves_api() {
        Router::new()
            .merge(api)
            .route("/videos/{*key}", get(api::video))
            .route("/", get(playground::index))
            .route("/playground/playground.js", get(playground::script))
            .route("/playground/playground.css", get(playground::style))
    } else {
        Router::new()
    };
    Router::new()
        .merge(public)
        .merge(admin)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(track_http))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::internal("a request handler panicked").into_response()
            },
        ))
        .with_state(state)
}

/// What a connection past `--max-connections` gets: liveness, else 503 (it reads no body).
fn overflow_router() -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(|| async { ApiError::Overloaded })
}

fn prometheus() -> Result<PrometheusHandle, String> {
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0, 300.0, 600.0, 1800.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// Loads the model's sessions and runs one tiny job through them, so the first real job does
/// not pay for lazy initialisation.
fn load_and_warm(model: &ModelDir, config: &ServeConfig) -> Result<Pipeline<OrtBackend>, String> {
    let started = Instant::now();
    let backend = OrtBackend::load_with(
        model,
        LoadOptions {
            device: config.device,
            text_encoder_device: config.text_encoder_device,
            threads: config.threads,
            cuda_memory: config.cuda_memory,
        },
    )
    .map_err(|e| e.to_string())?;
    let pipeline = Pipeline::new(backend, model)
        .map_err(|e| e.to_string())?
        .with_batched_guidance(config.batch_cfg);
    pipeline
        .warm_up()
        .map_err(|e| format!("warm-up failed: {e}"))?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f32(),
        "model loaded and warmed up"
    );
    Ok(pipeline)
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

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn serve(config: ServeConfig) -> Result<(), String> {
    tracing::info!(?config, "starting");
    let handle = prometheus()?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;

    // The model's files are checked here: hashed unless unchanged since they last verified on
    // this machine (`--verify-model` hashes them all).
    let model_dir = config.model_dir.clone();
    let verify = config.verify_model;
    let model = tokio::task::spawn_blocking(move || ModelDir::open_with(&model_dir, verify))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if config.bundled_model {
        tracing::warn!(dir = %config.model_dir.display(),
            "serving the BUNDLED TINY RANDOM-WEIGHT stand-in model: videos are textured noise. \
             Export real weights with models/export.py and pass --model-dir");
    } else {
        tracing::info!(dir = %config.model_dir.display(), dtype = %model.manifest.dtype, "serving the exported model");
    }
    match model.manifest.step_cache() {
        Some(cache) => tracing::info!(
            default = %config.cache_default,
            ratios = cache.source.as_deref().unwrap_or("unnamed"),
            "step caching available (\"cache\": off | fast | faster)"
        ),
        None if config.cache_default != crate::pipeline::step_cache::CacheMode::Off => {
            return Err(format!(
                "--cache-default {}: {} has no step cache (export it again with models/export.py)",
                config.cache_default,
                config.model_dir.display()
            ));
        }
        None => tracing::info!("this model has no step cache: \"cache\" other than off is refused"),
    }

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
    let started = start_plugins(&plugin_source).map_err(|e| e.to_string())?;
    if let Some(key) = &started.generated_key {
        println!(
            "No API key was configured; generated one (shown only now, stored hashed in {}):",
            config.data_dir.display()
        );
        println!("api key: {key}");
    }
    let (admin_key_hash, generated_admin) =
        auth::admin_key_hash(config.admin_key.as_ref(), &config.data_dir)?;
    let (shutdown_begun, shutting_down) = tokio::sync::watch::channel(false);
    if let Some(key) = generated_admin {
        println!("No admin key was configured; generated one (shown only now, stored hashed):");
        println!("admin key: {key}");
    }
    let watcher = match PluginWatcher::start(started.host.clone(), &started.config) {
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
        .map_err(|e| format!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
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

    let store: Arc<dyn JobStore> = match &config.queue {
        Some(url) => PgJobStore::open(url.expose_secret(), config.lease)
            .await
            .map_err(|e| e.to_string())?,
        None => Arc::new(
            SqliteJobStore::open(&config.data_dir.join("jobs.db"))
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    // A fleet's hosts must sign alike: with a shared queue its database keeps the secrets.
    let shared_secret = |name: &'static str| {
        let store = store.clone();
        async move {
            let fresh = webhooks::fresh_secret().map_err(|e| e.to_string())?;
            store
                .shared_secret(name, &fresh)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let events_secret = match shared_secret("events").await? {
        Some(bytes) => bytes.into(),
        None => {
            crate::storage::load_or_create_secret(&config.data_dir.join(events::EVENTS_SECRET_FILE))
                .map_err(|e| e.to_string())?
        }
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
        )
        .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let videos = Arc::new(
        VideoStore::open(
            config.store.as_deref(),
            &config.data_dir,
            &public_url,
            config.store_retry,
        )
        .map_err(|e| e.to_string())?,
    );
    // Jobs that were running when the last process died go back to the queue; whatever their
    // attempt may have published is removed so the re-run publishes the only copy.
    let recovered = store.recover().await.map_err(|e| e.to_string())?;
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

    let scheduler = Scheduler::start(
        store.clone(),
        videos.clone(),
        started.host.clone(),
        tokio::runtime::Handle::current(),
        SchedulerConfig {
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
    .map_err(|e| format!("cannot start the workers: {e}"))?;

    let store_readiness = readiness::StoreReadiness::start(videos.clone());
    let state = Arc::new(AppState {
        store: store.clone(),
        videos: videos.clone(),
        plugins: started.host.clone(),
        plugin_calls: plugin_pool::PluginPool::start(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )
        .map_err(|e| format!("cannot start the plugin threads: {e}"))?,
        watcher,
        admission: Default::default(),
        feeds: Default::default(),
        scheduler: scheduler.clone(),
        limits: HostLimits {
            max_pixel_frames: config.max_pixel_frames,
            max_steps: config.max_steps,
            cache_default: config.cache_default,
            body_limit: config.body_limit,
            manifest: model.manifest.clone(),
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

    // The model loads beside the listener: /health answers at once, /ready once it is warm.
    if !config.role.runs_jobs() {
        state.model.set(ModelStatus::NOT_LOADED);
    } else {
        let state = state.clone();
        let config = config.clone();
        std::thread::Builder::new()
            .name("wanserve-load".into())
            .spawn(move || match load_and_warm(&model, &config) {
                Ok(pipeline) => {
                    state.scheduler.set_pipeline(Arc::new(pipeline));
                    state.model.set(ModelStatus::READY);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the model; /ready says failed");
                    state.model.set(ModelStatus::FAILED);
                }
            })
            .map_err(|e| e.to_string())?;
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

    let webhook_sender = tokio::spawn(webhooks::run(state.clone()));

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
    tokio::task::spawn_blocking(move || scheduler.shutdown())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}
