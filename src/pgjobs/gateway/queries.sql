-- Every query the HTTP gateway runs itself, one named section each (`-- name: table_verb_guard`).
-- Job writes do not live here: the gateway enqueues, cancels and retries through
-- pgjobs.client, so it uses the same guarded transitions as every other producer.

-- name: token_insert
-- A company's token (company_id set), or an operator's (company_id NULL, operator true).
INSERT INTO pgjobs.api_tokens (id, company_id, token_hash, label, operator, created_at)
VALUES (%(id)s::uuid, %(company_id)s::text, %(token_hash)s::text, %(label)s::text,
        %(operator)s::boolean, coalesce(%(now)s::timestamptz, now()))
RETURNING id, company_id, created_at;

-- name: token_get_active_by_hash
SELECT id, company_id, token_hash, operator FROM pgjobs.api_tokens
WHERE token_hash = %(token_hash)s::text AND revoked_at IS NULL;

-- name: token_get_active_by_id
-- A stream token's parent, on every use of the stream token: no row once it is revoked.
-- An operator's token may mint stream tokens for any company.
SELECT id FROM pgjobs.api_tokens
WHERE id = %(id)s::uuid AND (company_id = %(company_id)s::text OR operator)
  AND revoked_at IS NULL;

-- name: token_list_revoked_by_ids
-- Which of the API tokens this gateway's open event streams were opened with are revoked:
-- one query for every open stream of the process (pgjobs.gateway.revocation).
SELECT id FROM pgjobs.api_tokens
WHERE id = ANY (%(ids)s::uuid[]) AND revoked_at IS NOT NULL;

-- name: token_revoke_by_hash_or_id
-- One of the two parameters is NULL; a revoked token stays as an audit record.
UPDATE pgjobs.api_tokens
SET revoked_at = coalesce(%(now)s::timestamptz, now())
WHERE (token_hash = %(token_hash)s::text OR id = %(id)s::uuid) AND revoked_at IS NULL
RETURNING id, company_id;

-- name: job_get_for_stream
-- The state an SSE stream starts from: the same fields as an event, plus event_seq (the
-- id of the last event this row's state reflects).
SELECT id, company_id, status, last_event, attempts, event_seq, progress_fraction,
       progress_message, result_asset_id, error_message, run_at
FROM pgjobs.jobs WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text;

-- name: job_events_after_seq
-- A job's events after the last one a stream sent. One job's seq is bumped under its row
-- lock, so commit order is seq order and `seq > last` can neither skip nor repeat.
SELECT id, job_id, seq, type, status, attempt, payload, xid::text AS xid
FROM pgjobs.job_events
WHERE job_id = %(job_id)s::uuid AND company_id = %(company_id)s::text AND seq > %(after_seq)s::int
ORDER BY seq
LIMIT %(limit)s::int;

-- name: job_events_after_seq_for_jobs
-- The job reader's one query per round (pgjobs.gateway.jobreader): for each (job, company,
-- seq) key, the job's events after that seq, at most %(limit)s each, in seq order per job.
-- Rung jobs' events (their transitions committed with the doorbell on, announced by a ring
-- after the commit), and in the periodic catch-up every watched job's. Each key is one
-- probe of the (job_id, seq) primary key, which finds nothing past `after_seq` for a job
-- that is up to date; the company in the WHERE keeps a ring's company name from reading
-- another company's job. As in job_events_after_seq, one job's seq is bumped under its row
-- lock, so `seq > after` can neither skip nor repeat. The arrays go in binary: dumping
-- 10,000 uuids as text cost the gateway ~14 ms of CPU per catch-up round, binary ~2 ms.
SELECT e.id, e.job_id, e.company_id, e.seq, e.type, e.status, e.attempt, e.payload
FROM unnest(%(job_ids)b::uuid[], %(company_ids)b::text[], %(after_seqs)b::int[])
         AS k(job_id, company_id, after_seq)
CROSS JOIN LATERAL (
    SELECT * FROM pgjobs.job_events e
    WHERE e.job_id = k.job_id AND e.company_id = k.company_id AND e.seq > k.after_seq
    ORDER BY e.seq
    LIMIT %(limit)s::int
) e
ORDER BY e.job_id, e.seq;

