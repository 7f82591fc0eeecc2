//! The command record: claiming a command (the idempotency decision), and recording its outcome
//! together with the outbox messages that report it.

use super::outbox::NewOutboxMessage;
use super::schema::payment_link_commands::dsl as c;
use super::{PgConn, StoreError};
use crate::command::Envelope;
use crate::errors::ErrorKind;
use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bytea, Integer, Jsonb, Nullable, Numeric, Text, Timestamptz,
};
use diesel_async::RunQueryDsl;
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

/// The tail shared by both outcome statements: the outbox rows go in only if the update found
/// the command still held by this worker, all in one statement (one round trip, one commit).
/// `$1` is the command id, `$2` the owner; the outbox columns are the last seven parameters.
fn outcome_statement(set: &str, first_outbox_param: usize) -> String {
    let p = |i: usize| format!("${}", first_outbox_param + i);
    format!(
        "WITH updated AS ( \
            UPDATE payment_link_commands SET {set}, lease_owner = NULL, lease_expires_at = NULL, \
                completed_at = now(), updated_at = now() \
            WHERE command_id = $1 AND lease_owner = $2 AND status = 'processing' \
            RETURNING created_at), \
         inserted AS ( \
            INSERT INTO outbox (command_id, message_id, kind, exchange, routing_key, properties, body, next_attempt_at) \
            SELECT $1, m.message_id, m.kind, m.exchange, m.routing_key, m.properties, m.body, m.next_attempt_at \
            FROM unnest({}::text[], {}::text[], {}::text[], {}::text[], {}::jsonb[], {}::bytea[], {}::timestamptz[]) \
                WITH ORDINALITY AS m(message_id, kind, exchange, routing_key, properties, body, next_attempt_at, ord) \
            WHERE EXISTS (SELECT 1 FROM updated) \
            ORDER BY m.ord \
            RETURNING id) \
         SELECT (SELECT created_at FROM updated) AS first_seen, ARRAY(SELECT id FROM inserted ORDER BY id) AS ids",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    )
}

#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    first_seen: Option<DateTime<Utc>>,
    #[diesel(sql_type = Array<BigInt>)]
    ids: Vec<i64>,
}

impl Recorded {
    fn into_result(self) -> Option<(Vec<i64>, DateTime<Utc>)> {
        self.first_seen.map(|first_seen| (self.ids, first_seen))
    }
}

/// The outbox rows as column arrays, for `unnest`.
#[allow(clippy::type_complexity)]
fn columns(
    messages: Vec<NewOutboxMessage>,
) -> (
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<serde_json::Value>,
    Vec<Vec<u8>>,
    Vec<DateTime<Utc>>,
) {
    let mut c = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for m in messages {
        c.0.push(m.message_id);
        c.1.push(m.kind);
        c.2.push(m.exchange);
        c.3.push(m.routing_key);
        c.4.push(m.properties);
        c.5.push(m.body);
        c.6.push(m.next_attempt_at);
    }
    c
}

/// Records a success and its event atomically (one statement). Returns the outbox ids to
/// publish, in the order of `messages`, and when the command was first seen; or `None` when this
/// worker no longer holds the command (its lease ran out and another took it).
pub async fn record_success(
    conn: &mut PgConn,
    command_id: String,
    owner: String,
    success: Success,
    messages: Vec<NewOutboxMessage>,
) -> Result<Option<(Vec<i64>, DateTime<Utc>)>, StoreError> {
    let (message_ids, kinds, exchanges, keys, properties, bodies, due) = columns(messages);
    let recorded: Recorded = diesel::sql_query(outcome_statement(
        "status = 'succeeded', attempts = attempts + $3, link_id = $4, payment_link = $5, \
         provider_response = $6, error_kind = NULL, error_message = NULL, http_status = NULL, \
         error_body = NULL",
        7,
    ))
    .bind::<Text, _>(&command_id)
    .bind::<Text, _>(&owner)
    .bind::<Integer, _>(success.attempts)
    .bind::<Nullable<BigInt>, _>(success.link_id)
    .bind::<Text, _>(&success.payment_link)
    .bind::<Text, _>(&success.response_body)
    .bind::<Array<Text>, _>(message_ids)
    .bind::<Array<Text>, _>(kinds)
    .bind::<Array<Text>, _>(exchanges)
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Jsonb>, _>(properties)
    .bind::<Array<Bytea>, _>(bodies)
    .bind::<Array<Timestamptz>, _>(due)
    .get_result(conn)
    .await?;
    Ok(recorded.into_result())
}

/// Records a failure with its event and dead letter atomically; `None` as for success.
pub async fn record_failure(
    conn: &mut PgConn,
    command_id: String,
    owner: String,
    failure: Failure,
    messages: Vec<NewOutboxMessage>,
) -> Result<Option<(Vec<i64>, DateTime<Utc>)>, StoreError> {
    let (message_ids, kinds, exchanges, keys, properties, bodies, due) = columns(messages);
    let recorded: Recorded = diesel::sql_query(outcome_statement(
        "status = 'failed', attempts = attempts + $3, error_kind = $4, error_message = $5, \
         http_status = $6, error_body = $7",
        8,
    ))
    .bind::<Text, _>(&command_id)
    .bind::<Text, _>(&owner)
    .bind::<Integer, _>(failure.attempts)
    .bind::<Text, _>(failure.kind.as_str())
    .bind::<Text, _>(&failure.message)
    .bind::<Nullable<Integer>, _>(failure.http_status.map(i32::from))
    .bind::<Nullable<Text>, _>(&failure.error_body)
    .bind::<Array<Text>, _>(message_ids)
    .bind::<Array<Text>, _>(kinds)
    .bind::<Array<Text>, _>(exchanges)
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Jsonb>, _>(properties)
    .bind::<Array<Bytea>, _>(bodies)
    .bind::<Array<Timestamptz>, _>(due)
    .get_result(conn)
    .await?;
    Ok(recorded.into_result())
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
