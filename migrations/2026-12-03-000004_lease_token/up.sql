-- A token per claim: the outcome is written, and the lease renewed or given back, only by the
-- claim that holds the token. The lease owner (a process) is not enough: two tasks of one
-- process, or a process whose lease ran out and was taken over, must not both record.
ALTER TABLE payment_link_commands ADD COLUMN lease_token TEXT;