-- name: job_events_exist_after_company_cursors
-- The periodic catch-up's question for the company feeds (pgjobs.gateway.jobreader):
-- which of these companies have an event after their feed's (xid, id) cursor, so that
-- only those feeds read (a ring lost between its commit and its send woke none). One
-- probe of job_events_company_xid_idx per company.
SELECT k.company_id
FROM unnest(%(company_ids)b::text[], %(xids)b::text[], %(ids)b::bigint[]) AS k(company_id, xid, id)
WHERE EXISTS (
    SELECT 1 FROM pgjobs.job_events e
    WHERE e.company_id = k.company_id AND (e.xid, e.id) > (k.xid::xid8, k.id)
);

-- name: job_events_company_feed
-- A company's events after the cursor (xid, id), only from transactions that have ended.
-- ids are assigned at insert, not at commit, so `id > last` could skip a row whose
-- transaction commits after a later id was already read. Every transaction with an xid
-- below the snapshot's xmin has finished (committed or aborted), and every transaction
-- that starts later gets a larger xid, so below that horizon the (xid, id) order is final:
-- paging through it can neither skip nor repeat. The price: one long write transaction
-- anywhere in the database holds the horizon, and these events, back until it ends.
-- held_back: whether rows of the company were held back by the horizon (committed, but
-- with an xid at or above it). Only then does the company's feed need to read again
-- without a NOTIFY, once the horizon has moved; every other new row comes with one. Both
-- answers come from one snapshot: asked in a second statement, the horizon could have
-- moved between the two, and rows it passed would be neither read nor reported. Always
-- one row at least; the event columns are NULL when the page is empty.
-- behind_retention: retention (pgjobs prune, sql/0013) has deleted rows of the company
-- after the cursor, so this page does not follow on from it; read in the same snapshot
-- as the page, since a prune deletes its rows and moves the mark in one transaction.
WITH h AS MATERIALIZED (
    SELECT s.horizon, EXISTS (
        SELECT 1 FROM pgjobs.job_events
        WHERE company_id = %(company_id)s::text AND xid >= s.horizon
          AND (xid, id) > (%(xid)s::xid8, %(id)s::bigint)
    ) AS held_back, EXISTS (
        SELECT 1 FROM pgjobs.job_events_pruned
        WHERE company_id = %(company_id)s::text
          AND (xid, id) > (%(xid)s::xid8, %(id)s::bigint)
    ) AS behind_retention
    FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) s
)
SELECT e.id, e.job_id, e.seq, e.type, e.status, e.attempt, e.payload, e.xid::text AS xid,
       h.held_back, h.behind_retention
FROM h LEFT JOIN LATERAL (
    SELECT * FROM pgjobs.job_events
    WHERE company_id = %(company_id)s::text
      AND (xid, id) > (%(xid)s::xid8, %(id)s::bigint)
      AND xid < h.horizon
    ORDER BY xid, id
    LIMIT %(limit)s::int
) e ON true
ORDER BY e.xid, e.id;

-- name: job_list_unfinished_for_company_stream
-- What a company stream resuming from before a retention cut is sent instead of the
-- events it can no longer get: the company's queued and running jobs (through
-- pgjobs.job_queue, which holds exactly those, with their company), in their current
-- state, and the horizon of the same snapshot, from which the stream goes on. Always one
-- row at least; the job columns are NULL when the company has no unfinished job.
WITH h AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon
)
SELECT h.horizon, j.id, j.company_id, j.status, j.last_event, j.attempts, j.event_seq,
       j.progress_fraction, j.progress_message, j.result_asset_id, j.error_message, j.run_at
FROM h LEFT JOIN LATERAL (
    SELECT j.* FROM pgjobs.job_queue q
    JOIN pgjobs.jobs j ON j.id = q.job_id
    WHERE q.company_id = %(company_id)s::text AND j.company_id = %(company_id)s::text
) j ON true
ORDER BY j.id;

-- name: job_events_horizon
-- Where a company stream without Last-Event-ID starts: everything from transactions that
-- had not finished yet when it connected, and everything after.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xid;

-- name: worker_job_type_live
-- Whether a live worker (pgjobs.worker_is_live, sql/0015: a heartbeat within
-- within_seconds) has registered this job type.
SELECT EXISTS (
    SELECT 1 FROM pgjobs.workers
    WHERE %(job_type)s::text = ANY (job_types)
      AND pgjobs.worker_is_live(last_heartbeat_at, %(within_seconds)s::float8, %(now)s::timestamptz)
) AS live;

