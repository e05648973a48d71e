-- A running job's latest live preview (a small PNG of its x0 estimate), for the event streams
-- of every host following it; cleared when its run ends.
ALTER TABLE jobs ADD COLUMN preview_step BIGINT;
ALTER TABLE jobs ADD COLUMN preview_total BIGINT;
ALTER TABLE jobs ADD COLUMN preview_width BIGINT;
ALTER TABLE jobs ADD COLUMN preview_height BIGINT;
ALTER TABLE jobs ADD COLUMN preview_png BYTEA;
