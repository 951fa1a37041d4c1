-- Back to 0006's publish trigger: nothing is sent on pgjobs_work any more.
CREATE OR REPLACE FUNCTION pgjobs.publish_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        WITH pairs AS (
            -- Only the columns an event needs: this CTE is materialised, and whole job
            -- rows (input, result) would be copied for nothing.
            SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts,
                   n.worker_id, n.progress_fraction, n.progress_message, n.result_asset_id,
                   n.error_message, n.error_traceback, n.run_at,
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
            SELECT id, item, sum(octet_length(item) + 1) OVER (ORDER BY id) / 4000 AS chunk FROM inserted
        ), notified AS (
            SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
            FROM chunks GROUP BY chunk
        )
        SELECT (SELECT count(n) FROM notified), (SELECT id FROM pairs WHERE is_bad LIMIT 1)
        INTO sent, bad_id;
        IF bad_id IS NOT NULL THEN
            RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event)', bad_id
                USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        WITH inserted AS (
            INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
            SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts, n.worker_id, '{}'::jsonb
            FROM new_rows n
            RETURNING id, pgjobs.notify_item(id, job_id, company_id, seq, type, status, attempt, payload) AS item
        ), chunks AS (
            SELECT id, item, sum(octet_length(item) + 1) OVER (ORDER BY id) / 4000 AS chunk FROM inserted
        ), notified AS (
            SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
            FROM chunks GROUP BY chunk
        )
        SELECT count(n) INTO sent FROM notified;
    END IF;
    RETURN NULL;
END;
$$;

DROP FUNCTION pgjobs.work_item(text, text, timestamptz, uuid);
