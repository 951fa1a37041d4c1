-- depends: 0009_operator_tokens
-- NOTIFY payloads packed up to the 8000-byte limit instead of half of it (issue 16).
--
-- What this migration does not need to do: the publish and queue-sync triggers on
-- pgjobs.jobs have been statement-level with transition tables since sql/0001 and
-- sql/0004 (one INSERT ... SELECT of the statement's audit rows, one statement per
-- job_queue change, items packed into few pg_notify calls), so a batch's triggers cost a
-- handful of statements, not one per job. bench.pgss's "19.5 µs of audit rows + NOTIFY
-- and 10 µs of job_queue per job" is the per-row work inside those statements.
--
-- What it changes: each channel's items were cut into chunks by their running size
-- divided by 4000, so a chunk stayed under 8000 bytes whatever one item's size (up to
-- ~3.5 kB), and a statement of many small items (a bulk enqueue's: ~150-200 bytes each)
-- sent twice the NOTIFYs it needed. Now the divisor is 7980 minus the statement's largest
-- item: a chunk holds less than divisor + one item + its comma, and with the 13 bytes of
-- '{"events":[' ... ']}' stays under 8000. A statement sends about half the NOTIFYs it
-- did (1,000 jobs of 1,000 types enqueued at once: 37 NOTIFYs of events and 11 of work
-- before, 19 and 6 after), so a listener (the gateway's fan-out, a worker) parses half
-- as many.
--
-- Measured: no change in PostgreSQL's CPU for a 1,000-job enqueue (two interleaved runs
-- of 10-12 rounds on a shared 2-core machine: 18.7 vs 19.4 and 19.2 vs 19.1 µs per job,
-- ranges overlapping). What the NOTIFY costs there (~3 µs per job) is building the items
-- and ordering them, not the pg_notify calls; a doorbell (one NOTIFY per statement)
-- would save ~1.7 µs of it, but needs the gateway to read events from the audit log.
-- Everything else is 0007's function unchanged: the audit rows, the refusal of a state
-- change without its audit row, both channels and their items.
--
-- Deploying: a function replaced in one transaction; workers and gateways of either
-- version keep working during and after it (the payloads' format is unchanged).

CREATE OR REPLACE FUNCTION pgjobs.publish_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
    wake_workers boolean;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        WITH pairs AS (
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
            FROM new_rows n JOIN old_rows o USING (id)
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
            RETURNING id, pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload) AS item
        ), chunks AS (
            SELECT id, item,
                   sum(octet_length(item) + 1) OVER (ORDER BY id)
                   / (7980 - max(octet_length(item)) OVER ()) AS chunk
            FROM inserted
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
            WITH work AS (
                SELECT n.id, n.job_type, n.run_at, n.status
                FROM new_rows n JOIN old_rows o USING (id)
                WHERE n.event_seq <> o.event_seq
                  AND (n.status = 'queued' OR (n.status = 'cancelled' AND o.status = 'running'))
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
            RETURNING id, pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload) AS item
        ), chunks AS (
            SELECT id, item,
                   sum(octet_length(item) + 1) OVER (ORDER BY id)
                   / (7980 - max(octet_length(item)) OVER ()) AS chunk
            FROM inserted
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
