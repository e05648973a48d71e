//! The SQL both job stores share: the row shapes, and every statement the two dialects can
//! run as one text. Placeholders are `$N`, which PostgreSQL takes and sqlx's SQLite driver binds
//! as the Nth argument too. What differs stays in each store: SQLite's `INSERT OR REPLACE`
//! against PostgreSQL's `ON CONFLICT`, row locks and advisory locks, `RETURNING` with leases,
//! notifications.

use super::{
    Counts, IDEMPOTENCY_WINDOW_MS, Job, JobPrincipal, JobRequest, JobState, NewJob, StoreError,
    StoredPreview, StoredProgress, Submitted, WebhookAttempt, WebhookDelivery,
};
use sqlx::{FromRow, Row};

/// The columns of a job row read by every query, in both databases' schemas (a macro, so that
/// the statements below are built at compile time).
macro_rules! job_columns {
    () => {
        "seq, id, principal, request, status, attempt, created_at, \
    started_at, finished_at, inference_seconds, pending_key, object_key, expires_at, \
    video_deleted_at, metadata, reason, progress_stage, progress_step, progress_total, \
    progress_eta, webhook_url"
    };
}

macro_rules! webhook_columns {
    () => {
        "id, job_id, url, payload, created_at, attempts, \
    next_attempt_at, delivered_at, gave_up_at, last_error"
    };
}

pub(crate) const JOB_COLUMNS: &str = job_columns!();
pub(crate) const WEBHOOK_COLUMNS: &str = webhook_columns!();

pub(super) const EARLIER_SUBMIT: &str = "SELECT job_id, request_hash FROM idempotency_keys WHERE principal_id = $1 AND key = $2 AND created_at > $3";
pub(super) const COUNT_QUEUED: &str = "SELECT count(*) FROM jobs WHERE status = 'queued'";
pub(super) const INSERT_JOB: &str = "INSERT INTO jobs (id, principal_id, principal, request, status, created_at, webhook_url, model) VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7)";
pub(super) const GET_JOB: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");
pub(super) const COUNT_AHEAD: &str =
    "SELECT count(*) FROM jobs WHERE status = 'queued' AND seq < $1";
pub(super) const COUNTS: &str =
    "SELECT status, count(*) AS n FROM jobs WHERE status IN ('queued', 'running') GROUP BY status";
pub(super) const COUNTS_OF: &str = "SELECT status, count(*) AS n FROM jobs WHERE principal_id = $1 AND status IN ('queued', 'running') GROUP BY status";
pub(super) const SET_PROGRESS: &str = "UPDATE jobs SET progress_stage = $1, progress_step = $2, progress_total = $3, progress_eta = $4 WHERE id = $5 AND attempt = $6";
/// Only while the attempt runs: a preview that lands after the run ended is not kept.
pub(super) const SET_PREVIEW: &str = "UPDATE jobs SET preview_step = $1, preview_total = $2, preview_width = $3, preview_height = $4, preview_png = $5 WHERE id = $6 AND attempt = $7 AND status = 'running'";
pub(super) const CLEAR_PREVIEW: &str = "UPDATE jobs SET preview_step = NULL, preview_total = NULL, preview_width = NULL, preview_height = NULL, preview_png = NULL WHERE id = $1 AND attempt = $2";
pub(super) const GET_PREVIEW: &str = "SELECT attempt, preview_step, preview_total, preview_width, preview_height, preview_png FROM jobs WHERE id = $1 AND status = 'running' AND preview_png IS NOT NULL";
pub(super) const SET_PENDING_KEY: &str =
    "UPDATE jobs SET pending_key = $1 WHERE id = $2 AND attempt = $3 AND status = 'running'";
pub(super) const EXPIRED_VIDEOS: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE status = 'succeeded' AND video_deleted_at IS NULL AND expires_at <= $1 AND (retention_checked_at IS NULL OR retention_checked_at <= $2) ORDER BY expires_at LIMIT $3"
);
pub(super) const PRUNE_IDEMPOTENCY_KEYS: &str =
    "DELETE FROM idempotency_keys WHERE created_at <= $1";
pub(super) const RECORD_WEBHOOK_ATTEMPT: &str = "UPDATE webhook_deliveries SET attempts = attempts + 1, payload = coalesce(payload, $1), next_attempt_at = $2, delivered_at = $3, gave_up_at = $4, last_error = coalesce($5, last_error) WHERE id = $6";
pub(super) const WEBHOOK_OF_JOB: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhook_deliveries WHERE job_id = $1"
);

