-- The dead-letter store: every dead letter, ingested from the dead-letter queue by the worker, so
-- operators can search, replay and archive them at volume. The queue stays the durable buffer
-- between a failure and its ingestion; a message is acked there only once its row is committed.
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY,
    -- The worker's x-dead-letter-id, or a hash of the whole message for one the broker
    -- dead-lettered itself: a message delivered twice to the ingester is stored once.
    dedup_key TEXT NOT NULL UNIQUE,
    command_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    error_message TEXT NOT NULL,
    http_status INTEGER,
    attempts INTEGER,
    error_body TEXT,
    failed_at TIMESTAMPTZ NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    replay_count INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'replaying', 'replayed', 'archived')),
    state_changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The replay run that holds it (replaying) or replayed it.
    replay_run_id BIGINT,
    -- The earlier dead letter of the same command that was replayed and failed again as this one.
    previous_id BIGINT REFERENCES dead_letters (id) ON DELETE SET NULL,
    payment_provider_id BIGINT,
    invoice_id BIGINT,
    adhoc_invoice_id BIGINT,
    customer_id BIGINT,
    description TEXT,
    email TEXT,
    trace_id TEXT,
    original_exchange TEXT NOT NULL,
    original_routing_key TEXT NOT NULL,
    -- The message as it was dead-lettered: properties (the stored JSON form) and body, exactly.
    properties JSONB NOT NULL,
    body BYTEA NOT NULL,
    -- What could not be stored exactly (a header JSON cannot hold), when something could not.
    stored_with_changes TEXT,
    -- What a text search looks in, lower-cased once when the row is written: one LIKE on one
    -- column per row instead of three case-folding ILIKEs.
    search_text TEXT GENERATED ALWAYS AS (
        lower(command_id || ' ' || coalesce(description, '') || ' ' || coalesce(email, ''))
    ) STORED
);
-- The console's list: newest first within a state, with keyset pagination on (failed_at, id).
CREATE INDEX dead_letters_state_failed ON dead_letters (state, failed_at DESC, id DESC);
CREATE INDEX dead_letters_failed ON dead_letters (failed_at DESC, id DESC);
CREATE INDEX dead_letters_kind ON dead_letters (kind, state);
CREATE INDEX dead_letters_command ON dead_letters (command_id);

-- Each replay of a dead letter: when, by which run, and whether the broker took it.
CREATE TABLE dead_letter_replays (
    id BIGSERIAL PRIMARY KEY,
    dead_letter_id BIGINT NOT NULL REFERENCES dead_letters (id) ON DELETE CASCADE,
    run_id BIGINT NOT NULL REFERENCES replay_runs (id),
    replayed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    outcome TEXT NOT NULL
);
CREATE INDEX dead_letter_replays_letter ON dead_letter_replays (dead_letter_id);

-- Replay runs are also the console's background jobs: their filter, state and progress.
ALTER TABLE replay_runs
    ADD COLUMN source TEXT NOT NULL DEFAULT 'cli',
    ADD COLUMN filter JSONB,
    ADD COLUMN state TEXT NOT NULL DEFAULT 'done'
        CHECK (state IN ('running', 'done', 'failed')),
    ADD COLUMN total INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN accept_duplicate_risk BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- Who did what to which dead letters, from the CLI or the console.
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    filter JSONB,
    count INTEGER NOT NULL,
    ids BIGINT[] NOT NULL DEFAULT '{}',
    run_id BIGINT
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
