-- What the fleet last found of each provider's pace (the rate it takes, the rate it refused, how
-- many calls at once), so a restarted, rolled-out or new worker starts paced instead of from
-- slow start. Written by the workers every few seconds and when they stop; read at start-up,
-- trusted less the older it is, and forgotten after a day.
CREATE TABLE provider_paces (
    provider_id BIGINT PRIMARY KEY,
    found_rate DOUBLE PRECISION CHECK (found_rate > 0),
    refused_rate DOUBLE PRECISION CHECK (refused_rate > 0),
    concurrency DOUBLE PRECISION NOT NULL CHECK (concurrency >= 1),
    slow_start BOOLEAN NOT NULL,
    found_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
