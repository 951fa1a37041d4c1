-- The statements of pgjobs before sql/0021_live_state.sql (src/pgjobs/queries.sql at
-- a134dab), which wrote the table pgjobs.jobs: what the producers and workers of the
-- version before that migration ran. tests/gateway/test_gw_migration.py and
-- tests/integration/test_migrations.py move jobs with them on the schema before it
-- (helpers.QUERIES_BEFORE_LIVE_STATE); bench.narrow drains with them as its side 0020.

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
WITH inserted AS (
    INSERT INTO pgjobs.jobs (id, company_id, job_type, input, source_task_id, priority, run_at,
                             max_attempts, created_at, updated_at)
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
-- Locking, as before: candidates come from pgjobs.job_queue (sql/0004), and both the
-- queue row and the job row are locked, both SKIP LOCKED, so the claim never waits: every
-- other writer locks the job row first and then (through the trigger) the queue row, and
-- a claim waiting for a job row while holding its queue row could deadlock with them
-- (test_a_claim_passes_over_a_job_a_cancel_holds). Measured and not taken: locking the
-- queue row only saves ~2.5 µs of the claim's ~24 µs of PostgreSQL CPU per job, but then
-- a cancel must lock the queue row before the job row, the reverse of the completion's
-- order for running jobs, and a cancel racing a claim's commit and the completion after
-- it can deadlock; locking the job row only (a re-check on it instead of the queue
-- row's) saved nothing measurable.
-- Once locked, "q.lease_expires_at IS NULL" is re-checked on the newest version of the
-- queue row, which changes in the same transaction as the job row: a job claimed or
-- finished by a session that committed meanwhile is passed over. The locks are taken
-- where the rows are found (in heads and fill, under their LIMITs), so a row another
-- claim holds is skipped and the next one taken, rather than leaving the batch short.
-- A head that fair leaves out stays locked until the claim commits, for a moment; fill
-- may take it (this transaction's own lock does not skip it), as heads2 would the heads1
-- rows it passes over but for its "ours already" filter. No condition on the job
-- row here: its selectivity (queued among millions of finished jobs) made the planner
-- merge-join the whole queue with jobs_pkey and sort it, ~300 ms per claim at 10M rows.
-- Claims nothing where a limit can cover a job of %(job_types)s (pgjobs.limits, sql/0014):
-- such jobs are claimed through job_claim_batch_limited (limits.sql). The check is one
-- probe of that small table (scope), run once before anything else (the UPDATE's one-time
-- filter), so a worker need not ask before each claim, and a limit committed before the
-- claim began holds for it.
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
    SELECT h.job_id, h.run_at, r.company_id, r.priority, r.cpos, r.n
    FROM ring r CROSS JOIN LATERAL (
        -- One level of one company: due jobs are a contiguous range of the index, so the
        -- walk ends at the first job not due yet (or of another level).
        SELECT q.job_id, q.run_at
        FROM pgjobs.job_queue q JOIN pgjobs.jobs j ON j.id = q.job_id
        WHERE q.company_id = r.company_id AND q.priority = r.priority
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
        ORDER BY q.run_at, q.job_id
        LIMIT (SELECT per_company FROM share)
        FOR UPDATE OF q, j SKIP LOCKED
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
    SELECT h.job_id, h.run_at, f.company_id, f.priority, r.cpos, f.n
    FROM filled f JOIN ring r ON r.n = f.n CROSS JOIN LATERAL (
        SELECT q.job_id, q.run_at
        FROM pgjobs.job_queue q JOIN pgjobs.jobs j ON j.id = q.job_id
        WHERE q.company_id = r.company_id AND q.priority = r.priority  -- as in heads1
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
          AND q.job_id <> ALL(ARRAY(SELECT job_id FROM heads1))  -- ours already
        ORDER BY q.run_at, q.job_id
        LIMIT f.per_company
        FOR UPDATE OF q, j SKIP LOCKED
    ) h
    WHERE f.per_company > 0
), heads AS (
    SELECT h.job_id, h.priority, h.company_id, h.cpos,
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
    SELECT h.job_id, h.company_id,
           row_number() OVER (ORDER BY h.priority DESC, h.rank, h.cpos) AS n
    FROM heads h
    WHERE h.priority >= coalesce((SELECT priority FROM cut), h.priority)
    ORDER BY h.priority DESC, h.rank, h.cpos
    LIMIT %(limit)s::int
), fill AS (
    SELECT q.job_id FROM pgjobs.job_queue q JOIN pgjobs.jobs j ON j.id = q.job_id
    WHERE q.lease_expires_at IS NULL
      AND q.run_at <= coalesce(%(now)s::timestamptz, now())
      AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
      AND q.job_id <> ALL(ARRAY(SELECT job_id FROM fair))
    ORDER BY q.priority DESC, q.run_at, q.job_id
    LIMIT %(limit)s::int - (SELECT count(*) FROM fair)
    FOR UPDATE OF q, j SKIP LOCKED
), claimed AS (
    UPDATE pgjobs.jobs j
    SET status = 'running',
        attempts = j.attempts + 1,
        worker_id = %(worker_id)s::text,
        lease_token = j.lease_token + 1,
        lease_expires_at = coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s::float8),
        started_at = coalesce(%(now)s::timestamptz, now()),
        progress_fraction = NULL,
        progress_message = NULL,
        event_seq = j.event_seq + 1,
        last_event = 'content_job.running',
        updated_at = coalesce(%(now)s::timestamptz, now())
    -- Rows by primary key, whatever the plan cache guesses for LIMIT $n; the CTEs locked them
    -- (re-checking their WHERE on the newest version), so nobody changed them since.
    WHERE j.id = ANY(ARRAY(SELECT job_id FROM fair UNION ALL SELECT job_id FROM fill))
      AND NOT (SELECT limited FROM scope)
      -- With the doorbell on, the worker runs this statement with events_doorbell_on here
      -- (pgjobs.doorbell.ringing): set once, before the statement's triggers.
      AND (SELECT true /* doorbell */)
    -- What the worker's Job needs that this statement does not set itself (pgjobs.types
    -- CLAIMED_COLUMNS: status, worker_id, progress and updated_at it knows, and
    -- lease_expires_at it computes from started_at); not the audit columns (last_event,
    -- error_traceback, up to 16 KiB on a retry). Every column decoded costs the worker CPU
    -- per job. job_claim_batch_limited returns the same.
    RETURNING j.id, j.company_id, j.job_type, j.input, j.priority, j.run_at, j.attempts,
        j.max_attempts, j.result, j.result_asset_id, j.error_message, j.source_task_id,
        j.lease_token, j.event_seq, j.started_at, j.finished_at, j.created_at
)
SELECT c.*,
    -- the company served last in the fair order (the ring's last if fair took none)
    coalesce((SELECT company_id FROM fair ORDER BY n DESC LIMIT 1),
             (SELECT company_id FROM ring ORDER BY n DESC LIMIT 1)) AS after_company,
    false AS limited
FROM claimed c
UNION ALL
-- A limit refused the claim: a row of NULLs (claimed's 17 columns and after_company)
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
-- The per-job values travel as arrays and are read by position (u.i): the relations the
-- lock and the UPDATE join stay three columns wide, because PostgreSQL copies each joined
-- row whole (for its concurrent-update recheck), and wide ones cost more than the rest.
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
    -- rows are locked in id order (as the heartbeat does, so the two can never deadlock)
    -- and re-checked after the lock is granted; once locked, no other session can change
    -- them before the UPDATE below, which only needs the id.
    SELECT j.id, u.i, u.outcome, CASE
               WHEN u.outcome = 'done' THEN 'done'
               WHEN u.outcome = 'error' AND j.attempts < j.max_attempts THEN 'queued'
               ELSE 'failed' END AS next_status
    -- Driven from the batch: one primary-key lookup per entry of u. (An extra
    -- "j.id = ANY(ids)" here made the planner, which expects few running jobs, drive the
    -- join from jobs instead and rescan u for every row: batch x batch comparisons, a
    -- third of this statement's time at 100 jobs per batch.)
    FROM u JOIN pgjobs.jobs j ON j.id = u.id AND j.lease_token = u.lease_token
    WHERE j.status = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), finished AS (
    UPDATE pgjobs.jobs j
    SET status = p.next_status,
        result = CASE WHEN p.outcome = 'done' THEN (%(results)b::jsonb[])[p.i] END,
        result_asset_id = CASE WHEN p.outcome = 'done' THEN (%(asset_ids)s::uuid[])[p.i] END,
        error_message = CASE WHEN p.outcome <> 'done' THEN (%(errors)b::text[])[p.i] END,
        -- An exception's traceback (NULL for the batch when no attempt raised one); the
        -- publish trigger copies it into this attempt's audit row (sql/0006).
        error_traceback = CASE WHEN p.outcome <> 'done' THEN (%(tracebacks)b::text[])[p.i] END,
        run_at = CASE WHEN p.next_status = 'queued'
                      THEN coalesce(%(now)s::timestamptz, now())
                           + make_interval(secs => (%(retry_delays)s::float8[])[p.i])
                      ELSE j.run_at END,
        lease_expires_at = NULL,
        finished_at = CASE WHEN p.next_status = 'queued' THEN NULL
                           ELSE coalesce(%(now)s::timestamptz, now()) END,
        event_seq = j.event_seq + 1,
        last_event = CASE p.next_status WHEN 'done' THEN 'content_job.done'
                                        WHEN 'queued' THEN 'content_job.retrying'
                                        ELSE 'content_job.failed' END,
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM plan p
    WHERE j.id = p.id  -- guarded and locked in plan
      -- events_doorbell_on with the doorbell on (pgjobs.doorbell.ringing)
      AND (SELECT true /* doorbell */)
    RETURNING j.id, j.company_id, j.source_task_id, j.status, p.i
), stored AS (
    INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type, byte_size,
                               sha256, original_filename, source_task_id, source_job_id, created_at)
    SELECT (%(asset_ids)s::uuid[])[f.i], f.company_id, 'generated', (%(asset_keys)s::text[])[f.i],
           (%(asset_content_types)s::text[])[f.i], (%(asset_sizes)s::bigint[])[f.i],
           (%(asset_sha256s)s::text[])[f.i], (%(asset_filenames)s::text[])[f.i],
           f.source_task_id, f.id, coalesce(%(now)s::timestamptz, now())
    FROM finished f
    WHERE f.status = 'done' AND (%(asset_ids)s::uuid[])[f.i] IS NOT NULL
    RETURNING id
)
SELECT f.id, f.status, (SELECT count(*) FROM stored) AS assets_stored FROM finished f;

-- name: job_cancel
-- Queued or running jobs only. A running job's worker learns of it from the workers'
-- NOTIFY channel (sql/0007; or its next heartbeat) and stops; its own completion is then fenced off by the status guard.
UPDATE pgjobs.jobs
SET status = 'cancelled',
    lease_expires_at = NULL,
    finished_at = coalesce(%(now)s::timestamptz, now()),
    event_seq = event_seq + 1,
    last_event = 'content_job.cancelled',
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text AND status IN ('queued', 'running')
RETURNING *;
