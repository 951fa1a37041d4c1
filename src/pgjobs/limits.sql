-- The queries of concurrency and rate limits (sql/0014_limits.sql), loaded with
-- queries.sql into pgjobs.queries.QUERIES: the limited claim, and the limits' own
-- reads and writes. Parameters and conventions as in queries.sql.

-- name: limit_lock_for_types
-- A transaction-level advisory lock on each limit that can cover a job of %(job_types)s,
-- in id order (every claim takes them in that order, so two claims never deadlock), held
-- until the claim commits. A statement after it takes its snapshot after the locks are
-- granted, so it counts every job an earlier holder claimed. Returns how many limits were
-- locked (0: none covers these jobs any more) and the seconds until the earliest current
-- rate window ends (NULL without a rate limit): when a claim came back short, the worker
-- looks again then.
SELECT count(*) AS locked,
       min(extract(epoch FROM
               to_timestamp((floor(extract(epoch FROM coalesce(%(now)s::timestamptz, now()))
                                   / l.period_seconds) + 1) * l.period_seconds)
               - clock_timestamp()))::float8 AS window_ends_in
FROM (
    SELECT id, period_seconds FROM pgjobs.limits
    WHERE pgjobs.limit_scope(job_type, %(job_types)s::text[])
    ORDER BY id
    OFFSET 0  -- a fence: the locks below are taken in this order
) l
CROSS JOIN LATERAL (SELECT pg_advisory_xact_lock(hashtext('pgjobs.limits'), l.id::int)) AS lock;

