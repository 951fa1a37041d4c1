-- depends: 0012_schedules
-- Retention (issue 17): `pgjobs prune` and the workers' retention policy
-- (pgjobs.retention).
--
-- The audit log stays append-only for everything but the retention path. The append-only
-- trigger now lets a DELETE through only when the transaction-local setting
-- pgjobs.prune_events_before holds a cut-off and the row was written before it; only
-- pgjobs.prune_events() sets it (set_config(..., true): it ends with the transaction, so
-- it also works through PgBouncer in transaction mode), and it clears it again before
-- returning. A hand-written DELETE in psql is refused as before, and UPDATE always is.
-- Why a setting and not a SECURITY DEFINER function owning the privilege: pgjobs runs as
-- one role that owns its tables, and an owner cannot be kept from deleting its own rows
-- by privileges, only by the trigger; the trigger has to tell the retention path from a
-- stray DELETE either way, and the cut-off in the setting also bounds what even a
-- forged setting can remove to rows older than a cut-off (what retention would remove).
--
-- pgjobs.job_events_pruned holds, per company, the largest (xid, id) of its audit rows
-- ever deleted: a company stream whose Last-Event-ID (xid, id) is below it may have lost
-- events it never saw, and is sent the current state instead (pgjobs.gateway.
-- companystream). pgjobs.retention (one row) records the workers' policy runs: one worker
-- per interval (the guarded update in query retention_claim_run).
-- pgjobs.asset_deletions holds the storage keys of pruned assets whose file is still to be
-- deleted: written in the transaction that deletes the asset rows, emptied as the files go
-- (after the commit); a file whose delete fails stays listed and is retried by the next
-- prune.

CREATE TABLE pgjobs.retention (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    last_run_at  timestamptz,
    runs         bigint      NOT NULL DEFAULT 0
);
INSERT INTO pgjobs.retention DEFAULT VALUES;

CREATE TABLE pgjobs.job_events_pruned (
    company_id  text    PRIMARY KEY,
    xid         xid8    NOT NULL,
    id          bigint  NOT NULL
);

CREATE TABLE pgjobs.asset_deletions (
    object_key  text        PRIMARY KEY,
    asset_id    uuid        NOT NULL,
    queued_at   timestamptz NOT NULL DEFAULT now(),
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text
);

CREATE OR REPLACE FUNCTION pgjobs.forbid_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cutoff text := current_setting('pgjobs.prune_events_before', true);
BEGIN
    IF TG_OP = 'DELETE' AND coalesce(cutoff, '') <> '' AND OLD.created_at < cutoff::timestamptz THEN
        RETURN OLD;  -- the retention path (pgjobs.prune_events), for a row older than its cut-off
    END IF;
    RAISE EXCEPTION 'pgjobs.job_events is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

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
