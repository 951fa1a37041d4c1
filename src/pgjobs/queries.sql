-- Every runtime query pgjobs runs, one named section each (`-- name: table_verb_guard`).
-- Parameters are passed by name (%(name)s, or %(name)b in binary format) and cast
-- explicitly. Time-based queries take %(now)s and fall back to the server clock when it
-- is NULL, so tests can move time.
--
-- A queued or running job's state lives in its pgjobs.job_queue row, an ended job's in its
-- pgjobs.job_rows row (sql/0021_live_state.sql; pgjobs.jobs is the view of both, which
-- reads use). Transitions bump event_seq by one and set last_event: a live job's on its
-- queue row, its end on its job row (event_seq the queue row's plus one); the statement
-- triggers turn that into the audit row and the NOTIFY, and add or remove the queue row,
-- in the same transaction. Guards: every write on behalf of a running attempt matches
-- (id, status = 'running', lease_token) on the queue row; zero rows back means "lost the
-- race". Lock order: the queue row, then the job row.

-- name: job_insert_many
-- Bulk enqueue: one statement, any number of jobs. The arrays go in binary format (the b
-- placeholders): psycopg writes a text-format array by quoting each element in Python,
-- ~9 µs of client CPU per job of a 1,000-job batch, against ~2.5 µs in binary; the server
-- also parses them faster. It returns only the time it stored as created_at: the client
-- builds the Jobs from what it sent (pgjobs.types.enqueued_jobs) instead of decoding every
-- row back, ~5 µs of client CPU per job less. A column whose values are all equal comes
-- as that one value (the same_ parameters) and a NULL array, which unnest pads with NULLs
-- (pgjobs.client._column): no column but run_at and source_task_id is ever NULL, and
-- those two are NULL in both.
-- Measured and not taken (issue 16; backend CPU per job, 1,000-job calls, interleaved): of
-- ~13 µs, the job row ~5 (its company index ~1.3, CHECKs ~0.7), the queue row ~4.3 (claim and
-- fair indexes ~1 each), the audit row ~3.3 (xid index ~1), transition tables <0.7, NOTIFY
-- ~0.5; every index is read by a query. Writing the queue and audit rows here (data-modifying
-- CTEs, no trigger, no check) was no cheaper; ~0.15 ms of a statement's ~0.26 ms is preparing
-- the three tables' CHECKs, and rewriting them plainer saved 0.06 ms (~0.2 µs per job): noise.
-- The job rows sent by COPY instead (bench.enqueue_rows' COPY variant): the same backend CPU,
-- more client CPU, 0.69x the rate (its triggers run after all rows are in: no overlap).
-- Taken instead: ids in order within a millisecond (jobspec.new_job_id) and the company
-- index ascending (sql/0022), so every index takes a job at its right-hand end: 13.5 -> 12.5 µs.
WITH inserted AS (
    INSERT INTO pgjobs.job_rows (id, company_id, job_type, input, source_task_id, priority,
                                 run_at, max_attempts, created_at, updated_at)
    SELECT u.id, coalesce(u.company_id, %(same_company_id)s::text),
           coalesce(u.job_type, %(same_job_type)s::text),
           coalesce(u.input, %(same_input)s::jsonb),
           coalesce(u.source_task_id, %(same_source_task_id)s::text),
           coalesce(u.priority, %(same_priority)s::int),
           coalesce(u.run_at, %(same_run_at)s::timestamptz, %(now)s::timestamptz, now()),
           coalesce(u.max_attempts, %(same_max_attempts)s::int),
           coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now())
    FROM unnest(%(ids)b::uuid[], %(company_ids)b::text[], %(job_types)b::text[],
                %(inputs)b::jsonb[], %(source_task_ids)b::text[], %(priorities)b::int[],
                %(run_ats)b::timestamptz[], %(max_attempts)b::int[])
         AS u(id, company_id, job_type, input, source_task_id, priority, run_at, max_attempts)
)
SELECT coalesce(%(now)s::timestamptz, now()) AS now;

-- name: job_insert_many_begin
-- The first statement of a bulk enqueue sent in chunks (pgjobs.client.ChunkedInsert): the
-- doorbell on for the transaction (as events_doorbell_on), and the transaction's time,
-- which every chunk's job_insert_many then stores (now() would be the same), so that the
-- client builds each chunk's Jobs while the server inserts the next. And generic plans for
-- the transaction: the publish trigger's statements read a PL/pgSQL variable (whether to
-- ring), so PostgreSQL would plan them again for every chunk (a custom plan is always
-- cheaper, with the variable folded), ~0.25 ms of PostgreSQL CPU per statement.
SELECT set_config('pgjobs.doorbell', 'on', true) AS doorbell,
       set_config('plan_cache_mode', 'force_generic_plan', true) AS plans,
       now() AS now;

-- name: job_get
SELECT * FROM pgjobs.jobs WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text;

-- name: job_get_any_company
SELECT * FROM pgjobs.jobs WHERE id = %(id)s::uuid;

