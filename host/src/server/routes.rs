//! The HTTP surface: every route, the OpenAPI document, the request metrics.

use super::error::{self, ApiError};
use super::ops::{health, metrics_text, ready};
use super::state::AppState;
use super::{admin, api, events, models, ops, playground};
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(title = "wanserve", description = "Text-to-video with Wan2.1-T2V-1.3B. \
        Every /video endpoint needs `Authorization: Bearer <API key>`; video URLs are signed and \
        need none. Errors: `{\"error\": {\"code\", \"message\", \"fields\"}}`."),
    paths(api::submit, api::status, api::cancel, api::cancel_delete, events::events_token,
        events::events, api::video, models::list,
        ops::health, ops::ready, ops::metrics_text, admin::list, admin::upload, admin::rollback, admin::history),
    components(schemas(error::ErrorBody, error::ErrorDetail, error::FieldProblem,
        events::PreviewEvent, events::PreviewData)),
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

/// The header a request's id comes in and goes back out in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Runs every request in its own span (method, route, the HTTP request id, and the job's
/// `request_id` once a handler knows it, so a request's log lines join its job's), echoes the
/// id in `X-Request-Id`, and counts and times the request by route and status.
async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    let id = crate::ids::http_request_id(
        request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let span = tracing::info_span!(
        "http",
        method,
        route = %route,
        http_request_id = %id,
        request_id = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let status = response.status().as_u16().to_string();
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request done"
        );
    });
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
        .route("/admin/plugins/{slot}/rollback", post(admin::rollback))
        .route("/admin/plugins/{slot}/history", get(admin::history));
    // A worker takes no client requests: operations, and the admin API (its plugins are
    // swapped like any host's).
    let public = if state.role.serves_api() {
        Router::new()
            .merge(api)
            .route("/videos/{*key}", get(api::video))
            .route("/models", get(models::list))
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
pub(super) fn overflow_router() -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(|| async { ApiError::Overloaded })
}
