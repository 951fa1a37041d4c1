DROP TABLE pgjobs.schedule_slots;
DROP TABLE pgjobs.schedules;
