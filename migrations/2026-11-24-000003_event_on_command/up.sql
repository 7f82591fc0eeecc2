-- The created event, kept on the command's row instead of an outbox row. The command message is
-- acked only once this event is confirmed by the broker, so the broker's redelivery of an unacked
-- command is what publishes it again after a crash; an outbox row is written only when the broker
-- refuses the event, for the relay. This saves an insert, an update and a foreign-key check per
-- command.
ALTER TABLE payment_link_commands
    ADD COLUMN event_exchange TEXT,
    ADD COLUMN event_routing_key TEXT,
    -- Its AMQP properties and headers, stored as in the outbox. Its body is the provider's
    -- answer, already kept in provider_response.
    ADD COLUMN event_properties JSONB;
