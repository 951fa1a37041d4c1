-- depends: 0015_audit_views
-- A narrower audit row (issue 16): less for PostgreSQL to do on every transition.
--
-- pgjobs.job_events is keyed by (job_id, seq), the key every per-job reader uses (job
-- streams, the REST timeline, job_timeline), and the index on id alone is gone: an audit
-- row now writes two B-tree entries (this key and the company stream's (company_id, xid,
-- id); a failed or cancelled event a third, in job_events_ended_idx) and a BRIN summary,
-- instead of three. The UNIQUE (job_id, seq) constraint becomes the primary key;
-- PostgreSQL cannot hand a constraint's index over to another constraint, so the key's
-- index is built anew: one index build over the whole audit log, during which inserts
-- into it (every transition) wait: 2.7 s for 3M audit rows on the 2-core bench machine
-- under load (the rollback, two builds: 4.9 s).
--
-- The id column stays, with its identity, because the company stream's cursor is
-- (xid, id): rows of one transaction are ordered by id, and every Last-Event-ID a browser
-- holds ("<xid>-<id>") names one. Without id, an old cursor could not say which rows of
-- its transaction it had already had, and the stream would repeat or skip them. id is
-- still unique (an identity), but nothing looks a row up by id alone any more: the
-- notification-lag metric reads rows by (job_id, seq), the company cursor through
-- (company_id, xid, id), and retention walks each company's rows through that same index
-- (pgjobs.prune_events below) instead of the old key.
--
-- pgjobs.jobs' 22 CHECKs and pgjobs.job_queue's 2 stay as they are: merging them into one
-- CASE per table was measured (docs/benchmarks.md) and saved nothing measurable (the rules
-- cost ~0.5 us per update however they are written), while one CASE makes `\d pgjobs.jobs`
-- much harder to read than 22 named rules.
--
-- Deploying: migrate, then start this version's workers and gateways. Older ones keep
-- working across it but for two things: a worker's retention policy calls
-- pgjobs.prune_events, whose arguments change (its retention loop stops, which /readyz
-- reports, until the worker is upgraded), and a gateway's notification-lag metric reads
-- audit rows by id (now an index scan of the whole company cursor index per scrape).
-- Nothing else they use changes. The rollback rebuilds the id key and the (job_id, seq)
-- unique index: two index builds over the whole audit log.

ALTER TABLE pgjobs.job_events
    DROP CONSTRAINT job_events_pkey,
    DROP CONSTRAINT job_events_job_id_seq_key,
    ADD CONSTRAINT job_events_pkey PRIMARY KEY (job_id, seq);

-- Retention without the id key (replaces sql/0013's prune_events(before, after_id, batch)).
-- One batch: the next `batch` audit rows of company `after_company` after (after_xid,
-- after_id), in the company stream's order, read through job_events_company_xid_idx; those
-- written before `before` are deleted. xids are handed out in time order, so a company's
-- walk stops at its first page with no row older than the cut-off and goes on with the
-- next company; as before, a row of a transaction that was open across the cut-off can
-- be left for the next run. after_company NULL starts at the first company. Returns the
-- rows deleted, the cursor for the next batch (last_company, last_xid, last_id) and done:
-- no company is left.
CREATE FUNCTION pgjobs.prune_events(before timestamptz, after_company text, after_xid xid8,
                                    after_id bigint, batch integer,
                                    OUT deleted bigint, OUT last_company text,
                                    OUT last_xid xid8, OUT last_id bigint, OUT done boolean)
LANGUAGE plpgsql AS $$
DECLARE
    company_done boolean;
BEGIN
    IF after_company IS NULL THEN
        after_company := (SELECT min(company_id) FROM pgjobs.job_events);
        after_xid := '0'::xid8;
        after_id := 0;
        IF after_company IS NULL THEN
            deleted := 0; done := true;
            RETURN;
        END IF;
    END IF;
    PERFORM set_config('pgjobs.prune_events_before', before::text, true);
    WITH page AS (
        SELECT ctid, xid, id, created_at FROM pgjobs.job_events
        WHERE company_id = after_company AND (xid, id) > (after_xid, after_id)
        ORDER BY xid, id LIMIT batch
    ), gone AS (
        DELETE FROM pgjobs.job_events e USING page p
        WHERE e.ctid = p.ctid AND p.created_at < before
        RETURNING e.id, e.xid
    ), mark AS (
        -- The company's newest (xid, id) deleted moves its streams' retention mark.
        INSERT INTO pgjobs.job_events_pruned AS m (company_id, xid, id)
        SELECT after_company, g.xid, g.id FROM gone g ORDER BY g.xid DESC, g.id DESC LIMIT 1
        ON CONFLICT (company_id) DO UPDATE SET xid = excluded.xid, id = excluded.id
        WHERE (excluded.xid, excluded.id) > (m.xid, m.id)
    ), tail AS (
        SELECT p.xid, p.id FROM page p ORDER BY p.xid DESC, p.id DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM gone),
           (SELECT l.xid FROM tail l), (SELECT l.id FROM tail l),
           (SELECT count(*) < batch OR bool_and(p.created_at >= before) FROM page p)
    INTO deleted, last_xid, last_id, company_done;
    PERFORM set_config('pgjobs.prune_events_before', '', true);
    IF company_done THEN
        last_company := (SELECT min(company_id) FROM pgjobs.job_events
                         WHERE company_id > after_company);
        last_xid := '0'::xid8;
        last_id := 0;
        done := last_company IS NULL;
    ELSE
        last_company := after_company;
        done := false;
    END IF;
END;
$$;

DROP FUNCTION pgjobs.prune_events(timestamptz, bigint, integer);