-- name: job_list_by_company
-- Newest first, keyset-paginated on (created_at, id); status, job type and source task
-- filters optional. A filter is a filter on the company's jobs in that order: quick for
-- done, the common status, and for common types; rare statuses have queries of their own
-- below. A rare type or a source task id reads the company's jobs until a page fills.
SELECT * FROM pgjobs.jobs
WHERE company_id = %(company_id)s::text
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(job_type)s::text IS NULL OR job_type = %(job_type)s::text)
  AND (%(source_task_id)s::text IS NULL OR source_task_id = %(source_task_id)s::text)
  AND (%(before_created_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(before_created_at)s::timestamptz, %(before_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s::int;

-- name: job_list_by_company_active
-- job_list_by_company for queued or running jobs. No index covers status, so these go
-- through pgjobs.job_queue, which holds only the queued and running jobs, instead of
-- walking every job the company ever had.
SELECT j.* FROM pgjobs.job_queue q JOIN pgjobs.jobs j ON j.id = q.job_id
WHERE j.company_id = %(company_id)s::text
  AND q.status = %(status)s::text
  AND (%(job_type)s::text IS NULL OR j.job_type = %(job_type)s::text)
  AND (%(source_task_id)s::text IS NULL OR j.source_task_id = %(source_task_id)s::text)
  AND (%(before_created_at)s::timestamptz IS NULL
       OR (j.created_at, j.id) < (%(before_created_at)s::timestamptz, %(before_id)s::uuid))
ORDER BY j.created_at DESC, j.id DESC
LIMIT %(limit)s::int;

-- name: job_list_by_company_ended
-- job_list_by_company for failed or cancelled jobs: the candidates are the company's jobs
-- that ever had such an event (job_events_ended_idx); one retried since is filtered out
-- by its current status (a CHECK ties a failed or cancelled status to its last event).
SELECT j.* FROM pgjobs.jobs j
WHERE j.id IN (SELECT e.job_id FROM pgjobs.job_events e
               WHERE e.company_id = %(company_id)s::text
                 AND e.type = 'content_job.' || %(status)s::text
                 -- implied by the line above; spelled out so that the planner can prove
                 -- the partial index's predicate for any parameter value
                 AND e.type IN ('content_job.failed', 'content_job.cancelled'))
  AND j.company_id = %(company_id)s::text
  AND j.status = %(status)s::text
  AND (%(job_type)s::text IS NULL OR j.job_type = %(job_type)s::text)
  AND (%(source_task_id)s::text IS NULL OR j.source_task_id = %(source_task_id)s::text)
  AND (%(before_created_at)s::timestamptz IS NULL
       OR (j.created_at, j.id) < (%(before_created_at)s::timestamptz, %(before_id)s::uuid))
ORDER BY j.created_at DESC, j.id DESC
LIMIT %(limit)s::int;

-- name: job_claim_batch
-- SKIP LOCKED claim of up to %(limit)s due jobs: highest priority first, and within a
-- priority level shared round-robin across the companies with queued work (sql/0008), so
-- one company's backlog does not delay every other company's first job.
--
-- ring: the (company, priority level) pairs with queued work, by a loose index scan of
-- job_queue_fair_idx (one probe per pair), starting after %(after_company)s (the last
-- company this worker served; NULL: from the first) and wrapping around, at most
-- %(limit)s pairs.
-- heads1: each pair's first due jobs in claim order, ceil(limit / companies) each; one
-- pair's due jobs are one range of the index, so jobs not due yet (scheduled, retrying)
-- end the walk instead of being walked past. heads2: what the pairs with fewer jobs left
-- of the batch, shared the same way among the pairs that gave their whole share (a
-- second index walk each), so a batch is not left to the oldest company when small
-- companies run out.
-- fair: the heads by (priority DESC, rank within the pair, company's ring position),
-- limit at most. Priority stays strict: below the level of a pair that gave all it was
-- asked for (it may have more there) and, when the ring was cut short at %(limit)s
-- pairs, below the highest due level anywhere (an unvisited company may hold it), heads
-- are left to fill.
-- fill: what fair left of the batch, in the global claim order (job_queue_claim_idx).
-- Rows read: at most %(limit)s ring probes, about 2 x %(limit)s heads, and fill's.
--
-- Locking: candidates come from pgjobs.job_queue, and only the queue row is locked (SKIP
-- LOCKED, so the claim never waits) and updated: a queued job's whole state is there
-- (sql/0021). Every other writer of a live job locks its queue row first too (the cancel,
-- the completion, the rescue; the job row after it), so a claim passes over a job another
-- session holds and cannot deadlock with it (test_a_claim_passes_over_a_job_a_cancel_holds).
-- Once locked, "q.lease_expires_at IS NULL" is re-checked on the newest version of the
-- queue row: a job claimed or ended by a session that committed meanwhile is passed over
-- (an ended job's queue row is gone). The locks are taken
-- where the rows are found (in heads and fill, under their LIMITs), so a row another
-- claim holds is skipped and the next one taken, rather than leaving the batch short.
-- A head that fair leaves out stays locked until the claim commits, for a moment; fill
-- may take it (this transaction's own lock does not skip it), as heads2 would the heads1
-- rows it passes over but for its "ours already" filter. No condition on the job
-- row here: its selectivity (queued among millions of finished jobs) made the planner
-- merge-join the whole queue with jobs_pkey and sort it, ~300 ms per claim at 10M rows.
-- Left (issue 16, perf of a 2-process 100,000-job drain): the ring's first probe of a
-- company walks the index entries of the jobs claimed since job_queue's last VACUUM (their
-- old versions: dead, or killed but still read page by page), ~2.5 µs per job of ~50, and
-- more the longer autovacuum leaves the queue (it does not run in a drain of seconds).
-- Under sustained churn (bench.churn: 1 worker, up to 12,000 jobs/s, 130 s, 2 rounds)
-- PostgreSQL's CPU per job climbs ~80 -> 230-440 µs between autovacuum's visits (naptime
-- 60 s; the probe up to 8,800 pages; medians 161 / 270 µs, 8,700 / 5,900 jobs/s); with
-- autovacuum_naptime 5 s, 98 / 88 µs at the 12,000 jobs/s cap. job_queue's own autovacuum
-- thresholds and cost delay left the climb as it was (README: Autovacuum under load). So
-- the workers vacuum the queue every 5 s (pgjobs.queue_vacuum): 68 µs per job, 11,600-12,000
-- jobs/s, against 102-118 µs, 7,600-8,300 jobs/s on autovacuum alone (2 rounds).
-- Measured and not taken (issue 16): claims taking turns (a transaction advisory lock per
-- job-type set, pipelined before the claim, so none walks past rows another has locked):
-- 0.97x / 0.94x / 0.83x the jobs/s at 1 / 2 / 4 processes (bench.cpusplit, 3 interleaved
-- rounds; a session lock released after the claim: 0.90x / 0.76x / 0.81x), PostgreSQL CPU
-- per job unchanged (48 / 53 / 60 µs against 48 / 55 / 62): one claim at a time, through
-- its commit, left the cores idle (1.5 busy against 1.7-1.8).
-- Claims nothing where a limit can cover a job of %(job_types)s (pgjobs.limits, sql/0014):
-- such jobs are claimed through job_claim_batch_limited (limits.sql). The check is one
-- probe of that small table (scope), run once before anything else (the UPDATE's one-time
-- filter), so a worker need not ask before each claim, and a limit committed before the
-- claim began holds for it.
-- Planned with sorts priced out: the worker pipelines transaction_plans_by_index before
-- it, in its transaction (that query says why: a queue vacuumed empty).
-- Returns the claimed jobs, each with after_company: what to pass next time, and limited
-- false. Where a limit refused the claim: one row of NULLs but limited (true), so that
-- the worker learns from its claim, with no statement of its own, to claim through
-- job_claim_batch_limited.
WITH RECURSIVE scope AS (
    SELECT EXISTS (SELECT 1 FROM pgjobs.limits l
                   WHERE pgjobs.limit_scope(l.job_type, %(job_types)s::text[])) AS limited
), ring (company_id, priority, run_at, job_id, cpos, n, wrapped) AS (
    -- (company, level) pairs, each with its first queued job (where heads1 starts: the
    -- index entries before it are of jobs claimed or finished since, which this walk has
    -- passed already); cpos numbers the companies, n the pairs.
    SELECT first.company_id, first.priority, first.run_at, first.job_id, 1, 1, first.wrapped
    FROM (
        (SELECT q.company_id, q.priority, q.run_at, q.job_id, false AS wrapped
         FROM pgjobs.job_queue q
         WHERE q.lease_expires_at IS NULL AND q.company_id > %(after_company)s::text
         ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
        UNION ALL
        (SELECT q.company_id, q.priority, q.run_at, q.job_id, true FROM pgjobs.job_queue q
         WHERE q.lease_expires_at IS NULL
         ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
        LIMIT 1
    ) first
    -- The ring's switch: pgjobs.queries.oldest_first turns it off (NOT true: no ring, so no
    -- heads and no fair share: fill takes the oldest due jobs).
    WHERE true /* ring */
    UNION ALL
    SELECT nx.company_id, nx.priority, nx.run_at, nx.job_id,
           r.cpos + (nx.company_id <> r.company_id)::int, r.n + 1, nx.wrapped
    FROM ring r CROSS JOIN LATERAL (
        SELECT s.company_id, s.priority, s.run_at, s.job_id, s.wrapped FROM (
            -- the company's next level
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, r.wrapped AS wrapped
             FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL
               AND q.company_id = r.company_id AND q.priority < r.priority
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            UNION ALL
            -- the next company's first
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, r.wrapped
             FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL AND q.company_id > r.company_id
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            UNION ALL
            -- past the last company: wrap around to the first, once
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, true FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL AND NOT r.wrapped
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            LIMIT 1
        ) s
    ) nx
    WHERE r.n < %(limit)s::int
      -- wrapped round to the companies visited before wrapping: the ring is complete
      AND NOT coalesce(nx.wrapped AND nx.company_id > %(after_company)s::text, false)
), share AS (
    SELECT max(cpos) AS companies, count(*) AS pairs,
           (%(limit)s::int + max(cpos) - 1) / greatest(max(cpos), 1) AS per_company
    FROM ring
), heads1 AS (
    SELECT h.job_id, h.run_at, r.company_id, r.priority, r.cpos, r.n, h.ctid
    FROM ring r CROSS JOIN LATERAL (
        -- One level of one company: due jobs are a contiguous range of the index, so the
        -- walk ends at the first job not due yet (or of another level).
        SELECT q.job_id, q.run_at, q.ctid
        FROM pgjobs.job_queue q
        WHERE q.company_id = r.company_id AND q.priority = r.priority
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
        ORDER BY q.run_at, q.job_id
        LIMIT (SELECT per_company FROM share)
        FOR UPDATE OF q SKIP LOCKED
    ) h
), whole AS (
    -- The levels that gave their company's whole share: they may have more.
    SELECT n FROM heads1 GROUP BY n HAVING count(*) = (SELECT per_company FROM share)
), filled AS (
    -- Each of them asked for a second share of what the others left of the batch.
    SELECT r.company_id, r.priority, r.n,
           (%(limit)s::int - (SELECT count(*) FROM heads1) + (SELECT count(*) FROM whole) - 1)
           / greatest((SELECT count(*) FROM whole), 1) AS per_company
    FROM whole w JOIN ring r ON r.n = w.n
), heads2 AS (
    SELECT h.job_id, h.run_at, f.company_id, f.priority, r.cpos, f.n, h.ctid
    FROM filled f JOIN ring r ON r.n = f.n CROSS JOIN LATERAL (
        SELECT q.job_id, q.run_at, q.ctid
        FROM pgjobs.job_queue q
        WHERE q.company_id = r.company_id AND q.priority = r.priority  -- as in heads1
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
          AND q.job_id <> ALL(ARRAY(SELECT job_id FROM heads1))  -- ours already
        ORDER BY q.run_at, q.job_id
        LIMIT f.per_company
        FOR UPDATE OF q SKIP LOCKED
    ) h
    WHERE f.per_company > 0
), heads AS (
    SELECT h.job_id, h.priority, h.company_id, h.cpos, h.ctid,
           row_number() OVER (PARTITION BY h.n ORDER BY h.run_at, h.job_id) AS rank,
           count(*) OVER (PARTITION BY h.n) AS taken,
           (SELECT per_company FROM share) + coalesce(f.per_company, 0) AS asked
    FROM (SELECT * FROM heads1 UNION ALL SELECT * FROM heads2) h
    LEFT JOIN filled f ON f.n = h.n
), cut AS (
    SELECT greatest(
        -- the level of a company that took all it asked for there
        (SELECT max(priority) FROM heads WHERE taken = asked),
        CASE WHEN (SELECT pairs FROM share) >= %(limit)s::int THEN (
            -- the highest due level anywhere (one probe of job_queue_claim_idx)
            SELECT q.priority FROM pgjobs.job_queue q
            WHERE q.lease_expires_at IS NULL
              AND q.run_at <= coalesce(%(now)s::timestamptz, now())
              AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
            ORDER BY q.priority DESC, q.run_at, q.job_id
            LIMIT 1) END) AS priority
), fair AS (
    SELECT h.job_id, h.company_id, h.ctid,
           row_number() OVER (ORDER BY h.priority DESC, h.rank, h.cpos) AS n
    FROM heads h
    WHERE h.priority >= coalesce((SELECT priority FROM cut), h.priority)
    ORDER BY h.priority DESC, h.rank, h.cpos
    LIMIT %(limit)s::int
), fill AS (
    SELECT q.job_id, q.ctid FROM pgjobs.job_queue q
    WHERE q.lease_expires_at IS NULL
      AND q.run_at <= coalesce(%(now)s::timestamptz, now())
      AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
      AND q.job_id <> ALL(ARRAY(SELECT job_id FROM fair))
    ORDER BY q.priority DESC, q.run_at, q.job_id
    LIMIT %(limit)s::int - (SELECT count(*) FROM fair)
    FOR UPDATE OF q SKIP LOCKED
), claimed AS (
    UPDATE pgjobs.job_queue q
    SET status = 'running',
        attempts = q.attempts + 1,
        worker_id = %(worker_id)s::text,
        lease_token = q.lease_token + 1,
        lease_expires_at = coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s::float8),
        started_at = coalesce(%(now)s::timestamptz, now()),
        progress_fraction = NULL,
        progress_message = NULL,
        event_seq = q.event_seq + 1,
        last_event = 'content_job.running',
        updated_at = coalesce(%(now)s::timestamptz, now())
    -- The rows the CTEs locked (re-checking their WHERE on the newest version), by the
    -- ctid of that version: nobody can have changed them since, so it is still theirs, and
    -- a TID scan fetches each without walking job_queue_pkey (~0.8 µs per job, perf).
    WHERE q.ctid = ANY(ARRAY(SELECT ctid FROM fair UNION ALL SELECT ctid FROM fill))
      AND NOT (SELECT limited FROM scope)
      -- With the doorbell on, the worker runs this statement with events_doorbell_on here
      -- (pgjobs.doorbell.ringing): set once, before the statement's triggers.
      AND (SELECT true /* doorbell */)
    RETURNING q.job_id, q.priority, q.run_at, q.attempts, q.error_message, q.lease_token,
              q.event_seq, q.started_at
)
-- What the worker's Job needs that this statement does not set itself (pgjobs.types
-- CLAIMED_COLUMNS: status, worker_id, progress and updated_at it knows, and
-- lease_expires_at it computes from started_at); not the audit columns (last_event,
-- error_traceback, up to 16 KiB on a retry). Every column decoded costs the worker CPU
-- per job. job_claim_batch_limited returns the same. The job row is read by primary key,
-- not locked: what is read of it does not change while it is live.
SELECT j.id, j.company_id, j.job_type, j.input, c.priority, c.run_at, c.attempts,
    j.max_attempts, j.result, j.result_asset_id, c.error_message, j.source_task_id,
    c.lease_token, c.event_seq, c.started_at, j.finished_at, j.created_at,
    -- the company served last in the fair order (the ring's last if fair took none; with
    -- no ring, the one given: the rotation goes on where the last fair claim left it)
    coalesce((SELECT company_id FROM fair ORDER BY n DESC LIMIT 1),
             (SELECT company_id FROM ring ORDER BY n DESC LIMIT 1),
             %(after_company)s::text) AS after_company,
    false AS limited
FROM claimed c JOIN pgjobs.job_rows j ON j.id = c.job_id
UNION ALL
-- A limit refused the claim: a row of NULLs (the 17 job columns and after_company)
-- saying so. (UNION ALL: a LEFT JOIN of claimed to scope cost ~1 µs more per job.)
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, true
FROM scope WHERE scope.limited;

-- name: job_finish_many_if_leased
-- Batch completion: one statement ends many attempts, each only if its lease still holds.
-- outcome is 'done', 'error' (retry if attempts are left, else failed) or 'fail' (failed
-- now: unknown job type, asset too large, timeout on the last attempt...). Asset rows are
-- inserted only for jobs whose guarded update went through, so a fenced-off worker leaves
-- no row behind. Returns the jobs that were finished, each with its new status (done,
-- queued: to be retried, failed); anything missing lost its lease.
-- An attempt that ends its job writes the job row (its final state, the queue row's live
-- columns carried over; the trigger deletes the queue row); a retry writes the queue row
-- only (sql/0021).
-- The per-job values travel as arrays and are read by position (u.i): the relations the
-- lock and the UPDATEs join stay narrow, because PostgreSQL copies each joined row whole
-- (for its concurrent-update recheck), and wide ones cost more than the rest.
-- ids, lease_tokens, outcomes and retry_delays come as array literals the worker writes
-- itself ('{…,…}': the ids' text it has made for its rings, the tokens' and delays' str,
-- the outcomes' names), one string each that psycopg passes on as it is: ~0.6 µs of the
-- worker's CPU per job less than binary arrays, which psycopg writes element by element
-- in Python (lists work too: psycopg writes them as text arrays). results, errors and
-- tracebacks, NULL but for a batch that has one, go in binary format (the b
-- placeholders); the asset arrays, NULL but for a batch that stored an asset, in text.
WITH u AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::bigint[], %(outcomes)s::text[])
         WITH ORDINALITY AS u(id, lease_token, outcome, i)
), plan AS (
    -- Decide retry vs failed from the attempt the lease belongs to. The guard lives here:
    -- queue rows are locked in job_id order (as the heartbeat does, so the two can never
    -- deadlock) and re-checked after the lock is granted; once locked, no other session
    -- can change them (or their job rows: every writer locks the queue row first) before
    -- the UPDATEs below, which only need the id.
    SELECT q.job_id AS id, u.i, u.outcome, CASE
               WHEN u.outcome = 'done' THEN 'done'
               WHEN u.outcome = 'error' AND q.attempts < q.max_attempts THEN 'queued'
               ELSE 'failed' END AS next_status,
           q.attempts, q.worker_id, q.lease_token, q.started_at, q.progress_fraction,
           q.progress_message, q.event_seq
    -- Driven from the batch, in id order: one primary-key lookup and lock per entry of u,
    -- whatever the statistics say. (As a join, a generic plan, which expects few running
    -- jobs, scanned the narrow queue table instead, or drove the join from it and
    -- rescanned u for every row: batch x batch comparisons.) FOR UPDATE keeps the
    -- subquery from being flattened into a join.
    FROM (SELECT * FROM u ORDER BY u.id) u
    CROSS JOIN LATERAL (
        SELECT q.job_id, q.attempts, q.max_attempts, q.worker_id, q.lease_token, q.started_at,
               q.progress_fraction, q.progress_message, q.event_seq
        FROM pgjobs.job_queue q
        WHERE q.job_id = u.id AND q.lease_token = u.lease_token AND q.status = 'running'
        FOR UPDATE
    ) q
), ended AS (
    UPDATE pgjobs.job_rows j
    SET status = p.next_status,
        attempts = p.attempts,
        worker_id = p.worker_id,
        lease_token = p.lease_token,
        lease_expires_at = NULL,
        started_at = p.started_at,
        progress_fraction = p.progress_fraction,
        progress_message = p.progress_message,
        result = CASE WHEN p.outcome = 'done' THEN (%(results)b::jsonb[])[p.i] END,
        result_asset_id = CASE WHEN p.outcome = 'done' THEN (%(asset_ids)s::uuid[])[p.i] END,
        error_message = CASE WHEN p.outcome <> 'done' THEN (%(errors)b::text[])[p.i] END,
        -- An exception's traceback (NULL for the batch when no attempt raised one); the
        -- trigger copies it into this attempt's audit row (sql/0006).
        error_traceback = CASE WHEN p.outcome <> 'done' THEN (%(tracebacks)b::text[])[p.i] END,
        finished_at = coalesce(%(now)s::timestamptz, now()),
        event_seq = p.event_seq + 1,
        last_event = CASE p.next_status WHEN 'done' THEN 'content_job.done'
                                        ELSE 'content_job.failed' END,
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM plan p
    WHERE j.id = p.id AND p.next_status <> 'queued'  -- guarded and locked in plan
      -- events_doorbell_on with the doorbell on (pgjobs.doorbell.ringing): a one-time
      -- filter, evaluated even when no attempt ends (a batch of retries), and before the
      -- statement's triggers, which run at its end (both UPDATEs' alike)
      AND (SELECT true /* doorbell */)
    RETURNING j.id, j.company_id, j.source_task_id, j.status, p.i
), retried AS (
    UPDATE pgjobs.job_queue q
    SET status = 'queued',
        error_message = (%(errors)b::text[])[p.i],
        error_traceback = (%(tracebacks)b::text[])[p.i],
        run_at = coalesce(%(now)s::timestamptz, now())
                 + make_interval(secs => (%(retry_delays)s::float8[])[p.i]),
        lease_expires_at = NULL,
        event_seq = q.event_seq + 1,
        last_event = 'content_job.retrying',
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM plan p
    WHERE q.job_id = p.id AND p.next_status = 'queued'  -- guarded and locked in plan
    RETURNING q.job_id AS id, q.company_id, q.status, p.i
), stored AS (
    INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type, byte_size,
                               sha256, original_filename, source_task_id, source_job_id, created_at)
    SELECT (%(asset_ids)s::uuid[])[f.i], f.company_id, 'generated', (%(asset_keys)s::text[])[f.i],
           (%(asset_content_types)s::text[])[f.i], (%(asset_sizes)s::bigint[])[f.i],
           (%(asset_sha256s)s::text[])[f.i], (%(asset_filenames)s::text[])[f.i],
           f.source_task_id, f.id, coalesce(%(now)s::timestamptz, now())
    FROM ended f
    WHERE f.status = 'done' AND (%(asset_ids)s::uuid[])[f.i] IS NOT NULL
    RETURNING id
)
SELECT f.id, f.status, (SELECT count(*) FROM stored) AS assets_stored FROM ended f
UNION ALL
SELECT r.id, r.status, (SELECT count(*) FROM stored) FROM retried r;

-- name: job_progress_if_leased
-- On the queue row alone (sql/0021).
UPDATE pgjobs.job_queue
SET progress_fraction = %(fraction)s::real,
    progress_message = %(message)s::text,
    event_seq = event_seq + 1,
    last_event = 'content_job.progress',
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE job_id = %(id)s::uuid AND status = 'running' AND lease_token = %(lease_token)s::bigint
  -- events_doorbell_on with the doorbell on (pgjobs.doorbell.ringing)
  AND (SELECT true /* doorbell */)
RETURNING job_id AS id, event_seq;

-- name: job_extend_leases
-- Heartbeat: one statement renews every lease this worker still holds, on the queue rows
-- (sql/0021). Not a transition (no event_seq bump, so no event row). Returns the jobs
-- still held; one missing from the result was cancelled or rescued, and the worker stops
-- working on it.
WITH held AS (
    -- Lock in job_id order, like job_finish_many_if_leased (and driven from u as there):
    -- no deadlock between the two.
    SELECT q.job_id
    FROM (SELECT * FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::bigint[]) AS u(id, lease_token)
          ORDER BY 1) u
    CROSS JOIN LATERAL (
        SELECT q.job_id FROM pgjobs.job_queue q
        WHERE q.job_id = u.id AND q.lease_token = u.lease_token AND q.status = 'running'
        FOR UPDATE
    ) q
)
UPDATE pgjobs.job_queue q
SET lease_expires_at = coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s::float8)
-- Guarded and locked in the CTE; by primary key, whatever the plan cache guesses.
WHERE q.job_id = ANY(ARRAY(SELECT job_id FROM held))
RETURNING q.job_id AS id;

