-- depends: 0026_notify_items_plan
-- An audit row's xid is the company stream's order key: the writing transaction's xid, or
-- the xid of the job's previous audit row where that is larger. A job's rows are then in
-- seq order in the company stream's (xid, id) order, as they are in its job stream.
--
-- Why: xids are handed out when a transaction first writes, not when it writes a given
-- job. A transaction that took its xid first and wrote a job's later transition after a
-- younger one wrote (and committed) its earlier one stored the later row under the
-- smaller xid, and the company stream sent that job's seq 12 before its seq 11: a worker's
-- finish batch that waited on the job's lock, or a cancel and a retry in the order of
-- tests/gateway/test_gw_company_stream.py (seen once in the chaos test: seqs ..., 10, 12,
-- 11, 13, ...). A browser applying the events in arrival order showed the earlier state.
--
-- Why the cursor stays exact: a row's key is at least its writer's xid, so below the
-- feed's horizon (the snapshot's xmin) every row is from a finished transaction and no
-- later row can take a key there; a job's next row is written after its previous one
-- committed (the job's row lock), so its key is at least the previous one's and, when
-- equal, its id is larger (ids are taken at insert, in order).
--
-- The cost: one lookup of the previous row by the audit log's key (job_id, seq) per
-- transition, in the pages the new row goes to, and only in a statement that a younger
-- transaction ended before (pgjobs.younger_transaction_ended: one snapshot per statement);
-- without one, no previous row can have a larger xid. The lookup is an index scan
-- whatever the log's size when PL/pgSQL planned the trigger (seq scans off while it runs:
-- a plan made while the log held a few rows, then kept, would otherwise scan the whole
-- log per row; see sql/0026). A job's first row (its insert) has no previous row and is
-- unchanged.
--
-- Everything else is sql/0023's job_rows_updated and job_queue_updated unchanged.
-- Deploying: no stop; two functions replaced in one transaction; sessions plan them anew;
-- workers and gateways of either version keep working. Rows written before keep their xid.

-- Whether a transaction with a larger xid than this one's has ended: only such a writer
-- can have left a job's previous audit row with a larger xid than this transaction's (it
-- wrote and committed the job after this one took its xid). Every xid between this one's
-- and the snapshot's xmax was handed out, and those not listed as running have ended (a
-- running subtransaction's xid is not listed either: it counts as ended, which costs the
-- lookups, never the order).
CREATE FUNCTION pgjobs.younger_transaction_ended() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT (SELECT count(*) FROM pg_snapshot_xip(s) AS x WHERE x > me)
           < pg_snapshot_xmax(s)::text::numeric - me::text::numeric - 1
    FROM pg_current_snapshot() AS s, pg_current_xact_id() AS me
$$;

CREATE OR REPLACE FUNCTION pgjobs.job_rows_updated() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    revived boolean;
    queued_again boolean;
    cancelled_running uuid[];
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
    younger_ended boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN
        RETURN NULL;  -- an UPDATE of no rows (a finish batch of retries only): nothing moved
    END IF;
    younger_ended := pgjobs.younger_transaction_ended();
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
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, xid, payload)
        SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
               -- The company stream's order key (see the top of this file).
               CASE WHEN younger_ended
                    THEN greatest(pg_current_xact_id(),
                                  (SELECT p.xid FROM pgjobs.job_events p
                                   WHERE p.job_id = c.id AND p.seq = c.event_seq - 1))
                    ELSE pg_current_xact_id() END,
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
        -- No RETURNING: the items, where asked for, are read back below.
    )
    SELECT (SELECT id FROM checked WHERE is_bad LIMIT 1),
           (SELECT bool_or(live AND NOT was_live) FROM checked),
           (SELECT bool_or(status = 'queued' AND NOT was_live AND event_seq <> old_seq) FROM checked),
           (SELECT array_agg(id) FROM checked
            WHERE status = 'cancelled' AND live_status = 'running' AND event_seq <> old_seq)
    INTO bad_id, revived, queued_again, cancelled_running;
    IF bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event; a queued or running job''s state is in pgjobs.job_queue)', bad_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ring THEN
        WITH pairs AS MATERIALIZED (
            -- FULL JOIN, materialised: see sql/0017_trigger_plans.sql.
            SELECT n.id, n.event_seq, n.event_seq <> o.event_seq AS is_transition
            FROM new_rows n FULL JOIN old_rows o USING (id)
        )
        SELECT pgjobs.notify_audit_rows(array_agg(id), array_agg(event_seq)) INTO sent
        FROM pairs WHERE is_transition;
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

CREATE OR REPLACE FUNCTION pgjobs.job_queue_updated() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    wake_workers boolean;
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
    younger_ended boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN
        RETURN NULL;  -- an UPDATE of no rows (every finish's retries, mostly none): nothing moved
    END IF;
    younger_ended := pgjobs.younger_transaction_ended();
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
        INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, xid, payload)
        SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
               -- The company stream's order key (see the top of this file).
               CASE WHEN younger_ended
                    THEN greatest(pg_current_xact_id(),
                                  (SELECT p.xid FROM pgjobs.job_events p
                                   WHERE p.job_id = c.id AND p.seq = c.event_seq - 1))
                    ELSE pg_current_xact_id() END,
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
        -- No RETURNING: the items, where asked for, are read back below.
    )
    SELECT (SELECT id FROM pairs WHERE is_bad LIMIT 1), (SELECT bool_or(for_workers) FROM pairs)
    INTO bad_id, wake_workers;
    IF bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event)', bad_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ring THEN
        WITH pairs AS MATERIALIZED (
            -- FULL JOIN, materialised: see sql/0017_trigger_plans.sql.
            SELECT n.job_id AS id, n.event_seq, n.event_seq <> o.event_seq AS is_transition
            FROM new_rows n FULL JOIN old_rows o USING (job_id)
        )
        SELECT pgjobs.notify_audit_rows(array_agg(id), array_agg(event_seq)) INTO sent
        FROM pairs WHERE is_transition;
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
