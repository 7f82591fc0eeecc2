//! The command record: claiming a command (the idempotency decision), and recording its outcome
//! together with the outbox messages that report it.

use super::outbox::{self, NewOutboxMessage};
use super::schema::payment_link_commands::dsl as c;
use super::{PgConn, StoreError};
use crate::command::Envelope;
use crate::errors::ErrorKind;
use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Numeric, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::time::Duration;

/// Status of a command whose provider call is under way (or was, until its lease expires).
pub const PROCESSING: &str = "processing";
/// Status of a command that has its link.
pub const SUCCEEDED: &str = "succeeded";
/// Status of a command that ended dead-lettered.
pub const FAILED: &str = "failed";

/// A command's row.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = super::schema::payment_link_commands)]
pub struct CommandRecord {
    pub command_id: String,
    pub canonical_request: String,
    pub payment_provider_id: i64,
    pub amount_in_major_currency: BigDecimal,
    pub description: String,
    pub email_address: Option<String>,
    pub invoice_id: Option<i64>,
    pub adhoc_invoice_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub correlation_id: String,
    pub status: String,
    pub attempts: i32,
    pub replay_count: i32,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub link_id: Option<i64>,
    pub payment_link: Option<String>,
    pub provider_response: Option<String>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub http_status: Option<i32>,
    pub error_body: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// What the idempotency record says about a delivered command.
#[derive(Debug)]
pub enum Claim {
    /// This worker holds the command now and must call the provider; `attempts` were made before.
    Acquired { attempts: i32 },
    /// The command already has an outcome; publish its event again, do not call the provider.
    Finished(Box<CommandRecord>),
    /// Another worker holds the command right now.
    Busy,
    /// The id was used before for a different request.
    Conflict,
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

/// Claims the command for `owner` in one statement: inserts its row, or takes over a row whose
/// holder's lease ran out, or re-opens a recorded failure when an operator replayed it.
pub async fn claim(
    conn: &mut PgConn,
    envelope: &Envelope,
    owner: &str,
    lease: Duration,
) -> Result<Claim, StoreError> {
    let cmd = &envelope.command;
    let claimed: Option<Claimed> = diesel::sql_query(
        "INSERT INTO payment_link_commands AS c (command_id, canonical_request, payment_provider_id, \
             amount_in_major_currency, description, email_address, invoice_id, adhoc_invoice_id, \
             customer_id, correlation_id, status, replay_count, lease_owner, lease_expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'processing', $11, $12, \
             now() + $13 * interval '1 millisecond') \
         ON CONFLICT (command_id) DO UPDATE SET status = 'processing', \
             lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at, \
             replay_count = GREATEST(c.replay_count, EXCLUDED.replay_count), updated_at = now() \
         WHERE c.canonical_request = EXCLUDED.canonical_request AND ( \
             (c.status = 'processing' AND c.lease_expires_at < now()) \
             OR (c.status = 'failed' AND EXCLUDED.replay_count > c.replay_count)) \
         RETURNING c.attempts",
    )
    .bind::<Text, _>(envelope.command_id.as_str())
    .bind::<Text, _>(&envelope.canonical_request)
    .bind::<BigInt, _>(cmd.payment_provider_id)
    .bind::<Numeric, _>(cmd.amount.value())
    .bind::<Text, _>(&cmd.description)
    .bind::<Nullable<Text>, _>(cmd.email_address.as_ref().map(|e| e.as_str()))
    .bind::<Nullable<BigInt>, _>(cmd.invoice_id)
    .bind::<Nullable<BigInt>, _>(cmd.adhoc_invoice_id)
    .bind::<Nullable<BigInt>, _>(cmd.customer_id)
    .bind::<Text, _>(&envelope.correlation_id)
    .bind::<Integer, _>(envelope.replay_count)
    .bind::<Text, _>(owner)
    .bind::<BigInt, _>(lease.as_millis() as i64)
    .get_result(conn)
    .await
    .optional()?;
    if let Some(claimed) = claimed {
        return Ok(Claim::Acquired {
            attempts: claimed.attempts,
        });
    }
    let Some(existing) = find(conn, envelope.command_id.as_str()).await? else {
        // Deleted between the two statements (only by hand): the next delivery claims it anew.
        return Ok(Claim::Busy);
    };
    Ok(
        if existing.canonical_request != envelope.canonical_request {
            Claim::Conflict
        } else if existing.status == PROCESSING {
            Claim::Busy
        } else {
            Claim::Finished(Box::new(existing))
        },
    )
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

/// The link the provider made for a command.
#[derive(Clone, Debug)]
pub struct Success {
    pub attempts: i32,
    pub link_id: Option<i64>,
    pub payment_link: String,
    pub response_body: String,
}

/// Why a command ended without a link.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
    pub attempts: i32,
    pub http_status: Option<u16>,
    pub error_body: Option<String>,
}

/// Records a success and its event in one transaction. Returns the outbox ids to publish and
/// when the command was first seen, or `None` when this worker no longer holds the command (its
/// lease ran out and another took it).
pub async fn record_success(
    conn: &mut PgConn,
    command_id: String,
    owner: String,
    success: Success,
    messages: Vec<NewOutboxMessage>,
) -> Result<Option<(Vec<i64>, DateTime<Utc>)>, StoreError> {
    // The closure owns its data: borrowed captures trip the compiler's Send check on spawn.
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let updated = diesel::update(held_by(&command_id, &owner))
            .set((
                c::status.eq(SUCCEEDED),
                c::attempts.eq(c::attempts + success.attempts),
                c::link_id.eq(success.link_id),
                c::payment_link.eq(&success.payment_link),
                c::provider_response.eq(&success.response_body),
                c::error_kind.eq(None::<String>),
                c::error_message.eq(None::<String>),
                c::http_status.eq(None::<i32>),
                c::error_body.eq(None::<String>),
                finished(),
            ))
            .returning(c::created_at)
            .get_result::<DateTime<Utc>>(conn)
            .await
            .optional()?;
        let Some(first_seen) = updated else {
            return Ok(None);
        };
        Ok(Some((outbox::insert(conn, messages).await?, first_seen)))
    })
    .await
}

