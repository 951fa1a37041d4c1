-- depends: 0021_live_state
-- A company's jobs in ascending (created_at, id) order: job_list_by_company and its active
-- and ended variants read it backwards for their ORDER BY created_at DESC, id DESC (a B-tree
-- scans either way), and job_list_companies' skip scan only needs company_id first.
--
-- Why: new jobs come in increasing (created_at, id) (one created_at per transaction, ids
-- in order within it: pgjobs.jobspec.new_job_id), which the descending index took at the
-- left-hand end of each company's entries: every insert descended from the root to the
-- same place and every split left a half-empty page behind. After a 20,000-job bulk
-- enqueue of one company it was 1.8 times its size after a REINDEX; ascending, the
-- inserts go at the right-hand end and fill pages as a REINDEX does
-- (tests/integration/test_index_fill.py).
--
-- Deploying: no stop needed; enqueues and job ends wait while the index builds (one sort of
-- company_id, created_at, id: ~0.8 s per million rows on the 2-core test machine).
DROP INDEX pgjobs.jobs_company_created_idx;
CREATE INDEX jobs_company_created_idx ON pgjobs.job_rows (company_id, created_at, id);
