//! The HTTP API's bodies as they travel: what the server writes and the client (and the OpenAPI
//! document) reads. Plain data with no server or client logic, so that both sides import this
//! module and neither imports the other.

use serde::{Deserialize, Serialize};

/// The seed's model name: what a server serves when it is given one model directory (or none).
pub const DEFAULT_MODEL: &str = "Wan2.1-T2V-1.3B";
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The submit body (as checked by the default validate plugin, `validate-seed`; an operator's
/// plugin may accept other values, within the server's own limits).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documentation of the body: the validate plugin reads it, not serde
pub struct SubmitBody {
    /// One of the names `GET /models` lists (a server given one model directory serves only
    /// `Wan2.1-T2V-1.3B`, the seed's).
    #[schema(example = "Wan2.1-T2V-1.3B", min_length = 1, max_length = 64)]
    model: String,
    /// 10–500 characters.
    #[schema(
        min_length = 10,
        max_length = 500,
        example = "A beautiful sunset over the mountains"
    )]
    prompt: String,
    /// What the video should not show; up to 500 characters.
    #[schema(max_length = 500)]
    negative_prompt: Option<String>,
    /// WIDTHxHEIGHT: `832x480` (landscape) or `480x832` (portrait).
    #[schema(example = "832x480", pattern = "^(480x832|832x480)$")]
    image_size: String,
    /// 24–120 (the model makes the next 4k+1 and the video has exactly this many).
    #[schema(minimum = 24, maximum = 120, example = 81)]
    num_frames: u32,
    #[schema(minimum = 1.0, maximum = 20.0, example = 5.0)]
    guidance_scale: f32,
    #[schema(minimum = 20, maximum = 100, example = 50)]
    infer_steps: u32,
    /// 0–2147483647; drawn at random when absent (and reported by status).
    #[schema(minimum = 0, maximum = 2147483647)]
    seed: Option<u32>,
    /// An http(s) URL the final status is POSTed to (signed; see the README). Checked by the
    /// server, not the validate plugin: internal addresses are refused unless the operator
    /// allowed them.
    #[schema(max_length = 2048, example = "https://example.com/hooks/video")]
    webhook: Option<String>,
    /// Step caching (MagCache): `fast` and `faster` skip the transformer's blocks on the steps
    /// the model's magnitude ratios allow (MagCache's published Wan2.1-1.3B settings E0.12 K2
    /// R0.2 and E0.12 K4 R0.2); `off` runs every step in full. Default: the server's
    /// `--cache-default` (off unless the operator chose otherwise). Checked by the server.
    #[schema(value_type = Option<String>, example = "fast", pattern = "^(off|fast|faster)$")]
    cache: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitResponse {
    /// 32 characters, `[a-z0-9]`.
    #[schema(example = "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6")]
    pub request_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    #[schema(example = "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6")]
    pub request_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Video {
    /// Opens without an API key until the video expires (signed).
    pub url: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Seconds from the start of generation to the stored video; null until it succeeds.
    pub inference: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Results {
    /// One video once `Succeed`, none before or after it expired.
    pub videos: Vec<Video>,
    pub timings: Timings,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    /// `encoding_text`, `denoising` or `decoding`.
    pub stage: String,
    /// Steps (or decoded chunks) done.
    pub step: u32,
    pub total: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum StatusName {
    InQueue,
    InProgress,
    Succeed,
    Failed,
    Cancelled,
}

impl StatusName {
    /// `Succeed`, `Failed` or `Cancelled`: the job will not change state again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeed | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    pub request_id: String,
    pub status: StatusName,
    pub results: Results,
    pub seed: u32,
    /// While `InQueue`: 1 = next to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// While `InProgress` (and, for a cancelled job, where it stopped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    /// While `InProgress`: estimated seconds until the video is ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Why a job `Failed` or was `Cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When a `Succeed` job's video is (or was) deleted, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// True once the video's retention has passed: the job stays `Succeed`, `videos` is empty.
    pub expired: bool,
    /// When the job was accepted, Unix milliseconds.
    pub created_at: i64,
    /// When its current (or last) run started, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When it reached its final state, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// What the post-process plugin attached to a `Succeed` job's video, and `cache` (the
    /// step-cache mode) when the job ran with one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The job's step caching: its mode and, when on, which steps skip the transformer's
    /// blocks (decided from the model's ratios alone, so known from submit on).
    pub cache: CacheView,
    /// The delivery of the final status to the job's webhook, once the job has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheView {
    /// `off`, `fast` or `faster`.
    #[schema(example = "fast")]
    pub mode: String,
    /// Steps (0-based) on which every guidance branch skips the blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_steps: Vec<u32>,
    /// DiT passes (one per branch per step) that skip the blocks, and all of them.
    pub skipped_passes: u32,
    pub passes: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    /// The `webhook-id` header of every attempt (receivers deduplicate on it).
    pub id: String,
    /// `pending` (being tried), `delivered`, or `failed` (retries spent).
    pub state: String,
    pub attempts: i64,
    /// Why the last failed attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    /// `Succeed`: the job is cancelled (a queued job left the queue; a running one stops
    /// before its next step).
    #[schema(example = "Succeed")]
    pub status: &'static str,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct FieldProblem {
    /// The request field, e.g. `num_frames`.
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `not_found`, `invalid_request`,
    /// `malformed_json`, `payload_too_large`, `request_timeout`, `queue_full`, `caller_busy`,
    /// `conflict`, `plugin_unavailable`, `overloaded`, `forbidden`, `not_ready`, `internal`.
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<FieldProblem>,
}
