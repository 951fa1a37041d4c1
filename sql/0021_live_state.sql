-- depends: 0020_merged_checks
-- The live state of a queued or running job (status, attempts, lease, progress, the last
-- attempt's error, event_seq) lives only in its narrow pgjobs.job_queue row; the job row
-- (pgjobs.job_rows, today's pgjobs.jobs renamed, its columns unchanged) is written at
-- enqueue and once at the end (done, failed, cancelled), never at a claim, a progress
-- report or a lease renewal. pgjobs.jobs becomes a view with the same columns and
-- meanings: the job row, its live columns taken from the queue row while one exists.
--
-- Why: a claim rewrote the wide job row (input, result, its CHECKs) and, through a trigger,
-- the queue row, and locked both. Now it locks and updates one narrow row (bench.cpusplit,
-- 100,000 jobs, 6 rounds interleaved with the version before: PostgreSQL CPU per drained
-- job 48.5 -> 47 / 54 -> 51 / 62 -> 54 us at 1 / 2 / 4 worker processes, lower in every
-- pair; the worker's unchanged).
--
-- What the schema keeps true, by triggers as before:
-- * a job whose status is queued or running has exactly one queue row, an ended one none:
--   queue rows are added and removed only by the job rows' triggers (job_queue_guard
--   refuses an INSERT or DELETE of pgjobs.job_queue from anywhere else); the job row's
--   trigger removes the queue row when the job ends and adds one when it is retried;
-- * every state change writes exactly one audit row, its seq one more than the job's
--   last: a live job's transitions are updates of its queue row (job_queue_updated, the
--   rules of publish_events), its end is an update of its job row whose event_seq must be
--   the queue row's plus one (job_rows_updated), and a job row may not change a live
--   job's status or seq at all; anything else is refused (check_violation);
-- * NOTIFY items (or the doorbell, sql/0019) exactly as publish_events sends them.
-- While a job is live its job row's own status, attempts, lease, progress and seq columns
-- are left as they were when it last became live (stale: read pgjobs.jobs).
--
-- Writes by hand through the view are routed to the tables by INSTEAD OF triggers (a
-- live job's state to its queue row, everything else to its job row), so an operator's
-- or a test's UPDATE pgjobs.jobs keeps working and keeps every rule above; they are row
-- by row, for hand writes: pgjobs' own statements write the tables.
--
-- Deploying: stop workers and gateways, migrate, start the new version (this version's
-- statements need the new tables; the old version's claim locks FOR UPDATE OF the view,
-- which PostgreSQL refuses). The migration moves the live state of queued and running
-- jobs into their queue rows; leases taken before it still complete (same tokens).

ALTER TABLE pgjobs.jobs RENAME TO job_rows;
DROP TRIGGER jobs_publish_insert ON pgjobs.job_rows;
DROP TRIGGER jobs_publish_update ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_insert ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_update ON pgjobs.job_rows;
DROP TRIGGER jobs_queue_delete ON pgjobs.job_rows;
-- publish_events and sync_job_queue stay (unused) for the rollback.

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
    error_message = j.error_message, error_traceback = j.error_traceback,
    event_seq = j.event_seq, last_event = j.last_event, updated_at = j.updated_at
FROM pgjobs.job_rows j WHERE j.id = q.job_id;

-- The job's rules (sql/0020_merged_checks) for the live state, on the table that holds it
-- now: a queue row's CHECKs accept exactly the live states (queued, running) that the job
-- row's accept, so every job migrated above passes them and a hand-written change that the
-- job row took before is taken still (tests/integration/test_migrations.py compares them
-- over a grid of states). Three, one per concern as on the job row, plain comparisons
-- (pgjobs.time_in_range is inlined): the claim, a progress report and a retry check these
-- instead of the job row's. job_queue_times_in_range takes the two new times too (one scan
-- validates all three, under the ACCESS EXCLUSIVE lock the ALTER TABLE takes anyway).
-- The job row keeps its three: a live job's job row holds its state as of when it became
-- live, which met them, and the end writes a full state there.
ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_times_in_range,
    -- NULL times pass, as on the job row.
    ADD CONSTRAINT job_queue_times_in_range CHECK (
        pgjobs.time_in_range(run_at) AND pgjobs.time_in_range(lease_expires_at)
        AND pgjobs.time_in_range(started_at) AND pgjobs.time_in_range(updated_at)),
    -- jobs_sizes_in_range's rules for the columns a live job's state has here (company_id
    -- and job_type are the job row's, checked there).
    ADD CONSTRAINT job_queue_sizes_in_range CHECK (
        length(progress_message) <= 1000 AND octet_length(error_traceback) <= 16384
        AND progress_fraction BETWEEN 0 AND 1 AND max_attempts BETWEEN 1 AND 1000),
    -- jobs_state_consistent's queued and running branches (a queue row has no finished_at:
    -- a live job's is NULL), any other status refused: an ended job has no queue row.
    ADD CONSTRAINT job_queue_state_consistent CHECK (
        attempts BETWEEN 0 AND max_attempts
        AND CASE status
            WHEN 'queued' THEN
                attempts < max_attempts  -- an attempt left (manual retry raises max_attempts)
                AND lease_expires_at IS NULL
                AND last_event IN ('content_job.queued', 'content_job.running',
                                   'content_job.progress', 'content_job.retrying',
                                   'content_job.done')
            WHEN 'running' THEN
                worker_id IS NOT NULL AND lease_expires_at IS NOT NULL
                AND started_at IS NOT NULL
                AND last_event IN ('content_job.queued', 'content_job.running',
                                   'content_job.progress', 'content_job.retrying',
                                   'content_job.done')
            ELSE false  -- queue rows are for queued and running jobs only
        END);

COMMENT ON CONSTRAINT job_queue_times_in_range ON pgjobs.job_queue IS
    'run_at, lease_expires_at, started_at and updated_at within 1970-01-01 .. 9999-12-31 UTC '
    '(pgjobs.time_in_range) where set, as on the job row (jobs_times_in_range)';
COMMENT ON CONSTRAINT job_queue_sizes_in_range ON pgjobs.job_queue IS
    'progress_message at most 1000 characters, error_traceback at most 16384 bytes, '
    'progress_fraction 0 to 1, max_attempts 1 to 1000, as on the job row (jobs_sizes_in_range)';
COMMENT ON CONSTRAINT job_queue_state_consistent ON pgjobs.job_queue IS
    'a live job''s state, as jobs_state_consistent requires of it on the job row: attempts 0 '
    'to max_attempts; status queued (an attempt left, lease_expires_at NULL) or running '
    '(worker_id, lease_expires_at and started_at set); last_event a content_job event other '
    'than failed and cancelled';

-- Queue rows come and go with their job's status, through the job rows' triggers only
-- (which run their statements at trigger depth 2 or more).
CREATE FUNCTION pgjobs.job_queue_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'pgjobs.job_queue rows are added and removed with their job''s status: write pgjobs.jobs or pgjobs.job_rows'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_queue_guard BEFORE INSERT OR DELETE ON pgjobs.job_queue
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_queue_guard();

-- Enqueue: the queue rows of the new live jobs, the audit rows, the NOTIFY items (as
-- publish_events' INSERT branch).
CREATE FUNCTION pgjobs.job_rows_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sent bigint;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at, lease_expires_at,
                                  status, attempts, max_attempts, lease_token, worker_id,
                                  started_at, progress_fraction, progress_message, error_message,
                                  error_traceback, event_seq, last_event, updated_at)
    SELECT id, company_id, job_type, priority, run_at, lease_expires_at, status, attempts,
           max_attempts, lease_token, worker_id, started_at, progress_fraction, progress_message,
           error_message, error_traceback, event_seq, last_event, updated_at
    FROM new_rows WHERE status IN ('queued', 'running');
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
END;
$$;

-- A job row's transitions: a live job's end (finish, cancel, rescue without an attempt
-- left; its queue row is deleted here and its seq must follow the queue row's), an ended
-- job's retry (its queue row is added here), an ended job's other changes (seq + 1, as on
-- pgjobs.jobs before). A live job's own state changes only in its queue row.
CREATE FUNCTION pgjobs.job_rows_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    revived boolean;
    queued_again boolean;
    cancelled_running uuid[];
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    WITH pairs AS MATERIALIZED (
        -- FULL JOIN, materialised: see sql/0017_trigger_plans.sql. Only the columns an
        -- event needs (whole job rows would be copied for nothing).
        SELECT n.id, n.company_id, n.event_seq, o.event_seq AS old_seq, n.last_event, n.status,
               o.status AS old_status, n.attempts, n.worker_id, n.progress_fraction,
               n.progress_message, n.result_asset_id, n.error_message, n.error_traceback,
               n.run_at,
               o.status IN ('queued', 'running') AS was_live,
               n.status IN ('queued', 'running') AS live
        FROM new_rows n FULL JOIN old_rows o USING (id)
    ), gone AS (
        DELETE FROM pgjobs.job_queue q USING pairs p
        WHERE q.job_id = p.id AND p.was_live AND NOT p.live
        RETURNING q.job_id, q.event_seq, q.status
    ), checked AS (
        SELECT p.*, g.status AS live_status,
               CASE WHEN p.was_live AND NOT p.live
                    -- ended: its queue row gone, the seq one past the queue row's
                    THEN g.job_id IS NULL OR p.event_seq IS DISTINCT FROM g.event_seq + 1
                    -- a live job's state is its queue row's
                    WHEN p.was_live THEN p.event_seq <> p.old_seq OR p.status <> p.old_status
                    ELSE (p.event_seq <> p.old_seq AND p.event_seq <> p.old_seq + 1)
                         OR (p.event_seq = p.old_seq AND p.status <> p.old_status)
               END AS is_bad
        FROM pairs p LEFT JOIN gone g ON g.job_id = p.id
    ), inserted AS (
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
        SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
               CASE WHEN c.last_event IN ('content_job.running', 'content_job.queued', 'content_job.cancelled')
                         OR (c.last_event = 'content_job.done' AND c.result_asset_id IS NULL)
                    THEN '{}'::jsonb
                    WHEN c.error_traceback IS NOT NULL
                         AND c.last_event IN ('content_job.retrying', 'content_job.failed')
                    -- The attempt's traceback, for the audit log only (sql/0006).
                    THEN pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              c.result_asset_id, c.error_message, c.run_at)
                         || jsonb_build_object('traceback', c.error_traceback)
                    ELSE pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                              c.result_asset_id, c.error_message, c.run_at) END
        FROM checked c
        WHERE c.event_seq <> c.old_seq AND NOT c.is_bad
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
    SELECT (SELECT count(n) FROM notified),
           (SELECT id FROM checked WHERE is_bad LIMIT 1),
           (SELECT bool_or(live AND NOT was_live) FROM checked),
           (SELECT bool_or(status = 'queued' AND NOT was_live AND event_seq <> old_seq) FROM checked),
           (SELECT array_agg(id) FROM checked
            WHERE status = 'cancelled' AND live_status = 'running' AND event_seq <> old_seq)
    INTO sent, bad_id, revived, queued_again, cancelled_running;
    IF bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event; a queued or running job''s state is in pgjobs.job_queue)', bad_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF revived THEN
        -- An ended job made live again (a retry): its queue row, from its job row. In a
        -- statement of its own, as the two below: the finishes, which end jobs, skip them.
        WITH pairs AS MATERIALIZED (
            SELECT n.*, o.status IN ('queued', 'running') AS was_live
            FROM new_rows n FULL JOIN old_rows o USING (id)
        )
        INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at,
                                      lease_expires_at, status, attempts, max_attempts,
                                      lease_token, worker_id, started_at, progress_fraction,
                                      progress_message, error_message, error_traceback,
                                      event_seq, last_event, updated_at)
        SELECT id, company_id, job_type, priority, run_at, lease_expires_at, status, attempts,
               max_attempts, lease_token, worker_id, started_at, progress_fraction,
               progress_message, error_message, error_traceback, event_seq, last_event, updated_at
        FROM pairs WHERE status IN ('queued', 'running') AND NOT was_live;
    END IF;
    IF queued_again OR cancelled_running IS NOT NULL THEN
        -- Workers hear of a job queued again and of a running job cancelled (work_item).
        WITH pairs AS MATERIALIZED (
            SELECT n.id, n.job_type, n.run_at, n.status, n.event_seq <> o.event_seq AS moved,
                   o.status IN ('queued', 'running') AS was_live
            FROM new_rows n FULL JOIN old_rows o USING (id)
        ), items AS (
            SELECT pgjobs.work_item('queued', job_type, min(run_at), NULL) AS item
            FROM pairs WHERE status = 'queued' AND NOT was_live AND moved GROUP BY job_type
            UNION ALL
            SELECT pgjobs.work_item('cancelled', NULL, NULL, c.id)
            FROM unnest(cancelled_running) AS c(id)
        ), work_chunks AS (
            SELECT item,
                   sum(octet_length(item) + 1) OVER (ORDER BY item ROWS UNBOUNDED PRECEDING)
                   / (7980 - max(octet_length(item)) OVER ()) AS chunk
            FROM items
        ), work_notified AS (
            SELECT pg_notify('pgjobs_work', '{"work":[' || string_agg(item, ',') || ']}') AS n
            FROM work_chunks GROUP BY chunk
        )
        SELECT count(n) INTO sent FROM work_notified;
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION pgjobs.job_rows_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pgjobs.job_queue q USING old_rows o WHERE q.job_id = o.id;
    RETURN NULL;