-- name: gateway_check_ready
SELECT to_regclass('pgjobs.api_tokens') IS NOT NULL AS migrated;

-- name: job_events_window_start_xid
-- Where the done/failed events of a company's last `window_seconds` begin in
-- job_events_company_xid_idx (company_id, xid, id), which job_stats_by_company scans from
-- there: pgjobs.job_events has no index on time. The xid of the company's newest (in xid
-- order) done or failed event from before the window, found by walking that index
-- backwards over the window's events; '0' if there is none. A done or failed event is
-- written by one short statement (a completion, the rescuer, a cancel), whose xid is
-- taken within moments of its created_at, so the window's events all have larger xids,
-- but for a skew of one statement's duration at the window's start. A separate statement,
-- so that the planner sees the bound's value when it plans the scan (a bound computed
-- inside the same query is unknown at planning time, and the estimate for `xid >= ?`
-- then makes it choose a scan of the whole table).
SELECT coalesce((
    SELECT e.xid FROM pgjobs.job_events e
    WHERE e.company_id = %(company_id)s::text
      AND e.type IN ('content_job.done', 'content_job.failed')
      AND e.created_at < coalesce(%(now)s::timestamptz, now())
                         - make_interval(secs => %(window_seconds)s::float8)
    ORDER BY e.xid DESC, e.id DESC
    LIMIT 1
), '0'::xid8)::text AS xid;

-- name: job_stats_by_company
-- A company's jobs per job type: queued (due now), scheduled (run_at in the future),
-- running, and done and failed within the last `window_seconds` before `now`. One row per
-- job type that has any; oldest_queued_at is the earliest run_at of the due ones.
-- Neither part reads the finished jobs' history:
-- * queued / scheduled / running come from pgjobs.job_queue, which holds only the queued
--   and running jobs, each with its company (sql/0008); the cost is the company's queued
--   and running jobs at most, never the finished ones.
-- * done / failed: the company's events from `since_xid` (job_events_window_start_xid)
--   on, through job_events_company_xid_idx, each joined to its job for its type; the cost
--   is the company's events in the window.
WITH p AS MATERIALIZED (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now,
           coalesce(%(now)s::timestamptz, now())
               - make_interval(secs => %(window_seconds)s::float8) AS since
), active AS (
    SELECT q.job_type,
           count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now) AS queued,
           count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at > p.now) AS scheduled,
           count(*) FILTER (WHERE q.lease_expires_at IS NOT NULL) AS running,
           min(q.run_at) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now)
               AS oldest_queued_at
    FROM pgjobs.job_queue q
    CROSS JOIN p
    WHERE q.company_id = %(company_id)s::text
    GROUP BY q.job_type
), ended AS (
    SELECT j.job_type,
           count(*) FILTER (WHERE e.type = 'content_job.done') AS done,
           count(*) FILTER (WHERE e.type = 'content_job.failed') AS failed
    FROM pgjobs.job_events e
    JOIN pgjobs.job_rows j ON j.id = e.job_id  -- job_type: the job row's own
    CROSS JOIN p
    WHERE e.company_id = %(company_id)s::text
      AND e.xid >= %(since_xid)s::xid8
      AND e.type IN ('content_job.done', 'content_job.failed')
      AND e.created_at >= p.since AND e.created_at <= p.now
    GROUP BY j.job_type
)
SELECT coalesce(a.job_type, d.job_type) AS job_type,
       coalesce(a.queued, 0) AS queued,
       coalesce(a.scheduled, 0) AS scheduled,
       coalesce(a.running, 0) AS running,
       coalesce(d.done, 0) AS done,
       coalesce(d.failed, 0) AS failed,
       a.oldest_queued_at
FROM active a FULL JOIN ended d ON d.job_type = a.job_type
ORDER BY 1;

-- name: job_completions_per_minute
-- The company's done events in each minute of the last `window_seconds` before `now`
-- (minutes_ago 0 is the newest), read as job_stats_by_company reads its done events: from
-- `since_xid` on through job_events_company_xid_idx.
SELECT floor(extract(epoch FROM (p.now - e.created_at)) / 60)::int AS minutes_ago,
       count(*)::int AS completed
