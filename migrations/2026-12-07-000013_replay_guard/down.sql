DROP INDEX dead_letters_previous_id;
UPDATE replay_runs SET state = 'done' WHERE state = 'stopped';
ALTER TABLE replay_runs
    DROP CONSTRAINT replay_runs_state_check,
    ADD CONSTRAINT replay_runs_state_check CHECK (state IN ('running', 'done', 'failed')),
    DROP COLUMN canary,
    DROP COLUMN canary_wait_ms,
    DROP COLUMN stop_after_failures,
    DROP COLUMN max_failure_ratio,
    DROP COLUMN failure_window,
    DROP COLUMN start_rate,
    DROP COLUMN stop_reason;
