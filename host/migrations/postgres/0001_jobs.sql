-- The job queue shared by every `wanserve serve` of a fleet (`--queue postgres://…`): the same
-- columns as the SQLite schema, plus the lease of the host running a job.
CREATE TABLE jobs (
    seq                BIGSERIAL PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,
    principal_id       TEXT    NOT NULL,
    principal          TEXT    NOT NULL,
    request            TEXT    NOT NULL,
    -- queued | running | succeeded | failed | cancelled
    status             TEXT    NOT NULL,
    -- Incremented by each claim; every write of a running job is fenced on it.
    attempt            BIGINT  NOT NULL DEFAULT 0,
    created_at         BIGINT  NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT,
    inference_seconds  DOUBLE PRECISION,
    pending_key        TEXT,
    object_key         TEXT,
    expires_at         BIGINT,
    video_deleted_at   BIGINT,
    metadata           TEXT,
    reason             TEXT,
    progress_stage     TEXT,
    progress_step      BIGINT,
    progress_total     BIGINT,
    progress_eta       DOUBLE PRECISION,
    retention_checked_at BIGINT,
    webhook_url        TEXT,
    -- The process running the job, and until when (Unix ms) it holds it. A running job whose
    -- lease has passed is claimed again by another worker (its host died or was cut off).
    lease_owner        TEXT,
    lease_until        BIGINT
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_expiry ON jobs (expires_at) WHERE status = 'succeeded' AND video_deleted_at IS NULL;

CREATE TABLE idempotency_keys (
    principal_id  TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    request_hash  TEXT    NOT NULL,
    job_id        TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL,
    PRIMARY KEY (principal_id, key)
);

CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY,
    job_id           TEXT    NOT NULL UNIQUE REFERENCES jobs (id),
    url              TEXT    NOT NULL,
    payload          TEXT,
    created_at       BIGINT  NOT NULL,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT  NOT NULL,
    delivered_at     BIGINT,
    gave_up_at       BIGINT,
    last_error       TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- As in SQLite: the delivery is created by the update that makes the job final.
CREATE FUNCTION jobs_final_webhook() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, job_id, url, created_at, next_attempt_at)
    VALUES ('msg_' || replace(gen_random_uuid()::text, '-', ''), NEW.id,
            NEW.webhook_url, coalesce(NEW.finished_at, 0), coalesce(NEW.finished_at, 0));
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_final_webhook AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN (NEW.webhook_url IS NOT NULL
      AND NEW.status IN ('succeeded', 'failed', 'cancelled')
      AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled'))
EXECUTE FUNCTION jobs_final_webhook();