FROM pgjobs.job_events e
CROSS JOIN (SELECT coalesce(%(now)s::timestamptz, now()) AS now) p
WHERE e.company_id = %(company_id)s::text
  AND e.xid >= %(since_xid)s::xid8
  AND e.type = 'content_job.done'
  AND e.created_at > p.now - make_interval(secs => %(window_seconds)s::float8)
  AND e.created_at <= p.now
GROUP BY 1;

-- name: job_events_page_for_company
-- A page of one job's audit rows after seq %(after_seq)s, for the REST timeline. The
-- company in the WHERE keeps another company's job id from answering anything; the
-- (job_id, seq) unique index serves it.
SELECT seq, type, status, attempt, worker_id, payload, created_at
FROM pgjobs.job_events
WHERE job_id = %(job_id)s::uuid AND company_id = %(company_id)s::text
  AND seq > %(after_seq)s::int
ORDER BY seq
LIMIT %(limit)s::int;

-- name: worker_list_live
-- Workers with a heartbeat within %(within_seconds)s, each with the jobs it holds now (its
-- running jobs, found through the queue table, which holds only queued and running jobs).
SELECT w.id, w.hostname, w.pid, w.job_types, w.concurrency, w.started_at,
       w.last_heartbeat_at,
       (SELECT count(*) FROM pgjobs.job_queue q
        WHERE q.lease_expires_at IS NOT NULL AND q.worker_id = w.id)::int AS running
FROM pgjobs.workers w
WHERE pgjobs.worker_is_live(w.last_heartbeat_at, %(within_seconds)s::float8, %(now)s::timestamptz)
ORDER BY w.hostname, w.pid, w.id;

-- name: worker_job_types_live
-- The job types some live worker serves: what a job can be submitted as and get run.
SELECT DISTINCT unnest(job_types) AS job_type
FROM pgjobs.workers
WHERE pgjobs.worker_is_live(last_heartbeat_at, %(within_seconds)s::float8, %(now)s::timestamptz)
ORDER BY 1;

-- name: job_count_failed_matching
-- How many of the company's failed jobs (optionally of one type and source task) a bulk
-- retry would queue again: the count an operator confirms first. Candidates come through
-- job_events_ended_idx, as a list of failed jobs does.
SELECT count(*)::int AS n FROM pgjobs.jobs j
WHERE j.id IN (SELECT e.job_id FROM pgjobs.job_events e
               WHERE e.company_id = %(company_id)s::text AND e.type = 'content_job.failed')
  AND j.company_id = %(company_id)s::text
  AND j.status = 'failed'
  AND (%(job_type)s::text IS NULL OR j.job_type = %(job_type)s::text)
  AND (%(source_task_id)s::text IS NULL OR j.source_task_id = %(source_task_id)s::text);

-- name: job_retry_failed_matching
-- Up to %(limit)s of those failed jobs back to queued in one statement, as job_retry
-- (pgjobs/queries.sql) does for one: the same SET list, kept in step with it (one more
-- attempt if none is left; the trigger writes each its audit row and NOTIFY). Oldest first; rows another session holds are skipped, and the guard on status
-- re-checks each row once locked.
WITH chosen AS (
    -- The job rows: a failed job's state is its job row's (sql/0021), and its trigger adds
    -- the queue row.
    SELECT j.id FROM pgjobs.job_rows j
    WHERE j.id IN (SELECT e.job_id FROM pgjobs.job_events e
                   WHERE e.company_id = %(company_id)s::text
                     AND e.type = 'content_job.failed')
      AND j.company_id = %(company_id)s::text
      AND j.status = 'failed'
      AND (%(job_type)s::text IS NULL OR j.job_type = %(job_type)s::text)
      AND (%(source_task_id)s::text IS NULL OR j.source_task_id = %(source_task_id)s::text)
    ORDER BY j.created_at, j.id
    LIMIT %(limit)s::int
    FOR UPDATE SKIP LOCKED
)
UPDATE pgjobs.job_rows j
SET status = 'queued',
    max_attempts = greatest(j.max_attempts, j.attempts + 1),
    run_at = coalesce(%(now)s::timestamptz, now()),
    error_message = NULL,
    error_traceback = NULL,
    result = NULL,
    result_asset_id = NULL,
    finished_at = NULL,
    progress_fraction = NULL,
    progress_message = NULL,
    event_seq = j.event_seq + 1,
    last_event = 'content_job.retrying',
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM chosen
WHERE j.id = chosen.id AND j.status = 'failed'
RETURNING j.id;

