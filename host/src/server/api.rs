//! The seed's endpoints: `POST /video/submit`, `POST /video/status`, `POST|DELETE
//! /video/cancel`, and `GET /videos/{key}` for the signed local URLs.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JobRefErrors, JsonCallErrors};
use super::request_check::check_submit;
use super::state::AppState;
use crate::ids::{is_request_id, new_request_id, now_ms};
use crate::jobs::{
    CancelOutcome, Job, JobPrincipal, JobRequest, JobState, NewJob, Submitted, WebhookDelivery,
};
use crate::pipeline::step_cache::CacheMode;
use crate::plugins::AdmissionAction;
use crate::wire::{
    CacheView, CancelResponse, JobRef, ProgressView, Results, StatusName, StatusResponse,
    SubmitBody, SubmitResponse, Timings, Video, WebhookView,
};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use tower::ServiceExt;

impl CacheView {
    /// `request`'s plan on its model (empty if the model cannot cache, which submit refuses
    /// anyway, or is no longer served here).
    pub fn of(models: &super::state::ServedModels, request: &JobRequest) -> Self {
        let generate = request.generate_request();
        let plan = match models.get(&request.model) {
            Some(model) => crate::pipeline::skip_plan_or_none(&model.manifest, &generate),
            None => crate::pipeline::step_cache::SkipPlan::none(
                generate.infer_steps,
                generate.guidance_scale > 1.0,
            ),
        };
        Self {
            mode: request.cache.as_str().into(),
            skipped_steps: plan.skipped_steps().into_iter().map(|s| s as u32).collect(),
            skipped_passes: plan.skipped_passes() as u32,
            passes: plan.passes() as u32,
        }
    }
}

impl From<WebhookDelivery> for WebhookView {
    fn from(d: WebhookDelivery) -> Self {
        let state = if d.delivered_at.is_some() {
            "delivered"
        } else if d.gave_up_at.is_some() {
            "failed"
        } else {
            "pending"
        };
        Self {
            id: d.id,
            state: state.into(),
            attempts: d.attempts,
            last_error: d.last_error,
            delivered_at: d.delivered_at,
        }
    }
}

/// The request body, or 413 past `limit`, 408 past the body deadline (400 when it cannot be
/// read at all).
pub fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge { limit };
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
        while let Some(error) = cause {
            if let Some(passed) = error.downcast_ref::<super::connections::BodyDeadlinePassed>() {
                return ApiError::BodyTimeout {
                    seconds: passed.0.as_secs().max(1),
                };
            }
            cause = error.source();
        }
        ApiError::MalformedJson("cannot read the request body".into())
    })
}

