//! [`JobStore`] on SQLite (sqlx, WAL): one writer connection, so every write transaction runs
//! alone and never meets `SQLITE_BUSY`; a pool of read-only connections for status lookups,
//! which WAL lets run beside the writer.

use super::sql::{self, JOB_COLUMNS, SharedSql, WEBHOOK_COLUMNS, job_from_row};
use super::{
    CancelOutcome, Completion, Counts, IDEMPOTENCY_WINDOW_MS, Job, JobState, JobStore, NewJob,
    StoreError, StoredPreview, StoredProgress, Submitted, WebhookAttempt, WebhookDelivery,
};
use crate::ids::now_ms;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, Row, SqlitePool, sqlite::SqliteRow};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct SqliteJobStore {
    writer: SqlitePool,
    reader: SqlitePool,
    cache: JobCache,
    /// Held while the store is open: a second process on the same database would requeue the
    /// first one's running jobs as left over from a crash, and the cache above assumes one
    /// writer. The kernel releases it when the process ends, however it ends.
    _exclusive: std::fs::File,
}

/// Jobs as last read, so that polling status does not cost a database round trip (each one is
/// two hand-offs to sqlx's connection thread). Exact because this store is the database's only
/// writer: every write invalidates the job it touched, after it commits. A reader that raced a
/// write (the generation moved while it read) does not fill the cache.
#[derive(Default)]
struct JobCache {
    generation: AtomicU64,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// Entries kept before the cache starts over (a few MB at most).
const CACHE_CAPACITY: usize = 10_000;

impl JobCache {
    fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().get(id).cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn fill(&self, job: &Arc<Job>, read_at_generation: u64) {
        let mut jobs = self.lock();
        if self.generation() == read_at_generation {
            if jobs.len() >= CACHE_CAPACITY {
                jobs.clear();
            }
            jobs.insert(job.id.clone(), Arc::clone(job));
        }
    }

    fn invalidate(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock().remove(id);
    }

    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SqliteJobStore {
    /// Opens (creating if needed) the database at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let exclusive = lock_exclusively(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a committed transaction survives a process crash (kill -9); only an
            // OS crash can lose the last ones.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // A local file cannot drop a connection: no ping before each use (it doubled the
        // round trips to sqlx's connection threads on every status request).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            cache: JobCache::default(),
            _exclusive: exclusive,
        })
    }
}

impl SqliteJobStore {
    /// Sets one of the job's timestamp columns (a fixed name, never client input).
    fn shared_reader(&self) -> SharedSql<'_, sqlx::Sqlite> {
        SharedSql(&self.reader)
    }

    fn shared_writer(&self) -> SharedSql<'_, sqlx::Sqlite> {
        SharedSql(&self.writer)
    }

    async fn stamp(&self, id: &str, column: &'static str, at_ms: i64) -> Result<(), StoreError> {
        self.shared_writer().stamp(id, column, at_ms).await?;
        self.cache.invalidate(id);
        Ok(())
    }
}

