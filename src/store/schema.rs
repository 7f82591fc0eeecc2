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
diesel::allow_tables_to_appear_in_same_query!(
    payment_link_commands,
    outbox,
    replay_runs,
    dead_letters,
    dead_letter_replays,
    audit_log
);

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
        source -> Text,
        filter -> Nullable<Jsonb>,
        state -> Text,
        total -> Int4,
        accept_duplicate_risk -> Bool,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// Every dead letter, ingested from the dead-letter queue.
    dead_letters (id) {
        id -> Int8,
        dedup_key -> Text,
        command_id -> Text,
        kind -> Text,
        error_message -> Text,
        http_status -> Nullable<Int4>,
        attempts -> Nullable<Int4>,
        error_body -> Nullable<Text>,
        failed_at -> Timestamptz,
        ingested_at -> Timestamptz,
        replay_count -> Int4,
        state -> Text,
        state_changed_at -> Timestamptz,
        replay_run_id -> Nullable<Int8>,
        previous_id -> Nullable<Int8>,
        payment_provider_id -> Nullable<Int8>,
        invoice_id -> Nullable<Int8>,
        adhoc_invoice_id -> Nullable<Int8>,
        customer_id -> Nullable<Int8>,
        description -> Nullable<Text>,
        email -> Nullable<Text>,
        trace_id -> Nullable<Text>,
        original_exchange -> Text,
        original_routing_key -> Text,
        properties -> Jsonb,
        body -> Bytea,
        stored_with_changes -> Nullable<Text>,
        search_text -> Text,
    }
}

diesel::table! {
    /// Each replay of a dead letter.
    dead_letter_replays (id) {
        id -> Int8,
        dead_letter_id -> Int8,
        run_id -> Int8,
        replayed_at -> Timestamptz,
        outcome -> Text,
    }
}

diesel::table! {
    /// Who did what to which dead letters.
    audit_log (id) {
        id -> Int8,
        at -> Timestamptz,
        actor -> Text,
        source -> Text,
        action -> Text,
        filter -> Nullable<Jsonb>,
        count -> Int4,
        ids -> Array<Int8>,
        run_id -> Nullable<Int8>,
        client_address -> Nullable<Text>,
    }
}

diesel::table! {
    /// The console's browser sessions, by the SHA-256 of the cookie's value.
    console_sessions (id_sha256) {
        id_sha256 -> Bytea,
        operator -> Text,
        csrf -> Text,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}