-- name: job_rescue_expired
-- Jobs whose lease ran out (worker killed, host gone, partitioned) go back to queued (the
-- queue row), or to failed when no attempt is left (the job row; its trigger deletes the
-- queue row). Guarded twice: the CTE skips rows another session holds, and re-checks
-- status and expiry on the row it locked, so a heartbeat or completion that committed
-- first wins and the rescue touches nothing. Returns the rescued jobs as pgjobs.jobs
-- shows them.
WITH expired AS (
    SELECT q.job_id AS id, q.attempts < q.max_attempts AS again, q.attempts, q.worker_id,
           q.lease_token, q.started_at, q.progress_fraction, q.progress_message, q.event_seq,
           format('lease expired: worker %%s stopped renewing it (attempt %%s of %%s)',
                  q.worker_id, q.attempts, q.max_attempts) AS error
    FROM pgjobs.job_queue q
    WHERE q.lease_expires_at < coalesce(%(now)s::timestamptz, now()) AND q.status = 'running'
    ORDER BY q.lease_expires_at
    LIMIT %(limit)s::int
    FOR UPDATE OF q SKIP LOCKED
), requeued AS (
    UPDATE pgjobs.job_queue q
    SET status = 'queued',
        error_message = e.error,
        error_traceback = NULL,  -- not the previous attempt's: this one raised nothing
        run_at = coalesce(%(now)s::timestamptz, now()),
        lease_expires_at = NULL,
        event_seq = q.event_seq + 1,
        last_event = 'content_job.retrying',
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM expired e
    WHERE q.job_id = e.id AND e.again
    RETURNING q.*
), ended AS (
    UPDATE pgjobs.job_rows j
    SET status = 'failed',
        attempts = e.attempts,
        worker_id = e.worker_id,
        lease_token = e.lease_token,
        lease_expires_at = NULL,
        started_at = e.started_at,
        progress_fraction = e.progress_fraction,
        progress_message = e.progress_message,
        error_message = e.error,
        error_traceback = NULL,
        run_at = coalesce(%(now)s::timestamptz, now()),
        finished_at = coalesce(%(now)s::timestamptz, now()),
        event_seq = e.event_seq + 1,
        last_event = 'content_job.failed',
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM expired e
    WHERE j.id = e.id AND NOT e.again
    RETURNING j.*
)
SELECT j.id, j.company_id, j.job_type, r.status, j.input, r.priority, r.run_at, r.attempts,
       r.max_attempts, j.result, j.result_asset_id, r.error_message, j.source_task_id,
       r.progress_fraction, r.progress_message, r.worker_id, r.lease_token, r.lease_expires_at,
       r.event_seq, r.last_event, r.started_at, j.finished_at, j.created_at, r.updated_at,
       r.error_traceback
