-- Every query the HTTP gateway runs itself, one named section each (`-- name: table_verb_guard`).
-- Job writes do not live here: the gateway enqueues, cancels and retries through
-- pgjobs.client, so it uses the same guarded transitions as every other producer.

-- name: token_insert
INSERT INTO pgjobs.api_tokens (id, company_id, token_hash, label, created_at)
VALUES (%(id)s::uuid, %(company_id)s::text, %(token_hash)s::text, %(label)s::text,
        coalesce(%(now)s::timestamptz, now()))
RETURNING id, company_id, created_at;

-- name: token_get_active_by_hash
SELECT id, company_id, token_hash FROM pgjobs.api_tokens
WHERE token_hash = %(token_hash)s::text AND revoked_at IS NULL;

-- name: token_get_active_by_id
-- A stream token's parent, on every use of the stream token: no row once it is revoked.
SELECT id FROM pgjobs.api_tokens
WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text AND revoked_at IS NULL;

-- name: token_list_revoked_by_ids
-- Which of the API tokens this gateway's open event streams were opened with are revoked:
-- one query for every open stream of the process (pgjobs.gateway.revocation).
SELECT id FROM pgjobs.api_tokens
WHERE id = ANY (%(ids)s::uuid[]) AND revoked_at IS NOT NULL;

-- name: token_revoke_by_hash_or_id
-- One of the two parameters is NULL; a revoked token stays as an audit record.
UPDATE pgjobs.api_tokens
SET revoked_at = coalesce(%(now)s::timestamptz, now())
WHERE (token_hash = %(token_hash)s::text OR id = %(id)s::uuid) AND revoked_at IS NULL
RETURNING id, company_id;

-- name: job_get_for_stream
-- The state an SSE stream starts from: the same fields as an event, plus event_seq (the
-- id of the last event this row's state reflects).
SELECT id, company_id, status, last_event, attempts, event_seq, progress_fraction,
       progress_message, result_asset_id, error_message, run_at
FROM pgjobs.jobs WHERE id = %(id)s::uuid AND company_id = %(company_id)s::text;

-- name: job_events_after_seq
-- A job's events after the last one a stream sent. One job's seq is bumped under its row
-- lock, so commit order is seq order and `seq > last` can neither skip nor repeat.
SELECT id, job_id, seq, type, status, attempt, payload, xid::text AS xid
FROM pgjobs.job_events
WHERE job_id = %(job_id)s::uuid AND company_id = %(company_id)s::text AND seq > %(after_seq)s::int
ORDER BY seq
LIMIT %(limit)s::int;

-- name: job_events_company_feed
-- A company's events after the cursor (xid, id), only from transactions that have ended.
-- ids are assigned at insert, not at commit, so `id > last` could skip a row whose
-- transaction commits after a later id was already read. Every transaction with an xid
-- below the snapshot's xmin has finished (committed or aborted), and every transaction
-- that starts later gets a larger xid, so below that horizon the (xid, id) order is final:
-- paging through it can neither skip nor repeat. The price: one long write transaction
-- anywhere in the database holds the horizon, and these events, back until it ends.
-- held_back: whether rows of the company were held back by the horizon (committed, but
-- with an xid at or above it). Only then does the company's feed need to read again
-- without a NOTIFY, once the horizon has moved; every other new row comes with one. Both
-- answers come from one snapshot: asked in a second statement, the horizon could have
-- moved between the two, and rows it passed would be neither read nor reported. Always
-- one row at least; the event columns are NULL when the page is empty.
WITH h AS MATERIALIZED (
    SELECT s.horizon, EXISTS (
        SELECT 1 FROM pgjobs.job_events
        WHERE company_id = %(company_id)s::text AND xid >= s.horizon
          AND (xid, id) > (%(xid)s::xid8, %(id)s::bigint)
    ) AS held_back
    FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) s
)
SELECT e.id, e.job_id, e.seq, e.type, e.status, e.attempt, e.payload, e.xid::text AS xid,
       h.held_back
FROM h LEFT JOIN LATERAL (
    SELECT * FROM pgjobs.job_events
    WHERE company_id = %(company_id)s::text
      AND (xid, id) > (%(xid)s::xid8, %(id)s::bigint)
      AND xid < h.horizon
    ORDER BY xid, id
    LIMIT %(limit)s::int
) e ON true
ORDER BY e.xid, e.id;

-- name: job_events_horizon
-- Where a company stream without Last-Event-ID starts: everything from transactions that
-- had not finished yet when it connected, and everything after.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xid;

-- name: worker_job_type_live
-- Whether a worker that heartbeated recently has registered this job type.
SELECT EXISTS (
    SELECT 1 FROM pgjobs.workers
    WHERE %(job_type)s::text = ANY (job_types)
      AND last_heartbeat_at > coalesce(%(now)s::timestamptz, now())
                              - make_interval(secs => %(within_seconds)s::float8)
) AS live;

-- name: gateway_check_ready
SELECT to_regclass('pgjobs.api_tokens') IS NOT NULL AS migrated;
