-- depends: 0007_worker_channel
-- A fair claim: one company's backlog no longer delays every other company (issue 16).
--
-- Until now the claim took due jobs by (priority DESC, run_at, job_id) across all
-- companies, so a company's 100,000-job bulk enqueue made every other company's first job
-- wait for the whole backlog. pgjobs.job_queue now carries company_id, and the claim
-- (job_claim_batch in src/pgjobs/queries.sql) shares a batch's slots round-robin across
-- the companies with queued work, within a priority level; priority still wins across
-- levels and run_at still gates.
--
-- How the claim finds the companies without reading every queued job: a loose index scan
-- of job_queue_fair_idx below (a recursive CTE, one index probe per company and priority
-- level), starting after a rotation cursor the worker passes (the last company it
-- served) and wrapping around, at most `limit` probes per claim, so 10,000 companies
-- cost at most `limit` probes. Then each company's head jobs per level (a LATERAL walk of
-- one range of the same index, ending at the first job not yet due, up to
-- ceil(limit / companies) each, locked SKIP LOCKED as before; a second share for those
-- that gave all of theirs, out of what the others left), ordered by (priority DESC, rank
-- within the company and level, rotation position). What that leaves unfilled (a level
-- cut to keep priority strict, locked rows) is filled in the old global order through
-- job_queue_claim_idx, which stays.
--
-- Measured (2-core shared VM, batches of 100): in a 30,000-job drain by one worker
-- process (pg_stat_statements, PostgreSQL 15), the claim's execution time is 62 µs per
-- job against 65 before fairness; with two processes 76 against 66 µs, and the drain
-- 14.0k against 16.0k jobs/s, while PostgreSQL's CPU per job stays 70 µs (time spent
-- waiting, not working; not explained yet). Medians of 30 claims (PostgreSQL 16): one company,
-- 100,000 queued, ~5 ms per claim before and after; 10,000 companies of 10 jobs (100
-- probes, 100 head walks) 6.3 vs 6.3 ms; a company with 100,000 jobs not yet due next to
-- one with 100,000 due 5.2 vs 6.0 ms. A claim still reads about twice its batch in
-- job_queue rows and nothing of the finished jobs (tests/integration/test_schema.py
-- checks it).
-- As before, jobs of types the worker does not handle are walked past within a level.
--
-- Options weighed:
--   * A window function ranking every due job per company (row_number() OVER
--     (PARTITION BY company_id)) over the whole queue: exact, but reads the whole backlog
--     on every claim (100,000 rows for a 100-job batch). Rejected.
--   * A table of companies with queued work (River Pro's and Oban Pro's partitions keep
--     such state): one more row to keep in step on every enqueue and every finish, hot
--     rows shared by every worker. Rejected: the loose index scan reads the same from
--     the index the claim needs anyway.
--   * Deficit round-robin across claims (remembering each company's share): only the
--     rotation cursor is kept, in the worker; a claim is round-robin within itself, and
--     the cursor moves the partial last round on to the next companies.
-- Cost: one more partial index on job_queue, written when a job is queued (enqueue,
-- retry, rescue, release), not when it is claimed or finished (a claimed row leaves the
-- partial index's predicate and gets no entry). The claim still reads only job_queue
-- and primary-key lookups of pgjobs.jobs, so finished jobs do not slow it.
--
-- Deploying: workers of the previous version keep working during and after the migration
-- (their claim does not read company_id, and the trigger fills it whoever writes the job
-- row), they just claim oldest-first. This version's workers need the migration first:
-- their claim reads company_id. The migration rewrites job_queue (one row per queued or
-- running job) under its lock, which holds up claims and transitions meanwhile.

ALTER TABLE pgjobs.job_queue ADD COLUMN company_id text;
UPDATE pgjobs.job_queue q SET company_id = j.company_id FROM pgjobs.jobs j WHERE j.id = q.job_id;
ALTER TABLE pgjobs.job_queue ALTER COLUMN company_id SET NOT NULL;

-- The fair claim: a company's due queued jobs in claim order, and (its leading column)
-- the distinct companies with queued work.
CREATE INDEX job_queue_fair_idx ON pgjobs.job_queue (company_id, priority DESC, run_at, job_id)
    WHERE lease_expires_at IS NULL;
-- The claim finds a company's next level, and its jobs of one level, by (company_id,
-- priority) through this index. job_queue_claim_idx would find them too, by filtering
-- every company's jobs by company, and statistics taken just after one company's bulk
-- enqueue (every queued job is that company's) made that look as cheap: the claim then
-- walked past the whole backlog to reach another company's jobs.
-- So the planner is told what the queue holds in general: many companies, each a small
-- part of the queued jobs (as many companies as a twentieth of the rows).
ALTER TABLE pgjobs.job_queue ALTER COLUMN company_id SET (n_distinct = -0.05);
ANALYZE pgjobs.job_queue;

-- 0004's function, with company_id (a job's company is not expected to change, but a
-- hand-written UPDATE that changes it moves the queue row too).
CREATE OR REPLACE FUNCTION pgjobs.sync_job_queue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at, lease_expires_at)
        SELECT id, company_id, job_type, priority, run_at, lease_expires_at FROM new_rows
        WHERE status IN ('queued', 'running');
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM pgjobs.job_queue q USING old_rows o WHERE q.job_id = o.id;
    ELSE
        WITH pairs AS (
            SELECT n.id, n.company_id, n.job_type, n.priority, n.run_at, n.lease_expires_at,
                   n.status IN ('queued', 'running') AS active,
                   o.status IN ('queued', 'running') AS was_active,
                   (n.company_id, n.job_type, n.priority, n.run_at, n.lease_expires_at)
                   IS DISTINCT FROM (o.company_id, o.job_type, o.priority, o.run_at, o.lease_expires_at) AS moved
            FROM new_rows n JOIN old_rows o USING (id)
        ), gone AS (
            DELETE FROM pgjobs.job_queue q USING pairs p
            WHERE q.job_id = p.id AND p.was_active AND NOT p.active
        ), moved AS (
            UPDATE pgjobs.job_queue q
            SET company_id = p.company_id, job_type = p.job_type, priority = p.priority,
                run_at = p.run_at, lease_expires_at = p.lease_expires_at
            FROM pairs p
            WHERE q.job_id = p.id AND p.active AND p.was_active AND p.moved
        )
        INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at, lease_expires_at)
        SELECT id, company_id, job_type, priority, run_at, lease_expires_at FROM pairs
        WHERE active AND NOT was_active;
    END IF;
    RETURN NULL;
END;
$$;
