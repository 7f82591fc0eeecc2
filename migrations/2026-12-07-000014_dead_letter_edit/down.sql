ALTER TABLE audit_log DROP COLUMN detail;
UPDATE dead_letters SET state = 'archived' WHERE state = 'edited';
ALTER TABLE dead_letters
    DROP CONSTRAINT dead_letters_state_check,
    ADD CONSTRAINT dead_letters_state_check
        CHECK (state IN ('open', 'replaying', 'replayed', 'archived')),
    DROP COLUMN edited_into;
