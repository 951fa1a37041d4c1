-- depends: 0013_retention
-- Concurrency and rate limits, enforced by the claim itself (issue 18).
--
-- A limit row names a company, a job type, or both (NULL: all of them together) and
-- bounds the jobs it covers:
--   max_running: at most this many running at once (counted from pgjobs.job_queue's
--     leased rows: the jobs the claim moved to running and nothing has ended yet);
--   max_starts per period_seconds: at most this many claims (running transitions) per
--     fixed window of period_seconds, windows aligned on the Unix epoch.
-- A job covered by several rows keeps to each of them.
--
-- Enforced without a coordinator: a worker whose job types a limit can cover claims
-- through job_claim_batch_limited (src/pgjobs/limits.sql) in a transaction holding
-- pg_advisory_xact_lock on each such limit's row id, taken in id order, so two claims
-- cannot both take the last slot: near a limit before the claim (whose snapshot then
-- counts every claim committed before it), far from every limit after it, to check
-- (limit_count_starts_if_within; rolled back and redone when exceeded). Transaction-
-- level locks are released at commit and work through PgBouncer in transaction mode.
-- Without limit rows the claim is the one of sql/0008, unchanged.

CREATE TABLE pgjobs.limits (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id     text,          -- NULL: every company's jobs together
    job_type       text,          -- NULL: every job type together
    max_running    int CHECK (max_running >= 0),
    max_starts     int CHECK (max_starts >= 0),
    period_seconds float8 CHECK (period_seconds > 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT limits_key_unique UNIQUE NULLS NOT DISTINCT (company_id, job_type),
    CONSTRAINT limits_names_a_key CHECK (company_id IS NOT NULL OR job_type IS NOT NULL),
    CONSTRAINT limits_bounds_something CHECK (max_running IS NOT NULL OR max_starts IS NOT NULL),
    CONSTRAINT limits_rate_has_period CHECK ((max_starts IS NULL) = (period_seconds IS NULL))
);

-- Rate limits' counters: how many jobs a limit's claims started in one window. One row
-- per (limit, window), written only under the limit's advisory lock (so no claim holding
-- a lock ever waits for this row), which also deletes a limit's windows that ended more
-- than a period ago.
CREATE TABLE pgjobs.limit_windows (
    limit_id     bigint NOT NULL REFERENCES pgjobs.limits (id) ON DELETE CASCADE,
    window_start timestamptz NOT NULL,
    started      int NOT NULL CHECK (started >= 0),
    PRIMARY KEY (limit_id, window_start)
);