FROM requeued r JOIN pgjobs.job_rows j ON j.id = r.job_id
UNION ALL
SELECT * FROM ended;

-- name: job_release_if_leased
-- Graceful shutdown: jobs that did not finish within the grace period go back to queued
-- without using up an attempt (the handler was interrupted, not wrong). The queue rows
-- only; returns the released jobs as pgjobs.jobs shows them.
WITH released AS (
    UPDATE pgjobs.job_queue q
    SET status = 'queued',
        attempts = q.attempts - 1,
        run_at = coalesce(%(now)s::timestamptz, now()),
        lease_expires_at = NULL,
        progress_fraction = NULL,
        progress_message = NULL,
        event_seq = q.event_seq + 1,
        last_event = 'content_job.queued',
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::bigint[]) AS u(id, lease_token)
    WHERE q.job_id = u.id AND q.status = 'running' AND q.lease_token = u.lease_token
    RETURNING q.*
)
SELECT j.id, j.company_id, j.job_type, r.status, j.input, r.priority, r.run_at, r.attempts,
       r.max_attempts, j.result, j.result_asset_id, r.error_message, j.source_task_id,
       r.progress_fraction, r.progress_message, r.worker_id, r.lease_token, r.lease_expires_at,
       r.event_seq, r.last_event, r.started_at, j.finished_at, j.created_at, r.updated_at,
       r.error_traceback
FROM released r JOIN pgjobs.job_rows j ON j.id = r.job_id;

-- name: job_cancel
-- Queued or running jobs only: the queue row is locked, then the job row takes its final
-- state (the live columns carried over; the trigger deletes the queue row). A running
-- job's worker learns of it from the workers' NOTIFY channel (sql/0007; or its next
-- heartbeat) and stops; its own completion is then fenced off by the status guard.
WITH live AS (
    SELECT q.job_id, q.priority, q.run_at, q.attempts, q.max_attempts, q.lease_token,
           q.worker_id, q.started_at, q.progress_fraction, q.progress_message, q.error_message,
           q.error_traceback, q.event_seq
    FROM pgjobs.job_queue q
    WHERE q.job_id = %(id)s::uuid AND q.company_id = %(company_id)s::text
    FOR UPDATE
)
UPDATE pgjobs.job_rows j
SET status = 'cancelled',
    priority = l.priority,
    run_at = l.run_at,
    attempts = l.attempts,
    max_attempts = l.max_attempts,
    lease_token = l.lease_token,
    worker_id = l.worker_id,
    started_at = l.started_at,
    progress_fraction = l.progress_fraction,
    progress_message = l.progress_message,
    error_message = l.error_message,
    error_traceback = l.error_traceback,
    lease_expires_at = NULL,
    finished_at = coalesce(%(now)s::timestamptz, now()),
    event_seq = l.event_seq + 1,
    last_event = 'content_job.cancelled',
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM live l
WHERE j.id = l.job_id
RETURNING j.*;

