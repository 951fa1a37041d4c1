\set batch 100
WITH next AS (
    SELECT q.job_id AS id FROM pgjobs.job_queue q JOIN pgjobs.jobs j ON j.id = q.job_id
    WHERE q.lease_expires_at IS NULL
      AND q.run_at <= coalesce(NULL::timestamptz, now())
      AND (NULL::text[] IS NULL OR q.job_type = ANY(NULL::text[]))
    ORDER BY q.priority DESC, q.run_at, q.job_id
    LIMIT :batch::int
    FOR UPDATE OF q, j SKIP LOCKED
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
WHERE j.id = ANY(ARRAY(SELECT id FROM next))
RETURNING j.*
)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_token), '{}') AS toks, count(*) AS n FROM claimed
\gset
WITH u AS (
    SELECT * FROM unnest(:ids::uuid[], :toks::bigint[], array_fill('done'::text, ARRAY[:n::int])::text[])
         WITH ORDINALITY AS u(id, lease_token, outcome, i)
), plan AS (
    SELECT j.id, u.i, u.outcome, CASE
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
        result = CASE WHEN p.outcome = 'done' THEN (array_fill(NULL::jsonb, ARRAY[:n::int])::jsonb[])[p.i] END,
        result_asset_id = CASE WHEN p.outcome = 'done' THEN (array_fill(NULL::uuid, ARRAY[:n::int])::uuid[])[p.i] END,
        error_message = CASE WHEN p.outcome <> 'done' THEN (array_fill(NULL::text, ARRAY[:n::int])::text[])[p.i] END,
        run_at = CASE WHEN p.next_status = 'queued'
                      THEN coalesce(NULL::timestamptz, now())
                           + make_interval(secs => (array_fill(0::float8, ARRAY[:n::int])::float8[])[p.i])
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
    WHERE j.id = p.id  -- guarded and locked in plan
    RETURNING j.id, j.company_id, j.source_task_id, j.status, p.i
), stored AS (
    INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type, byte_size,
                               sha256, original_filename, source_task_id, source_job_id, created_at)
    SELECT (array_fill(NULL::uuid, ARRAY[:n::int])::uuid[])[f.i], f.company_id, 'generated', (array_fill(NULL::text, ARRAY[:n::int])::text[])[f.i],
           (array_fill(NULL::text, ARRAY[:n::int])::text[])[f.i], (array_fill(NULL::bigint, ARRAY[:n::int])::bigint[])[f.i],
           (array_fill(NULL::text, ARRAY[:n::int])::text[])[f.i], (array_fill(NULL::text, ARRAY[:n::int])::text[])[f.i],
           f.source_task_id, f.id, coalesce(NULL::timestamptz, now())
    FROM finished f
    WHERE f.status = 'done' AND (array_fill(NULL::uuid, ARRAY[:n::int])::uuid[])[f.i] IS NOT NULL
    RETURNING id
)
SELECT f.id, (SELECT count(*) FROM stored) AS assets_stored FROM finished f;
