-- The job queue and its history. One row per accepted request; `seq` is the FIFO order and
-- never changes, so a job put back in the queue (restart, shutdown) keeps its place.
CREATE TABLE jobs (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT    NOT NULL UNIQUE,
    principal_id       TEXT    NOT NULL,
    -- The caller as the auth plugin described it (display name, attributes), JSON.
    principal          TEXT    NOT NULL,
    -- The validated generation request, JSON.
    request            TEXT    NOT NULL,
    -- queued | running | succeeded | failed | cancelled
    status             TEXT    NOT NULL,
    -- Incremented each time a worker claims the job; completion is fenced on it.
    attempt            INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    finished_at        INTEGER,
    inference_seconds  REAL,
    -- The object the current attempt is about to publish (deleted on recovery if it differs).
    pending_key        TEXT,
    object_key         TEXT,
    expires_at         INTEGER,
    video_deleted_at   INTEGER,
    metadata           TEXT,
    reason             TEXT,
    progress_stage     TEXT,
    progress_step      INTEGER,
    progress_total     INTEGER
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_expiry ON jobs (expires_at) WHERE status = 'succeeded' AND video_deleted_at IS NULL;

-- Idempotency-Key: the same key from the same principal within 24 h names the same job.
CREATE TABLE idempotency_keys (
    principal_id  TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    request_hash  TEXT    NOT NULL,
    job_id        TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (principal_id, key)
);