/// A job row as the database has it (JSON as text), for either store.
#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    seq: i64,
    id: String,
    principal: String,
    request: String,
    status: String,
    attempt: i64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    inference_seconds: Option<f64>,
    pending_key: Option<String>,
    object_key: Option<String>,
    expires_at: Option<i64>,
    video_deleted_at: Option<i64>,
    metadata: Option<String>,
    reason: Option<String>,
    progress_stage: Option<String>,
    progress_step: Option<i64>,
    progress_total: Option<i64>,
    progress_eta: Option<f64>,
    webhook_url: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: row.id.clone(),
            reason,
        };
        let principal: JobPrincipal =
            serde_json::from_str(&row.principal).map_err(|e| corrupt(format!("principal: {e}")))?;
        let request: JobRequest =
            serde_json::from_str(&row.request).map_err(|e| corrupt(format!("request: {e}")))?;
        let state = JobState::parse(&row.status)
            .ok_or_else(|| corrupt(format!("status {:?}", row.status)))?;
        let metadata = match &row.metadata {
            None => Vec::new(),
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt(format!("metadata: {e}")))?
            }
        };
        let progress = match (row.progress_stage, row.progress_step, row.progress_total) {
            (Some(stage), Some(step), Some(total)) => Some(StoredProgress {
                stage,
                step: step.clamp(0, u32::MAX as i64) as u32,
                total: total.clamp(0, u32::MAX as i64) as u32,
                eta_seconds: row.progress_eta,
            }),
            _ => None,
        };
        Ok(Job {
            seq: row.seq,
            id: row.id,
            principal,
            request,
            state,
            attempt: row.attempt,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            inference_seconds: row.inference_seconds,
            pending_key: row.pending_key,
            object_key: row.object_key,
            expires_at: row.expires_at,
            video_deleted_at: row.video_deleted_at,
            metadata,
            reason: row.reason,
            progress,
            webhook_url: row.webhook_url,
        })
    }
}

/// A job from a row of either database.
pub(super) fn job_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<Job, StoreError>
where
    JobRow: sqlx::FromRow<'r, R>,
{
    JobRow::from_row(row)?.try_into()
}

/// A value stored as JSON text.
pub(super) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// The statements both stores run the same way, on either pool: the bounds sqlx needs to bind,
/// run and decode them are written once, here. (Statements whose row counts matter stay in each
/// store: sqlx has no generic `rows_affected`.)
pub(super) struct SharedSql<'p, DB: sqlx::Database>(pub &'p sqlx::Pool<DB>);