/// Reads a JSON object body; 413 past the limit, 400 when it is not JSON, 422 when it is not
/// an object.
fn json_object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let bytes = body_bytes(body, limit)?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::field("body", "must be a JSON object")),
        Err(e) => Err(ApiError::MalformedJson(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// The body's `requestId` (422 when missing or not a string), also recorded in the request's
/// span (its log lines then carry the job's id). An id that cannot have been issued is 404
/// here, before any lookup.
pub(super) fn request_id_of(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<String, ApiError> {
    let map = json_object(body, limit)?;
    match map.get("requestId") {
        None => Err(ApiError::field("requestId", "is required")),
        Some(serde_json::Value::String(id)) if is_request_id(id) => {
            tracing::Span::current().record("request_id", id.as_str());
            Ok(id.clone())
        }
        Some(serde_json::Value::String(_)) => Err(ApiError::NotFound),
        Some(_) => Err(ApiError::field("requestId", "must be a string")),
    }
}

/// Idempotency-Key: 1–255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::field("Idempotency-Key", "sent more than once"));
    }
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= 255
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            Ok(Some(key.to_string()))
        }
        _ => Err(ApiError::field(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Submit a generation job.
#[utoipa::path(post, path = "/video/submit", tag = "video",
    request_body = SubmitBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "The same key from the same caller within 24 h returns the same requestId and creates nothing")),
    responses(
        (status = 202, description = "Accepted", body = SubmitResponse),
        (status = 409, description = "Idempotency-Key reused with a different body", body = ErrorBody),
        (status = 422, description = "Every bad field, with the reason", body = ErrorBody),
        (status = 429, description = "Queue full (queue_full) or this caller has enough jobs waiting (caller_busy); see Retry-After", body = ErrorBody),
        (status = 503, description = "A policy plugin failed (refused, fail closed)", body = ErrorBody),
        JsonCallErrors),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let body = json_object(body, state.limits.body_limit)?;
    let body_hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&body).unwrap_or_default(),
    ));
    let (request, webhook_url) = check_submit(&state, &principal, body).await?;
    let job = NewJob {
        id: new_request_id(),
        principal: JobPrincipal::from(&principal),
        request,
        idempotency: key.map(|k| (k, body_hash)),
        webhook_url,
    };
    // Held until the job is stored: this caller's next admission counts it.
    let _admitted = match super::admission::admit(&state, &principal, AdmissionAction::Submit).await
    {
        Ok(admitted) => admitted,
        // A retry of a job already submitted is answered with that job, even at the limit:
        // with no room (limit 0) the store only looks the key up and inserts nothing.
        Err(busy) if job.idempotency.is_some() => {
            match state
                .store
                .submit(job, 0)
                .await
                .map_err(ApiError::internal)?
            {
                Submitted::Existing(id) => return Ok(accepted(id)),
                Submitted::KeyReused => return Err(key_reused()),
                Submitted::Created(_) | Submitted::QueueFull { .. } => return Err(busy),
            }
        }
        Err(busy) => return Err(busy),
    };
    let outcome = state
        .store
        .submit(job, state.queue_limit)
        .await
        .map_err(ApiError::internal)?;
    let id = match outcome {
        Submitted::Created(id) => {
            state.workers.wake();
            metrics::counter!("wanserve_jobs_submitted_total").increment(1);
            id
        }
        Submitted::Existing(id) => id,
        Submitted::KeyReused => return Err(key_reused()),
        Submitted::QueueFull { queued } => {
            return Err(ApiError::QueueFull {
                queued,
                retry_after: state.workers.retry_after_seconds(),
            });
        }
    };
    tracing::Span::current().record("request_id", id.as_str());
    Ok(accepted(id))
}

fn accepted(id: String) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(SubmitResponse { request_id: id }),
    )
        .into_response()
}

fn key_reused() -> ApiError {
    ApiError::Conflict("this Idempotency-Key was used with a different request body".into())
}

/// The status of a job (only its submitter can see it).
#[utoipa::path(post, path = "/video/status", tag = "video",
    request_body = JobRef,
    responses(
        (status = 200, description = "The job", body = StatusResponse),
        JobRefErrors),
    security(("bearer" = [])))]
