ALTER TABLE payment_link_commands DROP COLUMN lease_token;
