-- bench.narrow's prototype of the narrow hot-path schema ("N2", issue 16), applied to a
-- database migrated to sql/0019_doorbell.sql, and its hot statements. A measurement, not
-- the migration: it keeps what the claim, the finish and the enqueue touch and nothing else
-- (no view pgjobs.jobs, no routing of writes by hand, no cancel/retry/rescue).
--
-- N2: a queued or running job's live state (status, attempts, lease, progress, seq) lives
-- only in its narrow pgjobs.job_queue row; the wide job row (today's pgjobs.jobs, renamed
-- pgjobs.job_rows, columns unchanged) is written at enqueue and once at the end. The claim
-- locks and updates queue rows only; the finish locks the queue rows, then updates the job
-- rows (final), whose trigger deletes the queue rows and checks the seq; audit rows are
-- written by statement triggers on both tables, as today on pgjobs.jobs.

-- name: n2_schema
ALTER TABLE pgjobs.jobs RENAME TO job_rows;
DROP TRIGGER jobs_publish_insert ON pgjobs.job_rows;
DROP TRIGGER jobs_publish_update ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_insert ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_update ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_delete ON pgjobs.job_rows;

ALTER TABLE pgjobs.job_queue
    ADD COLUMN status text NOT NULL DEFAULT 'queued',
    ADD COLUMN attempts int NOT NULL DEFAULT 0,
    ADD COLUMN max_attempts int NOT NULL DEFAULT 3,
    ADD COLUMN lease_token bigint NOT NULL DEFAULT 0,
    ADD COLUMN worker_id text,
    ADD COLUMN started_at timestamptz,
    ADD COLUMN progress_fraction real,
    ADD COLUMN progress_message text,
    ADD COLUMN error_message text,
    ADD COLUMN error_traceback text,
    ADD COLUMN event_seq int NOT NULL DEFAULT 1,
    ADD COLUMN last_event text NOT NULL DEFAULT 'content_job.queued',
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
UPDATE pgjobs.job_queue q
SET status = j.status, attempts = j.attempts, max_attempts = j.max_attempts,
    lease_token = j.lease_token, worker_id = j.worker_id, started_at = j.started_at,
    progress_fraction = j.progress_fraction, progress_message = j.progress_message,
    error_message = j.error_message, event_seq = j.event_seq, last_event = j.last_event,
    updated_at = j.updated_at
FROM pgjobs.job_rows j WHERE j.id = q.job_id;
ALTER TABLE pgjobs.job_queue
    ADD CONSTRAINT job_queue_live_status CHECK (
        status IN ('queued', 'running')
        AND (status = 'running') = (lease_expires_at IS NOT NULL)
        AND (status = 'queued' OR (worker_id IS NOT NULL AND started_at IS NOT NULL))),
    ADD CONSTRAINT job_queue_attempts_in_range CHECK (
        attempts >= 0 AND attempts <= max_attempts AND (status <> 'queued' OR attempts < max_attempts)),
    ADD CONSTRAINT job_queue_progress_in_range CHECK (
        progress_fraction BETWEEN 0 AND 1 AND length(progress_message) <= 1000),
    ADD CONSTRAINT job_queue_live_event CHECK (
        last_event IN ('content_job.queued', 'content_job.running', 'content_job.progress',
                       'content_job.retrying')),
    ADD CONSTRAINT job_queue_times_in_range CHECK (
        pgjobs.time_in_range(updated_at) AND pgjobs.time_in_range(started_at)),
    ADD CONSTRAINT job_queue_traceback_bounded CHECK (octet_length(error_traceback) <= 16384);

-- Queue rows are inserted and deleted only by the job rows' triggers (depth 2).
CREATE FUNCTION pgjobs.job_queue_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'pgjobs.job_queue rows are added and removed with their job row'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_queue_guard BEFORE INSERT OR DELETE ON pgjobs.job_queue
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_queue_guard();

