\set batch 100
WITH next AS (SELECT queue.job_id FROM queue WHERE queue.lease_expires_at IS NULL ORDER BY queue.priority DESC, queue.run_at, queue.job_id LIMIT :batch FOR UPDATE SKIP LOCKED),
claimed AS (UPDATE queue SET lease_expires_at = now() + interval '30 s' WHERE job_id IN (SELECT job_id FROM next) RETURNING job_id),
j AS (UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = lease_token + 1, worker_id = 'pgbench', event_seq = event_seq + 1, updated_at = now() WHERE id IN (SELECT job_id FROM claimed) RETURNING id, company_id, lease_token, event_seq),
audit AS (INSERT INTO events (job_id, seq, company_id, type) SELECT id, event_seq, company_id, 'content_job.running' FROM j)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_token), '{}') AS toks, pg_notify('floor', (SELECT string_agg(id::text || ':' || event_seq, ',') FROM j)) AS notified FROM j
\gset
WITH gone AS (DELETE FROM queue WHERE job_id = ANY(:ids::uuid[])),
j AS (UPDATE jobs SET status = 'done', event_seq = event_seq + 1, updated_at = now() FROM unnest(:ids::uuid[], :toks::int[]) u(id, tok) WHERE jobs.id = u.id AND jobs.lease_token = u.tok AND jobs.status = 'running' RETURNING jobs.id, company_id, event_seq),
audit AS (INSERT INTO events (job_id, seq, company_id, type) SELECT id, event_seq, company_id, 'content_job.done' FROM j)
SELECT count(*), pg_notify('floor', (SELECT string_agg(id::text || ':' || event_seq, ',') FROM j)) FROM j;