-- name: job_retry
-- Failed or cancelled jobs go back to queued now, with one more attempt if none is left.
-- The gateway's bulk retry (job_retry_failed_matching) sets the same columns. The job
-- row's trigger adds the queue row (sql/0021).
UPDATE pgjobs.job_rows
SET status = 'queued',
    max_attempts = greatest(max_attempts, attempts + 1),
    run_at = coalesce(%(now)s::timestamptz, now()),
    error_message = NULL,
    error_traceback = NULL,
    result = NULL,
    result_asset_id = NULL,
    finished_at = NULL,
    progress_fraction = NULL,
    progress_message = NULL,
    event_seq = event_seq + 1,
    last_event = 'content_job.retrying',
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text AND status IN ('failed', 'cancelled')
RETURNING *;

-- name: job_events_for_job
SELECT * FROM pgjobs.job_events
WHERE job_id = %(job_id)s::uuid AND company_id = %(company_id)s::text AND seq > %(after_seq)s::int
ORDER BY seq;

-- name: job_next_run_at
-- When the next queued job becomes due, so an idle worker can sleep exactly that long.
SELECT min(run_at) AS next_run_at FROM pgjobs.job_queue
WHERE lease_expires_at IS NULL
  AND (%(job_types)s::text[] IS NULL OR job_type = ANY(%(job_types)s::text[]));

-- name: asset_get
SELECT * FROM pgjobs.assets WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text;

-- name: worker_register
INSERT INTO pgjobs.workers (id, hostname, pid, job_types, concurrency, started_at, last_heartbeat_at)
VALUES (%(id)s::text, %(hostname)s::text, %(pid)s::int, %(job_types)s::text[], %(concurrency)s::int,
        coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = excluded.last_heartbeat_at;

-- name: worker_heartbeat
UPDATE pgjobs.workers SET last_heartbeat_at = coalesce(%(now)s::timestamptz, now())
WHERE id = %(id)s::text;

-- name: worker_count_live_by_type
-- For each of %(job_types)s, how many live workers claim it: registered with the type and
-- a heartbeat within %(within_seconds)s (a worker heartbeats more often than its lease
-- length). A queued job whose type has none stays queued until such a worker starts. Live is
-- pgjobs.worker_is_live (sql/0015), the definition the stuck_jobs view shares.
SELECT t.job_type, count(w.id)::int AS live_workers
FROM unnest(%(job_types)s::text[]) AS t(job_type)
LEFT JOIN pgjobs.workers w
       ON t.job_type = ANY(w.job_types)
      AND pgjobs.worker_is_live(w.last_heartbeat_at, %(within_seconds)s::float8, %(now)s::timestamptz)
GROUP BY t.job_type;

-- name: worker_deregister
DELETE FROM pgjobs.workers WHERE id = %(id)s::text;

-- name: worker_prune_stale
-- Bookkeeping only: rescue is driven by job leases, never by this table, so pruning a
-- worker row can never strand its jobs.
DELETE FROM pgjobs.workers
WHERE last_heartbeat_at < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(stale_seconds)s::float8);

-- name: schema_check
-- migrated: pgjobs' tables are there; tracked: yoyo's record of the applied migrations is
-- (schema_migrations_applied may be read: pgjobs.schema).
SELECT to_regclass('pgjobs.jobs') IS NOT NULL AND to_regclass('pgjobs.job_events') IS NOT NULL AS migrated,
       to_regclass('_yoyo_migration') IS NOT NULL AS tracked;

-- name: schema_migrations_applied
SELECT migration_id FROM _yoyo_migration;

-- name: connection_isolation_default
-- The isolation a transaction of this session gets when it does not ask for one (the
-- database's or the role's default_transaction_isolation): pgjobs.db.warn_unless_read_committed.
SELECT current_setting('default_transaction_isolation') AS isolation, current_user AS role_name;

-- name: connection_backend_pid
-- The server process this statement runs on. A connection whose BackendKeyData names
-- another pid goes through a pooler (PgBouncer sends a key of its own): pgjobs.db then
-- turns off prepared statements and the listener checks that LISTEN delivers.
SELECT pg_backend_pid() AS pid;

-- name: connection_dates_iso
-- For the session, where the server's DateStyle is not ISO (pgjobs.db.dates_iso): times
-- come back as ISO text, the only text form psycopg reads. The order part stays as it was.
SELECT set_config('datestyle', 'ISO', false) AS datestyle;