END;
$$;

-- A live job's transitions (claim, progress, retry, rescue, release): publish_events'
-- rules and items, on the queue row's columns.
CREATE FUNCTION pgjobs.job_queue_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    wake_workers boolean;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    WITH pairs AS MATERIALIZED (
        -- FULL JOIN, materialised: see sql/0017_trigger_plans.sql.
        SELECT coalesce(n.job_id, o.job_id) AS id, n.company_id, n.event_seq, n.last_event,
               n.status, n.attempts, n.worker_id, n.progress_fraction, n.progress_message,
               n.error_message, n.error_traceback, n.run_at,
               n.event_seq <> o.event_seq AND n.status = 'queued' AS for_workers,
               n.event_seq <> o.event_seq AS is_transition,
               n.job_id IS NULL OR o.job_id IS NULL  -- a queue row's job_id changed
               OR (n.event_seq <> o.event_seq AND n.event_seq <> o.event_seq + 1)
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
    IF wake_workers THEN
        -- The workers' channel, in a statement of its own (as in publish_events).
        WITH work AS (
            SELECT n.job_type, min(n.run_at) AS run_at
            FROM new_rows n JOIN old_rows o USING (job_id)
            WHERE n.event_seq <> o.event_seq AND n.status = 'queued'
            GROUP BY n.job_type
        ), items AS (
            SELECT pgjobs.work_item('queued', job_type, run_at, NULL) AS item FROM work
        ), chunks AS (
            SELECT item,
                   sum(octet_length(item) + 1) OVER (ORDER BY item ROWS UNBOUNDED PRECEDING)
                   / (7980 - max(octet_length(item)) OVER ()) AS chunk
            FROM items
        ), notified AS (
            SELECT pg_notify('pgjobs_work', '{"work":[' || string_agg(item, ',') || ']}') AS n
            FROM chunks GROUP BY chunk
        )
        SELECT count(n) INTO sent FROM notified;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_rows_inserted AFTER INSERT ON pgjobs.job_rows
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_rows_inserted();
CREATE TRIGGER job_rows_updated AFTER UPDATE ON pgjobs.job_rows
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_rows_updated();
CREATE TRIGGER job_rows_deleted AFTER DELETE ON pgjobs.job_rows
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_rows_deleted();
CREATE TRIGGER job_queue_updated AFTER UPDATE ON pgjobs.job_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.job_queue_updated();

-- The jobs as before: the job row, with the live columns of its queue row while it has
-- one (a LEFT JOIN on the queue's primary key, which the planner drops from a query that
-- reads none of them).
CREATE VIEW pgjobs.jobs AS
SELECT j.id, j.company_id, j.job_type,
       coalesce(q.status, j.status) AS status,
       j.input,
       coalesce(q.priority, j.priority) AS priority,
       coalesce(q.run_at, j.run_at) AS run_at,
       coalesce(q.attempts, j.attempts) AS attempts,
       coalesce(q.max_attempts, j.max_attempts) AS max_attempts,
       j.result, j.result_asset_id,
       CASE WHEN q.job_id IS NULL THEN j.error_message ELSE q.error_message END AS error_message,
       j.source_task_id,
       CASE WHEN q.job_id IS NULL THEN j.progress_fraction ELSE q.progress_fraction END AS progress_fraction,
       CASE WHEN q.job_id IS NULL THEN j.progress_message ELSE q.progress_message END AS progress_message,
       CASE WHEN q.job_id IS NULL THEN j.worker_id ELSE q.worker_id END AS worker_id,
       coalesce(q.lease_token, j.lease_token) AS lease_token,
       CASE WHEN q.job_id IS NULL THEN j.lease_expires_at ELSE q.lease_expires_at END AS lease_expires_at,
       coalesce(q.event_seq, j.event_seq) AS event_seq,
       coalesce(q.last_event, j.last_event) AS last_event,
       CASE WHEN q.job_id IS NULL THEN j.started_at ELSE q.started_at END AS started_at,
       j.finished_at, j.created_at,
       coalesce(q.updated_at, j.updated_at) AS updated_at,
       CASE WHEN q.job_id IS NULL THEN j.error_traceback ELSE q.error_traceback END AS error_traceback
FROM pgjobs.job_rows j
LEFT JOIN pgjobs.job_queue q ON q.job_id = j.id;

ALTER VIEW pgjobs.jobs ALTER COLUMN status SET DEFAULT 'queued';
ALTER VIEW pgjobs.jobs ALTER COLUMN input SET DEFAULT '{}'::jsonb;
ALTER VIEW pgjobs.jobs ALTER COLUMN priority SET DEFAULT 0;
ALTER VIEW pgjobs.jobs ALTER COLUMN run_at SET DEFAULT now();
ALTER VIEW pgjobs.jobs ALTER COLUMN attempts SET DEFAULT 0;
ALTER VIEW pgjobs.jobs ALTER COLUMN max_attempts SET DEFAULT 3;
ALTER VIEW pgjobs.jobs ALTER COLUMN lease_token SET DEFAULT 0;
ALTER VIEW pgjobs.jobs ALTER COLUMN event_seq SET DEFAULT 1;
ALTER VIEW pgjobs.jobs ALTER COLUMN last_event SET DEFAULT 'content_job.queued';
ALTER VIEW pgjobs.jobs ALTER COLUMN created_at SET DEFAULT now();
ALTER VIEW pgjobs.jobs ALTER COLUMN updated_at SET DEFAULT now();

COMMENT ON VIEW pgjobs.jobs IS
'Every job, one row each, with the columns and meanings pgjobs.jobs had as a table: the job '
'row (pgjobs.job_rows), its live columns (status, attempts, lease, progress, error, seq, '
'run_at, updated_at) taken from its pgjobs.job_queue row while it is queued or running. '
'INSERT, UPDATE and DELETE work (routed to the tables row by row, with every rule of the '
'tables); pgjobs'' own statements write the tables.';

-- Writes by hand through the view: a live job that stays live keeps its state in its
-- queue row (and the job row takes the columns that are its own); any other change is the
-- job row's (its trigger ends or revives the queue row). The tables' triggers check each.
CREATE FUNCTION pgjobs.jobs_view_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgjobs.job_rows SELECT NEW.*;
        RETURN NEW;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM pgjobs.job_rows WHERE id = OLD.id;
        RETURN OLD;
    END IF;
    IF OLD.status IN ('queued', 'running') THEN
        -- Lock order: the queue row, then the job row (as pgjobs' statements).
        PERFORM FROM pgjobs.job_queue WHERE job_id = OLD.id FOR UPDATE;
    END IF;
    IF OLD.status IN ('queued', 'running') AND NEW.status IN ('queued', 'running') THEN
        UPDATE pgjobs.job_rows
        SET id = NEW.id, company_id = NEW.company_id, job_type = NEW.job_type, input = NEW.input,
            priority = NEW.priority, run_at = NEW.run_at, max_attempts = NEW.max_attempts,
            result = NEW.result, result_asset_id = NEW.result_asset_id,
            source_task_id = NEW.source_task_id, finished_at = NEW.finished_at,
            created_at = NEW.created_at
        WHERE id = OLD.id
          AND (id, company_id, job_type, input, priority, run_at, max_attempts, result,
               result_asset_id, source_task_id, finished_at, created_at)
              IS DISTINCT FROM
              (NEW.id, NEW.company_id, NEW.job_type, NEW.input, NEW.priority, NEW.run_at,
               NEW.max_attempts, NEW.result, NEW.result_asset_id, NEW.source_task_id,
               NEW.finished_at, NEW.created_at);
        UPDATE pgjobs.job_queue
        SET company_id = NEW.company_id, job_type = NEW.job_type, priority = NEW.priority,
            run_at = NEW.run_at, status = NEW.status, attempts = NEW.attempts,
            max_attempts = NEW.max_attempts, lease_token = NEW.lease_token,
            worker_id = NEW.worker_id, lease_expires_at = NEW.lease_expires_at,
            started_at = NEW.started_at, progress_fraction = NEW.progress_fraction,
            progress_message = NEW.progress_message, error_message = NEW.error_message,
            error_traceback = NEW.error_traceback, event_seq = NEW.event_seq,
            last_event = NEW.last_event, updated_at = NEW.updated_at
        WHERE job_id = OLD.id;
    ELSE
        UPDATE pgjobs.job_rows
        SET (id, company_id, job_type, status, input, priority, run_at, attempts, max_attempts,
             result, result_asset_id, error_message, source_task_id, progress_fraction,
             progress_message, worker_id, lease_token, lease_expires_at, event_seq, last_event,
             started_at, finished_at, created_at, updated_at, error_traceback) = (SELECT NEW.*)
        WHERE id = OLD.id;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER jobs_view_write INSTEAD OF INSERT OR UPDATE OR DELETE ON pgjobs.jobs
    FOR EACH ROW EXECUTE FUNCTION pgjobs.jobs_view_write();

-- The time helpers for a row of the view (those of sql/0005 now take a job row).
CREATE FUNCTION pgjobs.job_times_out_of_range(j pgjobs.jobs) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT NOT (pgjobs.time_in_range(j.run_at) AND pgjobs.time_in_range(j.created_at)
                AND pgjobs.time_in_range(j.updated_at)
                AND coalesce(pgjobs.time_in_range(j.started_at), true)
                AND coalesce(pgjobs.time_in_range(j.finished_at), true)
                AND coalesce(pgjobs.time_in_range(j.lease_expires_at), true))
$$;
CREATE FUNCTION pgjobs.job_times_text(j pgjobs.jobs) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$  -- STABLE: the text is in the session's time zone
    SELECT format('run_at %s, created_at %s, updated_at %s, started_at %s, finished_at %s, '
                  'lease_expires_at %s', j.run_at, j.created_at, j.updated_at, j.started_at,
                  j.finished_at, j.lease_expires_at)
$$;

-- The running jobs' views read the live state from the queue row alone now.
CREATE OR REPLACE VIEW pgjobs.running_jobs AS
SELECT q.job_id, q.company_id, q.job_type, q.attempts AS attempt, q.worker_id,
       w.hostname, w.pid, w.last_heartbeat_at,
       q.started_at,
       now() - q.started_at AS lease_age,
       q.lease_expires_at,
       q.lease_expires_at - now() AS lease_remaining,
       q.progress_fraction, q.progress_message
FROM pgjobs.job_queue q
LEFT JOIN pgjobs.workers w ON w.id = q.worker_id
WHERE q.lease_expires_at IS NOT NULL;

CREATE OR REPLACE VIEW pgjobs.stuck_jobs AS
SELECT q.job_id, q.company_id, q.job_type, 'running'::text AS status,
       'lease_expired'::text AS reason, q.lease_expires_at AS since,
       now() - q.lease_expires_at AS stuck_for, q.worker_id
FROM pgjobs.job_queue q
WHERE q.lease_expires_at IS NOT NULL AND q.lease_expires_at < now()
UNION ALL
SELECT q.job_id, q.company_id, q.job_type, 'queued', 'no_live_worker',
       q.run_at, now() - q.run_at, NULL
FROM pgjobs.job_queue q
WHERE q.lease_expires_at IS NULL AND q.run_at <= now()
  AND NOT EXISTS (SELECT 1 FROM pgjobs.workers w
                  WHERE q.job_type = ANY (w.job_types)
                    AND pgjobs.worker_is_live(w.last_heartbeat_at));
