-- Back to the job row holding every job's state: the live jobs' state moves from their
-- queue rows back into their job rows, pgjobs.job_rows becomes the table pgjobs.jobs again
-- with sql/0019's triggers.
DROP TRIGGER jobs_view_write ON pgjobs.jobs;
DROP FUNCTION pgjobs.jobs_view_write();
DROP FUNCTION pgjobs.job_times_out_of_range(pgjobs.jobs);
DROP FUNCTION pgjobs.job_times_text(pgjobs.jobs);
DROP VIEW pgjobs.jobs;

-- sql/0015's views (their job row lookups bind to the table, renamed below).
CREATE OR REPLACE VIEW pgjobs.running_jobs AS
SELECT q.job_id, q.company_id, q.job_type, j.attempts AS attempt, j.worker_id,
       w.hostname, w.pid, w.last_heartbeat_at,
       j.started_at,
       now() - j.started_at AS lease_age,
       q.lease_expires_at,
       q.lease_expires_at - now() AS lease_remaining,
       j.progress_fraction, j.progress_message
FROM pgjobs.job_queue q
CROSS JOIN LATERAL (
    SELECT j.attempts, j.worker_id, j.started_at, j.progress_fraction, j.progress_message
    FROM pgjobs.job_rows j WHERE j.id = q.job_id OFFSET 0
) j
LEFT JOIN pgjobs.workers w ON w.id = j.worker_id
WHERE q.lease_expires_at IS NOT NULL;

CREATE OR REPLACE VIEW pgjobs.stuck_jobs AS
SELECT q.job_id, q.company_id, q.job_type, 'running'::text AS status,
       'lease_expired'::text AS reason, q.lease_expires_at AS since,
       now() - q.lease_expires_at AS stuck_for, j.worker_id
FROM pgjobs.job_queue q
CROSS JOIN LATERAL (SELECT j.worker_id FROM pgjobs.job_rows j WHERE j.id = q.job_id OFFSET 0) j
WHERE q.lease_expires_at IS NOT NULL AND q.lease_expires_at < now()
UNION ALL
SELECT q.job_id, q.company_id, q.job_type, 'queued', 'no_live_worker',
       q.run_at, now() - q.run_at, NULL
FROM pgjobs.job_queue q
WHERE q.lease_expires_at IS NULL AND q.run_at <= now()
  AND NOT EXISTS (SELECT 1 FROM pgjobs.workers w
                  WHERE q.job_type = ANY (w.job_types)
                    AND pgjobs.worker_is_live(w.last_heartbeat_at));

DROP TRIGGER job_rows_inserted ON pgjobs.job_rows;
DROP TRIGGER job_rows_updated ON pgjobs.job_rows;
DROP TRIGGER job_rows_deleted ON pgjobs.job_rows;
DROP TRIGGER job_queue_updated ON pgjobs.job_queue;
DROP TRIGGER job_queue_guard ON pgjobs.job_queue;
DROP FUNCTION pgjobs.job_rows_inserted();
DROP FUNCTION pgjobs.job_rows_updated();
DROP FUNCTION pgjobs.job_rows_deleted();
DROP FUNCTION pgjobs.job_queue_updated();
DROP FUNCTION pgjobs.job_queue_guard();

UPDATE pgjobs.job_rows j
SET status = q.status, attempts = q.attempts, max_attempts = q.max_attempts,
    lease_token = q.lease_token, worker_id = q.worker_id, lease_expires_at = q.lease_expires_at,
    started_at = q.started_at, progress_fraction = q.progress_fraction,
    progress_message = q.progress_message, error_message = q.error_message,
    error_traceback = q.error_traceback, event_seq = q.event_seq, last_event = q.last_event,
    run_at = q.run_at, priority = q.priority, updated_at = q.updated_at, finished_at = NULL
FROM pgjobs.job_queue q WHERE q.job_id = j.id;

-- The queue row's CHECKs as sql/0020_merged_checks left them: its two times only.
ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_times_in_range,
    DROP CONSTRAINT job_queue_sizes_in_range,
    DROP CONSTRAINT job_queue_state_consistent,
    ADD CONSTRAINT job_queue_times_in_range CHECK (
        pgjobs.time_in_range(run_at) AND pgjobs.time_in_range(lease_expires_at)),
    DROP COLUMN status,
    DROP COLUMN attempts,
    DROP COLUMN max_attempts,
    DROP COLUMN lease_token,
    DROP COLUMN worker_id,
    DROP COLUMN started_at,
    DROP COLUMN progress_fraction,
    DROP COLUMN progress_message,
    DROP COLUMN error_message,
    DROP COLUMN error_traceback,
    DROP COLUMN event_seq,
    DROP COLUMN last_event,
    DROP COLUMN updated_at;

COMMENT ON CONSTRAINT job_queue_times_in_range ON pgjobs.job_queue IS
    'run_at and lease_expires_at within 1970-01-01 .. 9999-12-31 UTC where set, as on pgjobs.jobs';

ALTER TABLE pgjobs.job_rows RENAME TO jobs;
CREATE TRIGGER jobs_publish_insert AFTER INSERT ON pgjobs.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.publish_events();
CREATE TRIGGER jobs_publish_update AFTER UPDATE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.publish_events();
CREATE TRIGGER jobs_queue_insert AFTER INSERT ON pgjobs.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();
CREATE TRIGGER jobs_queue_update AFTER UPDATE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();
CREATE TRIGGER jobs_queue_delete AFTER DELETE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();
