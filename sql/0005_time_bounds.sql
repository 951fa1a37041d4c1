-- depends: 0004_job_queue
-- Times Python can read (issue 19).
--
-- PostgreSQL stores timestamps from 4713 BC to 294276 AD; Python's datetime, and so
-- psycopg, only years 1 to 9999. A job whose run_at lay outside that (a caller's
-- '0001-01-01T00:00:00+00:01' became 0001-12-31 23:59 BC) made every worker that
-- claimed it die decoding the claim, and every read of it answer 500. pgjobs.jobspec now
-- refuses such times before any SQL runs; these CHECKs refuse them for every other
-- writer too (psql, an older client), on every timestamp column of a job, since any of
-- them that Python cannot read breaks the same reads. The range is
-- pgjobs.jobspec.TIME_MIN .. TIME_MAX (a test checks that the two agree): 1970 to a day
-- short of year 10000, so that the value stays below year 10000 in any session time zone.
--
-- Rows already out of range: adding a CHECK would fail the migration, and NOT VALID
-- would leave them unreadable and the next update of such a row failing. So they are
-- fixed first. A queued or running one is failed through an ordinary audited transition
-- (event_seq + 1, last_event 'content_job.failed'; the triggers write its audit row,
-- NOTIFY and take it out of pgjobs.job_queue), its error message naming the values it
-- had; a finished one keeps its status. In both, each time out of range is clamped to
-- the nearest bound, which is what lets the CHECKs be added validated.

UPDATE pgjobs.jobs j
SET status = CASE WHEN j.status IN ('queued', 'running') THEN 'failed' ELSE j.status END,
    error_message = CASE WHEN j.status IN ('queued', 'running')
        THEN format('failed by migration 0005_time_bounds: a time is outside 1970-01-01 to '
                    '9999-12-31 UTC (run_at %s, created_at %s, updated_at %s, started_at %s, '
                    'finished_at %s, lease_expires_at %s)', j.run_at, j.created_at,
                    j.updated_at, j.started_at, j.finished_at, j.lease_expires_at)
        ELSE j.error_message END,
    lease_expires_at = CASE WHEN j.status IN ('queued', 'running') THEN NULL
                            ELSE j.lease_expires_at END,
    finished_at = CASE WHEN j.status IN ('queued', 'running') THEN now()
                       WHEN j.finished_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'
                       WHEN j.finished_at > '9999-12-31 00:00:00+00' THEN '9999-12-31 00:00:00+00'
                       ELSE j.finished_at END,
    event_seq = j.event_seq + CASE WHEN j.status IN ('queued', 'running') THEN 1 ELSE 0 END,
    last_event = CASE WHEN j.status IN ('queued', 'running') THEN 'content_job.failed'
                      ELSE j.last_event END,
    run_at = CASE WHEN j.run_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'
                  WHEN j.run_at > '9999-12-31 00:00:00+00' THEN '9999-12-31 00:00:00+00'
                  ELSE j.run_at END,
    created_at = CASE WHEN j.created_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'
                      WHEN j.created_at > '9999-12-31 00:00:00+00' THEN '9999-12-31 00:00:00+00'
                      ELSE j.created_at END,
    updated_at = CASE WHEN j.status IN ('queued', 'running') THEN now()
                      WHEN j.updated_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'
                      WHEN j.updated_at > '9999-12-31 00:00:00+00' THEN '9999-12-31 00:00:00+00'
                      ELSE j.updated_at END,
    started_at = CASE WHEN j.started_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'
                      WHEN j.started_at > '9999-12-31 00:00:00+00' THEN '9999-12-31 00:00:00+00'
                      ELSE j.started_at END
WHERE NOT (j.run_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'
           AND j.created_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'
           AND j.updated_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'
           AND coalesce(j.started_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00', true)
           AND coalesce(j.finished_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00', true)
           AND coalesce(j.lease_expires_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00', true));

ALTER TABLE pgjobs.jobs
    ADD CONSTRAINT jobs_run_at_in_range
        CHECK (run_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT jobs_created_at_in_range
        CHECK (created_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT jobs_updated_at_in_range
        CHECK (updated_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT jobs_started_at_in_range
        CHECK (started_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT jobs_finished_at_in_range
        CHECK (finished_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT jobs_lease_expires_at_in_range
        CHECK (lease_expires_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00');

-- The queue's copies (the trigger that writes them has removed the failed jobs above).
ALTER TABLE pgjobs.job_queue
    ADD CONSTRAINT job_queue_run_at_in_range
        CHECK (run_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'),
    ADD CONSTRAINT job_queue_lease_expires_at_in_range
        CHECK (lease_expires_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00');
