-- depends: 0015_audit_views
-- A narrower audit row and merged CHECKs (issue 16): less for PostgreSQL to do on every
-- transition.
--
-- 1. pgjobs.job_events is keyed by (job_id, seq), the key every per-job reader uses (job
--    streams, the REST timeline, job_timeline), and the index on id alone is gone: an
--    audit row now writes two B-tree entries (this key and the company stream's
--    (company_id, xid, id); a failed or cancelled event a third, in job_events_ended_idx)
--    and a BRIN summary, instead of three. The UNIQUE (job_id, seq) constraint becomes the
--    primary key; PostgreSQL cannot hand a constraint's index over to another constraint,
--    so the key's index is built anew: one index build over the whole audit log, during
--    which inserts into it (every transition) wait: 2.7 s for 3M audit rows on the 2-core
--    bench machine under load (the rollback, two builds: 4.9 s).
--
--    The id column stays, with its identity, because the company stream's cursor is
--    (xid, id): rows of one transaction are ordered by id, and every Last-Event-ID a
--    browser holds ("<xid>-<id>") names one. Without id, an old cursor could not say
--    which rows of its transaction it had already had, and the stream would repeat or
--    skip them. id is still unique (an identity), but nothing looks a row up by id alone
--    any more: the notification-lag metric reads rows by (job_id, seq), the company
--    cursor through (company_id, xid, id), and retention walks each company's rows
--    through that same index (pgjobs.prune_events below) instead of the old key.
--
-- 2. pgjobs.jobs had 22 CHECK constraints and pgjobs.job_queue 2, each evaluated as its
--    own expression on every insert and update. They are now one per table, jobs_valid
--    and job_queue_valid, each one CASE over the same rules. A row that breaks a rule
--    still gets the error it got before, naming the rule: the CASE's branch for it calls
--    pgjobs.check_failed, which raises check_violation with PostgreSQL's own message
--    ('new row for relation "jobs" violates check constraint "jobs_running_has_lease"')
--    and the rule's name as the error's constraint name. The branches are in the old
--    constraints' name order, the order PostgreSQL checked them in, so a row breaking
--    two rules names the same one as before. A rule passes when its expression is NULL,
--    as a CHECK does (NOT NULL is not true, so the branch is not taken).
--
-- Deploying: migrate, then start this version's workers and gateways. Older ones keep
-- working across it but for two things: a worker's retention policy calls
-- pgjobs.prune_events, whose arguments change (its retention loop stops, which /readyz
-- reports, until the worker is upgraded), and a gateway's notification-lag metric reads audit rows by id (now an index
-- scan of the whole company cursor index per scrape). Nothing else they use changes. The
-- rollback rebuilds the id key and the (job_id, seq) unique index: two index builds over
-- the whole audit log.

ALTER TABLE pgjobs.job_events
    DROP CONSTRAINT job_events_pkey,
    DROP CONSTRAINT job_events_job_id_seq_key,
    ADD CONSTRAINT job_events_pkey PRIMARY KEY (job_id, seq);

