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

-- The range, once for the schema: the CHECKs below and pgjobs' queries that fail a job
-- holding a time out of range (src/pgjobs/queries.sql) call these. Plain SQL expressions,
-- so PostgreSQL inlines them where they are used.
CREATE FUNCTION pgjobs.time_in_range(ts timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ts BETWEEN '1970-01-01 00:00:00+00'::timestamptz AND '9999-12-31 00:00:00+00'::timestamptz
$$;

-- ts moved to the nearest bound of the range (NULL stays NULL).
CREATE FUNCTION pgjobs.clamp_time(ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ts < '1970-01-01 00:00:00+00'::timestamptz THEN '1970-01-01 00:00:00+00'::timestamptz
                WHEN ts > '9999-12-31 00:00:00+00'::timestamptz THEN '9999-12-31 00:00:00+00'::timestamptz
                ELSE ts END
$$;

-- Does any of a job's times lie outside the range?
CREATE FUNCTION pgjobs.job_times_out_of_range(j pgjobs.jobs) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT NOT (pgjobs.time_in_range(j.run_at) AND pgjobs.time_in_range(j.created_at)
                AND pgjobs.time_in_range(j.updated_at)
                AND coalesce(pgjobs.time_in_range(j.started_at), true)
                AND coalesce(pgjobs.time_in_range(j.finished_at), true)
                AND coalesce(pgjobs.time_in_range(j.lease_expires_at), true))
$$;

-- What a job's times were, for the error message of a job failed for holding one out of
-- range (the row's own are clamped, so that it satisfies the CHECKs).
CREATE FUNCTION pgjobs.job_times_text(j pgjobs.jobs) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$  -- STABLE: the text is in the session's time zone
    SELECT format('run_at %s, created_at %s, updated_at %s, started_at %s, finished_at %s, '
                  'lease_expires_at %s', j.run_at, j.created_at, j.updated_at, j.started_at,
                  j.finished_at, j.lease_expires_at)
$$;


UPDATE pgjobs.jobs j
SET status = CASE WHEN j.status IN ('queued', 'running') THEN 'failed' ELSE j.status END,
    error_message = CASE WHEN j.status IN ('queued', 'running')
        THEN 'failed by migration 0005_time_bounds: a time is outside 1970-01-01 to '
             '9999-12-31 UTC (' || pgjobs.job_times_text(j) || ')'
        ELSE j.error_message END,
    lease_expires_at = CASE WHEN j.status IN ('queued', 'running') THEN NULL
                            ELSE pgjobs.clamp_time(j.lease_expires_at) END,
    finished_at = CASE WHEN j.status IN ('queued', 'running') THEN now()
                       ELSE pgjobs.clamp_time(j.finished_at) END,
    event_seq = j.event_seq + CASE WHEN j.status IN ('queued', 'running') THEN 1 ELSE 0 END,
    last_event = CASE WHEN j.status IN ('queued', 'running') THEN 'content_job.failed'
                      ELSE j.last_event END,
    run_at = pgjobs.clamp_time(j.run_at),
    created_at = pgjobs.clamp_time(j.created_at),
    updated_at = CASE WHEN j.status IN ('queued', 'running') THEN now()
                      ELSE pgjobs.clamp_time(j.updated_at) END,
    started_at = pgjobs.clamp_time(j.started_at)
WHERE pgjobs.job_times_out_of_range(j);

ALTER TABLE pgjobs.jobs
    ADD CONSTRAINT jobs_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT jobs_created_at_in_range CHECK (pgjobs.time_in_range(created_at)),
    ADD CONSTRAINT jobs_updated_at_in_range CHECK (pgjobs.time_in_range(updated_at)),
    ADD CONSTRAINT jobs_started_at_in_range CHECK (pgjobs.time_in_range(started_at)),
    ADD CONSTRAINT jobs_finished_at_in_range CHECK (pgjobs.time_in_range(finished_at)),
    ADD CONSTRAINT jobs_lease_expires_at_in_range CHECK (pgjobs.time_in_range(lease_expires_at));

-- The queue's copies (the trigger that writes them has removed the failed jobs above).
ALTER TABLE pgjobs.job_queue
    ADD CONSTRAINT job_queue_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT job_queue_lease_expires_at_in_range
        CHECK (pgjobs.time_in_range(lease_expires_at));
