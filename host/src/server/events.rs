//! Live progress of one job as Server-Sent Events: `GET /video/events/{requestId}` sends the
//! job's status now, again on each change (state, stage, step, ETA), the final status last, and
//! then ends; while the job runs, its latest live preview (`event: preview`) each time there is
//! a new one. Each event is the job as it is when the stream re-reads it, so changes that land
//! close together (the last step and the start of decoding, on a busy host) arrive as one.
//!
//! A browser's `EventSource` cannot send an `Authorization` header, and an API key in a URL ends
//! up in logs and history. So a page first asks, with its key, for a token bound to one job and
//! its principal that expires in five minutes (`POST /video/events-token`), and puts that in the
//! URL (`?token=`). Other clients may send their `Authorization` header instead.

use super::api::{owned_job, request_id_of, status_view};
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JobRefErrors};
use super::job_feeds::{FeedValue, Published, PublishedPreview, ReadStatus};
use super::state::AppState;
use super::{admission, admission_locks};
use crate::jobs::{Job, JobState, StoredPreview};
use crate::plugins::{AdmissionAction, Principal};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::Stream;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::convert::Infallible;
use std::sync::Arc;
use utoipa::ToSchema;

/// The token-signing secret's file in the data directory.
pub const EVENTS_SECRET_FILE: &str = "events-secret";
/// How long an events token opens a stream (a stream already open runs to its end).
const TOKEN_SECONDS: i64 = 300;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The job.
    rid: String,
    /// The principal that submitted it.
    pid: String,
    /// Expiry, Unix seconds.
    exp: i64,
}

fn mac(secret: &SecretSlice<u8>, payload: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret())
        .expect("HMAC takes a key of any length");
    // Domain separation: this secret signs nothing else, but a MAC should say what it is for.
    mac.update(b"wanserve events token\0");
    mac.update(payload.as_bytes());
    mac
}

fn sign(secret: &SecretSlice<u8>, claims: &Claims) -> String {
    let json = serde_json::to_vec(claims).expect("claims serialize");
    let payload = URL_SAFE_NO_PAD.encode(json);
    let tag = URL_SAFE_NO_PAD.encode(mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{tag}")
}

/// The claims of a token this server signed and that has not expired at `now` (Unix seconds).
fn verify(secret: &SecretSlice<u8>, token: &str, now: i64) -> Option<Claims> {
    let (payload, tag) = token.split_once('.')?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    mac(secret, payload).verify_slice(&tag).ok()?; // constant time
    let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    (claims.exp > now).then_some(claims)
}

fn now_seconds() -> i64 {
    crate::ids::now_ms() / 1000
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsToken {
    /// For `GET /video/events/{requestId}?token=…`.
    pub token: String,
    /// Seconds the token can open a stream.
    #[schema(example = 300)]
    pub expires_in: i64,
}

/// A short-lived token that opens the live progress stream of one of the caller's jobs, for
/// clients that cannot send headers (a browser's `EventSource`).
#[utoipa::path(post, path = "/video/events-token", tag = "video",
    request_body = crate::wire::JobRef,
    responses(
        (status = 200, description = "The token", body = EventsToken),
        JobRefErrors),
    security(("bearer" = [])))]
