-- A replay run guards itself: it sends a canary first and stops by itself when its replayed
-- letters fail again (a run so stopped can be resumed), and may start slow and ramp up.
ALTER TABLE replay_runs
    ADD COLUMN canary INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN canary_wait_ms BIGINT NOT NULL DEFAULT 120000,
    ADD COLUMN stop_after_failures INTEGER,
    ADD COLUMN max_failure_ratio DOUBLE PRECISION,
    ADD COLUMN failure_window INTEGER NOT NULL DEFAULT 20,
    ADD COLUMN start_rate DOUBLE PRECISION,
    ADD COLUMN stop_reason TEXT,
    DROP CONSTRAINT replay_runs_state_check,
    ADD CONSTRAINT replay_runs_state_check
        CHECK (state IN ('running', 'done', 'failed', 'stopped'));
COMMENT ON COLUMN replay_runs.canary IS 'letters sent first, whose outcomes must all be successes before the rest go';
COMMENT ON COLUMN replay_runs.canary_wait_ms IS 'how long the canaries may take to succeed';
COMMENT ON COLUMN replay_runs.stop_after_failures IS 'the run stops once this many of its letters failed again';
COMMENT ON COLUMN replay_runs.max_failure_ratio IS 'the run stops once this share of its last failure_window settled letters failed again';
COMMENT ON COLUMN replay_runs.start_rate IS 'replays per second at the start, doubled every ramp interval up to rate_per_second';
COMMENT ON COLUMN replay_runs.stop_reason IS 'why the run stopped by itself (state stopped); cleared by a resume';
-- A replay that fails again is linked to the letter it was replayed from: the run's outcomes
-- look it up by that link.
CREATE INDEX dead_letters_previous_id ON dead_letters (previous_id) WHERE previous_id IS NOT NULL;
