-- depends: 0010_statement_publish
-- Unique jobs and idempotent POST (issue 18).
--
-- Two key tables, each keyed by (company_id, key): the primary key is the unique index
-- that makes "one job per key" hold across processes and hosts. A second enqueue or
-- POST with a key some transaction has just inserted waits on that index entry until the
-- first commits (then sees its row) or rolls back (then takes the key itself), so two
-- racing producers never both create a job.
--
-- Why not a partial unique index on pgjobs.jobs (status IN ('queued','running')): a
-- column in any index predicate makes every update of it non-HOT (sql/0004), and every
-- transition changes status. Instead a key row names the job holding it and the states
-- it holds the key in; whether it still holds is read when the key is next asked for
-- (the holder's status and the row's expiry), under the key row's lock. So claims and
-- completions pay nothing for unique jobs: no trigger, no index.

CREATE TABLE pgjobs.job_unique_keys (
    company_id  text        NOT NULL,
    unique_key  text        NOT NULL CHECK (length(unique_key) BETWEEN 1 AND 255),
    -- The job holding the key (no FK: a pruned job simply no longer holds it).
    job_id      uuid        NOT NULL,
    -- The holder keeps the key while its status is one of these...
    held_while  text[]      NOT NULL CHECK (
        cardinality(held_while) >= 1
        AND held_while <@ ARRAY['queued', 'running', 'done', 'failed', 'cancelled']),
    -- ...and, when set, until this time (enqueue's unique_for).
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, unique_key)
);

-- HTTP Idempotency-Key of POST /api/companies/{c}/content-jobs: the request's
-- fingerprint and the response it got, written in the job's own transaction.
CREATE TABLE pgjobs.idempotency_keys (
    company_id   text        NOT NULL,
    key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of the request body (canonical JSON), hex.
    request_hash text        NOT NULL CHECK (request_hash ~ '^[0-9a-f]{64}$'),
    job_id       uuid        NOT NULL,
    -- The first response's body as sent (JSON text, not jsonb, whose key order is its
    -- own), replayed byte for byte to every retry with the same key and body. NULL only
    -- inside the transaction that takes the key (it is set once the job is inserted,
    -- before that transaction commits), so no other session sees it NULL.
    response     text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (company_id, key)
);
-- The cleanup (pgjobs.rescuer) deletes expired keys oldest first.
CREATE INDEX idempotency_keys_expires_idx ON pgjobs.idempotency_keys (expires_at);
