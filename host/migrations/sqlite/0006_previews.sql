-- A running job's latest live preview (a small PNG of its x0 estimate), for the event streams
-- of any process following it; cleared when its run ends.
ALTER TABLE jobs ADD COLUMN preview_step INTEGER;
ALTER TABLE jobs ADD COLUMN preview_total INTEGER;
ALTER TABLE jobs ADD COLUMN preview_width INTEGER;
ALTER TABLE jobs ADD COLUMN preview_height INTEGER;
ALTER TABLE jobs ADD COLUMN preview_png BLOB;