CREATE FUNCTION pgjobs.job_rows_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sent bigint;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at, status,
                                  attempts, max_attempts, lease_token, event_seq, last_event,
                                  updated_at)
    SELECT id, company_id, job_type, priority, run_at, 'queued', attempts, max_attempts,
           lease_token, event_seq, last_event, updated_at
    FROM new_rows WHERE status = 'queued';
    WITH inserted AS (
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
        SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts, n.worker_id, '{}'::jsonb
        FROM new_rows n
        RETURNING id, CASE WHEN NOT ring
                           THEN pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload)
                      END AS item
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM inserted
        WHERE NOT ring
    ), notified AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    ), work AS (
        SELECT pgjobs.work_item('queued', n.job_type, min(n.run_at), NULL) AS item
        FROM new_rows n
        WHERE n.status = 'queued'
        GROUP BY n.job_type
    ), work_chunks AS (
        SELECT item,
               sum(octet_length(item) + 1) OVER (ORDER BY item ROWS UNBOUNDED PRECEDING)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM work
    ), work_notified AS (
        SELECT pg_notify('pgjobs_work', '{"work":[' || string_agg(item, ',') || ']}') AS n
        FROM work_chunks GROUP BY chunk
    )
    SELECT (SELECT count(n) FROM notified) + (SELECT count(n) FROM work_notified) INTO sent;
    RETURN NULL;
END $$;
CREATE TRIGGER job_rows_inserted AFTER INSERT ON pgjobs.job_rows
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_rows_inserted();

-- The end of a live job (and, in the migration, a retry's return to live): the job row's
-- final state; its queue row is deleted here, and its seq must follow the queue row's.
CREATE FUNCTION pgjobs.job_rows_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    WITH pairs AS MATERIALIZED (
        SELECT n.id, n.company_id, n.event_seq, o.event_seq AS old_seq, n.last_event, n.status,
               o.status AS old_status, n.attempts, n.worker_id, n.progress_fraction,
               n.progress_message, n.result_asset_id, n.error_message, n.error_traceback,
               n.run_at, o.status IN ('queued', 'running') AS was_live,
               n.status IN ('queued', 'running') AS live
        FROM new_rows n FULL JOIN old_rows o USING (id)
    ), gone AS (
        DELETE FROM pgjobs.job_queue q USING pairs p
        WHERE q.job_id = p.id AND p.was_live AND NOT p.live
        RETURNING q.job_id, q.event_seq
    ), bad AS (
        SELECT p.id FROM pairs p LEFT JOIN gone g ON g.job_id = p.id
        WHERE CASE WHEN p.was_live AND NOT p.live
                   THEN g.job_id IS NULL OR p.event_seq <> g.event_seq + 1
                   WHEN p.was_live THEN p.event_seq <> p.old_seq OR p.status <> p.old_status
                   ELSE p.event_seq NOT IN (p.old_seq, p.old_seq + 1)
                        OR (p.event_seq = p.old_seq AND p.status <> p.old_status) END
        LIMIT 1
    ), inserted AS (
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
        SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
               CASE WHEN c.last_event IN ('content_job.running', 'content_job.queued', 'content_job.cancelled')
                         OR (c.last_event = 'content_job.done' AND c.result_asset_id IS NULL)
                    THEN '{}'::jsonb
                    WHEN c.error_traceback IS NOT NULL
                         AND c.last_event IN ('content_job.retrying', 'content_job.failed')
                    THEN pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              c.result_asset_id, c.error_message, c.run_at)
                         || jsonb_build_object('traceback', c.error_traceback)
                    ELSE pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              c.result_asset_id, c.error_message, c.run_at) END
        FROM pairs c
        WHERE c.event_seq <> c.old_seq
        RETURNING id, CASE WHEN NOT ring
                           THEN pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload)
                      END AS item
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM inserted
        WHERE NOT ring
    ), notified AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT (SELECT count(n) FROM notified), (SELECT id FROM bad) INTO sent, bad_id;
    IF bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'pgjobs: job % changed state without a transition', bad_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_rows_updated AFTER UPDATE ON pgjobs.job_rows
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_rows_updated();