pub async fn status(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StatusResponse>, ApiError> {
    let id = request_id_of(body, state.limits.body_limit)?;
    let job = owned_job(&state, &id, &principal.id).await?;
    Ok(Json(status_view(&state, job).await?))
}

/// Job `id` if `owner` submitted it; to anyone else it does not exist (404).
pub(super) async fn owned_job(
    state: &AppState,
    id: &str,
    owner: &str,
) -> Result<Arc<Job>, ApiError> {
    state
        .store
        .get(id)
        .await
        .map_err(ApiError::internal)?
        .filter(|job| job.principal.id == owner)
        .ok_or(ApiError::NotFound)
}

/// What `/video/status` (and each live progress event) says about `job`.
pub(super) async fn status_view(
    state: &AppState,
    job: Arc<Job>,
) -> Result<StatusResponse, ApiError> {
    let now = now_ms();
    let mut response = StatusResponse {
        request_id: job.id.clone(),
        status: StatusName::InQueue,
        results: Results {
            videos: Vec::new(),
            timings: Timings { inference: None },
        },
        seed: job.request.seed,
        position: None,
        progress: None,
        eta_seconds: None,
        reason: None,
        expires_at: None,
        expired: false,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        metadata: BTreeMap::new(),
        cache: CacheView::of(&state.limits.models, &job.request),
        webhook: None,
    };
    if job.webhook_url.is_some() && job.state.is_final() {
        response.webhook = state
            .store
            .webhook_delivery(&job.id)
            .await
            .map_err(ApiError::internal)?
            .map(WebhookView::from);
    }
    let stored_progress = job.progress.as_ref().map(|p| ProgressView {
        stage: p.stage.clone(),
        step: p.step,
        total: p.total,
    });
    match job.state {
        JobState::Queued => {
            let ahead = state
                .store
                .jobs_ahead(job.seq)
                .await
                .map_err(ApiError::internal)?;
            response.position = Some(ahead + 1);
        }
        JobState::Running => {
            response.status = StatusName::InProgress;
            match state.workers.progress(&job.id) {
                Some(live) => {
                    response.progress = Some(ProgressView {
                        stage: live.stage.into(),
                        step: live.step,
                        total: live.total,
                    });
                    response.eta_seconds = live.eta_seconds.map(|s| (s * 10.0).round() / 10.0);
                }
                // Another host of the fleet runs it: what that worker last stored.
                None => {
                    response.progress = stored_progress;
                    response.eta_seconds = job.progress.as_ref().and_then(|p| p.eta_seconds);
                }
            }
        }
        JobState::Succeeded => {
            response.status = StatusName::Succeed;
            response.results.timings.inference = job.inference_seconds;
            response.expires_at = job.expires_at;
            response.metadata = job.metadata.iter().cloned().collect();
            // The host's entry beside the plugin's (the plugin's wins a clash).
            if job.request.cache != CacheMode::Off {
                response
                    .metadata
                    .entry("cache".into())
                    .or_insert_with(|| job.request.cache.as_str().into());
            }
            let expires_at = job.expires_at.unwrap_or(now);
            response.expired = job.video_deleted_at.is_some() || expires_at <= now;
            if !response.expired
                && let Some(key) = &job.object_key
                && let Some(url) = state
                    .videos
                    .url(key, now, expires_at)
                    .await
                    .map_err(ApiError::internal)?
            {
                response.results.videos.push(Video { url });
            }
        }
        JobState::Failed => {
            response.status = StatusName::Failed;
            response.reason = job.reason.clone();
        }
        JobState::Cancelled => {
            response.status = StatusName::Cancelled;
            response.reason = job.reason.clone();
            response.progress = stored_progress;
        }
    }
    Ok(response)
}

/// Cancel a job (POST or DELETE). A queued job leaves the queue at once; a running one stops
/// before its next denoising step. Cancelling a cancelled job succeeds again; a job that already
/// succeeded or failed answers 409 and keeps its result.
#[utoipa::path(post, path = "/video/cancel", tag = "video",
    request_body = JobRef,
    responses(
        (status = 200, description = "Cancelled", body = CancelResponse),
        (status = 409, description = "The job already succeeded or failed", body = ErrorBody),
        JobRefErrors),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CancelResponse>, ApiError> {
    let id = request_id_of(body, state.limits.body_limit)?;
    let outcome = state
        .store
        .cancel(&id, &principal.id)
        .await
        .map_err(ApiError::internal)?;
    match outcome {
        CancelOutcome::Dequeued => state.workers.changed(&id),
        CancelOutcome::AlreadyCancelled => {}
        CancelOutcome::StopRequested => {
            state.workers.cancel_running(&id);
        }
        CancelOutcome::AlreadyFinished(job_state) => {
            let what = if job_state == JobState::Succeeded {
                "succeeded"
            } else {
                "failed"
            };
            return Err(ApiError::Conflict(format!(
                "the job already {what}; there is nothing to cancel"
            )));
        }
        CancelOutcome::NotFound => return Err(ApiError::NotFound),
    }
    tracing::info!(request_id = %id, ?outcome, "cancel");
    Ok(Json(CancelResponse { status: "Succeed" }))
}

/// The same as `POST /video/cancel` (the seed's Postman guide uses DELETE).
#[utoipa::path(delete, path = "/video/cancel", tag = "video",
    request_body = JobRef,
    responses(
        (status = 200, description = "Cancelled", body = CancelResponse),
        (status = 409, description = "The job already succeeded or failed", body = ErrorBody),
        JobRefErrors),
    security(("bearer" = [])))]
