-- One row per running worker, refreshed on a timer: how many replicas share the queue, so a rate
-- limit set for the fleet (provider.max_requests_per_second) can be split between them.
CREATE TABLE worker_heartbeats (
    instance_id TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