impl<DB: sqlx::Database> SharedSql<'_, DB>
where
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<f64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> i64: sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'r> JobRow: sqlx::FromRow<'r, <DB as sqlx::Database>::Row>,
    for<'r> WebhookDelivery: sqlx::FromRow<'r, <DB as sqlx::Database>::Row>,
    for<'r> i64: sqlx::Decode<'r, DB>,
    for<'r> &'r str: sqlx::Decode<'r, DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, <DB as sqlx::Database>::Row>,
    usize: sqlx::ColumnIndex<<DB as sqlx::Database>::Row>,
    for<'a> &'a str: sqlx::ColumnIndex<<DB as sqlx::Database>::Row>,
{
    /// In a submit's transaction, before anything is written: what an earlier submit with the
    /// same `Idempotency-Key` from the same caller (within the window) answers now, if any.
    pub async fn earlier_submit(
        conn: &mut <DB as sqlx::Database>::Connection,
        job: &NewJob,
        now: i64,
    ) -> Result<Option<Submitted>, StoreError> {
        let Some((key, hash)) = &job.idempotency else {
            return Ok(None);
        };
        let earlier = sqlx::query(EARLIER_SUBMIT)
            .bind(job.principal.id.as_str())
            .bind(key.as_str())
            .bind(now - IDEMPOTENCY_WINDOW_MS)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = earlier else {
            return Ok(None);
        };
        let earlier_hash: String = row.try_get("request_hash")?;
        Ok(Some(if &earlier_hash == hash {
            Submitted::Existing(row.try_get("job_id")?)
        } else {
            Submitted::KeyReused
        }))
    }

    /// In a submit's transaction: inserts the job as queued, unless `queue_limit` jobs are
    /// queued already (then `Some(QueueFull)`, nothing written).
    pub async fn insert_unless_full(
        conn: &mut <DB as sqlx::Database>::Connection,
        job: &NewJob,
        queue_limit: u64,
        now: i64,
    ) -> Result<Option<Submitted>, StoreError> {
        let queued: i64 = sqlx::query_scalar(COUNT_QUEUED)
            .fetch_one(&mut *conn)
            .await?;
        let queued = queued.max(0) as u64;
        if queued >= queue_limit {
            return Ok(Some(Submitted::QueueFull { queued }));
        }
        let (principal, request) = (to_json(&job.principal), to_json(&job.request));
        sqlx::query(INSERT_JOB)
            .bind(job.id.as_str())
            .bind(job.principal.id.as_str())
            .bind(principal.as_str())
            .bind(request.as_str())
            .bind(now)
            .bind(job.webhook_url.as_deref())
            .bind(job.request.model.as_str())
            .execute(&mut *conn)
            .await?;
        Ok(None)
    }

    /// Queued jobs ahead of the one at `seq`.
    pub async fn jobs_ahead(&self, seq: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(COUNT_AHEAD)
            .bind(seq)
            .fetch_one(self.0)
            .await?;
        Ok(n.max(0) as u64)
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = sqlx::query(COUNTS).fetch_all(self.0).await?;
        Counts::from_rows(&rows)
    }

    pub async fn counts_of(&self, principal_id: &str) -> Result<Counts, StoreError> {
        let rows = sqlx::query(COUNTS_OF)
            .bind(principal_id)
            .fetch_all(self.0)
            .await?;
        Counts::from_rows(&rows)
    }

    /// Any status: a cancelled job keeps the step it stopped at.
    pub async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        progress: &StoredProgress,
    ) -> Result<(), StoreError> {
        sqlx::query(SET_PROGRESS)
            .bind(progress.stage.as_str())
            .bind(progress.step as i64)
            .bind(progress.total as i64)
            .bind(progress.eta_seconds)
            .bind(id)
            .bind(attempt)
            .execute(self.0)
            .await?;
        Ok(())
    }

    pub async fn set_preview(
        &self,
        id: &str,
        attempt: i64,
        preview: &StoredPreview,
    ) -> Result<(), StoreError> {
        sqlx::query(SET_PREVIEW)
            .bind(i64::from(preview.step))
            .bind(i64::from(preview.total))
            .bind(i64::from(preview.width))
            .bind(i64::from(preview.height))
            .bind(preview.png.as_slice())
            .bind(id)
            .bind(attempt)
            .execute(self.0)
            .await?;
        Ok(())
    }

    pub async fn clear_preview(&self, id: &str, attempt: i64) -> Result<(), StoreError> {
        sqlx::query(CLEAR_PREVIEW)
            .bind(id)
            .bind(attempt)
            .execute(self.0)
            .await?;
        Ok(())
    }

    pub async fn preview(&self, id: &str) -> Result<Option<StoredPreview>, StoreError> {
        let Some(row) = sqlx::query(GET_PREVIEW)
            .bind(id)
            .fetch_optional(self.0)
            .await?
        else {
            return Ok(None);
        };
        let number = |column: &str| -> Result<u32, StoreError> {
            let v: i64 = row.try_get(column)?;
            u32::try_from(v).map_err(|_| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("{column} {v}"),
            })
        };
        Ok(Some(StoredPreview {
            attempt: row.try_get("attempt")?,
            step: number("preview_step")?,
            total: number("preview_total")?,
            width: number("preview_width")?,
            height: number("preview_height")?,
            png: row.try_get("preview_png")?,
        }))
    }

    /// Succeeded jobs whose videos are past `expires_at` and not checked since `kept_before_ms`.
    pub async fn expired_videos(
        &self,
        now_ms: i64,
        kept_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        sqlx::query(EXPIRED_VIDEOS)
            .bind(now_ms)
            .bind(kept_before_ms)
            .bind(limit as i64)
            .fetch_all(self.0)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
    }

    pub async fn record_webhook_attempt(
        &self,
        id: &str,
        payload: &str,
        attempt: &WebhookAttempt,
    ) -> Result<(), StoreError> {
        let (next_at, delivered_at, gave_up_at, error) = attempt.recorded();
        sqlx::query(RECORD_WEBHOOK_ATTEMPT)
            .bind(payload)
            .bind(next_at)
            .bind(delivered_at)
            .bind(gave_up_at)
            .bind(error)
            .bind(id)
            .execute(self.0)
            .await?;
        Ok(())
    }

    pub async fn webhook_delivery(
        &self,
        job_id: &str,
    ) -> Result<Option<WebhookDelivery>, StoreError> {
        Ok(sqlx::query(WEBHOOK_OF_JOB)
            .bind(job_id)
            .fetch_optional(self.0)
            .await?
            .as_ref()
            .map(WebhookDelivery::from_row)
            .transpose()?)
    }

    /// Sets one timestamp column of a job (`column` is one of the stores' own names, never input).
    pub async fn stamp(
        &self,
        id: &str,
        column: &'static str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!("UPDATE jobs SET {column} = $1 WHERE id = $2"))
            .bind(at_ms)
            .bind(id)
            .execute(self.0)
            .await?;
        Ok(())
    }
}
