-- The model each job asked for, in a column of its own (the statements both stores share write
-- it; the PostgreSQL store claims by it). Older rows get it from their request.
ALTER TABLE jobs ADD COLUMN model TEXT;
UPDATE jobs SET model = json_extract(request, '$.model');
