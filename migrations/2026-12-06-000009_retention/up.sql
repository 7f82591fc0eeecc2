-- The retention sweep finds completed commands by when they completed, oldest first, without
-- reading the rows in processing; finished replay runs and old audit entries likewise.
CREATE INDEX payment_link_commands_completed ON payment_link_commands (completed_at)
    WHERE status IN ('succeeded', 'failed');
CREATE INDEX dead_letter_replays_run ON dead_letter_replays (run_id);
CREATE INDEX replay_runs_finished ON replay_runs (finished_at) WHERE state <> 'running';
