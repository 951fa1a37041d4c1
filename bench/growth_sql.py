"""Set-based generation of finished pgjobs jobs and their audit rows (for scenario 6).

Each generated job is 'done' after one attempt and has the three events a real one has
(queued, running, done), with created_at spread 100 ms apart back from now, so the
hourly audit query has hundreds of groups. The publish trigger is disabled while loading:
these rows are history, nobody listens for them."""

from __future__ import annotations

GENERATE = """
WITH ins AS (
    INSERT INTO pgjobs.job_rows (id, company_id, job_type, status, input, attempts, worker_id,
                                 lease_token, event_seq, last_event, run_at, started_at,
                                 finished_at, created_at, updated_at)
    SELECT gen_random_uuid(), 'company-' || (g %% 50), 'noop', 'done', '{}', 1, 'generated',
           1, 3, 'content_job.done', t.ts, t.ts, t.ts + interval '5 ms', t.ts,
           t.ts + interval '5 ms'
    FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g,
         LATERAL (SELECT now() - interval '1 day' - g * interval '100 ms' AS ts) AS t
    RETURNING id, company_id, created_at
)
INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id,
                               created_at)
SELECT ins.id, ins.company_id, e.seq, e.type, e.status, e.attempt,
       CASE WHEN e.seq > 1 THEN 'generated' END,
       ins.created_at + e.seq * interval '1 ms'
FROM ins CROSS JOIN (VALUES (1, 'content_job.queued', 'queued', 0),
                            (2, 'content_job.running', 'running', 1),
                            (3, 'content_job.done', 'done', 1)) AS e(seq, type, status, attempt)
"""

SIZES = """
SELECT c.relname AS name, c.relkind AS kind, pg_relation_size(c.oid) AS bytes
FROM pg_class c
WHERE c.oid IN ('pgjobs.job_rows'::regclass, 'pgjobs.job_events'::regclass,
                'pgjobs.job_queue'::regclass)
   OR c.oid IN (SELECT indexrelid FROM pg_index
                WHERE indrelid IN ('pgjobs.job_rows'::regclass, 'pgjobs.job_events'::regclass,
                                   'pgjobs.job_queue'::regclass))
ORDER BY c.relkind DESC, c.relname
"""

AUDIT_TIMELINE = """
SELECT seq, type, status, attempt, worker_id, payload, created_at
FROM pgjobs.job_events WHERE job_id = %(job_id)s::uuid ORDER BY seq
"""

AUDIT_HOURLY = """
SELECT date_trunc('hour', created_at) AS hour, type, count(*)
FROM pgjobs.job_events GROUP BY 1, 2 ORDER BY 1, 2
"""

# Indexes and key constraints of the two big tables, to drop before a bulk load and build
# again after it (one sorted build is far faster than millions of random B-tree inserts).
# Run without parameters, so '%' is literal here.
SAVED_INDEXES = """
SELECT format('DROP INDEX pgjobs.%I', c.relname) AS drop_sql,
       pg_get_indexdef(i.indexrelid) AS create_sql
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid IN ('pgjobs.job_rows'::regclass, 'pgjobs.job_events'::regclass)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
UNION ALL
SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', k.conrelid::regclass, k.conname),
       format('ALTER TABLE %s ADD CONSTRAINT %I %s', k.conrelid::regclass, k.conname,
              pg_get_constraintdef(k.oid))
FROM pg_constraint k
WHERE k.conrelid IN ('pgjobs.job_rows'::regclass, 'pgjobs.job_events'::regclass)
  AND k.contype IN ('p', 'u')
"""
