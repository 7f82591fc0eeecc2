-- One row per command id: the idempotency record. The primary key is what makes a command
-- processed once across every replica; the lease says which worker holds it right now.
CREATE TABLE payment_link_commands (
    command_id TEXT PRIMARY KEY,
    -- The request in canonical form; the same command id with another request is a conflict.
    canonical_request TEXT NOT NULL,
    payment_provider_id BIGINT NOT NULL,
    amount_in_major_currency NUMERIC(20, 4) NOT NULL CHECK (amount_in_major_currency > 0),
    description TEXT NOT NULL,
    email_address TEXT,
    invoice_id BIGINT,
    adhoc_invoice_id BIGINT,
    customer_id BIGINT,
    correlation_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('processing', 'succeeded', 'failed')),
    -- Provider calls made for this command, over all deliveries and replays.
    attempts INTEGER NOT NULL DEFAULT 0,
    replay_count INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at TIMESTAMPTZ,
    link_id BIGINT,
    payment_link TEXT,
    -- The provider's 200/201 body exactly as it came; the created event carries it.
    provider_response TEXT,
    error_kind TEXT,
    error_message TEXT,
    http_status INTEGER,
    error_body TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ
);

CREATE INDEX payment_link_commands_failed ON payment_link_commands (error_kind, completed_at)
    WHERE status = 'failed';
CREATE INDEX payment_link_commands_lease_owner ON payment_link_commands (lease_owner)
    WHERE status = 'processing';

-- Everything the worker must publish (events, dead letters), written in the same transaction
-- as the outcome it reports, and marked sent once the broker has confirmed it.
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    command_id TEXT NOT NULL REFERENCES payment_link_commands (command_id),
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('event', 'dead-letter')),
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    -- lapin's BasicProperties, serialized, so headers keep their AMQP types.
    properties JSONB NOT NULL,
    body BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    next_attempt_at TIMESTAMPTZ NOT NULL,
    publish_attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at TIMESTAMPTZ
);

CREATE INDEX outbox_unsent ON outbox (next_attempt_at) WHERE sent_at IS NULL;
CREATE INDEX outbox_command ON outbox (command_id);