-- Transitions of a live job (claim, progress, retry): today's publish_events on the
-- queue row's columns.
CREATE FUNCTION pgjobs.job_queue_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    wake_workers boolean;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    WITH pairs AS MATERIALIZED (
        SELECT n.job_id AS id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts,
               n.worker_id, n.progress_fraction, n.progress_message, n.error_message,
               n.error_traceback, n.run_at,
               n.event_seq <> o.event_seq AND n.status = 'queued' AS for_workers,
               n.event_seq <> o.event_seq AS is_transition,
               (n.event_seq <> o.event_seq AND n.event_seq <> o.event_seq + 1)
               OR (n.event_seq = o.event_seq
                   AND (n.status <> o.status
                        OR n.progress_fraction IS DISTINCT FROM o.progress_fraction
                        OR n.progress_message IS DISTINCT FROM o.progress_message
                        OR n.attempts <> o.attempts)) AS is_bad
        FROM new_rows n FULL JOIN old_rows o USING (job_id)
    ), inserted AS (
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
        SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
               CASE WHEN c.last_event IN ('content_job.running', 'content_job.queued')
                    THEN '{}'::jsonb
                    WHEN c.error_traceback IS NOT NULL AND c.last_event = 'content_job.retrying'
                    THEN pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              NULL, c.error_message, c.run_at)
                         || jsonb_build_object('traceback', c.error_traceback)
                    ELSE pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              NULL, c.error_message, c.run_at) END
        FROM pairs c
        WHERE c.is_transition AND NOT c.is_bad
        RETURNING id, CASE WHEN NOT ring
                           THEN pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload)
                      END AS item
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM inserted
        WHERE NOT ring
    ), notified AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT (SELECT count(n) FROM notified), (SELECT id FROM pairs WHERE is_bad LIMIT 1),
           (SELECT bool_or(for_workers) FROM pairs)
    INTO sent, bad_id, wake_workers;
    IF bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event)', bad_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_queue_updated AFTER UPDATE ON pgjobs.job_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_queue_updated();

-- name: n2_insert_many
WITH inserted AS (
    INSERT INTO pgjobs.job_rows (id, company_id, job_type, input, source_task_id, priority, run_at,
                                 max_attempts, created_at, updated_at)
    SELECT u.id, u.company_id, u.job_type, u.input, u.source_task_id, u.priority,
           coalesce(u.run_at, coalesce(%(now)s::timestamptz, now())), u.max_attempts,
           coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now())
    FROM unnest(%(ids)b::uuid[], %(company_ids)b::text[], %(job_types)b::text[],
                %(inputs)b::jsonb[], %(source_task_ids)b::text[], %(priorities)b::int[],
                %(run_ats)b::timestamptz[], %(max_attempts)b::int[])
         AS u(id, company_id, job_type, input, source_task_id, priority, run_at, max_attempts)
)
SELECT coalesce(%(now)s::timestamptz, now()) AS now;

