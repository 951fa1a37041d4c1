-- Rolls back 0026_notify_items_plan: notify_audit_rows as sql/0023 wrote it (a SQL
-- function, planned at each call; the replaced definition has no SET clause left).
CREATE OR REPLACE FUNCTION pgjobs.notify_audit_rows(job_ids uuid[], seqs int[]) RETURNS bigint
LANGUAGE sql AS $$
    WITH items AS (
        SELECT e.id, pgjobs.notify_item(e.id, e.job_id, e.company_id, e.seq, e.type, e.status,
                                        e.attempt, e.payload) AS item
        FROM unnest(job_ids, seqs) AS k(job_id, seq)
        JOIN pgjobs.job_events e ON e.job_id = k.job_id AND e.seq = k.seq
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM items
    ), notified AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT count(n) FROM notified;
$$;
