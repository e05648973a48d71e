//! Jobs: what a request becomes once accepted, where jobs are kept ([`JobStore`]), and who runs
//! them ([`workers::Workers`]).
//!
//! A job moves `queued → running → succeeded | failed | cancelled`; `running → queued` when the
//! server stops (or died) while it ran, keeping its place in the queue. Every transition out of
//! `running` is fenced on the job's attempt number, so a worker that lost its job (cancelled,
//! re-queued) cannot overwrite what happened since.

pub mod eta;
pub mod postgres;
pub mod retention;
mod sql;
pub mod sqlite;
pub mod swap_history;
pub mod workers;

use crate::plugins::{GenerationRequest, Principal};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("job store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("job store: corrupt row for job {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("job store: cannot open {path}: {reason}")]
    Open { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The validated request as stored (the plugin's `generation-request`, serialisable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
    pub guidance_scale: f32,
    pub infer_steps: u32,
    pub seed: u32,
    /// Step caching: the host's field (the validate plugin does not see it); jobs stored before
    /// it existed read as `off`.
    #[serde(default)]
    pub cache: crate::pipeline::step_cache::CacheMode,
}

impl JobRequest {
    /// The pipeline's request for this job (`negative_prompt` empty means diffusers' default).
    pub fn generate_request(&self) -> crate::pipeline::GenerateRequest {
        crate::pipeline::GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width as usize,
            height: self.height as usize,
            num_frames: self.num_frames as usize,
            infer_steps: self.infer_steps as usize,
            guidance_scale: self.guidance_scale,
            seed: u64::from(self.seed),
            cache: self.cache,
        }
    }
}

impl From<&GenerationRequest> for JobRequest {
    fn from(r: &GenerationRequest) -> Self {
        Self {
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width: r.width,
            height: r.height,
            num_frames: r.num_frames,
            guidance_scale: r.guidance_scale,
            infer_steps: r.infer_steps,
            seed: r.seed,
            cache: Default::default(),
        }
    }
}

impl From<&JobRequest> for GenerationRequest {
    fn from(r: &JobRequest) -> Self {
        Self {
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width: r.width,
            height: r.height,
            num_frames: r.num_frames,
            guidance_scale: r.guidance_scale,
            infer_steps: r.infer_steps,
            seed: r.seed,
        }
    }
}

/// The caller as stored with the job (for the post-process plugin, which sees who asked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPrincipal {
    pub id: String,
    pub display_name: String,
    pub attributes: Vec<(String, String)>,
}

impl From<&Principal> for JobPrincipal {
    fn from(p: &Principal) -> Self {
        Self {
            id: p.id.clone(),
            display_name: p.display_name.clone(),
            attributes: p.attributes.clone(),
        }
    }
}

impl From<&JobPrincipal> for Principal {
    fn from(p: &JobPrincipal) -> Self {
        Self {
            id: p.id.clone(),
            display_name: p.display_name.clone(),
            attributes: p.attributes.clone(),
        }
    }
}

/// Where a job is in its run, as last recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredProgress {
    pub stage: String,
    pub step: u32,
    pub total: u32,
    /// The worker's estimate of the seconds left, when it had one.
    pub eta_seconds: Option<f64>,
}

/// A running job's latest live preview, as last recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPreview {
    /// The attempt that made it.
    pub attempt: i64,
    pub step: u32,
    pub total: u32,
    pub width: u32,
    pub height: u32,
    /// 8-bit RGB PNG.
    pub png: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Job {
    /// FIFO order of the queue.
    pub seq: i64,
    pub id: String,
    pub principal: JobPrincipal,
    pub request: JobRequest,
    pub state: JobState,
    pub attempt: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub inference_seconds: Option<f64>,
    pub pending_key: Option<String>,
    pub object_key: Option<String>,
    pub expires_at: Option<i64>,
    pub video_deleted_at: Option<i64>,
    pub metadata: Vec<(String, String)>,
    pub reason: Option<String>,
    pub progress: Option<StoredProgress>,
    /// Where the final state is POSTed (checked against the server's policy at submit).
    pub webhook_url: Option<String>,
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub principal: JobPrincipal,
    pub request: JobRequest,
    /// `Idempotency-Key` and the hash of the request it came with.
    pub idempotency: Option<(String, String)>,
    pub webhook_url: Option<String>,
}

