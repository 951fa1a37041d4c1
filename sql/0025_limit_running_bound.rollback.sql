-- Rolls back 0025_limit_running_bound: the limited claim counts every limit's running
-- jobs again (that version's limits.sql).
DROP TABLE pgjobs.limit_running;