-- name: job_claim_batch_limited
-- job_claim_batch (queries.sql: read its comments first) for a worker some limit applies
-- to. Differences:
-- room: each applicable limit's room (running jobs from limit_running's bound, or counted
-- from job_queue's leased rows where the bound plus the batch is over max_running; rate
-- starts from limit_windows' row for the current window); blocked: those with none.
-- A job a blocked limit covers is no candidate (heads1, heads2, cut, fill pass it by;
-- a company blocked on all its jobs is not walked at all). Jobs of a (company, type)
-- that is blocked are walked past within their level, as other workers' types are.
-- chosen/held/keep: what fair and fill took, cut to each limit's room in claim order;
-- the rows held back were locked and are left as they were (queued).
-- counted/pruned: the claimed jobs added to each rate limit's current window, and the
-- windows that ended more than a period ago deleted. bounded: each concurrency limit's
-- bound (sql/0025), its count (or its bound) plus the claimed jobs it covers.
-- The bound: only claims holding a limit's lock start jobs it covers (a new limit waits
-- for the claims running: limit_lock_table_for_upsert), and nothing else makes a job
-- running, so the count at the last exact count plus every job claimed since is at least
-- the jobs running. While bound + %(limit)s <= max_running the room cannot cut this batch
-- and is taken as max_running - bound (a lower bound of the room: held counts through
-- it only below the batch); otherwise the claim counts and writes the count back.
-- Run after limit_lock_for_types in the same transaction (the worker sends both in one
-- pipeline: one round trip): its snapshot is then taken under the locks, so the rooms
-- are exact where they can bind (every claim committed before counts) and the windows'
-- and bounds' rows are only ever written by the locks' holder (a claim holding a lock
-- never waits for such a row, and reads the last holder's).
-- Returns the claimed jobs, each with after_company and held_back: how many jobs were
-- held back by a limit with room left (then the worker claims again at once, for the
-- jobs no limit holds back).
-- Why a copy of job_claim_batch rather than one shared definition: PostgreSQL has no
-- way to share CTEs between statements but a function, and a set-returning function
-- that locks rows (FOR UPDATE SKIP LOCKED) is not inlined, so the claim would be planned
-- apart from its UPDATE and its parameters; assembling both statements from pieces in
-- pgjobs.queries would leave neither readable as one statement. ring, share, whole and
-- filled are the same text in both (tests/integration/test_limits.py checks it); the
-- rest differs by the limits' filters.
-- Measured and not taken (issue 16, branch limits6): shared advisory locks where no limit
-- is near binding (room >= max_connections x 200, so all claims out at once cannot pass
-- it), rate windows split in per-backend slots, so a worker's two claims out overlap: the
-- limits scenario 0.947x -> 0.963x (6 x 3 interleaved pairs, quiet; within the spread)
-- for +2.5 µs of PostgreSQL per job (the overlapping claims walk past each other's locked
-- rows) and a migration: not worth its second locking mode.
-- Since the bound (sql/0025): a limit far from binding costs a primary-key read and an
-- upsert of limit_running instead of a read of every leased row (a limited 100,000-job
-- drain: 517 scans of job_queue_lease_idx reading 417,903 entries -> none; EXPLAIN
-- ANALYZE of a claim of 200 with 800 running: room 0.23 -> 0.05 ms, the upsert 0.13).
-- Skipping the per-row cut (chosen/held/keep) where no room is below the batch saved
-- nothing measurable (backend CPU per claim of 200, interleaved; held already joins only
-- the rooms below the batch).
WITH RECURSIVE room AS MATERIALIZED (
    -- The limits that can cover this worker's jobs, each with its room: how many more of
    -- its jobs may start now (the least of its running and rate bounds). Limit names are
    -- '' for "all" here, so that the matches below are plain equalities.
    SELECT l.id, coalesce(l.company_id, '') AS company_id, coalesce(l.job_type, '') AS job_type,
           l.max_starts, l.period_seconds, w.window_start,
           -- whether the current window has its row yet (pruned runs only when not)
           s.started IS NOT NULL AS window_counted,
           l.max_running, b.bound, n.counted,
           -- (CASE: a bound not set is not counted at all)
           least(CASE WHEN l.max_running IS NOT NULL
                      THEN l.max_running - coalesce(n.counted, b.bound) END,
                 CASE WHEN l.max_starts IS NOT NULL THEN l.max_starts - coalesce(s.started, 0) END)
               AS room
    FROM pgjobs.limits l
    CROSS JOIN LATERAL (
        -- the rate window now is in (NULL without a rate)
        SELECT to_timestamp(floor(extract(epoch FROM coalesce(%(now)s::timestamptz, now()))
                                  / l.period_seconds) * l.period_seconds) AS window_start
    ) w
    -- its starts so far (none: no row yet, or no rate)
    LEFT JOIN pgjobs.limit_windows s ON s.limit_id = l.id AND s.window_start = w.window_start
    -- at least its running jobs (sql/0025; none: no row yet)
    LEFT JOIN pgjobs.limit_running b ON b.limit_id = l.id
    CROSS JOIN LATERAL (
        -- Its running jobs counted exactly (job_queue's leased rows, job_queue_lease_idx),
        -- only where the bound cannot show that this batch fits: no bound yet, or the
        -- bound plus the batch over max_running. (The count is a subplan of the CASE
        -- branch: not run at all otherwise.)
        SELECT CASE WHEN l.max_running IS NOT NULL
                         AND (b.bound IS NULL OR b.bound > l.max_running - %(limit)s::int)
                    THEN (SELECT count(*) FROM pgjobs.job_queue q
                          WHERE q.lease_expires_at IS NOT NULL
                            AND (l.company_id IS NULL OR q.company_id = l.company_id)
                            AND (l.job_type IS NULL OR q.job_type = l.job_type)) END AS counted
    ) n
    WHERE pgjobs.limit_scope(l.job_type, %(job_types)s::text[])
), blocked AS (
    -- limits with no room left: the jobs they cover are not candidates at all
    SELECT company_id, job_type FROM room WHERE room <= 0
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
    SELECT h.job_id, h.run_at, h.job_type, r.company_id, r.priority, r.cpos, r.n, h.ctid
    FROM (SELECT * FROM ring
          -- a company over a limit on all its jobs: not walked at all
          WHERE NOT EXISTS (SELECT 1 FROM blocked b
                            WHERE b.company_id = ring.company_id AND b.job_type = '')) r
    CROSS JOIN LATERAL (
        -- One level of one company: due jobs are a contiguous range of the index, so the
        -- walk ends at the first job not due yet (or of another level).
        SELECT q.job_id, q.run_at, q.job_type, q.ctid
        FROM pgjobs.job_queue q
        WHERE q.company_id = r.company_id AND q.priority = r.priority
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
          AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.company_id IN (q.company_id, '')
                                                  AND b.job_type IN (q.job_type, ''))
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
    SELECT h.job_id, h.run_at, h.job_type, f.company_id, f.priority, r.cpos, f.n, h.ctid
    FROM filled f JOIN ring r ON r.n = f.n CROSS JOIN LATERAL (
        SELECT q.job_id, q.run_at, q.job_type, q.ctid
        FROM pgjobs.job_queue q
        WHERE q.company_id = r.company_id AND q.priority = r.priority  -- as in heads1
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
          AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.company_id IN (q.company_id, '')
                                                  AND b.job_type IN (q.job_type, ''))
          AND q.job_id <> ALL(ARRAY(SELECT job_id FROM heads1))  -- ours already
        ORDER BY q.run_at, q.job_id
        LIMIT f.per_company
        FOR UPDATE OF q SKIP LOCKED
    ) h
    WHERE f.per_company > 0
), heads AS (
    SELECT h.job_id, h.priority, h.company_id, h.job_type, h.cpos, h.ctid,
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
              AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.company_id IN (q.company_id, '')
                                                      AND b.job_type IN (q.job_type, ''))
            ORDER BY q.priority DESC, q.run_at, q.job_id
            LIMIT 1) END) AS priority
), fair AS (
    SELECT h.job_id, h.company_id, h.job_type, h.ctid,
           row_number() OVER (ORDER BY h.priority DESC, h.rank, h.cpos) AS n
    FROM heads h
    WHERE h.priority >= coalesce((SELECT priority FROM cut), h.priority)
    ORDER BY h.priority DESC, h.rank, h.cpos
    LIMIT %(limit)s::int
), fill AS (
    SELECT q.job_id, q.priority, q.run_at, q.company_id, q.job_type, q.ctid FROM pgjobs.job_queue q
    WHERE q.lease_expires_at IS NULL
      AND q.run_at <= coalesce(%(now)s::timestamptz, now())
      AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.company_id IN (q.company_id, '')
                                              AND b.job_type IN (q.job_type, ''))
      AND q.job_id <> ALL(ARRAY(SELECT job_id FROM fair))
    ORDER BY q.priority DESC, q.run_at, q.job_id
    LIMIT %(limit)s::int - (SELECT count(*) FROM fair)
    FOR UPDATE OF q SKIP LOCKED
), chosen AS (
    -- fair's jobs, then fill's, in claim order, with what limits match them on
    SELECT job_id, n AS ord, company_id, job_type, ctid FROM fair
    UNION ALL
    SELECT job_id, (SELECT count(*) FROM fair)
                   + row_number() OVER (ORDER BY priority DESC, run_at, job_id),
           company_id, job_type, ctid
    FROM fill
), held AS (
    -- The jobs past a limit's room, counting its covered jobs in claim order. A job held
    -- back by one limit still counts against the others: never over, at worst a batch
    -- short (the worker then claims again at once, see held_back). Only the limits whose
    -- room is less than the batch are counted through: chosen has at most %(limit)s jobs,
    -- so no other limit can hold one back (a limit far from binding costs nothing here).
    SELECT DISTINCT x.job_id FROM (
        SELECT c.job_id, r.room, row_number() OVER (PARTITION BY r.id ORDER BY c.ord) AS k
        FROM chosen c
        JOIN room r ON r.company_id IN (c.company_id, '') AND r.job_type IN (c.job_type, '')
        WHERE r.room < %(limit)s::int
    ) x
    WHERE x.k > x.room
), keep AS (
    SELECT c.job_id, c.company_id, c.job_type, c.ctid FROM chosen c
    WHERE c.job_id <> ALL(ARRAY(SELECT job_id FROM held))
), claimed AS (
    -- The queue row only, as in job_claim_batch (sql/0021).
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
    -- The rows the CTEs locked, by the ctid of the version they locked, as in
    -- job_claim_batch (a TID scan, not a walk of job_queue_pkey per job).
    WHERE q.ctid = ANY(ARRAY(SELECT ctid FROM keep))
      -- With the doorbell on, the worker runs this statement with events_doorbell_on here
      -- (pgjobs.doorbell.ringing), as job_claim_batch.
      AND (SELECT true /* doorbell */)
    RETURNING q.job_id, q.company_id, q.job_type, q.priority, q.run_at, q.attempts,
        q.error_message, q.lease_token, q.event_seq, q.started_at
), counted AS (
    INSERT INTO pgjobs.limit_windows AS w (limit_id, window_start, started)
    SELECT r.id, r.window_start, count(*)
    FROM room r JOIN claimed c
      ON r.company_id IN (c.company_id, '') AND r.job_type IN (c.job_type, '')
    WHERE r.max_starts IS NOT NULL
    GROUP BY r.id, r.window_start
    ON CONFLICT (limit_id, window_start) DO UPDATE SET started = w.started + excluded.started
), pruned AS (
    -- Windows that ended more than a period ago are never read again. Deleted by the
    -- claim that writes a limit's window first (its row is new), not by every claim.
    DELETE FROM pgjobs.limit_windows w USING room r
    WHERE w.limit_id = r.id AND r.max_starts IS NOT NULL AND NOT r.window_counted
      AND w.window_start < r.window_start - make_interval(secs => r.period_seconds)
), bounded AS (
    -- Each concurrency limit's bound, now: what it counted (or its bound, if it did not
    -- count) plus the jobs it covers this claim took. Not written when that changes
    -- nothing.
    INSERT INTO pgjobs.limit_running AS b (limit_id, bound)
    SELECT r.id, coalesce(r.counted, r.bound) + count(c.job_id)
    FROM room r LEFT JOIN claimed c
      ON r.company_id IN (c.company_id, '') AND r.job_type IN (c.job_type, '')
    WHERE r.max_running IS NOT NULL
    GROUP BY r.id, r.counted, r.bound
    HAVING count(c.job_id) > 0 OR r.counted IS DISTINCT FROM r.bound
    ON CONFLICT (limit_id) DO UPDATE SET bound = excluded.bound
)
-- The columns job_claim_batch returns (and why there), the job row read by primary key.
SELECT j.id, j.company_id, j.job_type, j.input, c.priority, c.run_at, c.attempts,
    j.max_attempts, j.result, j.result_asset_id, c.error_message, j.source_task_id,
    c.lease_token, c.event_seq, c.started_at, j.finished_at, j.created_at,
    -- the company served last in the fair order (the ring's last if fair took none; with
    -- no ring, the one given: the rotation goes on where the last fair claim left it)
    coalesce((SELECT company_id FROM fair ORDER BY n DESC LIMIT 1),
             (SELECT company_id FROM ring ORDER BY n DESC LIMIT 1),
             %(after_company)s::text) AS after_company,
    (SELECT count(*) FROM held) AS held_back
