-- When the retention plugin last chose to keep an expired video: the sweeper asks again only
-- after a while, so kept videos do not crowd out the ones due now.
ALTER TABLE jobs ADD COLUMN retention_checked_at INTEGER;
