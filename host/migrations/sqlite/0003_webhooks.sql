-- Webhooks: the URL a job's final state is POSTed to, and one delivery row per final state.
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;

-- `id` is the stable `webhook-id` every attempt carries; `payload` is fixed at the first attempt
-- so that retries send the same bytes; `next_attempt_at` is also the lease of the attempt in
-- flight (pushed past its timeout when claimed: a host that dies mid-send leaves it due again).
CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY,
    job_id           TEXT    NOT NULL UNIQUE REFERENCES jobs (id),
    url              TEXT    NOT NULL,
    payload          TEXT,
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    delivered_at     INTEGER,
    gave_up_at       INTEGER,
    last_error       TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- The delivery is created by the same statement that makes the job final (complete, fail,
-- cancel), so no final state of a job with a webhook can be committed without one.
CREATE TRIGGER jobs_final_webhook AFTER UPDATE OF status ON jobs
WHEN NEW.webhook_url IS NOT NULL
 AND NEW.status IN ('succeeded', 'failed', 'cancelled')
 AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
BEGIN
    INSERT INTO webhook_deliveries (id, job_id, url, created_at, next_attempt_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), NEW.id, NEW.webhook_url,
            coalesce(NEW.finished_at, 0), coalesce(NEW.finished_at, 0));
END;
