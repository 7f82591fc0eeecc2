UPDATE replay_runs SET replayed = selected WHERE dry_run;
ALTER TABLE replay_runs DROP COLUMN selected;
