-- Rolls back 0016_narrow_audit: the audit log keyed by id again with UNIQUE (job_id, seq)
-- (two index builds over the whole audit log) and 0013's prune.

DROP FUNCTION pgjobs.prune_events(timestamptz, text, xid8, bigint, integer);
-- One batch of audit-log retention: the next `batch` rows after id `after_id`, in id
-- order (the primary key: no scan of the table, no index on time needed), of which those
-- written before `before` are deleted. ids are handed out in insert order, so the walk
-- can stop at the first page with no row older than the cut-off (`done`); a row of a
-- transaction that was open across the cut-off can be left for the next run. Returns the
-- rows deleted and the last id read (the next batch's `after_id`).
CREATE FUNCTION pgjobs.prune_events(before timestamptz, after_id bigint, batch integer,
                                    OUT deleted bigint, OUT last_id bigint, OUT done boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pgjobs.prune_events_before', before::text, true);
    WITH page AS (
        SELECT id, xid, created_at FROM pgjobs.job_events
        WHERE id > after_id ORDER BY id LIMIT batch
    ), gone AS (
        DELETE FROM pgjobs.job_events e USING page p
        WHERE e.id = p.id AND p.created_at < before
        RETURNING e.id, e.xid, e.company_id
    ), mark AS (
        -- Each company's newest (xid, id) deleted moves its streams' retention mark.
        INSERT INTO pgjobs.job_events_pruned AS m (company_id, xid, id)
        SELECT DISTINCT ON (company_id) company_id, xid, id
        FROM gone ORDER BY company_id, xid DESC, id DESC
        ON CONFLICT (company_id) DO UPDATE SET xid = excluded.xid, id = excluded.id
        WHERE (excluded.xid, excluded.id) > (m.xid, m.id)
    )
    SELECT (SELECT count(*) FROM gone),
           coalesce((SELECT max(id) FROM page), after_id),
           coalesce((SELECT bool_and(created_at >= before) FROM page), true)
    INTO deleted, last_id, done;
    PERFORM set_config('pgjobs.prune_events_before', '', true);
END;
$$;

ALTER TABLE pgjobs.job_events
    DROP CONSTRAINT job_events_pkey,
    ADD CONSTRAINT job_events_pkey PRIMARY KEY (id),
    ADD CONSTRAINT job_events_job_id_seq_key UNIQUE (job_id, seq);
