-- Rolls back 0020_merged_checks: the 22 CHECKs of pgjobs.jobs and the 2 of
-- pgjobs.job_queue as 0001, 0004, 0005 and 0006 left them (same names, same definitions),
-- validated in one scan per table.

ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_times_in_range,
    ADD CONSTRAINT job_queue_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT job_queue_lease_expires_at_in_range
        CHECK (pgjobs.time_in_range(lease_expires_at));

ALTER TABLE pgjobs.jobs
    DROP CONSTRAINT jobs_times_in_range,
    DROP CONSTRAINT jobs_sizes_in_range,
    DROP CONSTRAINT jobs_state_consistent,
    ADD CONSTRAINT jobs_company_id_check CHECK (length(company_id) BETWEEN 1 AND 200),
    ADD CONSTRAINT jobs_job_type_check CHECK (length(job_type) BETWEEN 1 AND 200),
    ADD CONSTRAINT jobs_status_check
        CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    ADD CONSTRAINT jobs_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
    ADD CONSTRAINT jobs_progress_fraction_check CHECK (progress_fraction BETWEEN 0 AND 1),
    ADD CONSTRAINT jobs_progress_message_check CHECK (length(progress_message) <= 1000),
    ADD CONSTRAINT jobs_attempts_in_range CHECK (attempts BETWEEN 0 AND max_attempts),
    ADD CONSTRAINT jobs_queued_has_attempt_left
        CHECK (status <> 'queued' OR attempts < max_attempts),
    ADD CONSTRAINT jobs_finished_iff_terminal
        CHECK ((status IN ('done', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    ADD CONSTRAINT jobs_running_has_lease
        CHECK (status <> 'running'
               OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL AND started_at IS NOT NULL)),
    ADD CONSTRAINT jobs_lease_only_while_running
        CHECK (status = 'running' OR lease_expires_at IS NULL),
    ADD CONSTRAINT jobs_done_has_no_error CHECK (status <> 'done' OR error_message IS NULL),
    ADD CONSTRAINT jobs_failed_has_error CHECK (status <> 'failed' OR error_message IS NOT NULL),
    ADD CONSTRAINT jobs_last_event_known CHECK (last_event IN (
        'content_job.queued', 'content_job.running', 'content_job.progress',
        'content_job.retrying', 'content_job.done', 'content_job.failed',
        'content_job.cancelled')),
    ADD CONSTRAINT jobs_ended_has_its_event CHECK (
        (status = 'failed') = (last_event = 'content_job.failed')
        AND (status = 'cancelled') = (last_event = 'content_job.cancelled')),
    ADD CONSTRAINT jobs_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT jobs_created_at_in_range CHECK (pgjobs.time_in_range(created_at)),
    ADD CONSTRAINT jobs_updated_at_in_range CHECK (pgjobs.time_in_range(updated_at)),
    ADD CONSTRAINT jobs_started_at_in_range CHECK (pgjobs.time_in_range(started_at)),
    ADD CONSTRAINT jobs_finished_at_in_range CHECK (pgjobs.time_in_range(finished_at)),
    ADD CONSTRAINT jobs_lease_expires_at_in_range CHECK (pgjobs.time_in_range(lease_expires_at)),
    ADD CONSTRAINT jobs_traceback_bounded CHECK (octet_length(error_traceback) <= 16384);