/// The delivery of a job's final state to its webhook (one per job, created with that state).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WebhookDelivery {
    /// The `webhook-id` every attempt carries.
    pub id: String,
    pub job_id: String,
    pub url: String,
    /// The body, fixed by the first attempt.
    pub payload: Option<String>,
    pub created_at: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub gave_up_at: Option<i64>,
    pub last_error: Option<String>,
}

/// How an attempt to deliver a webhook ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookAttempt {
    Delivered {
        at: i64,
    },
    /// Failed; try again at `next_at`.
    Retry {
        at: i64,
        next_at: i64,
        error: String,
    },
    /// Failed, and the time for retries is spent.
    GaveUp {
        at: i64,
        error: String,
    },
}

impl WebhookAttempt {
    /// (next_attempt_at, delivered_at, gave_up_at, last_error) as a store records them.
    pub(crate) fn recorded(&self) -> (i64, Option<i64>, Option<i64>, Option<&str>) {
        match self {
            Self::Delivered { at } => (*at, Some(*at), None, None),
            Self::Retry { next_at, error, .. } => (*next_at, None, None, Some(error)),
            Self::GaveUp { at, error } => (*at, None, Some(*at), Some(error)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Created(String),
    /// The principal used this idempotency key for this job within the last 24 h.
    Existing(String),
    /// The idempotency key was used for a different request.
    KeyReused,
    /// `queued` jobs already at the limit.
    QueueFull {
        queued: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Was queued: it left the queue.
    Dequeued,
    /// Was running: marked cancelled; its worker stops at its next step.
    StopRequested,
    AlreadyCancelled,
    /// Succeeded or failed before the cancel came.
    AlreadyFinished(JobState),
    NotFound,
}

/// What a successful attempt leaves.
#[derive(Debug, Clone)]
pub struct Completion {
    pub object_key: String,
    pub expires_at: i64,
    pub inference_seconds: f64,
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: u64,
    pub running: u64,
}

impl Counts {
    /// From `(status, n)` rows of a `GROUP BY status` over queued and running jobs.
    fn from_rows<R: sqlx::Row>(rows: &[R]) -> Result<Self, StoreError>
    where
        for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> &'r str: sqlx::ColumnIndex<R>,
    {
        let mut counts = Counts::default();
        for row in rows {
            let n = row.try_get::<i64, _>("n")?.max(0) as u64;
            match row.try_get::<&str, _>("status")? {
                "queued" => counts.queued = n,
                _ => counts.running = n,
            }
        }
        Ok(counts)
    }
}

/// Idempotency keys are remembered this long.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Where jobs live. SQLite for one host; PostgreSQL (many hosts, one queue) comes through the
/// same trait. Every method is one atomic step of the store.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync {
    /// Inserts `job` unless its idempotency key names an earlier one, or the queue is full.
    async fn submit(&self, job: NewJob, queue_limit: u64) -> Result<Submitted, StoreError>;
    /// Shared: a status poll reads the same job many times, and copying it each time showed.
    async fn get(&self, id: &str) -> Result<Option<Arc<Job>>, StoreError>;
    /// Queued jobs ahead of the one with `seq`.
    async fn jobs_ahead(&self, seq: i64) -> Result<u64, StoreError>;
    async fn counts(&self) -> Result<Counts, StoreError>;
    /// One caller's queued and running jobs (what admission weighs).
    async fn counts_of(&self, principal_id: &str) -> Result<Counts, StoreError>;
    /// Cancels `id` if `principal_id` owns it and it has not ended.
    async fn cancel(&self, id: &str, principal_id: &str) -> Result<CancelOutcome, StoreError>;
    /// The oldest queued job (or, in a shared store, a running one whose host's lease ran
    /// out), now `running` with its attempt incremented and leased to this process. Its
    /// `pending_key` is the key an earlier attempt was publishing, if any, for the caller to
    /// delete before it runs the job again.
    ///
    /// `models` are the ones this process serves. A shared store hands out only their jobs:
    /// the fleet's hosts may serve different models, and a job of a model no host serves
    /// waits for one that does. A store only this process uses hands out any job, so that one
    /// of a model this host no longer serves fails with that reason instead of waiting for ever.
    async fn claim_next(&self, models: &[String]) -> Result<Option<Job>, StoreError>;
    /// Extends this process's leases on the jobs it runs (id, attempt) and returns those it
    /// no longer holds (cancelled elsewhere, or taken over after its lease ran out): their
    /// workers stop. A store only this process uses has no leases and returns none.
    async fn renew_leases(&self, _held: &[(String, i64)]) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Ids of jobs cancelled by another process, as they are cancelled (a shared store);
    /// `None` where every cancel happens in this process.
    fn cancellations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
    /// The secret `name` every process sharing this store must sign with; `fresh` is stored
    /// if there is none yet. `None` where this process owns the store alone (its data
    /// directory keeps its secrets).
    async fn shared_secret(
        &self,
        _name: &str,
        _fresh: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    /// A signal for each job queued by any process (a shared store); `None` where submit
    /// wakes the workers itself.
    fn queued(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
        None
    }
    async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        progress: &StoredProgress,
    ) -> Result<(), StoreError>;
    /// Keeps `preview` as the running attempt's latest (ignored once it no longer runs).
    async fn set_preview(
        &self,
        id: &str,
        attempt: i64,
        preview: &StoredPreview,
    ) -> Result<(), StoreError>;
    /// Forgets the attempt's preview (its run ended).
    async fn clear_preview(&self, id: &str, attempt: i64) -> Result<(), StoreError>;
    /// The latest preview of `id` while it runs.
    async fn preview(&self, id: &str) -> Result<Option<StoredPreview>, StoreError>;
    /// Records the key about to be published; false if the attempt no longer runs.
    async fn set_pending_key(&self, id: &str, attempt: i64, key: &str) -> Result<bool, StoreError>;
    /// `running → succeeded`; false if the attempt no longer runs (cancelled meanwhile).
    async fn complete(&self, id: &str, attempt: i64, done: &Completion)
    -> Result<bool, StoreError>;
    /// `running → failed`; false if the attempt no longer runs.
    async fn fail(&self, id: &str, attempt: i64, reason: &str) -> Result<bool, StoreError>;
    /// `running → queued` (shutdown), keeping the job's place; false if it no longer runs.
    async fn requeue(&self, id: &str, attempt: i64) -> Result<bool, StoreError>;
    /// At start-up: every `running` job (its process died) back to `queued`. Returns them as
    /// they were, so the caller can remove what their attempt may have left behind.
    async fn recover(&self) -> Result<Vec<Job>, StoreError>;
    /// Succeeded jobs whose video's time is up and that still have it, leaving out those the
    /// retention plugin chose to keep after `kept_before_ms`.
    async fn expired_videos(
        &self,
        now_ms: i64,
        kept_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError>;
    async fn mark_video_deleted(&self, id: &str, at_ms: i64) -> Result<(), StoreError>;
    /// The retention plugin kept the video at `at_ms` (asked again later).
    async fn mark_video_kept(&self, id: &str, at_ms: i64) -> Result<(), StoreError>;
    /// Forgets idempotency keys older than the window.
    async fn prune_idempotency_keys(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Up to `limit` webhook deliveries due at `now_ms`, leased until `lease_until_ms` (another
    /// claim skips them until then; a process that dies mid-send leaves them due again).
    async fn claim_due_webhooks(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, StoreError>;
    /// Records one attempt (and the payload it sent, kept for the next ones).
    async fn record_webhook_attempt(
        &self,
        id: &str,
        payload: &str,
        attempt: &WebhookAttempt,
    ) -> Result<(), StoreError>;
    /// The delivery of job `job_id`'s final state, once it has one.
    async fn webhook_delivery(&self, job_id: &str) -> Result<Option<WebhookDelivery>, StoreError>;
}
