DROP INDEX replay_runs_finished;
DROP INDEX dead_letter_replays_run;
DROP INDEX payment_link_commands_completed;