-- name: job_list_companies
-- Every company that has a job, in order: a skip scan of jobs_company_created_idx (one
-- index probe per company, whatever the number of jobs), for the operators' overview.
WITH RECURSIVE c AS (
    SELECT (SELECT min(company_id) FROM pgjobs.job_rows) AS company_id
    UNION ALL
    SELECT (SELECT min(j.company_id) FROM pgjobs.job_rows j WHERE j.company_id > c.company_id)
    FROM c WHERE c.company_id IS NOT NULL
)
SELECT company_id FROM c WHERE company_id IS NOT NULL;

-- name: job_stats_all_companies
-- job_stats_by_company for every company at once (operators): one row per company and
-- job type that has any. Costs as there, summed over the companies, and one index probe
-- per company:
-- * queued / scheduled / running: all of pgjobs.job_queue (queued and running jobs only).
-- * done / failed: for each company (the skip scan of job_list_companies), where its
--   window begins in job_events_company_xid_idx, as job_events_window_start_xid finds it,
--   and its events from there. The per-company count is a lateral subquery with its own
--   GROUP BY, which the planner cannot flatten into the outer join, so it runs once per
--   company with the company and its window's start as parameters of an index scan of
--   (company_id, xid). Written as a plain join, the planner read every ended event in
--   the table and checked each against its company's start (a full scan: 0.9 s with
--   100,000 finished jobs, tests/gateway/test_gw_stats.py).
WITH RECURSIVE p AS MATERIALIZED (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now,
           coalesce(%(now)s::timestamptz, now())
               - make_interval(secs => %(window_seconds)s::float8) AS since
), c AS (
    SELECT (SELECT min(company_id) FROM pgjobs.job_rows) AS company_id
    UNION ALL
    SELECT (SELECT min(j.company_id) FROM pgjobs.job_rows j WHERE j.company_id > c.company_id)
    FROM c WHERE c.company_id IS NOT NULL
), active AS (
    SELECT q.company_id, q.job_type,
           count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now) AS queued,
           count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at > p.now) AS scheduled,
           count(*) FILTER (WHERE q.lease_expires_at IS NOT NULL) AS running,
           min(q.run_at) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now)
               AS oldest_queued_at
    FROM pgjobs.job_queue q
    CROSS JOIN p
    GROUP BY q.company_id, q.job_type
), ended AS (
    SELECT c.company_id, d.job_type, d.done, d.failed
    FROM c
    CROSS JOIN p
    CROSS JOIN LATERAL (
        SELECT j.job_type,
               count(*) FILTER (WHERE e.type = 'content_job.done') AS done,
               count(*) FILTER (WHERE e.type = 'content_job.failed') AS failed
        FROM pgjobs.job_events e
        JOIN pgjobs.job_rows j ON j.id = e.job_id  -- job_type: the job row's own
        WHERE e.company_id = c.company_id
          AND e.xid >= coalesce((
              SELECT b.xid FROM pgjobs.job_events b
              WHERE b.company_id = c.company_id
                AND b.type IN ('content_job.done', 'content_job.failed')
                AND b.created_at < p.since
              ORDER BY b.xid DESC, b.id DESC
              LIMIT 1
          ), '0'::xid8)
          AND e.type IN ('content_job.done', 'content_job.failed')
          AND e.created_at >= p.since AND e.created_at <= p.now
        GROUP BY j.job_type
    ) d
    WHERE c.company_id IS NOT NULL
)
SELECT coalesce(a.company_id, d.company_id) AS company_id,
       coalesce(a.job_type, d.job_type) AS job_type,
       coalesce(a.queued, 0) AS queued,
       coalesce(a.scheduled, 0) AS scheduled,
       coalesce(a.running, 0) AS running,
       coalesce(d.done, 0) AS done,
       coalesce(d.failed, 0) AS failed,
       a.oldest_queued_at
FROM active a FULL JOIN ended d ON d.company_id = a.company_id AND d.job_type = a.job_type
ORDER BY 1, 2;

