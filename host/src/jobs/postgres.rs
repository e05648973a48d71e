//! [`JobStore`] on PostgreSQL, shared by every `wanserve serve` of a fleet (`--queue
//! postgres://…`).
//!
//! - **Claims** take the oldest queued job with `FOR UPDATE SKIP LOCKED` (two workers never
//!   get the same one, and neither waits for the other) and lease it to this process until
//!   `now + lease`, `now` being the database's clock (hosts' clocks may disagree; a host whose
//!   clock ran ahead would otherwise take over every running job); the scheduler renews the leases of the jobs it runs. A running job whose
//!   lease has passed (its host died, or was cut off) is claimed again like a queued one, with
//!   the next attempt number.
//! - **Fencing**: every write of a running job names its attempt, so a worker that lost its
//!   lease can no longer record progress, a video key or a result; its renewal says so and it
//!   stops.
//! - **Cancel** of a running job sends `NOTIFY wanserve_cancel` with the id in the same
//!   transaction; every process listens and stops the job at once if it runs it (the lease
//!   renewal would also find it cancelled, a little later).
//! - **Submit** sends `NOTIFY wanserve_queued`: idle workers on every host claim at once
//!   instead of at their next poll.
//! - No cache: other processes write the same rows.

use super::sql::{self, JOB_COLUMNS, SharedSql, WEBHOOK_COLUMNS, job_from_row};
use super::swap_history::{PgSwapHistory, SWAPS_CHANNEL};
use super::{
    CancelOutcome, Completion, Counts, IDEMPOTENCY_WINDOW_MS, Job, JobState, JobStore, NewJob,
    StoreError, StoredPreview, StoredProgress, Submitted, WebhookAttempt, WebhookDelivery,
};
use crate::ids::now_ms;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{FromRow, PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const CANCEL_CHANNEL: &str = "wanserve_cancel";
/// A job was queued: idle workers on every host look at the queue now.
const QUEUED_CHANNEL: &str = "wanserve_queued";

/// The database's clock in milliseconds since the epoch: leases are written and compared on it,
/// so that a host whose clock runs ahead cannot see every other host's leases as expired.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

pub struct PgJobStore {
    pool: PgPool,
    /// This process, as recorded in the leases it holds.
    owner: String,
    lease: Duration,
    cancels: tokio::sync::broadcast::Sender<String>,
    queued: tokio::sync::broadcast::Sender<()>,
    /// A host changed a slot's plugin swap history.
    swap_changes: tokio::sync::broadcast::Sender<crate::plugins::Slot>,
}

impl PgJobStore {
    /// Connects, applies the migrations (sqlx serialises concurrent starts with an advisory
    /// lock) and starts listening for cancels.
    pub async fn open(url: &str, lease: Duration) -> Result<Arc<Self>, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen_all([CANCEL_CHANNEL, QUEUED_CHANNEL, SWAPS_CHANNEL])
            .await?;
        let cancels = tokio::sync::broadcast::channel(256).0;
        let queued = tokio::sync::broadcast::channel(16).0;
        let swap_changes = tokio::sync::broadcast::channel(16).0;
        let (forward_cancel, forward_queued, forward_swaps) =
            (cancels.clone(), queued.clone(), swap_changes.clone());
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(notification) if notification.channel() == QUEUED_CHANNEL => {
                        let _ = forward_queued.send(());
                    }
                    Ok(notification) if notification.channel() == SWAPS_CHANNEL => {
                        if let Some(slot) = crate::plugins::Slot::ALL
                            .into_iter()
                            .find(|slot| slot.to_string() == notification.payload())
                        {
                            let _ = forward_swaps.send(slot);
                        }
                    }
                    Ok(notification) => {
                        let _ = forward_cancel.send(notification.payload().to_string());
                    }
                    Err(e) => {
                        // recv reconnects on the next call; a cancel missed meanwhile is still
                        // found by the lease renewal, a plugin swap by the follower's poll.
                        tracing::warn!(error = %e, "lost the PostgreSQL cancel listener; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        let mut random = [0u8; 6];
        let _ = getrandom::fill(&mut random);
        let owner = format!("{}-{}", std::process::id(), hex::encode(random));
        tracing::info!(
            owner,
            lease_ms = lease.as_millis() as u64,
            "job queue on PostgreSQL"
        );
        Ok(Arc::new(Self {
            pool,
            owner,
            lease,
            cancels,
            queued,
            swap_changes,
        }))
    }

    /// The fleet's plugin swap history, in this database.
    pub fn swap_history(&self) -> PgSwapHistory {
        PgSwapHistory {
            pool: self.pool.clone(),
            changes: self.swap_changes.clone(),
        }
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    fn shared(&self) -> SharedSql<'_, sqlx::Postgres> {
        SharedSql(&self.pool)
    }

    async fn stamp(&self, id: &str, column: &'static str, at_ms: i64) -> Result<(), StoreError> {
        self.shared().stamp(id, column, at_ms).await
    }
}

#[async_trait::async_trait]
impl JobStore for PgJobStore {
    async fn submit(&self, job: NewJob, queue_limit: u64) -> Result<Submitted, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        if let Some((key, _)) = &job.idempotency {
            // Two hosts given the same key at once: the second waits for the first's commit
            // and then finds its job.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(1) || $2, 0))")
                .bind(&job.principal.id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(answer) =
            SharedSql::<sqlx::Postgres>::earlier_submit(&mut tx, &job, now).await?
        {
            return Ok(answer);
        }
        // Hosts that submit at the same moment may each see room for one more: the limit is a
        // bound on the order of the number of API hosts, not exact.
        if let Some(full) =
            SharedSql::<sqlx::Postgres>::insert_unless_full(&mut tx, &job, queue_limit, now).await?
        {
            return Ok(full);
        }
        if let Some((key, hash)) = &job.idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (principal_id, key, request_hash, job_id, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (principal_id, key) DO UPDATE
                 SET request_hash = EXCLUDED.request_hash, job_id = EXCLUDED.job_id,
                     created_at = EXCLUDED.created_at",
            )
            .bind(&job.principal.id)
            .bind(key)
            .bind(hash)
            .bind(&job.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        // Idle workers on every host wake when this commits (they also poll).
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(QUEUED_CHANNEL)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Submitted::Created(job.id))
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<Job>>, StoreError> {
        sqlx::query(sql::GET_JOB)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
            .map(|job| job.map(Arc::new))
    }

    async fn jobs_ahead(&self, seq: i64) -> Result<u64, StoreError> {
        self.shared().jobs_ahead(seq).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.shared().counts().await
    }

    async fn counts_of(&self, principal_id: &str) -> Result<Counts, StoreError> {
        self.shared().counts_of(principal_id).await
    }

    async fn cancel(&self, id: &str, principal_id: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row =
            sqlx::query("SELECT status FROM jobs WHERE id = $1 AND principal_id = $2 FOR UPDATE")
                .bind(id)
                .bind(principal_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let status: String = row.try_get("status")?;
        let outcome = match JobState::parse(&status) {
            Some(JobState::Queued) => CancelOutcome::Dequeued,
            Some(JobState::Running) => CancelOutcome::StopRequested,
            Some(JobState::Cancelled) => return Ok(CancelOutcome::AlreadyCancelled),
            Some(state) => return Ok(CancelOutcome::AlreadyFinished(state)),
            None => {
                return Err(StoreError::Corrupt {
                    id: id.into(),
                    reason: format!("status {status:?}"),
                });
            }
        };
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = $1,
                 reason = 'cancelled by the client', lease_owner = NULL, lease_until = NULL
             WHERE id = $2",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if outcome == CancelOutcome::StopRequested {
            // Delivered to every listener when (and only if) this commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn claim_next(&self, models: &[String]) -> Result<Option<Job>, StoreError> {
        let now = now_ms();
        let row = sqlx::query(&format!(
            "WITH next AS (
                 SELECT seq AS next_seq, pending_key AS stale_key FROM jobs
                 WHERE (status = 'queued' OR (status = 'running' AND lease_until < {DB_NOW_MS}))
                   AND model = ANY($4)
                 ORDER BY seq LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = $1,
                 progress_stage = NULL, progress_step = NULL, progress_total = NULL,
                 progress_eta = NULL, pending_key = NULL, lease_owner = $2,
                 lease_until = {DB_NOW_MS} + $3
             FROM next WHERE jobs.seq = next.next_seq
             RETURNING {JOB_COLUMNS}, stale_key"
        ))
        .bind(now)
        .bind(&self.owner)
        .bind(self.lease_ms())
        .bind(models)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut job = job_from_row(&row)?;
        job.pending_key = row.try_get("stale_key")?;
        if job.attempt > 1 {
            tracing::info!(request_id = %job.id, attempt = job.attempt, "claimed a job again (its last attempt stopped or its host's lease ran out)");
        }
        Ok(Some(job))
    }

    async fn renew_leases(&self, held: &[(String, i64)]) -> Result<Vec<String>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
        let rows = sqlx::query(&format!(
            "UPDATE jobs SET lease_until = {DB_NOW_MS} + $1
             WHERE id = ANY($2) AND lease_owner = $3 AND status = 'running'
             RETURNING id, attempt"
        ))
        .bind(self.lease_ms())
        .bind(&ids)
        .bind(&self.owner)
        .fetch_all(&self.pool)
        .await?;
        let renewed: HashMap<String, i64> = rows
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("attempt")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(held
            .iter()
            .filter(|(id, attempt)| renewed.get(id) != Some(attempt))
            .map(|(id, _)| id.clone())
            .collect())
    }

    fn cancellations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.cancels.subscribe())
    }

    fn queued(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
        Some(self.queued.subscribe())
    }

    async fn shared_secret(&self, name: &str, fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // Two hosts starting at once: one insert wins, both read the winner.
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(value))
    }

    async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        progress: &StoredProgress,
    ) -> Result<(), StoreError> {
        self.shared().set_progress(id, attempt, progress).await
    }

    async fn set_preview(
        &self,
        id: &str,
        attempt: i64,
        preview: &StoredPreview,
    ) -> Result<(), StoreError> {
        self.shared().set_preview(id, attempt, preview).await
    }

    async fn clear_preview(&self, id: &str, attempt: i64) -> Result<(), StoreError> {
        self.shared().clear_preview(id, attempt).await
    }

    async fn preview(&self, id: &str) -> Result<Option<StoredPreview>, StoreError> {
        self.shared().preview(id).await
    }

    async fn set_pending_key(&self, id: &str, attempt: i64, key: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(sql::SET_PENDING_KEY)
            .bind(key)
            .bind(id)
            .bind(attempt)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn complete(
        &self,
        id: &str,
        attempt: i64,
        done: &Completion,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', finished_at = $1, inference_seconds = $2,
                 object_key = $3, pending_key = NULL, expires_at = $4, metadata = $5,
                 reason = NULL, lease_owner = NULL, lease_until = NULL
             WHERE id = $6 AND attempt = $7 AND status = 'running'",
        )
        .bind(now_ms())
        .bind(done.inference_seconds)
        .bind(&done.object_key)
        .bind(done.expires_at)
        .bind(sql::to_json(&done.metadata))
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn fail(&self, id: &str, attempt: i64, reason: &str) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_at = $1, reason = $2, pending_key = NULL,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = $3 AND attempt = $4 AND status = 'running'",
        )
        .bind(now_ms())
        .bind(reason)
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn requeue(&self, id: &str, attempt: i64) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'queued', started_at = NULL, progress_stage = NULL,
                 progress_step = NULL, progress_total = NULL, progress_eta = NULL,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = $1 AND attempt = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Nothing to do at start: running jobs belong to their hosts' leases (this process's
    /// predecessor's too; they are claimed again when those run out).
    async fn recover(&self) -> Result<Vec<Job>, StoreError> {
        Ok(Vec::new())
    }

    async fn expired_videos(
        &self,
        now_ms: i64,
        kept_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        self.shared()
            .expired_videos(now_ms, kept_before_ms, limit)
            .await
    }

    async fn mark_video_deleted(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.stamp(id, "video_deleted_at", at_ms).await
    }

    async fn mark_video_kept(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.stamp(id, "retention_checked_at", at_ms).await
    }

    async fn prune_idempotency_keys(&self, now_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(sql::PRUNE_IDEMPOTENCY_KEYS)
            .bind(now_ms - IDEMPOTENCY_WINDOW_MS)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn claim_due_webhooks(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET next_attempt_at = $1
             WHERE id IN (SELECT id FROM webhook_deliveries
                          WHERE delivered_at IS NULL AND gave_up_at IS NULL
                            AND next_attempt_at <= $2
                          ORDER BY next_attempt_at LIMIT $3
                          FOR UPDATE SKIP LOCKED)
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(WebhookDelivery::from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        payload: &str,
        attempt: &WebhookAttempt,
    ) -> Result<(), StoreError> {
        self.shared()
            .record_webhook_attempt(id, payload, attempt)
            .await
    }

    async fn webhook_delivery(&self, job_id: &str) -> Result<Option<WebhookDelivery>, StoreError> {
        self.shared().webhook_delivery(job_id).await
    }
}
