-- depends: 0017_trigger_plans
-- pgjobs.limit_scope: whether a limit of job type limit_job_type (NULL: every type) can
-- cover a job of worker_types (NULL: a worker of every type). One definition of the
-- predicate the plain claim, limit_exists_for_types, limit_lock_for_types and
-- job_claim_batch_limited all filter pgjobs.limits by.
-- A single-SELECT LANGUAGE sql function, not STRICT: PostgreSQL inlines it where it is
-- called, so the plans are those of the expression written out.
CREATE FUNCTION pgjobs.limit_scope(limit_job_type text, worker_types text[])
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT worker_types IS NULL OR limit_job_type IS NULL OR limit_job_type = ANY(worker_types)
$$;
