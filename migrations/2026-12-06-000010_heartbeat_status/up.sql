-- What each worker reports with its heartbeat (its outcomes so far, each provider lane's limit,
-- load and breaker), so `payment-link-worker status` can show a whole fleet from the database.
ALTER TABLE worker_heartbeats ADD COLUMN status JSONB;
