//! The command record, one row per command id, shared by every replica: reading it, the event
//! kept on it, and giving a command back. Claiming is in [`super::claims`], recording an outcome
//! in [`super::outcomes`].

use super::schema::payment_link_commands::dsl as c;
use super::{PgConn, StoreError};
use crate::broker::messages::OutboundMessage;
use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use std::time::Duration;

/// Status of a command whose provider call is under way (or was, until its lease expires).
pub const PROCESSING: &str = "processing";
/// Status of a command that has its link.
pub const SUCCEEDED: &str = "succeeded";
/// Status of a command that ended dead-lettered.
pub const FAILED: &str = "failed";

/// A command's row; its columns are described in the migrations.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = super::schema::payment_link_commands)]
pub struct CommandRecord {
    /// The command's id (its message id).
    pub command_id: String,
    /// The request as sent to the provider (a conflict compares it).
    pub canonical_request: String,
    /// The command's `paymentProviderId`, where its body had one.
    pub payment_provider_id: i64,
    /// The amount, exact (never a float).
    pub amount_in_major_currency: BigDecimal,
    /// The link's description.
    pub description: String,
    /// The e-mail address to send the link to, if any.
    pub email_address: Option<String>,
    /// The command's `invoiceId`, if any.
    pub invoice_id: Option<i64>,
    /// The command's `adhocInvoiceId`, if any.
    pub adhoc_invoice_id: Option<i64>,
    /// The command's `customerId`, if any.
    pub customer_id: Option<i64>,
    /// The invoicing system's correlation id, carried to the events.
    pub correlation_id: String,
    /// Where the command stands: processing, succeeded or failed.
    pub status: String,
    /// Provider calls made for it so far.
    pub attempts: i32,
    /// Times it was replayed.
    pub replay_count: i32,
    /// The worker that holds its claim, while processing.
    pub lease_owner: Option<String>,
    /// When that claim runs out and another worker may take the command over.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The claim's token: only its holder may record the outcome.
    pub lease_token: Option<String>,
    /// The provider's id of the link, once made.
    pub link_id: Option<i64>,
    /// The link, once made.
    pub payment_link: Option<String>,
    /// The provider's answer, verbatim (the created event carries it).
    pub provider_response: Option<String>,
    /// Why it failed (an `ErrorKind`), once failed.
    pub error_kind: Option<String>,
    /// What went wrong, in words, once failed.
    pub error_message: Option<String>,
    /// The provider's HTTP status, when it answered.
    pub http_status: Option<i32>,
    /// The start of the provider's error answer, if any.
    pub error_body: Option<String>,
    /// When it was first recorded.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// When it got its outcome.
    pub completed_at: Option<DateTime<Utc>>,
}

/// The row of one command.
pub async fn find(
    conn: &mut PgConn,
    command_id: &str,
) -> Result<Option<CommandRecord>, StoreError> {
    Ok(c::payment_link_commands
        .find(command_id)
        .select(CommandRecord::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The kept event's columns: exchange, routing key, properties, and the provider's answer.
type KeptRow = (
    Option<String>,
    Option<String>,
    Option<serde_json::Value>,
    Option<String>,
);

/// The event to publish again for a command that has an outcome: the created event kept on its
/// row, or else the newest event in the outbox (a failed event, or a row written before events
/// were kept on the command). `None` when it has none; an `Err` inside when it is unreadable.
pub async fn recorded_event(
    conn: &mut PgConn,
    command_id: &str,
) -> Result<Option<Result<OutboundMessage, serde_json::Error>>, StoreError> {
    let on_row: Option<KeptRow> = c::payment_link_commands
        .find(command_id)
        .select((
            c::event_exchange,
            c::event_routing_key,
            c::event_properties,
            c::provider_response,
        ))
        .first(conn)
        .await
        .optional()?;
    if let Some((Some(exchange), Some(routing_key), Some(properties), Some(body))) = on_row {
        return Ok(Some(
            crate::broker::messages::properties_from_json(properties).map(|properties| {
                OutboundMessage {
                    exchange,
                    routing_key,
                    properties,
                    body: body.into_bytes(),
                }
            }),
        ));
    }
    Ok(super::outbox::latest_event(conn, command_id)
        .await?
        .map(|row| row.message()))
}

/// Gives a command back (shutdown, a wait in a delay queue, a panic), adding the provider calls
/// made and the last error seen, so the attempt history stays on the row. Only the claim holding
/// `token` gives it back; without a token (a panic, whose claim is unknown), any claim of `owner`.
pub async fn release(
    conn: &mut PgConn,
    command_id: &str,
    owner: &str,
    token: Option<&str>,
    attempts: i32,
    last_error: Option<&str>,
) -> Result<(), StoreError> {
    use diesel::sql_types::{Integer, Nullable, Text};
    diesel::sql_query(
        "UPDATE payment_link_commands SET attempts = attempts + $4, error_message = $5, \
             lease_owner = NULL, lease_token = NULL, lease_expires_at = now(), updated_at = now() \
         WHERE command_id = $1 AND lease_owner = $2 AND status = 'processing' \
             AND ($3::text IS NULL OR lease_token = $3)",
    )
    .bind::<Text, _>(command_id)
    .bind::<Text, _>(owner)
    .bind::<Nullable<Text>, _>(token)
    .bind::<Integer, _>(attempts)
    .bind::<Nullable<Text>, _>(last_error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Renews the lease of the claim holding `token` for another `lease`: a command whose provider
/// call is still under way (slow, waiting on the breaker) is never taken over by another worker.
/// `false` when that claim no longer holds the command.
pub async fn renew(
    conn: &mut PgConn,
    command_id: &str,
    token: &str,
    lease: Duration,
) -> Result<bool, StoreError> {
    use diesel::sql_types::{BigInt, Text};
    let renewed = diesel::sql_query(
        "UPDATE payment_link_commands \
         SET lease_expires_at = now() + $3 * interval '1 millisecond' \
         WHERE command_id = $1 AND lease_token = $2 AND status = 'processing'",
    )
    .bind::<Text, _>(command_id)
    .bind::<Text, _>(token)
    .bind::<BigInt, _>(lease.as_millis() as i64)
    .execute(conn)
    .await?;
    Ok(renewed == 1)
}

/// How long the oldest command still being processed has been (zero when none is).
pub async fn oldest_processing_age(conn: &mut PgConn) -> Result<Duration, StoreError> {
    let oldest: Option<DateTime<Utc>> = c::payment_link_commands
        .filter(c::status.eq(PROCESSING))
        .select(diesel::dsl::min(c::created_at))
        .first(conn)
        .await?;
    Ok(oldest
        .and_then(|at| (Utc::now() - at).to_std().ok())
        .unwrap_or_default())
}

/// Lets other workers take every command `owner` still holds (at shutdown).
pub async fn release_all(conn: &mut PgConn, owner: &str) -> Result<usize, StoreError> {
    Ok(diesel::update(
        c::payment_link_commands
            .filter(c::lease_owner.eq(owner))
            .filter(c::status.eq(PROCESSING)),
    )
    .set((
        c::lease_owner.eq(None::<String>),
        c::lease_token.eq(None::<String>),
        c::lease_expires_at.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .await?)
}