/// Takes `<database>.lock` for this process, and writes its pid there for the error another
/// process gets.
fn lock_exclusively(database: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = database.with_extension("db.lock");
    let failed = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| failed(e.to_string()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another wanserve process".to_string()
            } else {
                format!("another wanserve process (pid {holder})")
            };
            return Err(failed(format!(
                "{who} is serving from this data directory; stop it, or give this one its own \
                 --data-dir (hosts that share jobs share a --queue, not a directory)"
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(failed(format!("cannot lock: {e}"))),
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()));
    written.map_err(|e| failed(e.to_string()))?;
    Ok(file)
}

fn delivery_from_row(row: &SqliteRow) -> Result<WebhookDelivery, StoreError> {
    Ok(WebhookDelivery::from_row(row)?)
}

#[async_trait::async_trait]
impl JobStore for SqliteJobStore {
    async fn submit(&self, job: NewJob, queue_limit: u64) -> Result<Submitted, StoreError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        if let Some(answer) = SharedSql::<sqlx::Sqlite>::earlier_submit(&mut tx, &job, now).await? {
            return Ok(answer);
        }
        if let Some(full) =
            SharedSql::<sqlx::Sqlite>::insert_unless_full(&mut tx, &job, queue_limit, now).await?
        {
            return Ok(full);
        }
        if let Some((key, hash)) = &job.idempotency {
            // An expired entry for the same key is replaced.
            sqlx::query(
                "INSERT OR REPLACE INTO idempotency_keys (principal_id, key, request_hash, job_id, created_at)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&job.principal.id)
            .bind(key)
            .bind(hash)
            .bind(&job.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Submitted::Created(job.id))
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<Job>>, StoreError> {
        if let Some(job) = self.cache.get(id) {
            return Ok(Some(job));
        }
        let generation = self.cache.generation();
        let job = sqlx::query(sql::GET_JOB)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()?
            .map(Arc::new);
        if let Some(job) = &job {
            self.cache.fill(job, generation);
        }
        Ok(job)
    }

    async fn jobs_ahead(&self, seq: i64) -> Result<u64, StoreError> {
        self.shared_reader().jobs_ahead(seq).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.shared_reader().counts().await
    }

    async fn counts_of(&self, principal_id: &str) -> Result<Counts, StoreError> {
        self.shared_reader().counts_of(principal_id).await
    }

    async fn cancel(&self, id: &str, principal_id: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT status FROM jobs WHERE id = ? AND principal_id = ?")
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
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, reason = 'cancelled by the client'
             WHERE id = ?",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.cache.invalidate(id);
        Ok(outcome)
    }

    /// Any model's job (see the trait): this host is the only one that can run it.
    async fn claim_next(&self, _models: &[String]) -> Result<Option<Job>, StoreError> {
        let job = sqlx::query(&format!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = ?,
                 progress_stage = NULL, progress_step = NULL, progress_total = NULL, progress_eta = NULL
             WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(now_ms())
        .fetch_optional(&self.writer)
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()?;
        if let Some(job) = &job {
            self.cache.invalidate(&job.id);
        }
        Ok(job)
    }

    async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        progress: &StoredProgress,
    ) -> Result<(), StoreError> {
        self.shared_writer()
            .set_progress(id, attempt, progress)
            .await?;
        self.cache.invalidate(id);
        Ok(())
    }

    async fn set_preview(
        &self,
        id: &str,
        attempt: i64,
        preview: &StoredPreview,
    ) -> Result<(), StoreError> {
        self.shared_writer().set_preview(id, attempt, preview).await
    }

    async fn clear_preview(&self, id: &str, attempt: i64) -> Result<(), StoreError> {
        self.shared_writer().clear_preview(id, attempt).await
    }

    async fn preview(&self, id: &str) -> Result<Option<StoredPreview>, StoreError> {
        self.shared_reader().preview(id).await
    }

    async fn set_pending_key(&self, id: &str, attempt: i64, key: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(sql::SET_PENDING_KEY)
            .bind(key)
            .bind(id)
            .bind(attempt)
            .execute(&self.writer)
            .await?;
        self.cache.invalidate(id);
        Ok(done.rows_affected() == 1)
    }

    async fn complete(
        &self,
        id: &str,
        attempt: i64,
        done: &Completion,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?, inference_seconds = ?,
                 object_key = ?, pending_key = NULL, expires_at = ?, metadata = ?, reason = NULL
             WHERE id = ? AND attempt = ? AND status = 'running'",
        )
        .bind(now_ms())
        .bind(done.inference_seconds)
        .bind(&done.object_key)
        .bind(done.expires_at)
        .bind(sql::to_json(&done.metadata))
        .bind(id)
        .bind(attempt)
        .execute(&self.writer)
        .await?;
        self.cache.invalidate(id);
        Ok(updated.rows_affected() == 1)
    }

    async fn fail(&self, id: &str, attempt: i64, reason: &str) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_at = ?, reason = ?, pending_key = NULL
             WHERE id = ? AND attempt = ? AND status = 'running'",
        )
        .bind(now_ms())
        .bind(reason)
        .bind(id)
        .bind(attempt)
        .execute(&self.writer)
        .await?;
        self.cache.invalidate(id);
        Ok(updated.rows_affected() == 1)
    }

    async fn requeue(&self, id: &str, attempt: i64) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'queued', started_at = NULL,
                 progress_stage = NULL, progress_step = NULL, progress_total = NULL, progress_eta = NULL
             WHERE id = ? AND attempt = ? AND status = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(&self.writer)
        .await?;
        self.cache.invalidate(id);
        Ok(updated.rows_affected() == 1)
    }

    async fn recover(&self) -> Result<Vec<Job>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'running' ORDER BY seq"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "UPDATE jobs SET status = 'queued', started_at = NULL, pending_key = NULL,
                 progress_stage = NULL, progress_step = NULL, progress_total = NULL, progress_eta = NULL
             WHERE status = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.cache.clear();
        Ok(jobs)
    }

    async fn expired_videos(
        &self,
        now_ms: i64,
        kept_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        self.shared_reader()
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
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn claim_due_webhooks(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        sqlx::query(&format!(
            "UPDATE webhook_deliveries SET next_attempt_at = ?
             WHERE id IN (SELECT id FROM webhook_deliveries
                          WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ?
                          ORDER BY next_attempt_at LIMIT ?)
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.writer)
        .await?
        .iter()
        .map(delivery_from_row)
        .collect()
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        payload: &str,
        attempt: &WebhookAttempt,
    ) -> Result<(), StoreError> {
        self.shared_writer()
            .record_webhook_attempt(id, payload, attempt)
            .await
    }

    async fn webhook_delivery(&self, job_id: &str) -> Result<Option<WebhookDelivery>, StoreError> {
        self.shared_reader().webhook_delivery(job_id).await
    }
}
