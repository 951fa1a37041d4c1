-- Rolls back 0016_narrow_audit: the audit log keyed by id again with UNIQUE (job_id, seq)
-- (two index builds over the whole audit log), the separate CHECKs, and 0013's prune.

DROP FUNCTION pgjobs.prune_events(timestamptz, text, xid8, bigint, integer);
-- One batch of audit-log retention: the next `batch` rows after id `after_id`, in id
-- order (the primary key: no scan of the table, no index on time needed), of which those
-- written before `before` are deleted. ids are handed out in insert order, so the walk
-- can stop at the first page with no row older than the cut-off (`done`); a row of a
-- transaction that was open across the cut-off can be left for the next run. Returns the
-- rows deleted and the last id read (the next batch's `after_id`).
CREATE FUNCTION pgjobs.prune_events(before timestamptz, after_id bigint, batch integer,
                                    OUT deleted bigint, OUT last_id bigint, OUT done boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pgjobs.prune_events_before', before::text, true);
    WITH page AS (
        SELECT id, xid, created_at FROM pgjobs.job_events
        WHERE id > after_id ORDER BY id LIMIT batch
    ), gone AS (
        DELETE FROM pgjobs.job_events e USING page p
        WHERE e.id = p.id AND p.created_at < before
        RETURNING e.id, e.xid, e.company_id
    ), mark AS (
        -- Each company's newest (xid, id) deleted moves its streams' retention mark.
        INSERT INTO pgjobs.job_events_pruned AS m (company_id, xid, id)
        SELECT DISTINCT ON (company_id) company_id, xid, id
        FROM gone ORDER BY company_id, xid DESC, id DESC
        ON CONFLICT (company_id) DO UPDATE SET xid = excluded.xid, id = excluded.id
        WHERE (excluded.xid, excluded.id) > (m.xid, m.id)
    )
    SELECT (SELECT count(*) FROM gone),
           coalesce((SELECT max(id) FROM page), after_id),
           coalesce((SELECT bool_and(created_at >= before) FROM page), true)
    INTO deleted, last_id, done;
    PERFORM set_config('pgjobs.prune_events_before', '', true);
END;
$$;

ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_valid,
    ADD CONSTRAINT job_queue_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT job_queue_lease_expires_at_in_range
        CHECK (pgjobs.time_in_range(lease_expires_at));

ALTER TABLE pgjobs.jobs
    DROP CONSTRAINT jobs_valid,
    ADD CONSTRAINT jobs_company_id_check CHECK (length(company_id) BETWEEN 1 AND 200),
    ADD CONSTRAINT jobs_job_type_check CHECK (length(job_type) BETWEEN 1 AND 200),
    ADD CONSTRAINT jobs_status_check
        CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    ADD CONSTRAINT jobs_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
    ADD CONSTRAINT jobs_progress_fraction_check CHECK (progress_fraction BETWEEN 0 AND 1),
    ADD CONSTRAINT jobs_progress_message_check CHECK (length(progress_message) <= 1000),
    ADD CONSTRAINT jobs_attempts_in_range CHECK (attempts BETWEEN 0 AND max_attempts),
    ADD CONSTRAINT jobs_queued_has_attempt_left CHECK (status <> 'queued' OR attempts < max_attempts),
    ADD CONSTRAINT jobs_finished_iff_terminal
        CHECK ((status IN ('done', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    ADD CONSTRAINT jobs_running_has_lease
        CHECK (status <> 'running'
               OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL AND started_at IS NOT NULL)),
    ADD CONSTRAINT jobs_lease_only_while_running CHECK (status = 'running' OR lease_expires_at IS NULL),
    ADD CONSTRAINT jobs_done_has_no_error CHECK (status <> 'done' OR error_message IS NULL),
    ADD CONSTRAINT jobs_failed_has_error CHECK (status <> 'failed' OR error_message IS NOT NULL),
    ADD CONSTRAINT jobs_last_event_known CHECK (last_event IN (
        'content_job.queued', 'content_job.running', 'content_job.progress',
        'content_job.retrying', 'content_job.done', 'content_job.failed',
        'content_job.cancelled')),
    ADD CONSTRAINT jobs_ended_has_its_event CHECK (
        (status = 'failed') = (last_event = 'content_job.failed')
        AND (status = 'cancelled') = (last_event = 'content_job.cancelled')),
    ADD CONSTRAINT jobs_run_at_in_range CHECK (pgjobs.time_in_range(run_at)),
    ADD CONSTRAINT jobs_created_at_in_range CHECK (pgjobs.time_in_range(created_at)),
    ADD CONSTRAINT jobs_updated_at_in_range CHECK (pgjobs.time_in_range(updated_at)),
    ADD CONSTRAINT jobs_started_at_in_range CHECK (pgjobs.time_in_range(started_at)),
    ADD CONSTRAINT jobs_finished_at_in_range CHECK (pgjobs.time_in_range(finished_at)),
    ADD CONSTRAINT jobs_lease_expires_at_in_range CHECK (pgjobs.time_in_range(lease_expires_at)),
    ADD CONSTRAINT jobs_traceback_bounded CHECK (octet_length(error_traceback) <= 16384);

DROP FUNCTION pgjobs.check_failed(text, text);

ALTER TABLE pgjobs.job_events
    DROP CONSTRAINT job_events_pkey,
    ADD CONSTRAINT job_events_pkey PRIMARY KEY (id),
    ADD CONSTRAINT job_events_job_id_seq_key UNIQUE (job_id, seq);
