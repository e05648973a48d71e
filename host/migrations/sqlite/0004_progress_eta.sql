-- The worker's estimate of the seconds left, stored with each step so that any process reading
-- the job (not only the one running it) can report it.
ALTER TABLE jobs ADD COLUMN progress_eta REAL;
