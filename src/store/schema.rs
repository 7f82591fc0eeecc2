//! diesel's view of the tables in `migrations/`.

diesel::table! {
    /// One row per command id: its idempotency record and outcome.
    payment_link_commands (command_id) {
        command_id -> Text,
        canonical_request -> Text,
        payment_provider_id -> Int8,
        amount_in_major_currency -> Numeric,
        description -> Text,
        email_address -> Nullable<Text>,
        invoice_id -> Nullable<Int8>,
        adhoc_invoice_id -> Nullable<Int8>,
        customer_id -> Nullable<Int8>,
        correlation_id -> Text,
        status -> Text,
        attempts -> Int4,
        replay_count -> Int4,
        lease_owner -> Nullable<Text>,
        lease_expires_at -> Nullable<Timestamptz>,
        link_id -> Nullable<Int8>,
        payment_link -> Nullable<Text>,
        provider_response -> Nullable<Text>,
        error_kind -> Nullable<Text>,
        error_message -> Nullable<Text>,
        http_status -> Nullable<Int4>,
        error_body -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        completed_at -> Nullable<Timestamptz>,
        event_exchange -> Nullable<Text>,
        event_routing_key -> Nullable<Text>,
        event_properties -> Nullable<Jsonb>,
        lease_token -> Nullable<Text>,
    }
}

diesel::table! {
    /// Messages to publish, written with the outcome they report.
    outbox (id) {
        id -> Int8,
        command_id -> Text,
        message_id -> Text,
        kind -> Text,
        exchange -> Text,
        routing_key -> Text,
        properties -> Jsonb,
        body -> Bytea,
        created_at -> Timestamptz,
        next_attempt_at -> Timestamptz,
        publish_attempts -> Int4,
        last_error -> Nullable<Text>,
        sent_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(outbox -> payment_link_commands (command_id));
diesel::allow_tables_to_appear_in_same_query!(payment_link_commands, outbox, replay_runs);

diesel::table! {
    /// Replay runs of dead letters, for audit.
    replay_runs (id) {
        id -> Int8,
        started_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        requested_by -> Text,
        filter_kind -> Nullable<Text>,
        filter_command_id -> Nullable<Text>,
        max_count -> Nullable<Int8>,
        rate_per_second -> Nullable<Float8>,
        dry_run -> Bool,
        replayed -> Int4,
        skipped -> Int4,
        failed -> Int4,
        left_in_queue -> Nullable<Int4>,
        command_ids -> Array<Text>,
        selected -> Int4,
    }
}
