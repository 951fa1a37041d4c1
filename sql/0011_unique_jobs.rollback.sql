DROP TABLE pgjobs.idempotency_keys;
DROP TABLE pgjobs.job_unique_keys;