-- name: n2_claim_batch
-- job_claim_batch (pgjobs/queries.sql at 0701e1f) with the job row neither joined nor
-- locked in heads1, heads2 and fill, the queue row updated, and the job row read by
-- primary key for what the worker's Job needs.
WITH RECURSIVE ring (company_id, priority, run_at, job_id, cpos, n, wrapped) AS (
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
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, r.wrapped AS wrapped
             FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL
               AND q.company_id = r.company_id AND q.priority < r.priority
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            UNION ALL
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, r.wrapped
             FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL AND q.company_id > r.company_id
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            UNION ALL
            (SELECT q.company_id, q.priority, q.run_at, q.job_id, true FROM pgjobs.job_queue q
             WHERE q.lease_expires_at IS NULL AND NOT r.wrapped
             ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1)
            LIMIT 1
        ) s
    ) nx
    WHERE r.n < %(limit)s::int
      AND NOT coalesce(nx.wrapped AND nx.company_id > %(after_company)s::text, false)
), share AS (
    SELECT max(cpos) AS companies, count(*) AS pairs,
           (%(limit)s::int + max(cpos) - 1) / greatest(max(cpos), 1) AS per_company
    FROM ring
), heads1 AS (
    SELECT h.job_id, h.run_at, r.company_id, r.priority, r.cpos, r.n
    FROM ring r CROSS JOIN LATERAL (
        SELECT q.job_id, q.run_at
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
    SELECT n FROM heads1 GROUP BY n HAVING count(*) = (SELECT per_company FROM share)
), filled AS (
    SELECT r.company_id, r.priority, r.n,
           (%(limit)s::int - (SELECT count(*) FROM heads1) + (SELECT count(*) FROM whole) - 1)
           / greatest((SELECT count(*) FROM whole), 1) AS per_company
    FROM whole w JOIN ring r ON r.n = w.n
), heads2 AS (
    SELECT h.job_id, h.run_at, f.company_id, f.priority, r.cpos, f.n
    FROM filled f JOIN ring r ON r.n = f.n CROSS JOIN LATERAL (
        SELECT q.job_id, q.run_at
        FROM pgjobs.job_queue q
        WHERE q.company_id = r.company_id AND q.priority = r.priority
          AND (q.run_at, q.job_id) >= (r.run_at, r.job_id)
          AND q.lease_expires_at IS NULL
          AND q.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
          AND q.job_id <> ALL(ARRAY(SELECT job_id FROM heads1))
        ORDER BY q.run_at, q.job_id
        LIMIT f.per_company
        FOR UPDATE OF q SKIP LOCKED
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
        (SELECT max(priority) FROM heads WHERE taken = asked),
        CASE WHEN (SELECT pairs FROM share) >= %(limit)s::int THEN (
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
    SELECT q.job_id FROM pgjobs.job_queue q
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
        error_traceback = NULL,
        event_seq = q.event_seq + 1,
        last_event = 'content_job.running',
        updated_at = coalesce(%(now)s::timestamptz, now())
    WHERE q.job_id = ANY(ARRAY(SELECT job_id FROM fair UNION ALL SELECT job_id FROM fill))
      AND NOT EXISTS (SELECT 1 FROM pgjobs.limits l
                      WHERE pgjobs.limit_scope(l.job_type, %(job_types)s::text[]))
    RETURNING q.job_id, q.priority, q.run_at, q.attempts, q.error_message, q.lease_token,
              q.lease_expires_at, q.event_seq, q.started_at
)
SELECT j.id, j.company_id, j.job_type, j.input, c.priority, c.run_at, c.attempts,
    j.max_attempts, j.result, j.result_asset_id, c.error_message, j.source_task_id,
    c.lease_token, c.lease_expires_at, c.event_seq, c.started_at, j.finished_at, j.created_at,
    coalesce((SELECT company_id FROM fair ORDER BY n DESC LIMIT 1),
             (SELECT company_id FROM ring ORDER BY n DESC LIMIT 1)) AS after_company
FROM claimed c JOIN pgjobs.job_rows j ON j.id = c.job_id;

-- name: n2_finish_many_if_leased
-- job_finish_many_if_leased with the guard and the lock on the queue row; an attempt that
-- ends the job updates the job row (its trigger deletes the queue row), a retry only the
-- queue row.
WITH u AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(lease_tokens)b::bigint[], %(outcomes)b::text[])
         WITH ORDINALITY AS u(id, lease_token, outcome, i)
), plan AS (
    SELECT q.job_id AS id, u.i, u.outcome, CASE
               WHEN u.outcome = 'done' THEN 'done'
               WHEN u.outcome = 'error' AND q.attempts < q.max_attempts THEN 'queued'
               ELSE 'failed' END AS next_status,
           q.attempts, q.worker_id, q.lease_token, q.started_at, q.progress_fraction,
           q.progress_message, q.event_seq
    FROM u JOIN pgjobs.job_queue q ON q.job_id = u.id AND q.lease_token = u.lease_token
    WHERE q.status = 'running'
    ORDER BY q.job_id
    FOR UPDATE OF q
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
        error_traceback = CASE WHEN p.outcome <> 'done' THEN (%(tracebacks)b::text[])[p.i] END,
        finished_at = coalesce(%(now)s::timestamptz, now()),
        event_seq = p.event_seq + 1,
        last_event = CASE p.next_status WHEN 'done' THEN 'content_job.done'
                                        ELSE 'content_job.failed' END,
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM plan p
    WHERE j.id = p.id AND p.next_status <> 'queued'
    RETURNING j.id, j.company_id, j.source_task_id, j.status, p.i
), retried AS (
    UPDATE pgjobs.job_queue q
    SET status = 'queued',
        run_at = coalesce(%(now)s::timestamptz, now())
                 + make_interval(secs => (%(retry_delays)b::float8[])[p.i]),
        lease_expires_at = NULL,
        error_message = (%(errors)b::text[])[p.i],
        error_traceback = (%(tracebacks)b::text[])[p.i],
        event_seq = q.event_seq + 1,
        last_event = 'content_job.retrying',
        updated_at = coalesce(%(now)s::timestamptz, now())
    FROM plan p
    WHERE q.job_id = p.id AND p.next_status = 'queued'
    RETURNING q.job_id AS id, q.company_id, NULL::text AS source_task_id, q.status, p.i
), finished AS (
    SELECT * FROM ended UNION ALL SELECT * FROM retried
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
