-- Back to 0004's queue: no company_id, and its sync trigger function.
CREATE OR REPLACE FUNCTION pgjobs.sync_job_queue() RETURNS trigger
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

DROP INDEX pgjobs.job_queue_fair_idx;
ALTER TABLE pgjobs.job_queue DROP COLUMN company_id;