-- name: connection_plans_generic
-- For the session: a prepared statement planned once, generically, instead of five custom
-- plans before the plan cache considers a generic one (pgjobs.db.open_pool's
-- generic_plans: the worker's connections, where the claim takes ~2-4 ms to plan).
SELECT set_config('plan_cache_mode', 'force_generic_plan', false) AS plans;

-- name: transaction_plans_default
-- ctx.transaction() (pgjobs.txcomplete), for its transaction only: the handler's own
-- statements planned as the server's settings say (the value RESET would restore), not as
-- the worker's connections force for the claim (connection_plans_generic).
SELECT set_config('plan_cache_mode', reset_val, true) AS plans
FROM pg_settings WHERE name = 'plan_cache_mode';

-- name: transaction_lock_timeout_set_local
-- How long the statements of this transaction wait for a lock before failing with
-- lock_not_available (pgjobs.db.lock_timeout_for_transaction): the gateway's wait for
-- another request holding the same Idempotency-Key, a limit's wait for the claims running.
-- SET LOCAL: it ends with the transaction.
SELECT set_config('lock_timeout', %(lock_timeout)s::text, true);

-- name: transaction_plans_by_index
-- Run before a claim in its transaction (the worker's pipeline, pgjobs.worker): the claim
-- planned with sorts priced out, so that every ordered probe of job_queue is an index
-- scan whatever the statistics say. A VACUUM of an emptied queue (the workers' own,
-- pgjobs.queue_vacuum, keeps the table's pages) records 0 rows in those pages, and the
-- planner then estimates 0 rows however full the queue is until the next VACUUM or
-- ANALYZE: each ordered LIMIT 1 probe of the ring became a bitmap scan and a sort of
-- every queued row, and a claim of 200 over 300 companies on 100,000 queued jobs took
-- 6-13 s instead of ~20 ms, for as long as the plan was kept (a generic plan stays until
-- job_queue's next VACUUM or ANALYZE). With correct statistics the plans are the same
-- with sorts on or off (EXPLAIN, 300 companies, 100,000 queued), and every sort the
-- claim must do (its window functions, fair's order) has no alternative, so it is only
-- priced, not avoided. Local to the claim's transaction: the other statements on the
-- connection, and a handler's, keep the server's settings.
-- JIT off with it: a sort priced out adds 10^10 to the plan's cost, far above every
-- jit_*_above_cost, so on a server built with JIT (Debian's and most packaged builds have
-- it on) each claim was compiled with LLVM: ~1.25 s per claim of 200 (PostgreSQL 15,
-- auto_explain) against ~3 ms.
SELECT set_config('enable_sort', 'off', true) AS sort, set_config('jit', 'off', true) AS jit;

-- name: listener_notify_probe
-- pgjobs.notifier: a NOTIFY on the listener's private probe channel, sent from another
-- connection, to learn whether the LISTEN connection receives what others send.
SELECT pg_notify(%(channel)s::text, 'probe');

-- name: job_get_many
SELECT * FROM pgjobs.jobs WHERE id = ANY(%(ids)s::uuid[]) ORDER BY started_at, id;

-- name: job_find_matching
-- pgjobs.testing: jobs of a company and type whose input contains %(input)s.
SELECT * FROM pgjobs.jobs
WHERE company_id = %(company_id)s::text AND job_type = %(job_type)s::text
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(input)s::jsonb IS NULL OR input @> %(input)s::jsonb)
ORDER BY created_at, id;

-- name: job_fail_unreadable_if_leased
-- Jobs a worker claimed but cannot read (a value Python cannot represent, such as a time
-- before year 1): failed at once, each only if its lease still holds, with the reason
-- in the error message and so in the audit row. Times out of range are clamped
-- (sql/0005_time_bounds.sql) so that the row satisfies the range CHECKs even where they
-- were added NOT VALID; the error message keeps what they were. The queue row is locked,
-- the job row takes the final state (as job_finish_many_if_leased).
WITH live AS (
    SELECT q.job_id, q.attempts, q.worker_id, q.lease_token, q.started_at,
           q.progress_fraction, q.progress_message, q.event_seq, q.run_at, u.error
    FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::bigint[], %(errors)s::text[])
         AS u(id, lease_token, error)
    JOIN pgjobs.job_queue q ON q.job_id = u.id AND q.lease_token = u.lease_token
    WHERE q.status = 'running'
    ORDER BY q.job_id
    FOR UPDATE OF q
), seen AS (
    SELECT v.id, pgjobs.job_times_out_of_range(v) AS out_of_range, pgjobs.job_times_text(v) AS times
    FROM pgjobs.jobs v WHERE v.id IN (SELECT job_id FROM live)
)
UPDATE pgjobs.job_rows j
SET status = 'failed',
    error_message = CASE WHEN s.out_of_range THEN l.error || ' (' || s.times || ')'
                         ELSE l.error END,
    attempts = l.attempts,
    worker_id = l.worker_id,
    lease_token = l.lease_token,
    progress_fraction = l.progress_fraction,
    progress_message = l.progress_message,
    run_at = pgjobs.clamp_time(l.run_at),
    created_at = pgjobs.clamp_time(j.created_at),
    started_at = pgjobs.clamp_time(l.started_at),
    lease_expires_at = NULL,
    error_traceback = NULL,  -- no handler ran: not an earlier attempt's traceback
    finished_at = coalesce(%(now)s::timestamptz, now()),
    event_seq = l.event_seq + 1,
    last_event = 'content_job.failed',
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM live l JOIN seen s ON s.id = l.job_id
WHERE j.id = l.job_id
RETURNING j.id;

-- name: job_fail_out_of_range_if_queued
-- After a claim statement failed on a data error (nothing was claimed): fail the queued
-- jobs holding a time out of range, which the claim cannot move to running where the
-- range CHECKs were added NOT VALID and a worker could not read if it did. Locked SKIP
-- LOCKED like the claim (the queue row); clamped and audited like
-- job_fail_unreadable_if_leased.
WITH bad AS (
    SELECT q.job_id, q.attempts, q.event_seq, q.run_at, pgjobs.job_times_text(v) AS times
    FROM pgjobs.job_queue q JOIN pgjobs.jobs v ON v.id = q.job_id
    WHERE q.lease_expires_at IS NULL AND q.status = 'queued' AND pgjobs.job_times_out_of_range(v)
    LIMIT %(limit)s::int
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE pgjobs.job_rows j
SET status = 'failed',
    error_message = 'a time is outside 1970-01-01 to 9999-12-31 UTC, which pgjobs cannot '
                    'read (' || b.times || '); the job was not run',
    attempts = b.attempts,
    run_at = pgjobs.clamp_time(b.run_at),
    created_at = pgjobs.clamp_time(j.created_at),
    started_at = pgjobs.clamp_time(j.started_at),
    lease_expires_at = NULL,
    error_traceback = NULL,  -- no handler ran: not an earlier attempt's traceback
    finished_at = coalesce(%(now)s::timestamptz, now()),
    event_seq = b.event_seq + 1,
    last_event = 'content_job.failed',
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM bad b
WHERE j.id = b.job_id
RETURNING j.id;

-- name: job_queue_depth_by_type
-- Metrics (pgjobs_jobs, pgjobs_oldest_queued_age_seconds) and `pgjobs stats`: per job
-- type, the queued jobs that are due, those not due yet (scheduled, or retrying after a
-- delay), the running ones, and how long the oldest due one has been due. Reads only
-- pgjobs.job_queue, which holds the queued and running jobs and never the finished ones.
WITH p AS MATERIALIZED (SELECT coalesce(%(now)s::timestamptz, now()) AS now)
SELECT q.job_type,
       count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now) AS queued,
       count(*) FILTER (WHERE q.lease_expires_at IS NULL AND q.run_at > p.now) AS scheduled,
       count(*) FILTER (WHERE q.lease_expires_at IS NOT NULL) AS running,
       extract(epoch FROM p.now - min(q.run_at) FILTER (
           WHERE q.lease_expires_at IS NULL AND q.run_at <= p.now))::float8
           AS oldest_queued_seconds
FROM pgjobs.job_queue q
CROSS JOIN p
GROUP BY q.job_type, p.now
ORDER BY q.job_type;

-- name: job_events_failed_since_by_type
-- `pgjobs stats`: failed transitions per job type in the `window_seconds` before `now`,
-- read through job_events_created_brin_idx (sql/0015), so only the window's events are
-- read. created_at is its transaction's start, so a transaction open across the window's
-- start may be counted on the other side of it.
WITH p AS MATERIALIZED (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now,
           coalesce(%(now)s::timestamptz, now())
               - make_interval(secs => %(window_seconds)s::float8) AS since
)
SELECT j.job_type, count(*) AS failed
FROM pgjobs.job_events e
JOIN pgjobs.job_rows j ON j.id = e.job_id  -- job_type: the job row's own
CROSS JOIN p
WHERE e.type = 'content_job.failed'
  AND e.created_at >= p.since AND e.created_at <= p.now
GROUP BY j.job_type
ORDER BY j.job_type;

-- name: worker_list_by_heartbeat
-- `pgjobs stats`: every registered worker, how long ago it last heartbeated, and whether
-- that makes it live within `live_seconds` (pgjobs.worker_is_live, the one definition).
SELECT w.id, w.hostname, w.pid, w.job_types, w.concurrency,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - w.last_heartbeat_at)::float8
           AS heartbeat_age_seconds,
       pgjobs.worker_is_live(w.last_heartbeat_at, %(live_seconds)s::float8,
                             coalesce(%(now)s::timestamptz, now())) AS live
FROM pgjobs.workers w
ORDER BY w.id;

-- Unique jobs (sql/0011, pgjobs.unique): a key row names the job holding the key and the
-- states it holds it in; these statements run in the enqueue's transaction, in order.

-- name: job_unique_key_insert_many
-- Take the keys nobody holds. ON CONFLICT waits for a transaction that inserted the
-- same key and is still open, then skips the key if it committed: the caller reads the
-- holder next (job_unique_key_lock_many). Returns the keys taken.
INSERT INTO pgjobs.job_unique_keys (company_id, unique_key, job_id, held_while, expires_at,
                                    created_at)
SELECT u.company_id, u.unique_key, u.job_id, string_to_array(u.held_while, ','),
       coalesce(%(now)s::timestamptz, now()) + u.unique_for,
       coalesce(%(now)s::timestamptz, now())
FROM unnest(%(company_ids)s::text[], %(unique_keys)s::text[], %(job_ids)s::uuid[],
            %(held_whiles)s::text[], %(unique_fors)s::interval[])
     AS u(company_id, unique_key, job_id, held_while, unique_for)
ON CONFLICT (company_id, unique_key) DO NOTHING
RETURNING company_id, unique_key;

-- name: job_unique_key_lock_many
-- The key rows someone else holds, locked until the enqueue commits: a concurrent
-- enqueue of the same key waits here, then reads what this one wrote. No join to the
-- holder here: a row re-locked after a concurrent update is re-checked against the
-- rows the join found before it (EvalPlanQual), which would pair the new holder with no
-- job and call the key released. The caller reads the holders in its next statement,
-- whose snapshot sees any holder that committed before its key row could be locked.
-- Locked in key order, as the caller inserts them, so two batches cannot deadlock.
-- A key row deleted meanwhile is missing: the caller inserts it again.
SELECT k.company_id, k.unique_key, k.job_id, k.held_while,
       k.expires_at IS NOT NULL AND k.expires_at <= coalesce(%(now)s::timestamptz, now())
       AS expired
FROM pgjobs.job_unique_keys k
WHERE (k.company_id, k.unique_key) IN (
    SELECT * FROM unnest(%(company_ids)s::text[], %(unique_keys)s::text[]))
ORDER BY k.company_id, k.unique_key
FOR UPDATE OF k;

-- name: job_unique_key_take_many_if_released
-- Hand released keys to new jobs. Guarded on the holder the caller saw (it holds the
-- row lock, so this matches unless the row is gone).
UPDATE pgjobs.job_unique_keys k
SET job_id = u.job_id, held_while = string_to_array(u.held_while, ','),
    expires_at = coalesce(%(now)s::timestamptz, now()) + u.unique_for,
    created_at = coalesce(%(now)s::timestamptz, now())
FROM unnest(%(company_ids)s::text[], %(unique_keys)s::text[], %(old_job_ids)s::uuid[],
            %(job_ids)s::uuid[], %(held_whiles)s::text[], %(unique_fors)s::interval[])
     AS u(company_id, unique_key, old_job_id, job_id, held_while, unique_for)
WHERE k.company_id = u.company_id AND k.unique_key = u.unique_key AND k.job_id = u.old_job_id
RETURNING k.company_id, k.unique_key;

-- name: job_unique_key_delete_released
-- Cleanup (every worker's rescue loop): key rows whose holder is gone, has left the
-- states it held the key in, or expired. candidates is read without locks; locked then
-- re-finds each row with the holder seen (an inner join, so a row re-locked after a
-- concurrent update re-checks k.job_id against that holder and drops out when the key
-- went to a new job meanwhile), skipping rows an enqueue holds.
WITH candidates AS (
    SELECT k.company_id, k.unique_key, k.job_id
    FROM pgjobs.job_unique_keys k
    LEFT JOIN pgjobs.jobs j ON j.id = k.job_id
    WHERE j.id IS NULL OR NOT j.status = ANY(k.held_while)
       OR k.expires_at <= coalesce(%(now)s::timestamptz, now())
    LIMIT %(limit)s::int
), locked AS (
    SELECT k.company_id, k.unique_key, k.job_id
    FROM pgjobs.job_unique_keys k
    JOIN candidates c ON (k.company_id, k.unique_key, k.job_id)
                       = (c.company_id, c.unique_key, c.job_id)
    FOR UPDATE OF k SKIP LOCKED
)
DELETE FROM pgjobs.job_unique_keys k USING locked r
WHERE (k.company_id, k.unique_key, k.job_id) = (r.company_id, r.unique_key, r.job_id)
RETURNING k.company_id;

-- name: idempotency_key_delete_expired
-- Cleanup (every worker's rescue loop): HTTP Idempotency-Keys past their expiry, oldest
-- first. A POST replaying or re-taking one holds its lock and is skipped.
DELETE FROM pgjobs.idempotency_keys k
WHERE (k.company_id, k.key) IN (
    SELECT company_id, key FROM pgjobs.idempotency_keys
    WHERE expires_at <= coalesce(%(now)s::timestamptz, now())
    ORDER BY expires_at
    LIMIT %(limit)s::int
    FOR UPDATE SKIP LOCKED)
  AND k.expires_at <= coalesce(%(now)s::timestamptz, now())
RETURNING k.company_id;

-- Periodic jobs (pgjobs.scheduler, sql/0012_schedules.sql) ---------------------------

-- name: schedule_upsert_declared
-- A schedule declared in code, written by each worker whose registry declares it when it
-- starts. created_at is kept on update: slots before it are never due.
INSERT INTO pgjobs.schedules (name, cron, timezone, company_id, job_type, input, priority,
                              max_attempts, catch_up, source, created_at, updated_at)
VALUES (%(name)s, %(cron)s, %(timezone)s, %(company_id)s, %(job_type)s, %(input)s::jsonb,
        %(priority)s, %(max_attempts)s, %(catch_up)s::interval, 'code',
        coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO UPDATE
SET cron = excluded.cron, timezone = excluded.timezone, company_id = excluded.company_id,
    job_type = excluded.job_type, input = excluded.input, priority = excluded.priority,
    max_attempts = excluded.max_attempts, catch_up = excluded.catch_up, source = 'code',
    updated_at = excluded.updated_at
-- Unchanged: no write, so workers starting together do not queue on the row lock.
WHERE (pgjobs.schedules.cron, pgjobs.schedules.timezone, pgjobs.schedules.company_id,
       pgjobs.schedules.job_type, pgjobs.schedules.input, pgjobs.schedules.priority,
       pgjobs.schedules.max_attempts, pgjobs.schedules.catch_up, pgjobs.schedules.source)
      IS DISTINCT FROM (excluded.cron, excluded.timezone, excluded.company_id,
                        excluded.job_type, excluded.input, excluded.priority,
                        excluded.max_attempts, excluded.catch_up, excluded.source);

-- name: schedule_insert_if_absent
-- A schedule added at run time (pgjobs schedules add); no row when the name is taken.
INSERT INTO pgjobs.schedules (name, cron, timezone, company_id, job_type, input, priority,
                              max_attempts, catch_up, source, created_at, updated_at)
VALUES (%(name)s, %(cron)s, %(timezone)s, %(company_id)s, %(job_type)s, %(input)s::jsonb,
        %(priority)s, %(max_attempts)s, %(catch_up)s::interval, 'database',
        coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- name: schedule_delete
-- Its slot rows go with it (ON DELETE CASCADE); the jobs it enqueued stay.
DELETE FROM pgjobs.schedules WHERE name = %(name)s RETURNING name, source;

-- name: schedule_list_with_last_slot
-- Every schedule with the slot recorded last (enqueued or skipped: where the next pass
-- starts) and the job enqueued last, with its status. Both laterals walk the slot
-- table's primary key backwards.
SELECT s.name, s.cron, s.timezone, s.company_id, s.job_type, s.input, s.priority,
       s.max_attempts, extract(epoch FROM s.catch_up)::float8 AS catch_up_seconds, s.source,
       s.created_at, s.updated_at, last.slot_at AS last_slot_at,
       enq.slot_at AS last_job_slot_at, enq.job_id AS last_job_id, j.status AS last_job_status
FROM pgjobs.schedules s
LEFT JOIN LATERAL (
    SELECT l.slot_at FROM pgjobs.schedule_slots l
    WHERE l.schedule_name = s.name ORDER BY l.slot_at DESC LIMIT 1
) last ON true
LEFT JOIN LATERAL (
    SELECT e.slot_at, e.job_id FROM pgjobs.schedule_slots e
    WHERE e.schedule_name = s.name AND e.job_id IS NOT NULL ORDER BY e.slot_at DESC LIMIT 1
) enq ON true
LEFT JOIN pgjobs.jobs j ON j.id = enq.job_id
ORDER BY s.name;

-- name: schedule_clock_now
-- The scheduler judges which slots are due by the database's clock, the one clock every
-- worker shares.
SELECT now() AS now;

-- name: schedule_slot_record_once
-- Record one slot, and enqueue its job (unless job_id is NULL: a skipped slot), in one
-- statement. The slot's primary key is the lock: of the workers recording the same slot
-- at once, one inserts and the others wait for its commit and insert nothing, so each
-- slot is enqueued once. A worker whose view is stale (a slot at or after this one is
-- already recorded) records nothing either. The job is inserted as job_insert_many
-- inserts one, so its audit row and NOTIFY come from the same triggers.
WITH slot AS (
    INSERT INTO pgjobs.schedule_slots (schedule_name, slot_at, job_id, recorded_at)
    SELECT %(name)s, %(slot_at)s::timestamptz, %(job_id)s::uuid,
           coalesce(%(now)s::timestamptz, now())
    WHERE NOT EXISTS (
        SELECT 1 FROM pgjobs.schedule_slots newer
        WHERE newer.schedule_name = %(name)s AND newer.slot_at >= %(slot_at)s::timestamptz)
    ON CONFLICT (schedule_name, slot_at) DO NOTHING
    RETURNING job_id
), job AS (
    INSERT INTO pgjobs.job_rows (id, company_id, job_type, input, priority, run_at,
                                 max_attempts, created_at, updated_at)
    SELECT slot.job_id, %(company_id)s, %(job_type)s, %(input)s::jsonb, %(priority)s::int,
           coalesce(%(now)s::timestamptz, now()), %(max_attempts)s::int,
           coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now())
    FROM slot WHERE slot.job_id IS NOT NULL
    RETURNING id
)
SELECT (SELECT count(*) FROM slot) = 1 AS recorded, (SELECT id FROM job) AS job_id;

-- name: schedule_slot_prune_old
-- Slot rows older than the retention, except each schedule's latest (where its next
-- pass starts, and what schedule_slot_record_once's staleness guard compares with).
DELETE FROM pgjobs.schedule_slots o
WHERE o.slot_at < coalesce(%(now)s::timestamptz, now()) - %(keep)s::interval
  AND EXISTS (SELECT 1 FROM pgjobs.schedule_slots n
              WHERE n.schedule_name = o.schedule_name AND n.slot_at > o.slot_at);

-- Retention (pgjobs.retention, sql/0013) ------------------------------------------------

-- name: job_delete_finished_before
-- One batch of `pgjobs prune`: the next %(limit)s jobs after %(after_id)s in id order (ids
-- are UUIDv7, so id order is creation order and the walk is a primary-key range scan),
-- of which the finished ones (done, failed, cancelled) that finished before %(before)s are
-- deleted. Rows another transaction holds are skipped (a retry or a late completion in
-- flight: the next run sees them), and the status and finish time are re-checked on the
-- locked row. With %(assets)s, their asset rows go in the same statement and their keys
-- are queued in pgjobs.asset_deletions (the files are deleted after the commit). `done`:
-- the page held no job created before the cut-off (none after it can have finished
-- before it), so the walk can stop.
WITH page AS MATERIALIZED (
    SELECT id, created_at FROM pgjobs.job_rows
    WHERE id > %(after_id)s::uuid
    ORDER BY id
    LIMIT %(limit)s::int
), doomed AS (
    -- The job rows' status: an ended job's own (a live job's is its queue row's, and its
    -- job row never shows an ended status while it is live, sql/0021).
    SELECT j.id FROM pgjobs.job_rows j
    WHERE j.id IN (SELECT id FROM page)
      AND j.status IN ('done', 'failed', 'cancelled')
      AND j.finished_at < %(before)s::timestamptz
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM pgjobs.job_rows j USING doomed d
    WHERE j.id = d.id
    RETURNING j.id, j.status
), assets AS (
    DELETE FROM pgjobs.assets a USING gone g
    WHERE %(assets)s::boolean AND a.source_job_id = g.id
    RETURNING a.id, a.object_key
), queued AS (
    INSERT INTO pgjobs.asset_deletions (object_key, asset_id, queued_at)
    SELECT object_key, id, coalesce(%(now)s::timestamptz, now()) FROM assets
    ON CONFLICT (object_key) DO NOTHING
)
SELECT (SELECT id FROM page ORDER BY id DESC LIMIT 1) AS last_id,
       coalesce((SELECT bool_and(created_at >= %(before)s::timestamptz) FROM page), true) AS done,
       (SELECT count(*) FROM gone WHERE status = 'done') AS done_jobs,
       (SELECT count(*) FROM gone WHERE status = 'failed') AS failed_jobs,
       (SELECT count(*) FROM gone WHERE status = 'cancelled') AS cancelled_jobs,
       coalesce((SELECT array_agg(object_key ORDER BY object_key) FROM assets), '{}') AS asset_keys;

-- name: job_events_prune_before
-- One batch of audit-log retention, through the one function the append-only trigger lets
-- delete (sql/0013), walking each company's rows in (xid, id) order (sql/0016). The cursor
-- (after_company, after_xid, after_id) is the last batch's (last_company, last_xid,
-- last_id); after_company NULL starts at the first company.
SELECT deleted, last_company, last_xid::text AS last_xid, last_id, done
FROM pgjobs.prune_events(%(before)s::timestamptz, %(after_company)s::text,
                         %(after_xid)s::xid8, %(after_id)s::bigint, %(limit)s::int);

-- name: asset_deletion_list_pending
-- Files of pruned assets still to delete (their delete failed, or the prune stopped
-- between its commit and the delete), a page at a time in key order.
SELECT object_key FROM pgjobs.asset_deletions
WHERE object_key > %(after_key)s::text
ORDER BY object_key
LIMIT %(limit)s::int;

-- name: asset_deletion_delete_done
DELETE FROM pgjobs.asset_deletions WHERE object_key = ANY (%(keys)s::text[]);

-- name: asset_deletion_update_failed
UPDATE pgjobs.asset_deletions
SET attempts = attempts + 1, last_error = left(%(error)s::text, 2000)
WHERE object_key = %(key)s::text;

-- name: retention_try_lock
-- Whether this transaction is the one retention leader: a transaction-level advisory lock
-- (released at commit, so no session state: it works through PgBouncer in transaction
-- mode). Every batch of a worker's retention run takes it first.
SELECT pg_try_advisory_xact_lock(hashtext('pgjobs.retention')::bigint) AS leader;

-- name: retention_claim_run
-- A worker's retention run for this interval: at most one per %(interval_seconds)s among
-- all workers (the row is updated only if the last run started longer ago). Zero rows:
-- another worker has run it.
UPDATE pgjobs.retention
SET last_run_at = coalesce(%(now)s::timestamptz, now()), runs = runs + 1
WHERE last_run_at IS NULL
   OR last_run_at <= coalesce(%(now)s::timestamptz, now())
                     - make_interval(secs => %(interval_seconds)s::float8)
RETURNING runs;

-- name: queue_vacuum_check_permitted
-- Whether this role's VACUUM of pgjobs.job_queue would do anything: PostgreSQL lets the
-- table's owner, the database's owner (each: or a role with their privileges; a
-- superuser has every role's) and, from 17, a role granted MAINTAIN on it vacuum it;
-- anyone else's VACUUM only warns and skips it. has_table_privilege's MAINTAIN is unknown
-- before 17, hence the CASE (evaluated only there).
SELECT pg_has_role(c.relowner, 'USAGE')
       OR pg_has_role(d.datdba, 'USAGE')
       OR CASE WHEN current_setting('server_version_num')::int >= 170000
               THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END AS permitted,
       pg_get_userbyid(c.relowner) AS owner,
       current_user AS role
FROM pg_class c, pg_database d
WHERE c.oid = 'pgjobs.job_queue'::regclass AND d.datname = current_database();

-- name: queue_vacuum_claim_run
-- A worker's vacuum of pgjobs.job_queue for this interval: at most one per
-- %(interval_seconds)s among all workers (the row is updated only if the last one started
-- longer ago; a worker updating it at the same moment waits for the first's commit, then
-- finds it recent), none while a vacuum of the table by anyone (autovacuum included)
-- ended within the interval, and none while the table has fewer than %(min_dead)s dead
-- tuples (an idle queue). Zero rows: not this worker's to run now.
UPDATE pgjobs.queue_vacuum
SET last_run_at = coalesce(%(now)s::timestamptz, now()), runs = runs + 1
WHERE (last_run_at IS NULL
       OR last_run_at <= coalesce(%(now)s::timestamptz, now())
                         - make_interval(secs => %(interval_seconds)s::float8))
  AND EXISTS (
      SELECT FROM pg_stat_user_tables t
      WHERE t.relid = 'pgjobs.job_queue'::regclass
        AND t.n_dead_tup >= %(min_dead)s::bigint
        AND coalesce(greatest(t.last_vacuum, t.last_autovacuum), '-infinity')
            <= coalesce(%(now)s::timestamptz, now())
               - make_interval(secs => %(interval_seconds)s::float8))
RETURNING runs;

-- name: queue_vacuum
-- The vacuum itself (run outside a transaction: VACUUM cannot run in one). SKIP_LOCKED:
-- if another vacuum of the table (autovacuum's) holds its lock, skip it with a warning
-- (SQLSTATE 55P03) instead of waiting. INDEX_CLEANUP ON: always remove the dead index
-- entries, which are what the claim walks (AUTO skips the index pass when under 2 percent of
-- the table's pages have dead tuples). TRUNCATE false: never take the ACCESS EXCLUSIVE
-- lock that returning empty pages at the table's end needs, which would stop claims
-- while held; the queue reuses its pages, and autovacuum still truncates.
VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, TRUNCATE false) pgjobs.job_queue;

-- name: events_doorbell_on
-- Ask the publish trigger for a ring instead of NOTIFY items for the rest of this
-- transaction (sql/0019_doorbell.sql): run first in a transaction whose transitions the
-- caller rings for after its commit (pgjobs.doorbell). The worker's claim, finish and
-- progress statements run it inside themselves instead, as an uncorrelated subquery in
-- place of their doorbell mark (pgjobs.doorbell.ringing): evaluated once before the
-- statement changes a row, so before any of its triggers.
SELECT set_config('pgjobs.doorbell', 'on', true);

-- name: events_ring
-- A ring (one pgjobs.events.encode_ring payload) for transitions committed with the
-- doorbell on; sent after that commit, in a transaction of its own, which writes no WAL
-- and so does not wait for a flush at its commit while it holds the NOTIFY lock. One
-- payload per statement (a ring of up to ~200 jobs is one): as an array, ~30 µs more of
-- the worker's CPU per ring in binary format, ~170 µs more in text format (psycopg quotes
-- the ~4 KB strings character by character in Python). Several: events_ring_many.
SELECT pg_notify('pgjobs_events', %(payload)s::text);

-- name: events_ring_many
-- events_ring for several payloads (a ring for more than ~200 jobs: a bulk enqueue's) in
-- one statement, one round trip: a text array literal of them (pgjobs.doorbell), notified
-- in its order (pg_notify is volatile, so it runs after the sort).
SELECT pg_notify('pgjobs_events', u.payload)
FROM unnest(%(payloads)s::text[]) WITH ORDINALITY AS u(payload, i)
ORDER BY u.i;
