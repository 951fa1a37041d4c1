-- pgjobs initial schema.
--
-- Invariants live here, not in Python: status values, status <-> timestamp/lease
-- consistency, and "every transition writes exactly one audit row and a NOTIFY" (the
-- statement-level triggers at the bottom). Application code can forget things; the
-- schema cannot.

CREATE SCHEMA IF NOT EXISTS pgjobs;

CREATE TABLE pgjobs.jobs (
    id                uuid        PRIMARY KEY,
    company_id        text        NOT NULL CHECK (length(company_id) BETWEEN 1 AND 200),
    job_type          text        NOT NULL CHECK (length(job_type) BETWEEN 1 AND 200),
    status            text        NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    input             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Higher runs first.
    priority          integer     NOT NULL DEFAULT 0,
    run_at            timestamptz NOT NULL DEFAULT now(),
    attempts          integer     NOT NULL DEFAULT 0,
    max_attempts      integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 1000),
    result            jsonb,
    result_asset_id   uuid,       -- deliberately no FK: assets outlive pruned jobs and vice versa
    error_message     text,
    source_task_id    text,       -- the caller's task id; no FK, it lives in another system
    progress_fraction real        CHECK (progress_fraction BETWEEN 0 AND 1),
    progress_message  text        CHECK (length(progress_message) <= 1000),
    -- Lease: the worker holding the job, until when, and a token bumped on every claim.
    -- Every write made on behalf of a running attempt matches (id, status, lease_token);
    -- a worker whose lease was rescued and re-claimed carries an old token and updates
    -- zero rows (fencing).
    worker_id         text,
    lease_token       bigint      NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    -- Per-job event sequence: bumped by exactly one on every transition, under the row
    -- lock, so it orders one job's events by commit order. last_event names the event the
    -- transition writes (the trigger below copies it into pgjobs.job_events).
    event_seq         integer     NOT NULL DEFAULT 1,
    last_event        text        NOT NULL DEFAULT 'content_job.queued',
    started_at        timestamptz,
    finished_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT jobs_attempts_in_range CHECK (attempts BETWEEN 0 AND max_attempts),
    -- A queued job always has an attempt left; manual retry raises max_attempts.
    CONSTRAINT jobs_queued_has_attempt_left CHECK (status <> 'queued' OR attempts < max_attempts),
    CONSTRAINT jobs_finished_iff_terminal
        CHECK ((status IN ('done', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT jobs_running_has_lease
        CHECK (status <> 'running'
               OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL AND started_at IS NOT NULL)),
    CONSTRAINT jobs_lease_only_while_running CHECK (status = 'running' OR lease_expires_at IS NULL),
    CONSTRAINT jobs_done_has_no_error CHECK (status <> 'done' OR error_message IS NULL),
    CONSTRAINT jobs_failed_has_error CHECK (status <> 'failed' OR error_message IS NOT NULL),
    CONSTRAINT jobs_last_event_known CHECK (last_event IN (
        'content_job.queued', 'content_job.running', 'content_job.progress',
        'content_job.retrying', 'content_job.done', 'content_job.failed',
        'content_job.cancelled'))
);

-- The claim reads only queued rows, so its cost does not grow with finished ones.
CREATE INDEX jobs_claim_idx ON pgjobs.jobs (priority DESC, run_at, id) WHERE status = 'queued';
-- The rescuer reads only running rows whose lease is past.
CREATE INDEX jobs_lease_idx ON pgjobs.jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_company_created_idx ON pgjobs.jobs (company_id, created_at DESC, id DESC);
CREATE INDEX jobs_company_status_idx ON pgjobs.jobs (company_id, status);

CREATE TABLE pgjobs.job_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      uuid        NOT NULL,  -- no FK: the audit log outlives pruned jobs
    company_id  text        NOT NULL,
    seq         integer     NOT NULL,
    type        text        NOT NULL CHECK (type IN (
        'content_job.queued', 'content_job.running', 'content_job.progress',
        'content_job.retrying', 'content_job.done', 'content_job.failed',
        'content_job.cancelled')),
    status      text        NOT NULL,
    attempt     integer     NOT NULL,
    worker_id   text,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The writing transaction's id. ids are handed out at insert, not at commit, so a
    -- reader paging by id alone can skip a row that commits late. Readers page by
    -- (xid, id) and only read xids below their snapshot's xmin, which no transaction
    -- still in flight can have (see pgjobs.gateway.companystream).
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, seq)
);
-- The company stream's cursor (see the xid column). Every index here is paid on every
-- transition, so there is no other.
CREATE INDEX job_events_company_xid_idx ON pgjobs.job_events (company_id, xid, id);