pub async fn events_token(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EventsToken>, ApiError> {
    let id = request_id_of(body, state.limits.body_limit)?;
    let job = owned_job(&state, &id, &principal.id).await?;
    let claims = Claims {
        rid: job.id.clone(),
        pid: principal.id,
        exp: now_seconds() + TOKEN_SECONDS,
    };
    Ok(Json(EventsToken {
        token: sign(&state.events_secret, &claims),
        expires_in: TOKEN_SECONDS,
    }))
}

/// One event of the stream, as a client's SSE parser sees it. `data` is the job's status, the
/// body `POST /video/status` would give (`StatusResponse`), as JSON.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation of the wire format: events are built by `Follow`
pub struct StatusEvent {
    /// Always `status`.
    #[schema(pattern = "^status$")]
    event: String,
    /// 1, 2, 3, … in the order sent.
    #[schema(pattern = "^[1-9][0-9]*$")]
    id: String,
    /// A `StatusResponse`, JSON-encoded.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The data of an `event: preview`: what the video looks like so far, a small picture made
/// from the denoiser's current estimate (see `GET /models`' `previewEvery`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewData {
    pub request_id: String,
    /// The denoising step it follows, of `total`.
    pub step: u32,
    pub total: u32,
    /// Its size in pixels: the latents' (the video's divided by the VAE's spatial factor, 8).
    pub width: u32,
    pub height: u32,
    /// `data:image/png;base64,…`, for an `<img>` as it is.
    #[schema(example = "data:image/png;base64,iVBORw0KGgo=")]
    pub image: String,
}

/// An `event: preview` of the stream (sent after each preview step of a running job; never after
/// the final status).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation of the wire format: events are built by `Follow`
pub struct PreviewEvent {
    /// Always `preview`.
    #[schema(pattern = "^preview$")]
    event: String,
    /// 1, 2, 3, … in the order sent (one sequence with the status events).
    #[schema(pattern = "^[1-9][0-9]*$")]
    id: String,
    /// A `PreviewData`, JSON-encoded.
    #[schema(content_media_type = "application/json")]
    data: String,
}

fn preview_of(id: &str, preview: StoredPreview) -> Option<PublishedPreview> {
    let data = PreviewData {
        request_id: id.to_string(),
        step: preview.step,
        total: preview.total,
        width: preview.width,
        height: preview.height,
        image: format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&preview.png)
        ),
    };
    Some(PublishedPreview {
        attempt: preview.attempt,
        step: preview.step,
        json: serde_json::to_string(&data).ok()?,
    })
}

/// What a stream of `job` sends now: its status, and its latest preview while it runs.
async fn published(state: &AppState, job: Arc<Job>) -> Result<FeedValue, ApiError> {
    let running = job.state == JobState::Running;
    let id = job.id.clone();
    let status = status_view(state, job).await?;
    let preview = match running {
        // A preview that cannot be read is left out: the status still goes.
        true => match state.store.preview(&id).await {
            Ok(Some(preview)) => preview_of(&id, preview),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a job's preview");
                None
            }
        },
        false => None,
    };
    Ok(Published::of(&status, preview))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Who may follow a job: the holder of a valid token, else whoever the auth plugin accepts.
pub enum Follower {
    Token(Claims),
    Principal(String),
}

impl FromRequestParts<Arc<AppState>> for Follower {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token = Query::<TokenQuery>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|q| q.0.token);
        match token {
            Some(token) => verify(&state.events_secret, &token, now_seconds())
                .map(Follower::Token)
                .ok_or_else(|| ApiError::Unauthorized {
                    reason: "invalid or expired events token (POST /video/events-token)".into(),
                    challenge: None,
                }),
            None => {
                let Caller(principal) = Caller::from_request_parts(parts, state).await?;
                Ok(Follower::Principal(principal.id))
            }
        }
    }
}

