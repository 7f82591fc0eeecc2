-- One row per `dead-letters replay` run, so an operator can answer "who replayed what, when".
-- Written when the run starts and updated as it goes, so a run that died midway still shows.
CREATE TABLE replay_runs (
    id BIGSERIAL PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    requested_by TEXT NOT NULL,
    filter_kind TEXT,
    filter_command_id TEXT,
    max_count BIGINT,
    rate_per_second DOUBLE PRECISION,
    dry_run BOOLEAN NOT NULL,
    replayed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    left_in_queue INTEGER,
    command_ids TEXT[] NOT NULL DEFAULT '{}'
);
