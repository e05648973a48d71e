-- The model each job asked for, in a column of its own: a worker claims only the jobs of the
-- models it serves (fleet hosts may serve different ones). Older rows get it from their request.
ALTER TABLE jobs ADD COLUMN model TEXT;
UPDATE jobs SET model = (request::jsonb) ->> 'model';
CREATE INDEX jobs_queued_by_model ON jobs (model, seq) WHERE status = 'queued';
