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
    #[diesel(sql_type = Text)]
    command_id: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

/// What a claim needs of a command.
struct ClaimRequest {
    command_id: String,
    canonical_request: String,
    payment_provider_id: i64,
    amount: BigDecimal,
    description: String,
    email_address: Option<String>,
    invoice_id: Option<i64>,
    adhoc_invoice_id: Option<i64>,
    customer_id: Option<i64>,
    correlation_id: String,
    replay_count: i32,
}

type ClaimReply = tokio::sync::oneshot::Sender<Result<Option<i32>, String>>;

/// Most claims in one statement.
const CLAIM_BATCH: usize = 512;

/// The one writer of claims: every command that arrives while the previous statement runs is
/// claimed by the next one, a single multi-row `INSERT … ON CONFLICT … RETURNING`. One round trip
/// and one commit serve many commands, instead of one each.
#[derive(Clone)]
pub struct ClaimBatcher {
    tx: tokio::sync::mpsc::UnboundedSender<(ClaimRequest, ClaimReply)>,
}

impl ClaimBatcher {
    /// Starts the writer; `owner` and `lease` are the worker's.
    pub fn start(pool: super::PgPool, owner: String, lease: Duration) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ClaimRequest, ClaimReply)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < CLAIM_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                // One row may not be affected twice by one statement: a second copy of a
                // command in the same batch is answered "not claimed" and looks at the record.
                let mut seen = std::collections::HashSet::new();
                let (unique, repeated): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|(r, _)| seen.insert(r.command_id.clone()));
                for (_, reply) in repeated {
                    let _ = reply.send(Ok(None));
                }
                let result = match pool.get().await {
                    Ok(mut conn) => {
                        claim_batch(&mut conn, unique.iter().map(|(r, _)| r), &owner, lease).await
                    }
                    Err(e) => Err(StoreError::from(e)),
                };
                match result {
                    Ok(claimed) => {
                        for (request, reply) in unique {
                            let _ = reply.send(Ok(claimed.get(&request.command_id).copied()));
                        }
                    }
                    Err(error) => {
                        let error = error.to_string();
                        for (_, reply) in unique {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Claims one command; `Some(attempts made before)` when this worker now holds it.
    async fn claim(&self, envelope: &Envelope) -> Result<Option<i32>, StoreError> {
        let cmd = &envelope.command;
        let request = ClaimRequest {
            command_id: envelope.command_id.as_str().to_owned(),
            canonical_request: envelope.canonical_request.clone(),
            payment_provider_id: cmd.payment_provider_id,
            amount: cmd.amount.value().clone(),
            description: cmd.description.clone(),
            email_address: cmd.email_address.as_ref().map(|e| e.as_str().to_owned()),
            invoice_id: cmd.invoice_id,
            adhoc_invoice_id: cmd.adhoc_invoice_id,
            customer_id: cmd.customer_id,
            correlation_id: envelope.correlation_id.clone(),
            replay_count: envelope.replay_count,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send((request, reply))
            .map_err(|_| StoreError::Batch("the claim writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the claim writer has stopped".into()))?
            .map_err(StoreError::Batch)
    }
}

/// Inserts the commands' rows, or takes over rows whose holder's lease ran out, or re-opens
/// recorded failures an operator replayed; returns the ids now held with their earlier attempts.
async fn claim_batch<'a>(
    conn: &mut PgConn,
    requests: impl Iterator<Item = &'a ClaimRequest>,
    owner: &str,
    lease: Duration,
) -> Result<std::collections::HashMap<String, i32>, StoreError> {
    let mut ids = Vec::new();
    let mut canonical = Vec::new();
    let mut providers = Vec::new();
    let mut amounts = Vec::new();
    let mut descriptions = Vec::new();
    let mut emails = Vec::new();
    let mut invoices = Vec::new();
    let mut adhoc = Vec::new();
    let mut customers = Vec::new();
    let mut correlations = Vec::new();
    let mut replays = Vec::new();
    for r in requests {
        ids.push(r.command_id.clone());
        canonical.push(r.canonical_request.clone());
        providers.push(r.payment_provider_id);
        amounts.push(r.amount.clone());
        descriptions.push(r.description.clone());
        emails.push(r.email_address.clone());
        invoices.push(r.invoice_id);
        adhoc.push(r.adhoc_invoice_id);
        customers.push(r.customer_id);
        correlations.push(r.correlation_id.clone());
        replays.push(r.replay_count);
    }
    let claimed: Vec<Claimed> = diesel::sql_query(
        "INSERT INTO payment_link_commands AS c (command_id, canonical_request, payment_provider_id, \
             amount_in_major_currency, description, email_address, invoice_id, adhoc_invoice_id, \
             customer_id, correlation_id, status, replay_count, lease_owner, lease_expires_at) \
         SELECT u.command_id, u.canonical_request, u.payment_provider_id, u.amount, u.description, \
             u.email_address, u.invoice_id, u.adhoc_invoice_id, u.customer_id, u.correlation_id, \
             'processing', u.replay_count, $12, now() + $13 * interval '1 millisecond' \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::numeric[], $5::text[], $6::text[], \
             $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::int4[]) \
             AS u(command_id, canonical_request, payment_provider_id, amount, description, \
                  email_address, invoice_id, adhoc_invoice_id, customer_id, correlation_id, replay_count) \
         ON CONFLICT (command_id) DO UPDATE SET status = 'processing', \
             lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at, \
             replay_count = GREATEST(c.replay_count, EXCLUDED.replay_count), updated_at = now() \
         WHERE c.canonical_request = EXCLUDED.canonical_request AND ( \
             (c.status = 'processing' AND c.lease_expires_at < now()) \
             OR (c.status = 'failed' AND EXCLUDED.replay_count > c.replay_count)) \
         RETURNING c.command_id, c.attempts",
    )
    .bind::<Array<Text>, _>(ids)
    .bind::<Array<Text>, _>(canonical)
    .bind::<Array<BigInt>, _>(providers)
    .bind::<Array<Numeric>, _>(amounts)
    .bind::<Array<Text>, _>(descriptions)
    .bind::<Array<Nullable<Text>>, _>(emails)
    .bind::<Array<Nullable<BigInt>>, _>(invoices)
    .bind::<Array<Nullable<BigInt>>, _>(adhoc)
    .bind::<Array<Nullable<BigInt>>, _>(customers)
    .bind::<Array<Text>, _>(correlations)
    .bind::<Array<Integer>, _>(replays)
    .bind::<Text, _>(owner)
    .bind::<BigInt, _>(lease.as_millis() as i64)
    .load(conn)
    .await?;
    Ok(claimed
        .into_iter()
        .map(|c| (c.command_id, c.attempts))
        .collect())
}

/// Claims the command for this worker through the batched writer: inserts its row, or takes
/// over a row whose holder's lease ran out, or re-opens a recorded failure an operator replayed.
/// Otherwise the record says why not: finished, held by another worker, or in conflict.
pub async fn claim(
    pool: &super::PgPool,
    batcher: &ClaimBatcher,
    envelope: &Envelope,
) -> Result<Claim, StoreError> {
    // No connection is held while waiting for the writer, which needs one from the same pool.
    let claimed = batcher.claim(envelope).await?;
    if let Some(attempts) = claimed {
        return Ok(Claim::Acquired { attempts });
    }
    let conn = &mut pool.get().await?;
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
