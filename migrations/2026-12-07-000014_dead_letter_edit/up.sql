-- An operator may fix a dead letter's command before sending it again: the edited command is a
-- new command (its own id), the letter becomes `edited` and names its successor, and the audit
-- entry keeps who, why, and the fields before and after.
ALTER TABLE dead_letters
    ADD COLUMN edited_into TEXT,
    DROP CONSTRAINT dead_letters_state_check,
    ADD CONSTRAINT dead_letters_state_check
        CHECK (state IN ('open', 'replaying', 'replayed', 'archived', 'edited'));
COMMENT ON COLUMN dead_letters.edited_into IS 'the command id its edited copy was sent as (state edited)';
ALTER TABLE audit_log ADD COLUMN detail JSONB;
COMMENT ON COLUMN audit_log.detail IS 'what an edit changed: the reason, the fields before and after, the new command id';
