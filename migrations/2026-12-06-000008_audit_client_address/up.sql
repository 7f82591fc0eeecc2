-- From where an operator acted: the console's client address (empty for the CLI). Refused
-- sign-ins and bearer checks are recorded too, with the address they came from.
ALTER TABLE audit_log ADD COLUMN client_address TEXT;
