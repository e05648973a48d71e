-- Admission counts one caller's queued and running jobs on every submit.
CREATE INDEX jobs_active_by_principal ON jobs (principal_id, status) WHERE status IN ('queued', 'running');
