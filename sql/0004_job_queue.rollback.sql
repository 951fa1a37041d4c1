-- Back to 0003: the claim and rescue read pgjobs.jobs through its partial indexes again.
DROP TRIGGER jobs_queue_delete ON pgjobs.jobs;
DROP TRIGGER jobs_queue_update ON pgjobs.jobs;
DROP TRIGGER jobs_queue_insert ON pgjobs.jobs;
DROP TRIGGER jobs_id_fixed ON pgjobs.jobs;
DROP FUNCTION pgjobs.forbid_job_id_change();
DROP FUNCTION pgjobs.sync_job_queue();
ALTER TABLE pgjobs.jobs RESET (fillfactor);
ALTER TABLE pgjobs.jobs DROP CONSTRAINT jobs_ended_has_its_event;
DROP INDEX pgjobs.job_events_ended_idx;
CREATE INDEX jobs_claim_idx ON pgjobs.jobs (priority DESC, run_at, id) WHERE status = 'queued';
CREATE INDEX jobs_lease_idx ON pgjobs.jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_company_status_idx ON pgjobs.jobs (company_id, status);
DROP TABLE pgjobs.job_queue;
