-- Rolls back 0024_queue_vacuum: the workers' record of their vacuums of the queue goes.
DROP TABLE pgjobs.queue_vacuum;
