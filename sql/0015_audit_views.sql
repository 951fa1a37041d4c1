-- depends: 0014_limits
-- Audit views for operators in psql (issue 17): job_timeline, running_jobs, stuck_jobs,
-- throughput, queue_depth, in schema pgjobs. The README's "Auditing with psql" cookbook
-- queries them (tests/acceptance/test_readme.py runs it); tests/integration/
-- test_audit_views.py checks their rows and their plans.
--
-- What each reads, so that none slows down as finished jobs pile up (10M in bench.views):
--   * job_timeline: pgjobs.job_events only, through its (job_id, seq) key for a job_id
--     filter. No join to pgjobs.jobs, so a pruned job's history still shows.
--   * running_jobs, stuck_jobs, queue_depth: pgjobs.job_queue (the queued and running
--     jobs only, sql/0004) and primary-key lookups of pgjobs.jobs and pgjobs.workers.
--   * throughput: the audit log's done/retrying/failed events of a recent window only
--     (per minute: the current minute and the 59 before; per hour: the current hour and
--     the 23 before), found through job_events_created_brin_idx below.
-- Every view reads the tables as they are: rows a retention run removed simply are not
-- there (a job's timeline without its job row, a throughput bucket with fewer events).
--
-- Why a BRIN index and not a B-tree on job_events.created_at: job_events is append-only
-- and written in time order, so a block range summary (min/max created_at per 32 pages)
-- finds a recent window nearly as well as a B-tree, at a size of a few pages per million
-- rows, and an insert updates at most one summary tuple (ranges filled since the last
-- summarisation are unsummarised and always read, which is exactly the recent end).
-- A B-tree would add a descent and a leaf write to every transition of the hot path.
-- autosummarize asks autovacuum to summarise each range once it is full.
--
-- Deploying: migrate before starting this version's gateway and workers (their worker
-- queries call pgjobs.worker_is_live); older ones keep working across it, nothing they
-- use changes. Building the BRIN index is one sequential read of pgjobs.job_events,
-- during which the build's lock holds up inserts into it, that is every transition
-- (yoyo runs the migration in a transaction, so not CONCURRENTLY): not measured at 10M
-- jobs; run it when a pause of that read's length is acceptable.

CREATE INDEX job_events_created_brin_idx ON pgjobs.job_events
    USING brin (created_at) WITH (pages_per_range = 32, autosummarize = on);

-- Whether a worker is live: it heartbeated within `within_seconds` before `at`. The one
-- definition of "live" (the gateway's worker_* queries and pgjobs' worker_count_live_by_type
-- call it with their configured window; stuck_jobs with the default). The default window
-- is the gateway's default (PGJOBS_GATEWAY_LIVE_WORKER_SECONDS, 30 s), and a session or
-- database may change it for the views: SET pgjobs.live_worker_seconds = 60.
CREATE FUNCTION pgjobs.live_worker_seconds() RETURNS float8
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('pgjobs.live_worker_seconds', true), '')::float8, 30.0)
$$;

CREATE FUNCTION pgjobs.worker_is_live(
    last_heartbeat_at timestamptz,
    within_seconds float8 DEFAULT pgjobs.live_worker_seconds(),
    at timestamptz DEFAULT now()
) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT last_heartbeat_at > coalesce(at, now()) - make_interval(secs => within_seconds)
$$;

CREATE VIEW pgjobs.job_timeline AS
SELECT e.job_id, e.company_id, e.seq, e.created_at AS at, e.type AS event, e.status,
       e.attempt, e.worker_id, e.payload ->> 'errorMessage' AS error, e.payload
FROM pgjobs.job_events e;

COMMENT ON VIEW pgjobs.job_timeline IS
'One row per audit row (pgjobs.job_events): a job''s transitions in seq order, with the time '
'(at: the writing transaction''s start), event type, status after it, attempt, the worker that '
'held the job, the error message if any and the whole payload (progress, resultAssetId, runAt, '
'traceback). Filter by job_id: it uses the (job_id, seq) key. Outlives the job row.';

-- pgjobs.jobs is read by key, once per queue row: the lookup is a LATERAL subquery with
-- OFFSET 0, which the planner cannot flatten into a join. As a plain join, the planner
-- chose a merge join walking jobs_pkey in id order, which reads every job with an id below
-- the largest queued one: with time-ordered ids (uuid7) that is all of them, 10M finished
-- jobs to find 1,000 running ones (stuck_jobs written so took 0.66 s in bench.views).
CREATE VIEW pgjobs.running_jobs AS
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
    FROM pgjobs.jobs j WHERE j.id = q.job_id OFFSET 0
) j
LEFT JOIN pgjobs.workers w ON w.id = j.worker_id
WHERE q.lease_expires_at IS NOT NULL;

COMMENT ON VIEW pgjobs.running_jobs IS
'The running jobs and who holds them: worker id (and its host, pid and last heartbeat while '
'it is registered), lease_age (since this attempt''s claim, started_at), lease_remaining '
'(until lease_expires_at; negative once expired and not yet rescued, see stuck_jobs). Reads '
'pgjobs.job_queue, never the finished jobs.';

