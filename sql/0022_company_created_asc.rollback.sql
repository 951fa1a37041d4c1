-- Rolls back 0022_company_created_asc: the index in descending order, as 0001 made it.
DROP INDEX pgjobs.jobs_company_created_idx;
CREATE INDEX jobs_company_created_idx ON pgjobs.job_rows (company_id, created_at DESC, id DESC);