-- Raises the error a failed CHECK raises, for the rule `rule` of table `tbl`; never
-- returns. VOLATILE so that the planner never evaluates it ahead of its CASE branch.
CREATE FUNCTION pgjobs.check_failed(tbl text, rule text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'new row for relation "%" violates check constraint "%"', tbl, rule
        USING ERRCODE = 'check_violation', SCHEMA = 'pgjobs', TABLE = tbl, CONSTRAINT = rule;
END;
$$;

ALTER TABLE pgjobs.jobs
    DROP CONSTRAINT jobs_attempts_in_range,
    DROP CONSTRAINT jobs_company_id_check,
    DROP CONSTRAINT jobs_created_at_in_range,
    DROP CONSTRAINT jobs_done_has_no_error,
    DROP CONSTRAINT jobs_ended_has_its_event,
    DROP CONSTRAINT jobs_failed_has_error,
    DROP CONSTRAINT jobs_finished_at_in_range,
    DROP CONSTRAINT jobs_finished_iff_terminal,
    DROP CONSTRAINT jobs_job_type_check,
    DROP CONSTRAINT jobs_last_event_known,
    DROP CONSTRAINT jobs_lease_expires_at_in_range,
    DROP CONSTRAINT jobs_lease_only_while_running,
    DROP CONSTRAINT jobs_max_attempts_check,
    DROP CONSTRAINT jobs_progress_fraction_check,
    DROP CONSTRAINT jobs_progress_message_check,
    DROP CONSTRAINT jobs_queued_has_attempt_left,
    DROP CONSTRAINT jobs_run_at_in_range,
    DROP CONSTRAINT jobs_running_has_lease,
    DROP CONSTRAINT jobs_started_at_in_range,
    DROP CONSTRAINT jobs_status_check,
    DROP CONSTRAINT jobs_traceback_bounded,
    DROP CONSTRAINT jobs_updated_at_in_range,
    -- Each branch is a former constraint: its name, then its expression (sql/0001, 0004,
    -- 0005, 0006).
    ADD CONSTRAINT jobs_valid CHECK (CASE
        WHEN NOT (attempts BETWEEN 0 AND max_attempts)
            THEN pgjobs.check_failed('jobs', 'jobs_attempts_in_range')
        WHEN NOT (length(company_id) BETWEEN 1 AND 200)
            THEN pgjobs.check_failed('jobs', 'jobs_company_id_check')
        WHEN NOT pgjobs.time_in_range(created_at)
            THEN pgjobs.check_failed('jobs', 'jobs_created_at_in_range')
        WHEN NOT (status <> 'done' OR error_message IS NULL)
            THEN pgjobs.check_failed('jobs', 'jobs_done_has_no_error')
        WHEN NOT ((status = 'failed') = (last_event = 'content_job.failed')
                  AND (status = 'cancelled') = (last_event = 'content_job.cancelled'))
            THEN pgjobs.check_failed('jobs', 'jobs_ended_has_its_event')
        WHEN NOT (status <> 'failed' OR error_message IS NOT NULL)
            THEN pgjobs.check_failed('jobs', 'jobs_failed_has_error')
        WHEN NOT pgjobs.time_in_range(finished_at)
            THEN pgjobs.check_failed('jobs', 'jobs_finished_at_in_range')
        WHEN NOT ((status IN ('done', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
            THEN pgjobs.check_failed('jobs', 'jobs_finished_iff_terminal')
        WHEN NOT (length(job_type) BETWEEN 1 AND 200)
            THEN pgjobs.check_failed('jobs', 'jobs_job_type_check')
        WHEN NOT (last_event IN (
                'content_job.queued', 'content_job.running', 'content_job.progress',
                'content_job.retrying', 'content_job.done', 'content_job.failed',
                'content_job.cancelled'))
            THEN pgjobs.check_failed('jobs', 'jobs_last_event_known')
        WHEN NOT pgjobs.time_in_range(lease_expires_at)
            THEN pgjobs.check_failed('jobs', 'jobs_lease_expires_at_in_range')
        WHEN NOT (status = 'running' OR lease_expires_at IS NULL)
            THEN pgjobs.check_failed('jobs', 'jobs_lease_only_while_running')
        WHEN NOT (max_attempts BETWEEN 1 AND 1000)
            THEN pgjobs.check_failed('jobs', 'jobs_max_attempts_check')
        WHEN NOT (progress_fraction BETWEEN 0 AND 1)
            THEN pgjobs.check_failed('jobs', 'jobs_progress_fraction_check')
        WHEN NOT (length(progress_message) <= 1000)
            THEN pgjobs.check_failed('jobs', 'jobs_progress_message_check')
        WHEN NOT (status <> 'queued' OR attempts < max_attempts)
            THEN pgjobs.check_failed('jobs', 'jobs_queued_has_attempt_left')
        WHEN NOT pgjobs.time_in_range(run_at)
            THEN pgjobs.check_failed('jobs', 'jobs_run_at_in_range')
        WHEN NOT (status <> 'running'
                  OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL
                      AND started_at IS NOT NULL))
            THEN pgjobs.check_failed('jobs', 'jobs_running_has_lease')
        WHEN NOT pgjobs.time_in_range(started_at)
            THEN pgjobs.check_failed('jobs', 'jobs_started_at_in_range')
        WHEN NOT (status IN ('queued', 'running', 'done', 'failed', 'cancelled'))
            THEN pgjobs.check_failed('jobs', 'jobs_status_check')
        WHEN NOT (octet_length(error_traceback) <= 16384)
            THEN pgjobs.check_failed('jobs', 'jobs_traceback_bounded')
        WHEN NOT pgjobs.time_in_range(updated_at)
            THEN pgjobs.check_failed('jobs', 'jobs_updated_at_in_range')
        ELSE true
    END);

ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_lease_expires_at_in_range,
    DROP CONSTRAINT job_queue_run_at_in_range,
    ADD CONSTRAINT job_queue_valid CHECK (CASE
        WHEN NOT pgjobs.time_in_range(lease_expires_at)
            THEN pgjobs.check_failed('job_queue', 'job_queue_lease_expires_at_in_range')
        WHEN NOT pgjobs.time_in_range(run_at)
            THEN pgjobs.check_failed('job_queue', 'job_queue_run_at_in_range')
        ELSE true
    END);

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
