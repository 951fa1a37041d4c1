DROP VIEW pgjobs.queue_depth;
DROP VIEW pgjobs.throughput;
DROP VIEW pgjobs.stuck_jobs;
DROP VIEW pgjobs.running_jobs;
DROP VIEW pgjobs.job_timeline;
DROP FUNCTION pgjobs.worker_is_live(timestamptz, float8, timestamptz);
DROP FUNCTION pgjobs.live_worker_seconds();
DROP INDEX pgjobs.job_events_created_brin_idx;
