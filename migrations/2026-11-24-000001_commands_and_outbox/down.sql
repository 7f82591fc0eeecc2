DROP TABLE outbox;
DROP TABLE payment_link_commands;