CREATE TABLE pgjobs.assets (
    id                uuid        PRIMARY KEY,
    company_id        text        NOT NULL,
    namespace         text        NOT NULL CHECK (namespace IN ('generated')),
    object_key        text        NOT NULL UNIQUE,
    content_type      text        NOT NULL,
    byte_size         bigint      NOT NULL CHECK (byte_size >= 0),
    sha256            text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    original_filename text,
    source_task_id    text,
    source_job_id     uuid,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX assets_company_idx ON pgjobs.assets (company_id, created_at DESC);
CREATE INDEX assets_source_job_idx ON pgjobs.assets (source_job_id);
CREATE INDEX assets_source_task_idx ON pgjobs.assets (company_id, source_task_id);

CREATE TABLE pgjobs.workers (
    id                text        PRIMARY KEY,
    hostname          text        NOT NULL,
    pid               integer     NOT NULL,
    job_types         text[]      NOT NULL,
    concurrency       integer     NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Publishing: one audit row per transition and NOTIFYs carrying those rows, in the
-- transition's own transaction. Postgres delivers NOTIFY only at commit, so no listener
-- can see an event before the row it describes. A statement may move many jobs; their
-- events go out in as few NOTIFYs as fit under the 8000-byte payload limit, because a
-- commit that carries NOTIFY takes a database-wide lock and fewer, fuller commits are
-- what make throughput.
CREATE FUNCTION pgjobs.publish_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_id uuid;
    sent bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- One pass over old/new pairs: rows whose event_seq moved become events, and a
        -- status/progress/attempt change without exactly one event_seq bump would be a
        -- transition without its audit row, which is refused (the exception also undoes
        -- the event rows written here).
        WITH pairs AS (
            SELECT n.*,
                   n.event_seq <> o.event_seq AS is_transition,
                   (n.event_seq <> o.event_seq AND n.event_seq <> o.event_seq + 1)
                   OR (n.event_seq = o.event_seq
                       AND (n.status <> o.status
                            OR n.progress_fraction IS DISTINCT FROM o.progress_fraction
                            OR n.progress_message IS DISTINCT FROM o.progress_message
                            OR n.attempts <> o.attempts)) AS is_bad
            FROM new_rows n JOIN old_rows o USING (id)
        ), inserted AS (
            INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
            SELECT c.id, c.company_id, c.event_seq, c.last_event, c.status, c.attempts, c.worker_id,
                   pgjobs.event_payload(c.last_event, c.progress_fraction, c.progress_message,
                                        c.result_asset_id, c.error_message, c.run_at)
            FROM pairs c
            WHERE c.is_transition AND NOT c.is_bad
            RETURNING job_events AS ev
        )
        SELECT (SELECT pgjobs.notify_events(array_agg(ev ORDER BY (ev).id)) FROM inserted),
               (SELECT id FROM pairs WHERE is_bad LIMIT 1)
        INTO sent, bad_id;
        IF bad_id IS NOT NULL THEN
            RAISE EXCEPTION 'pgjobs: job % changed state without a transition (bump event_seq by one and set last_event)', bad_id
                USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        WITH inserted AS (
            INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id, payload)
            SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts, n.worker_id,
                   '{}'::jsonb
            FROM new_rows n
            RETURNING job_events AS ev
        )
        SELECT pgjobs.notify_events(array_agg(ev ORDER BY (ev).id)) INTO sent FROM inserted;
    END IF;
    RETURN NULL;
END;
$$;

-- The small, event-type-specific part of an event row.
CREATE FUNCTION pgjobs.event_payload(
    event_type text, fraction real, message text, asset_id uuid, error text, run_at timestamptz
) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE event_type
        WHEN 'content_job.progress' THEN
            jsonb_build_object('progress', jsonb_build_object('fraction', fraction, 'message', message))
        WHEN 'content_job.done' THEN jsonb_strip_nulls(jsonb_build_object('resultAssetId', asset_id))
        WHEN 'content_job.failed' THEN jsonb_build_object('errorMessage', left(error, 2000))
        WHEN 'content_job.retrying' THEN
            jsonb_strip_nulls(jsonb_build_object('errorMessage', left(error, 2000), 'runAt', run_at))
        ELSE '{}'::jsonb
    END
$$;

-- Sends events on channel pgjobs_events as {"events": [...]}, packed by a running sum of
-- their sizes so that each payload stays under the 8000-byte NOTIFY limit: a chunk holds
-- less than 4000 bytes plus one event, and one event is at most ~3.5 kB (error and
-- progress messages are cut to 300 characters here; the full text is in the row).
-- Set-based on purpose: a row-by-row plpgsql loop measured ~25% slower on batch claims.
-- Returns the number of NOTIFYs sent.
CREATE FUNCTION pgjobs.notify_events(events pgjobs.job_events[]) RETURNS bigint
LANGUAGE sql AS $$
    WITH items AS (
        SELECT e.id,
               json_build_object(
                   'eventId', e.id, 'jobId', e.job_id, 'companyId', e.company_id, 'seq', e.seq,
                   'type', e.type, 'status', e.status, 'attempt', e.attempt,
                   'progress', CASE WHEN e.payload ? 'progress' THEN json_build_object(
                       'fraction', e.payload #> '{progress,fraction}',
                       'message', left(e.payload #>> '{progress,message}', 300)) END,
                   'errorMessage', left(e.payload ->> 'errorMessage', 300),
                   'resultAssetId', e.payload ->> 'resultAssetId',
                   'runAt', e.payload ->> 'runAt')::text AS item
        FROM unnest(events) AS e
    ), chunks AS (
        SELECT id, item, sum(octet_length(item) + 1) OVER (ORDER BY id) / 4000 AS chunk
        FROM items
    ), sent AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT count(n) FROM sent
$$;

CREATE TRIGGER jobs_publish_insert
    AFTER INSERT ON pgjobs.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.publish_events();

CREATE TRIGGER jobs_publish_update
    AFTER UPDATE ON pgjobs.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgjobs.publish_events();

-- The audit log is append-only.
CREATE FUNCTION pgjobs.forbid_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgjobs.job_events is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER job_events_append_only
    BEFORE UPDATE OR DELETE ON pgjobs.job_events
    FOR EACH ROW EXECUTE FUNCTION pgjobs.forbid_event_change();
