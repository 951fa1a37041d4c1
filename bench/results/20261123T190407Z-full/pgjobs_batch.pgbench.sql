\set batch 100
WITH next AS (
    SELECT id FROM pgjobs.jobs
    WHERE status = 'queued'
      AND run_at <= coalesce(NULL::timestamptz, now())
      AND (NULL::text[] IS NULL OR job_type = ANY(NULL::text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT :batch::int
    FOR UPDATE SKIP LOCKED
),
claimed AS (
UPDATE pgjobs.jobs j
SET status = 'running',
    attempts = j.attempts + 1,
    worker_id = 'pgbench'::text,
    lease_token = j.lease_token + 1,
    lease_expires_at = coalesce(NULL::timestamptz, now()) + make_interval(secs => 30::float8),
    started_at = coalesce(NULL::timestamptz, now()),
    progress_fraction = NULL,
    progress_message = NULL,
    event_seq = j.event_seq + 1,
    last_event = 'content_job.running',
    updated_at = coalesce(NULL::timestamptz, now())
FROM next
WHERE j.id = next.id AND j.status = 'queued'
RETURNING j.*
)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_token), '{}') AS toks, count(*) AS n FROM claimed
\gset
WITH u AS (
    SELECT * FROM unnest(
        :ids::uuid[], :toks::bigint[], array_fill('done'::text, ARRAY[:n::int])::text[], array_fill(NULL::jsonb, ARRAY[:n::int])::jsonb[],
        array_fill(NULL::text, ARRAY[:n::int])::text[], array_fill(0::float8, ARRAY[:n::int])::float8[],
        array_fill(NULL::uuid, ARRAY[:n::int])::uuid[], array_fill(NULL::text, ARRAY[:n::int])::text[], array_fill(NULL::text, ARRAY[:n::int])::text[],
        array_fill(NULL::bigint, ARRAY[:n::int])::bigint[], array_fill(NULL::text, ARRAY[:n::int])::text[], array_fill(NULL::text, ARRAY[:n::int])::text[])
    AS u(id, lease_token, outcome, result, error, retry_delay,
         asset_id, asset_key, asset_content_type, asset_size, asset_sha256, asset_filename)
), plan AS (
    SELECT u.*, CASE
               WHEN u.outcome = 'done' THEN 'done'
               WHEN u.outcome = 'error' AND j.attempts < j.max_attempts THEN 'queued'
               ELSE 'failed' END AS next_status
    FROM u JOIN pgjobs.jobs j ON j.id = u.id AND j.lease_token = u.lease_token
    WHERE j.status = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), finished AS (
    UPDATE pgjobs.jobs j
    SET status = p.next_status,
        result = CASE WHEN p.outcome = 'done' THEN p.result END,
        result_asset_id = CASE WHEN p.outcome = 'done' THEN p.asset_id END,
        error_message = CASE WHEN p.outcome = 'done' THEN NULL ELSE p.error END,
        run_at = CASE WHEN p.next_status = 'queued'
                      THEN coalesce(NULL::timestamptz, now()) + make_interval(secs => p.retry_delay)
                      ELSE j.run_at END,
        lease_expires_at = NULL,
        finished_at = CASE WHEN p.next_status = 'queued' THEN NULL
                           ELSE coalesce(NULL::timestamptz, now()) END,
        event_seq = j.event_seq + 1,
        last_event = CASE p.next_status WHEN 'done' THEN 'content_job.done'
                                        WHEN 'queued' THEN 'content_job.retrying'
                                        ELSE 'content_job.failed' END,
        updated_at = coalesce(NULL::timestamptz, now())
    FROM plan p
    WHERE j.id = p.id
    RETURNING j.id, j.company_id, j.source_task_id, j.status
), stored AS (
    INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type, byte_size,
                               sha256, original_filename, source_task_id, source_job_id, created_at)
    SELECT u.asset_id, f.company_id, 'generated', u.asset_key, u.asset_content_type, u.asset_size,
           u.asset_sha256, u.asset_filename, f.source_task_id, f.id,
           coalesce(NULL::timestamptz, now())
    FROM finished f JOIN u ON u.id = f.id
    WHERE u.asset_id IS NOT NULL AND f.status = 'done'
    RETURNING id
)
SELECT f.id, (SELECT count(*) FROM stored) AS assets_stored FROM finished f;
