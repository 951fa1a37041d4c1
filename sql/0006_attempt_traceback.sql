-- depends: 0005_time_bounds
-- A failed attempt keeps its traceback (issue 14).
--
-- pgjobs.jobs.error_traceback holds the traceback of the attempt that set error_message
-- (an exception in a handler; NULL for a timeout, a lost lease, a manual retry or a
-- success), bounded to 16 KiB by the worker and by the CHECK below. The publish trigger
-- copies it into the audit row of that attempt's content_job.retrying or
-- content_job.failed event as payload.traceback, so every attempt's traceback stays
-- readable with plain SQL after the next attempt has replaced the job row's.
--
-- Never in a NOTIFY: pgjobs.notify_item (sql/0003) builds NOTIFY items from the payload
-- keys it names (progress, errorMessage, resultAssetId, runAt), and the gateway's SSE
-- frames likewise; a traceback reveals server internals and is for operators only.
--
-- Only failing attempts pay: the column is NULL on the hot path, where the completion
-- passes NULL for the whole batch's tracebacks and the trigger adds nothing.

ALTER TABLE pgjobs.jobs ADD COLUMN error_traceback text
    CONSTRAINT jobs_traceback_bounded CHECK (octet_length(error_traceback) <= 16384);

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
