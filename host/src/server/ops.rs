//! Operations endpoints: liveness, readiness, Prometheus metrics.

use super::state::AppState;
use crate::plugins::Slot;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::sync::Arc;

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
