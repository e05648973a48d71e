//! `wanserve serve`: the seed's REST API over the job store, the job workers, the plugins and the
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
pub mod startup;
pub mod webhooks;

pub use startup::{StartupError, serve};

use crate::jobs::workers::Workers;
use crate::jobs::{JobRequest, JobStore};
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
use error::{ApiError, FieldProblem};
use metrics_exporter_prometheus::PrometheusHandle;
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
