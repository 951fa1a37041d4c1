-- depends: 0011_unique_jobs
-- Periodic jobs (issue 18): cron schedules, and one row per schedule slot.
--
-- pgjobs.schedules holds both kinds of schedule in one table: those declared in code
-- (@registry.periodic, upserted by each worker whose registry declares them when it
-- starts: source 'code') and those added at run time (pgjobs schedules add: source
-- 'database').
--
-- pgjobs.schedule_slots is what makes a slot enqueue exactly once however many workers
-- run: every worker computes the same due slot and inserts its (schedule_name, slot_at)
-- row in the same statement as the job; the primary key lets one insert through and the
-- others do nothing (no advisory lock, so it works through PgBouncer in transaction
-- mode). Unlike a unique key on the job, which stops holding once the job has finished,
-- the slot row stays, so a slot can never be enqueued a second time. A slot passed over
-- (missed beyond the catch-up window) gets a row with no job_id, so the next pass does
-- not consider it again. job_id has no foreign key: pruning old jobs must not have to
-- look here, and the slot row still records what happened.

CREATE TABLE pgjobs.schedules (
    name         text        PRIMARY KEY CHECK (name <> '' AND length(name) <= 200),
    cron         text        NOT NULL,
    timezone     text        NOT NULL DEFAULT 'UTC',
    company_id   text        NOT NULL,
    job_type     text        NOT NULL,
    input        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(input) = 'object'),
    priority     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 1000),
    catch_up     interval    NOT NULL DEFAULT '0' CHECK (catch_up >= '0'),
    source       text        NOT NULL CHECK (source IN ('code', 'database')),
    -- Slots are due from here on: a new schedule does not enqueue the slots before it.
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

CREATE TABLE pgjobs.schedule_slots (
    schedule_name text        NOT NULL REFERENCES pgjobs.schedules (name) ON DELETE CASCADE,
    slot_at       timestamptz NOT NULL,
    -- The job enqueued for this slot; NULL when the slot was skipped (missed beyond the
    -- schedule's catch-up window).
    job_id        uuid,
    recorded_at   timestamptz NOT NULL,
    PRIMARY KEY (schedule_name, slot_at)
);