-- The no_live_worker branch, which may list a whole backlog, reads job_queue only (a
-- queue row without a lease is a queued job); the lease_expired one looks its job's worker
-- up by key, as running_jobs does.
CREATE VIEW pgjobs.stuck_jobs AS
SELECT q.job_id, q.company_id, q.job_type, 'running'::text AS status,
       'lease_expired'::text AS reason, q.lease_expires_at AS since,
       now() - q.lease_expires_at AS stuck_for, j.worker_id
FROM pgjobs.job_queue q
CROSS JOIN LATERAL (SELECT j.worker_id FROM pgjobs.jobs j WHERE j.id = q.job_id OFFSET 0) j
WHERE q.lease_expires_at IS NOT NULL AND q.lease_expires_at < now()
UNION ALL
SELECT q.job_id, q.company_id, q.job_type, 'queued', 'no_live_worker',
       q.run_at, now() - q.run_at, NULL
FROM pgjobs.job_queue q
WHERE q.lease_expires_at IS NULL AND q.run_at <= now()
  AND NOT EXISTS (SELECT 1 FROM pgjobs.workers w
                  WHERE q.job_type = ANY (w.job_types)
                    AND pgjobs.worker_is_live(w.last_heartbeat_at));

COMMENT ON VIEW pgjobs.stuck_jobs IS
'Jobs that are not moving. reason ''lease_expired'': running, its lease past (since = '
'lease_expires_at) and not rescued yet; a live worker''s rescuer requeues or fails it within '
'a rescue interval, so a row that stays means no worker is rescuing. reason '
'''no_live_worker'': queued and due (since = run_at) but no live worker registered its type '
'(live: pgjobs.worker_is_live, a heartbeat within pgjobs.live_worker_seconds(), 30 s unless '
'SET pgjobs.live_worker_seconds). worker_id: the expired lease''s holder. Reads '
'pgjobs.job_queue, never the finished jobs.';

-- The window bounds are stable expressions of now(), so the planner estimates the window
-- from created_at's statistics when it plans the query and reads it through the BRIN index.
-- job_type by a subquery, not a join: one primary-key lookup per event of the window,
-- whatever the planner thinks of the window's size (a join let it choose to hash the whole
-- of pgjobs.jobs instead). NULL when the job row was pruned.
CREATE VIEW pgjobs.throughput AS
SELECT 'minute'::text AS granularity, date_trunc('minute', e.created_at) AS bucket,
       (SELECT j.job_type FROM pgjobs.jobs j WHERE j.id = e.job_id) AS job_type,
       count(*) FILTER (WHERE e.type = 'content_job.done') AS completed,
       count(*) FILTER (WHERE e.type = 'content_job.failed') AS failed,
       count(*) FILTER (WHERE e.type = 'content_job.retrying') AS retried
FROM pgjobs.job_events e
WHERE e.created_at >= date_trunc('minute', now()) - interval '59 minutes'
  AND e.type IN ('content_job.done', 'content_job.failed', 'content_job.retrying')
GROUP BY 2, 3
UNION ALL
SELECT 'hour', date_trunc('hour', e.created_at),
       (SELECT j.job_type FROM pgjobs.jobs j WHERE j.id = e.job_id),
       count(*) FILTER (WHERE e.type = 'content_job.done'),
       count(*) FILTER (WHERE e.type = 'content_job.failed'),
       count(*) FILTER (WHERE e.type = 'content_job.retrying')
FROM pgjobs.job_events e
WHERE e.created_at >= date_trunc('hour', now()) - interval '23 hours'
  AND e.type IN ('content_job.done', 'content_job.failed', 'content_job.retrying')
GROUP BY 2, 3;

COMMENT ON VIEW pgjobs.throughput IS
'Outcomes per job type per time bucket, from the audit log: completed (content_job.done), '
'failed (content_job.failed: a job that failed for good) '
'and retried (content_job.retrying: a failed attempt that will run again). Two granularities: '
'''minute'' buckets for the current minute and the 59 before, ''hour'' buckets for the '
'current hour and the 23 before; nothing older (it reads only that window, through '
'job_events_created_brin_idx). Buckets without events have no row. job_type is NULL for an '
'event whose job row was pruned. bucket is the event''s transaction start, truncated.';

CREATE VIEW pgjobs.queue_depth AS
SELECT q.company_id, q.job_type,
       count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= now()) AS queued,
       count(*) FILTER (WHERE q.lease_expires_at IS NOT NULL) AS running,
       count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at > now()) AS scheduled,
       now() - min(q.run_at) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= now())
           AS oldest_queued_age
FROM pgjobs.job_queue q
GROUP BY q.company_id, q.job_type;

COMMENT ON VIEW pgjobs.queue_depth IS
'Backlog per company and job type: queued (due now), running, scheduled (queued with run_at '
'in the future: scheduled jobs and retries waiting out their delay), and oldest_queued_age '
'(how long the oldest due job has been due; NULL if none). Only companies and types with '
'queued or running jobs have a row. Reads pgjobs.job_queue only.';
