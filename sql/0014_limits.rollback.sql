DROP TABLE pgjobs.limit_windows;
DROP TABLE pgjobs.limits;
