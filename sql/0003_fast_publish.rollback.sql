-- Back to 0001's publish trigger and NOTIFY builder.
CREATE FUNCTION pgjobs.notify_events(events pgjobs.job_events[]) RETURNS bigint
LANGUAGE sql AS $$
    WITH items AS (
        SELECT e.id,
               json_build_object(
                   'eventId', e.id, 'jobId', e.job_id, 'companyId', e.company_id, 'seq', e.seq,
                   'type', e.type, 'status', e.status, 'attempt', e.attempt,
                   'progress', CASE WHEN e.payload ? 'progress' THEN json_build_object(
                       'fraction', e.payload #> '{progress,fraction}',
                       'message', left(e.payload #>> '{progress,message}', 300)) END,
                   'errorMessage', left(e.payload ->> 'errorMessage', 300),
                   'resultAssetId', e.payload ->> 'resultAssetId',
                   'runAt', e.payload ->> 'runAt')::text AS item
        FROM unnest(events) AS e
    ), chunks AS (
        SELECT id, item, sum(octet_length(item) + 1) OVER (ORDER BY id) / 4000 AS chunk
        FROM items
    ), sent AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT count(n) FROM sent
$$;

CREATE OR REPLACE FUNCTION pgjobs.publish_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- One pass over old/new pairs: rows whose event_seq moved become events, and a
        -- status/progress/attempt change without exactly one event_seq bump would be a
        -- transition without its audit row, which is refused (the exception also undoes
        -- the event rows written here).
        WITH pairs AS (
            SELECT n.*,
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
                   pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                        c.result_asset_id, c.error_message, c.run_at)
            FROM pairs c
            WHERE c.is_transition AND NOT c.is_bad
            RETURNING job_events AS ev
        )
        SELECT (SELECT pgjobs.notify_events(array_agg(ev ORDER BY (ev).id)) FROM inserted),
               (SELECT id FROM pairs WHERE is_bad LIMIT 1)
        INTO sent, bad_id;
        IF bad_id IS NOT NULL THEN
            RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event)', bad_id
                USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        WITH inserted AS (
            INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
            SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts, n.worker_id,
                   '{}'::jsonb
            FROM new_rows n
            RETURNING job_events AS ev
        )
        SELECT pgjobs.notify_events(array_agg(ev ORDER BY (ev).id)) INTO sent FROM inserted;
    END IF;
    RETURN NULL;
END;
$$;

DROP FUNCTION pgjobs.notify_item(bigint, uuid, text, integer, text, text, integer, jsonb);