FROM claimed c JOIN pgjobs.job_rows j ON j.id = c.job_id;

-- name: limit_lock_table_for_upsert
-- Before limit_upsert, in its transaction: waits for every transaction that has read
-- pgjobs.limits (each claim, plain and limited, reads it first and holds its lock until
-- it commits) and makes those that start wait until the upsert commits. A statement
-- takes its tables' locks before its snapshot, so every claim either committed before a
-- new limit existed or sees it: a plain claim refuses, and a limited claim's
-- limit_lock_for_types locks it (a limit cannot appear between the pipeline's two
-- statements). So the running jobs a limit covers only ever grow under its advisory
-- lock, which pgjobs.limit_running's bound relies on (sql/0025). Enqueues, finishes and
-- rescues do not read pgjobs.limits and never wait for it.
LOCK TABLE pgjobs.limits IN ACCESS EXCLUSIVE MODE;

-- name: limit_upsert
-- `pgjobs limits set`: create the limit of (company, job type), or change the bounds
-- given (a NULL bound parameter keeps the one already set). A rate is its count and its
-- period together.
INSERT INTO pgjobs.limits AS l (company_id, job_type, max_running, max_starts, period_seconds,
                                updated_at)
VALUES (%(company_id)s::text, %(job_type)s::text, %(max_running)s::int, %(max_starts)s::int,
        %(period_seconds)s::float8, coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (company_id, job_type) DO UPDATE
SET max_running = coalesce(excluded.max_running, l.max_running),
    max_starts = coalesce(excluded.max_starts, l.max_starts),
    period_seconds = coalesce(excluded.period_seconds, l.period_seconds),
    updated_at = excluded.updated_at
RETURNING *;

-- name: limit_list
-- `pgjobs limits list`: every limit, with its running jobs and its current rate window's
-- starts.
SELECT l.*,
       (SELECT count(*) FROM pgjobs.job_queue q
        WHERE q.lease_expires_at IS NOT NULL
          AND (l.company_id IS NULL OR q.company_id = l.company_id)
          AND (l.job_type IS NULL OR q.job_type = l.job_type))::int AS running,
       coalesce((SELECT s.started FROM pgjobs.limit_windows s
                 WHERE s.limit_id = l.id
                   AND s.window_start = to_timestamp(
                       floor(extract(epoch FROM coalesce(%(now)s::timestamptz, now()))
                             / l.period_seconds) * l.period_seconds)), 0) AS started_this_window
FROM pgjobs.limits l
ORDER BY l.company_id NULLS FIRST, l.job_type NULLS FIRST;

-- name: limit_delete
-- `pgjobs limits clear`: remove the limit of exactly (company, job type) (NULL: "all").
DELETE FROM pgjobs.limits
WHERE company_id IS NOT DISTINCT FROM %(company_id)s::text
  AND job_type IS NOT DISTINCT FROM %(job_type)s::text
RETURNING id;
