ALTER TABLE worker_heartbeats DROP COLUMN status;
