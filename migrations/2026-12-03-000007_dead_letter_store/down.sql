DROP TABLE audit_log;
ALTER TABLE replay_runs
    DROP COLUMN source, DROP COLUMN filter, DROP COLUMN state, DROP COLUMN total,
    DROP COLUMN accept_duplicate_risk, DROP COLUMN updated_at;
DROP TABLE dead_letter_replays;
DROP TABLE dead_letters;