/// Live progress of a job (Server-Sent Events, each `event: status` with the body
/// `/video/status` would give). The first event is the status now; the stream ends after the
/// final one (`Succeed`, `Failed`, `Cancelled`). While the job denoises, a model that makes
/// previews (`GET /models`: `previewEvery`) also sends `event: preview` (`PreviewEvent`, its data a
/// `PreviewData`: a small PNG of the video so far), in step order, never after the final
/// status. Authenticate with `Authorization`, or with `?token=` from `POST /video/events-token`
/// (for `EventSource`).
#[utoipa::path(get, path = "/video/events/{requestId}", tag = "video",
    params(("requestId" = String, Path, description = "The job"),
           ("token" = Option<String>, Query, description = "From POST /video/events-token")),
    responses(
        (status = 200, description = "text/event-stream of status events", content_type = "text/event-stream",
         body = StatusEvent),
        (status = 401, description = "Authentication failed or token invalid", body = ErrorBody),
        (status = 404, description = "No such job for this caller", body = ErrorBody),
        (status = 429, description = "The job's owner has enough streams open (caller_busy); see Retry-After", body = ErrorBody),
        (status = 503, description = "The auth or validate plugin failed (refused)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    follower: Follower,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // An id that does not decode is no job (and gets the API's error shape, not axum's text).
    let Path(id) = id.map_err(|_| ApiError::NotFound)?;
    if crate::ids::is_request_id(&id) {
        tracing::Span::current().record("request_id", id.as_str());
    }
    let owner = match follower {
        Follower::Token(claims) if claims.rid == id => claims.pid,
        Follower::Token(_) => return Err(ApiError::NotFound),
        Follower::Principal(principal) => principal,
    };
    // Subscribed before the first read, so no change between the two is missed.
    let changes = state.workers.changes();
    let job = owned_job(&state, &id, &owner).await?;
    // Admission weighs the stream against the job's owner (with its tier), however it came.
    let admitted = admission::admit(
        &state,
        &Principal::from(&job.principal),
        AdmissionAction::OpenStream,
    )
    .await?;
    let counted = admitted.open_stream(&state, &job.principal.id);
    let first = published(&state, job).await?;
    let read: ReadStatus = {
        let state = state.clone();
        Arc::new(move |id: String| {
            let state = state.clone();
            Box::pin(async move {
                match state.store.get(&id).await {
                    Ok(Some(job)) => published(&state, job).await.ok().flatten(),
                    _ => None,
                }
            })
        })
    };
    let feed = state
        .feeds
        .subscribe(&id, changes, &first, read, state.shutting_down.clone());
    let follow = Follow {
        shutting_down: state.shutting_down.clone(),
        feed,
        next: first,
        last: None,
        last_preview: None,
        queued: None,
        done: false,
        sent: 0,
        _counted: counted,
    };
    let stream = futures::stream::unfold(follow, |mut follow| async move {
        let event = follow.next_event().await?;
        Some((Ok(event), follow))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct Follow {
    shutting_down: tokio::sync::watch::Receiver<bool>,
    feed: tokio::sync::watch::Receiver<FeedValue>,
    /// A status read but not sent yet (the first).
    next: FeedValue,
    /// The last status sent, as sent.
    last: Option<Arc<Published>>,
    /// The attempt and step of the last preview sent.
    last_preview: Option<(i64, u32)>,
    /// An event due after the one just returned (a preview follows its step's status).
    queued: Option<Event>,
    done: bool,
    sent: u64,
    /// Counts this stream against its caller's streams until it ends.
    _counted: admission_locks::OpenStream,
}

impl Follow {
    /// The next status that differs from the last one sent, or a preview not sent yet; `None`
    /// once the final status was sent, the server is shutting down, or the job cannot be read
    /// any more.
    async fn next_event(&mut self) -> Option<Event> {
        if let Some(event) = self.queued.take() {
            return Some(event);
        }
        if self.done {
            return None;
        }
        loop {
            let status = match self.next.take() {
                Some(status) => status,
                None => {
                    tokio::select! {
                        changed = self.feed.changed() => changed.ok()?,
                        // The client reconnects (to another host, or after the restart).
                        _ = self.shutting_down.wait_for(|stopping| *stopping) => return None,
                    }
                    self.feed.borrow_and_update().clone()?
                }
            };
            let new_status = self
                .last
                .as_ref()
                .is_none_or(|last| last.json != status.json);
            // A preview is of a run in progress: none goes after the final status.
            let preview = status
                .preview
                .as_ref()
                .filter(|p| !status.is_final && Some((p.attempt, p.step)) != self.last_preview);
            if let Some(p) = preview {
                self.last_preview = Some((p.attempt, p.step));
            }
            // Ids in the order sent: the status (if new), then the preview of its step.
            let first = new_status.then(|| self.event("status", &status.json));
            let preview = preview.map(|p| self.event("preview", &p.json));
            if new_status {
                self.done = status.is_final;
                self.last = Some(status.clone());
            }
            match (first, preview) {
                (Some(first), preview) => {
                    self.queued = preview;
                    return Some(first);
                }
                (None, Some(preview)) => return Some(preview),
                (None, None) => continue,
            }
        }
    }

    fn event(&mut self, kind: &str, data: &str) -> Event {
        self.sent += 1;
        Event::default()
            .event(kind)
            .id(self.sent.to_string())
            .data(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> SecretSlice<u8> {
        vec![byte; 32].into()
    }

    #[test]
    fn tokens_verify_only_unaltered_unexpired_and_with_the_right_secret() {
        let claims = Claims {
            rid: "a".repeat(32),
            pid: "alice".into(),
            exp: 1_000,
        };
        let token = sign(&secret(1), &claims);
        assert_eq!(verify(&secret(1), &token, 999), Some(claims));
        assert_eq!(verify(&secret(1), &token, 1_000), None, "expired");
        assert_eq!(verify(&secret(2), &token, 999), None, "another server's");
        // Another principal's claims under the same tag.
        let (_, tag) = token.split_once('.').expect("payload.tag");
        let forged = Claims {
            rid: "a".repeat(32),
            pid: "mallory".into(),
            exp: 1_000,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        assert_eq!(verify(&secret(1), &format!("{payload}.{tag}"), 999), None);
        assert_eq!(verify(&secret(1), "not a token", 0), None);
    }
}
