-- depends: 0018_limit_scope
-- A transaction may ask for a ring instead of NOTIFY items: with the transaction-local
-- setting pgjobs.doorbell = 'on' (set_config('pgjobs.doorbell', 'on', true)), the publish
-- trigger still writes every audit row but sends nothing on pgjobs_events; the writer sends
-- a ring after its commit (pgjobs.events.encode_ring), naming the jobs, and listeners read
-- their events from pgjobs.job_events.
--
-- Why: PostgreSQL's PreCommit_Notify takes a database-wide lock for a commit that carries a
-- NOTIFY and holds it through the commit's WAL flush, so such commits never share a flush.
-- Every worker claim and finish carried one: bench.waits found 18% / 35% / 47% of active
-- backends' samples waiting for that lock at 1 / 2 / 4 worker processes, which is why a
-- second process drained no faster. A ring's own transaction writes no WAL and holds the
-- lock briefly (docs/benchmarks.md, "A doorbell apart from the commit"). Building the items
-- is skipped too (~5 µs of PostgreSQL CPU per event).
--
-- What does not change: the audit rows, the schema's refusal of a state change without one,
-- and pgjobs_work (workers' wake-ups and cancellations are still sent in the commit: few
-- statements have any, and a lost one would leave a job waiting for a poll). Sessions that
-- do not set it (psql, the gateway, old workers) get today's items. Deploying: one function
-- replaced; workers and gateways of either version keep working (an old gateway cannot read a
-- ring, so it re-reads every stream's events from the table: upgrade gateways first).

CREATE OR REPLACE FUNCTION pgjobs.publish_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    wake_workers boolean;
    -- The writer rings after its commit instead (see the header).
    ring boolean := current_setting('pgjobs.doorbell', true) IS NOT DISTINCT FROM 'on';
BEGIN
    IF TG_OP = 'UPDATE' THEN
        WITH pairs AS MATERIALIZED (
            -- Only the columns an event needs: this CTE is materialised, and whole job
            -- rows (input, result) would be copied for nothing.
            SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts,
                   n.worker_id, n.progress_fraction, n.progress_message, n.result_asset_id,
                   n.error_message, n.error_traceback, n.run_at,
                   -- Whether workers need to hear of it (see work_item).
                   n.event_seq <> o.event_seq
                   AND (n.status = 'queued' OR (n.status = 'cancelled' AND o.status = 'running')) AS for_workers,
                   n.event_seq <> o.event_seq AS is_transition,
                   (n.event_seq <> o.event_seq AND n.event_seq <> o.event_seq + 1)
                   OR (n.event_seq = o.event_seq
                       AND (n.status <> o.status
                            OR n.progress_fraction IS DISTINCT FROM o.progress_fraction
                            OR n.progress_message IS DISTINCT FROM o.progress_message
                            OR n.attempts <> o.attempts)) AS is_bad
            FROM new_rows n FULL JOIN old_rows o USING (id)
        ), inserted AS (
            INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
            SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
                   CASE WHEN c.last_event IN ('content_job.running', 'content_job.queued', 'content_job.cancelled')
                             OR (c.last_event = 'content_job.done' AND c.result_asset_id IS NULL)
                        THEN '{}'::jsonb
                        WHEN c.error_traceback IS NOT NULL
                             AND c.last_event IN ('content_job.retrying', 'content_job.failed')
                        -- The attempt's traceback, for the audit log only (see above).
                        THEN pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                                  c.result_asset_id, c.error_message, c.run_at)
                             || jsonb_build_object('traceback', c.error_traceback)
                        ELSE pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                                  c.result_asset_id, c.error_message, c.run_at) END
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
            -- The workers' channel, in a statement of its own: most statements (the
            -- claim, progress, completions) have nothing for workers and skip it.
            WITH joined AS MATERIALIZED (
                -- The pairs as above (FULL JOIN, materialised: see the header).
                SELECT n.id, n.job_type, n.run_at, n.status, o.status AS old_status,
                       n.event_seq <> o.event_seq AS is_transition
                FROM new_rows n FULL JOIN old_rows o USING (id)
            ), work AS (
                SELECT id, job_type, run_at, status FROM joined
                WHERE is_transition
                  AND (status = 'queued' OR (status = 'cancelled' AND old_status = 'running'))
            ), items AS (
                SELECT pgjobs.work_item('queued', job_type, min(run_at), NULL) AS item
                FROM work WHERE status = 'queued' GROUP BY job_type
                UNION ALL
                SELECT pgjobs.work_item('cancelled', NULL, NULL, id) FROM work WHERE status = 'cancelled'
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
    ELSE
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
    END IF;
    RETURN NULL;
END;
$$;
