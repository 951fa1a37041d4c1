-- depends: 0003_fast_publish
-- Transitions as HOT updates (issue 4).
--
-- PostgreSQL can rewrite a row inside its own page without touching any index (a "HOT"
-- update) only when no indexed column changes: no key, and no column of a partial index's
-- predicate. Until now every transition changed `status`, which was in the claim and lease
-- indexes' predicates and was jobs_company_status_idx's key, so each of the two updates a
-- job takes (claim, completion) wrote a new entry into every index of pgjobs.jobs.
--
-- Now pgjobs.jobs keeps only indexes on columns that never change (jobs_pkey,
-- jobs_company_created_idx), and the claim and rescue read pgjobs.job_queue: one narrow row
-- per queued or running job, holding exactly what those two need. A trigger keeps it in
-- step with pgjobs.jobs in the same statement (the schema, not application code, keeps the
-- invariant "job_queue holds exactly the queued and running jobs"). A fillfactor of 50
-- leaves room in each page for the new versions, so the job row's updates stay HOT.
--
-- Locking rule: every writer locks the pgjobs.jobs row first; the job_queue row is only
-- ever written by the trigger, under that lock. The claim and the rescuer, which find
-- their rows through job_queue, lock both rows SKIP LOCKED and so never wait: no lock
-- cycle can form between them and the other writers (see pgjobs/queries.sql).
--
-- Deploying: stop the workers, migrate, start the new version. Older workers' claim would
-- still be correct but would scan pgjobs.jobs, the index it used being gone.

CREATE TABLE pgjobs.job_queue (
    job_id           uuid        PRIMARY KEY,  -- pgjobs.jobs.id
    job_type         text        NOT NULL,
    priority         integer     NOT NULL,
    run_at           timestamptz NOT NULL,
    -- NULL exactly while the job is queued (pgjobs.jobs' CHECKs tie the lease to status).
    lease_expires_at timestamptz
);
-- The claim: due queued jobs, highest priority first.
CREATE INDEX job_queue_claim_idx ON pgjobs.job_queue (priority DESC, run_at, job_id)
    WHERE lease_expires_at IS NULL;
-- The rescuer: running jobs by lease expiry.
CREATE INDEX job_queue_lease_idx ON pgjobs.job_queue (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

INSERT INTO pgjobs.job_queue (job_id, job_type, priority, run_at, lease_expires_at)
SELECT id, job_type, priority, run_at, lease_expires_at
FROM pgjobs.jobs WHERE status IN ('queued', 'running');

DROP INDEX pgjobs.jobs_claim_idx;
DROP INDEX pgjobs.jobs_lease_idx;
-- Listing a company's jobs by status: queued and running ones through job_queue, failed
-- and cancelled ones through the audit log's index below, done ones (the common case)
-- by walking jobs_company_created_idx and filtering.
DROP INDEX pgjobs.jobs_company_status_idx;
-- The audit log never changes, so an index on it costs nothing at a transition but its
-- own insert, and this one takes only the (rare) failed and cancelled events.
CREATE INDEX job_events_ended_idx ON pgjobs.job_events (company_id, type, job_id)
    WHERE type IN ('content_job.failed', 'content_job.cancelled');
-- What that listing relies on: a failed or cancelled job's last event says so.
ALTER TABLE pgjobs.jobs ADD CONSTRAINT jobs_ended_has_its_event CHECK (
    (status = 'failed') = (last_event = 'content_job.failed')
    AND (status = 'cancelled') = (last_event = 'content_job.cancelled'));
-- Applies to pages written from now on; existing pages fill up as rows are updated.
ALTER TABLE pgjobs.jobs SET (fillfactor = 50);

-- Keeps pgjobs.job_queue equal to the queued and running jobs' (id, job_type, priority,
-- run_at, lease_expires_at). Statement-level and set-based, like the publish trigger: a
-- batch claim or completion of a hundred jobs costs three statements here, not a hundred.
CREATE FUNCTION pgjobs.sync_job_queue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgjobs.job_queue (job_id, job_type, priority, run_at, lease_expires_at)
        SELECT id, job_type, priority, run_at, lease_expires_at FROM new_rows
        WHERE status IN ('queued', 'running');
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM pgjobs.job_queue q USING old_rows o WHERE q.job_id = o.id;
    ELSE
        WITH pairs AS (
            SELECT n.id, n.job_type, n.priority, n.run_at, n.lease_expires_at,
                   n.status IN ('queued', 'running') AS active,
                   o.status IN ('queued', 'running') AS was_active,
                   (n.job_type, n.priority, n.run_at, n.lease_expires_at)
                   IS DISTINCT FROM (o.job_type, o.priority, o.run_at, o.lease_expires_at) AS moved
            FROM new_rows n JOIN old_rows o USING (id)
        ), gone AS (
            DELETE FROM pgjobs.job_queue q USING pairs p
            WHERE q.job_id = p.id AND p.was_active AND NOT p.active
        ), moved AS (
            UPDATE pgjobs.job_queue q
            SET job_type = p.job_type, priority = p.priority, run_at = p.run_at,
                lease_expires_at = p.lease_expires_at
            FROM pairs p
            WHERE q.job_id = p.id AND p.active AND p.was_active AND p.moved
        )
        INSERT INTO pgjobs.job_queue (job_id, job_type, priority, run_at, lease_expires_at)
        SELECT id, job_type, priority, run_at, lease_expires_at FROM pairs
        WHERE active AND NOT was_active;
    END IF;
    RETURN NULL;
END;
$$;

-- A job's id never changes: the queue row, the audit log and the stream cursors are keyed
-- by it.
CREATE FUNCTION pgjobs.forbid_job_id_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgjobs.jobs.id cannot change' USING ERRCODE = 'check_violation';
END;
$$;

CREATE TRIGGER jobs_id_fixed
    BEFORE UPDATE OF id ON pgjobs.jobs
    FOR EACH ROW WHEN (old.id IS DISTINCT FROM new.id)
    EXECUTE FUNCTION pgjobs.forbid_job_id_change();

CREATE TRIGGER jobs_queue_insert
    AFTER INSERT ON pgjobs.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();

CREATE TRIGGER jobs_queue_update
    AFTER UPDATE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();

CREATE TRIGGER jobs_queue_delete
    AFTER DELETE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.sync_job_queue();
