ALTER TABLE payment_link_commands
    DROP COLUMN event_exchange,
    DROP COLUMN event_routing_key,
    DROP COLUMN event_properties;