pub async fn cancel_delete(
    state: State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CancelResponse>, ApiError> {
    cancel(state, caller, body).await
}

#[derive(Debug, Default, Deserialize)]
pub struct Signature {
    expires: Option<String>,
    sig: Option<String>,
}

// Raw bytes in the OpenAPI document (a video, a component): `{"type": "string", "format":
// "binary"}`, which generated clients read as a file. `Vec<u8>` would document an array of
// integers, and such clients then drop the body.
/// Raw bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct BinaryBody(#[allow(dead_code)] Vec<u8>);

/// `video/mp4`, unless the client's `Accept` names `application/octet-stream` and nothing that
/// `video/mp4` matches (clients generated from the OpenAPI document may only read that type).
fn video_media_type(headers: &axum::http::HeaderMap) -> &'static str {
    let accepted: Vec<String> = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|range| range.split(';').next())
        .map(|range| range.trim().to_ascii_lowercase())
        .collect();
    let mp4_matches = accepted
        .iter()
        .any(|range| matches!(range.as_str(), "video/mp4" | "video/*" | "*/*"));
    if !mp4_matches
        && accepted
            .iter()
            .any(|range| range == "application/octet-stream")
    {
        "application/octet-stream"
    } else {
        "video/mp4"
    }
}

/// A stored video, by the signed URL that status hands out (no API key; range requests).
#[utoipa::path(get, path = "/videos/{key}", tag = "video",
    params(("key" = String, Path, description = "Object key"),
        ("expires" = i64, Query, description = "Unix seconds"),
        ("sig" = String, Query, description = "HMAC-SHA256, hex")),
    responses(
        (status = 200, description = "The video: `video/mp4`, or `application/octet-stream` for an \
            `Accept` that names only that", content(
            (inline(BinaryBody) = "video/mp4"), (inline(BinaryBody) = "application/octet-stream"))),
        (status = 206, description = "A range of the video", content(
            (inline(BinaryBody) = "video/mp4"), (inline(BinaryBody) = "application/octet-stream"))),
        (status = 403, description = "Bad or expired signature", body = ErrorBody),
        (status = 404, description = "No such video", body = ErrorBody)))]
pub async fn video(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    signature: Result<Query<Signature>, QueryRejection>,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    // A path that does not decode names no video; a query that does not parse (a repeated or
    // odd parameter) is no signature: both in the API's error shape, not axum's plain text.
    let Path(key) = key.map_err(|_| ApiError::NotFound)?;
    let signature = signature.map(|Query(s)| s).unwrap_or_default();
    let (Some(expires), Some(sig)) = (signature.expires, signature.sig) else {
        return Err(ApiError::Forbidden("missing or invalid signature".into()));
    };
    let file = state
        .videos
        .verify_local(&key, &expires, &sig, now_ms())
        .map_err(|refusal| {
            ApiError::Forbidden(match refusal {
                crate::storage::UrlRefusal::Expired => "this link has expired".into(),
                _ => "missing or invalid signature".into(),
            })
        })?;
    if !tokio::fs::try_exists(&file).await.unwrap_or(false) {
        return Err(ApiError::NotFound);
    }
    let media_type = video_media_type(request.headers());
    let served = tower_http::services::ServeFile::new_with_mime(
        &file,
        &mime::Mime::from_str(media_type).map_err(ApiError::internal)?,
    )
    .oneshot(request)
    .await
    .map_err(ApiError::internal)?;
    Ok(served.map(Body::new).into_response())
}
