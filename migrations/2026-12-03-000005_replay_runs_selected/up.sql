-- A dry run replays nothing: `replayed` now counts only commands really sent back, and the new
-- `selected` counts those the filter chose (in a dry run: what a real run would have replayed).
-- Earlier dry runs recorded their selection as `replayed`; they are corrected here.
ALTER TABLE replay_runs ADD COLUMN selected INTEGER NOT NULL DEFAULT 0;
UPDATE replay_runs SET selected = replayed;
UPDATE replay_runs SET replayed = 0 WHERE dry_run;
COMMENT ON COLUMN replay_runs.selected IS 'dead letters the filter chose (a dry run stops here)';
COMMENT ON COLUMN replay_runs.replayed IS 'dead letters sent back to the command exchange (0 in a dry run)';
COMMENT ON COLUMN replay_runs.command_ids IS 'the selected command ids (replayed unless dry_run)';