/// Records a failure and its event and dead letter in one transaction; `None` as for success.
pub async fn record_failure(
    conn: &mut PgConn,
    command_id: String,
    owner: String,
    failure: Failure,
    messages: Vec<NewOutboxMessage>,
) -> Result<Option<(Vec<i64>, DateTime<Utc>)>, StoreError> {
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let updated = diesel::update(held_by(&command_id, &owner))
            .set((
                c::status.eq(FAILED),
                c::attempts.eq(c::attempts + failure.attempts),
                c::error_kind.eq(failure.kind.as_str()),
                c::error_message.eq(&failure.message),
                c::http_status.eq(failure.http_status.map(i32::from)),
                c::error_body.eq(&failure.error_body),
                finished(),
            ))
            .returning(c::created_at)
            .get_result::<DateTime<Utc>>(conn)
            .await
            .optional()?;
        let Some(first_seen) = updated else {
            return Ok(None);
        };
        Ok(Some((outbox::insert(conn, messages).await?, first_seen)))
    })
    .await
}

/// Gives a command back (shutdown, or a wait in a delay queue), adding the provider calls made
/// and the last error seen, so the attempt history stays on the row.
pub async fn release(
    conn: &mut PgConn,
    command_id: &str,
    owner: &str,
    attempts: i32,
    last_error: Option<&str>,
) -> Result<(), StoreError> {
    diesel::update(held_by(command_id, owner))
        .set((
            c::attempts.eq(c::attempts + attempts),
            c::error_message.eq(last_error),
            c::lease_owner.eq(None::<String>),
            c::lease_expires_at.eq(diesel::dsl::now),
            c::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    Ok(())
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
        c::lease_expires_at.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .await?)
}

type HeldBy<'a> = diesel::dsl::Filter<
    diesel::dsl::Filter<
        diesel::dsl::Filter<c::payment_link_commands, diesel::dsl::Eq<c::command_id, &'a str>>,
        diesel::dsl::Eq<c::lease_owner, &'a str>,
    >,
    diesel::dsl::Eq<c::status, &'static str>,
>;

/// The command's row, only while `owner` holds it.
fn held_by<'a>(command_id: &'a str, owner: &'a str) -> HeldBy<'a> {
    c::payment_link_commands
        .filter(c::command_id.eq(command_id))
        .filter(c::lease_owner.eq(owner))
        .filter(c::status.eq(PROCESSING))
}

/// Columns set when a command reaches its outcome.
#[allow(clippy::type_complexity)]
fn finished() -> (
    diesel::dsl::Eq<c::lease_owner, Option<String>>,
    diesel::dsl::Eq<c::lease_expires_at, Option<DateTime<Utc>>>,
    diesel::dsl::Eq<c::completed_at, diesel::dsl::now>,
    diesel::dsl::Eq<c::updated_at, diesel::dsl::now>,
) {
    (
        c::lease_owner.eq(None),
        c::lease_expires_at.eq(None),
        c::completed_at.eq(diesel::dsl::now),
        c::updated_at.eq(diesel::dsl::now),
    )
}
