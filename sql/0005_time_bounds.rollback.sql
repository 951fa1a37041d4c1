-- Rolls back 0005_time_bounds: drops the range CHECKs and their functions. The rows it failed or clamped stay
-- as they are (their audit rows record it).
ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_run_at_in_range,
    DROP CONSTRAINT job_queue_lease_expires_at_in_range;
ALTER TABLE pgjobs.jobs
    DROP CONSTRAINT jobs_run_at_in_range,
    DROP CONSTRAINT jobs_created_at_in_range,
    DROP CONSTRAINT jobs_updated_at_in_range,
    DROP CONSTRAINT jobs_started_at_in_range,
    DROP CONSTRAINT jobs_finished_at_in_range,
    DROP CONSTRAINT jobs_lease_expires_at_in_range;
DROP FUNCTION pgjobs.job_times_text(pgjobs.jobs);
DROP FUNCTION pgjobs.job_times_out_of_range(pgjobs.jobs);
DROP FUNCTION pgjobs.clamp_time(timestamptz);
DROP FUNCTION pgjobs.time_in_range(timestamptz);