-- name: job_completions_per_minute_all_companies
-- job_completions_per_minute over every company (operators), each company's done events
-- read from where its window begins, as job_stats_all_companies reads them (a lateral
-- subquery with its own GROUP BY, per company, for the same reason).
WITH RECURSIVE p AS MATERIALIZED (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now,
           coalesce(%(now)s::timestamptz, now())
               - make_interval(secs => %(window_seconds)s::float8) AS since
), c AS (
    SELECT (SELECT min(company_id) FROM pgjobs.job_rows) AS company_id
    UNION ALL
    SELECT (SELECT min(j.company_id) FROM pgjobs.job_rows j WHERE j.company_id > c.company_id)
    FROM c WHERE c.company_id IS NOT NULL
)
SELECT m.minutes_ago, sum(m.completed)::int AS completed
FROM c
CROSS JOIN p
CROSS JOIN LATERAL (
    SELECT floor(extract(epoch FROM (p.now - e.created_at)) / 60)::int AS minutes_ago,
           count(*) AS completed
    FROM pgjobs.job_events e
    WHERE e.company_id = c.company_id
      AND e.xid >= coalesce((
          SELECT b.xid FROM pgjobs.job_events b
          WHERE b.company_id = c.company_id
            AND b.type IN ('content_job.done', 'content_job.failed')
            AND b.created_at < p.since
          ORDER BY b.xid DESC, b.id DESC
          LIMIT 1
      ), '0'::xid8)
      AND e.type = 'content_job.done'
      AND e.created_at > p.since AND e.created_at <= p.now
    GROUP BY 1
) m
WHERE c.company_id IS NOT NULL
GROUP BY 1;

-- name: job_events_age_by_keys
-- The notification lag metric (pgjobs.metrics.LagSampler): how long ago, by the
-- database's clock, each sampled audit row was written (its transaction's start time).
-- By primary key (job_id, seq), the two arrays zipped; a row pruned meanwhile is missing
-- from the result.
SELECT e.job_id, e.seq, extract(epoch FROM clock_timestamp() - e.created_at)::float8 AS age_seconds
FROM unnest(%(job_ids)s::uuid[], %(seqs)s::int[]) AS k(job_id, seq)
JOIN pgjobs.job_events e ON e.job_id = k.job_id AND e.seq = k.seq;

-- HTTP Idempotency-Key on POST .../content-jobs (pgjobs.gateway.idempotency, sql/0011).
-- These run in the transaction that enqueues the job, in order.

-- name: idempotency_key_insert
-- Take a key nobody has. ON CONFLICT waits for a request that inserted the same key and
-- is still open: if it commits the key is skipped (the caller then reads it), if it
-- rolls back this one takes it. Returns the key if taken.
INSERT INTO pgjobs.idempotency_keys (company_id, key, request_hash, job_id, created_at,
                                     expires_at)
VALUES (%(company_id)s::text, %(key)s::text, %(request_hash)s::text, %(job_id)s::uuid,
        coalesce(%(now)s::timestamptz, now()),
        coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(ttl_seconds)s::float8))
ON CONFLICT (company_id, key) DO NOTHING
RETURNING key;

-- name: idempotency_key_lock
-- The key someone has, locked until this transaction ends (an expired key is re-taken
-- under this lock); no row: the cleanup deleted it meanwhile, insert again.
SELECT request_hash, job_id, response,
       expires_at <= coalesce(%(now)s::timestamptz, now()) AS expired
FROM pgjobs.idempotency_keys
WHERE company_id = %(company_id)s::text AND key = %(key)s::text
FOR UPDATE;

-- name: idempotency_key_take_if_expired
-- Re-take an expired key for a new request (the caller holds the row lock).
UPDATE pgjobs.idempotency_keys
SET request_hash = %(request_hash)s::text, job_id = %(job_id)s::uuid, response = NULL,
    created_at = coalesce(%(now)s::timestamptz, now()),
    expires_at = coalesce(%(now)s::timestamptz, now())
                 + make_interval(secs => %(ttl_seconds)s::float8)
WHERE company_id = %(company_id)s::text AND key = %(key)s::text
  AND expires_at <= coalesce(%(now)s::timestamptz, now())
RETURNING key;

-- name: idempotency_key_set_response
-- The response the request that took the key gives, stored before it commits.
UPDATE pgjobs.idempotency_keys SET response = %(response)s::text
WHERE company_id = %(company_id)s::text AND key = %(key)s::text AND job_id = %(job_id)s::uuid
RETURNING key;
