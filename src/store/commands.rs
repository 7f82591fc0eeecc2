//! The command record: claiming a command (the idempotency decision), and recording its outcome
//! with what reports it: a success keeps its created event on the row, a failure writes its
//! failed event and dead letter to the outbox in the same transaction.

use super::outbox::NewOutboxMessage;
use super::schema::payment_link_commands::dsl as c;
use super::{PgConn, StoreError};
use crate::broker::messages::OutboundMessage;
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

/// The link the provider made for a command, and the event that reports it.
#[derive(Clone, Debug)]
pub struct Success {
    pub attempts: i32,
    pub link_id: Option<i64>,
    pub payment_link: String,
    pub response_body: String,
    /// Kept on the command's row: published again from there if the command comes again.
    pub event: KeptEvent,
}

/// Where a created event went and its properties, as the command's row keeps them; its body is
/// the provider's answer, which the row keeps anyway.
#[derive(Clone, Debug)]
pub struct KeptEvent {
    pub exchange: String,
    pub routing_key: String,
    pub properties: serde_json::Value,
}

impl KeptEvent {
    /// What to keep of `event`, a created event.
    pub fn new(event: &OutboundMessage) -> Self {
        Self {
            exchange: event.exchange.clone(),
            routing_key: event.routing_key.clone(),
            properties: crate::broker::messages::properties_to_json(&event.properties),
        }
    }
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

/// Why a command ended without a link.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
    pub attempts: i32,
    pub http_status: Option<u16>,
    pub error_body: Option<String>,
}

/// A command's outcome, as the outcome writer records it.
#[derive(Clone, Debug)]
pub enum Outcome {
    Succeeded(Success),
    Failed(Failure),
}

/// What the outcome writer answers: the outbox ids (in the order of the messages) and when the
/// command was first seen, or `None` when this worker no longer held the command.
pub type Recorded = Option<(Vec<i64>, DateTime<Utc>)>;

type OutcomeReply = tokio::sync::oneshot::Sender<Result<Recorded, String>>;

struct OutcomeRequest {
    command_id: String,
    outcome: Outcome,
    messages: Vec<NewOutboxMessage>,
}

/// Most outcomes in one transaction.
const OUTCOME_BATCH: usize = 512;

/// The one writer of outcomes: the outcomes of every command that finished while the previous
/// transaction ran are recorded, with their outbox rows, by the next one, in a few multi-row
/// statements and a single commit. A command's delivery is acked only after the transaction
/// holding its outcome has committed (its caller waits for the answer).
#[derive(Clone)]
pub struct OutcomeWriter {
    tx: tokio::sync::mpsc::UnboundedSender<(OutcomeRequest, OutcomeReply)>,
}

#[derive(QueryableByName)]
struct Updated {
    #[diesel(sql_type = Text)]
    command_id: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    command_id: String,
}

impl OutcomeWriter {
    /// Starts the writer for the commands `owner` holds.
    pub fn start(pool: super::PgPool, owner: String) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(OutcomeRequest, OutcomeReply)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < OUTCOME_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let ids: Vec<String> = requests.iter().map(|r| r.command_id.clone()).collect();
                let result = match pool.get().await {
                    Ok(mut conn) => record_batch(&mut conn, requests, &owner).await,
                    Err(e) => Err(StoreError::from(e)),
                };
                match result {
                    Ok(mut recorded) => {
                        for (id, reply) in ids.iter().zip(replies) {
                            let _ = reply.send(Ok(recorded.remove(id)));
                        }
                    }
                    Err(error) => {
                        let error = error.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Records one command's outcome and its outbox rows; returns once they are committed.
    pub async fn record(
        &self,
        command_id: &str,
        outcome: Outcome,
        messages: Vec<NewOutboxMessage>,
    ) -> Result<Recorded, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = OutcomeRequest {
            command_id: command_id.to_owned(),
            outcome,
            messages,
        };
        self.tx
            .send((request, reply))
            .map_err(|_| StoreError::Batch("the outcome writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the outcome writer has stopped".into()))?
            .map_err(StoreError::Batch)
    }
}

/// Outbox rows as column arrays, for `unnest`.
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

/// One transaction: the successes, the failures (each only where `owner` still holds the
/// command), then the outbox rows of the commands that were updated.
async fn record_batch(
    conn: &mut PgConn,
    requests: Vec<OutcomeRequest>,
    owner: &str,
) -> Result<std::collections::HashMap<String, (Vec<i64>, DateTime<Utc>)>, StoreError> {
    use diesel_async::AsyncConnection;
    let owner = owner.to_owned();
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let (mut ok_ids, mut ok_attempts, mut ok_link_ids, mut ok_links, mut ok_bodies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut ev_exchanges, mut ev_keys, mut ev_properties) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bad_ids, mut bad_attempts, mut bad_kinds, mut bad_messages, mut bad_statuses, mut bad_bodies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut outbox_command_ids = Vec::new();
        let mut all_messages = Vec::new();
        for request in requests {
            match request.outcome {
                Outcome::Succeeded(s) => {
                    ok_ids.push(request.command_id.clone());
                    ok_attempts.push(s.attempts);
                    ok_link_ids.push(s.link_id);
                    ok_links.push(s.payment_link);
                    ok_bodies.push(s.response_body);
                    ev_exchanges.push(s.event.exchange);
                    ev_keys.push(s.event.routing_key);
                    ev_properties.push(s.event.properties);
                }
                Outcome::Failed(f) => {
                    bad_ids.push(request.command_id.clone());
                    bad_attempts.push(f.attempts);
                    bad_kinds.push(f.kind.as_str().to_owned());
                    bad_messages.push(f.message);
                    bad_statuses.push(f.http_status.map(i32::from));
                    bad_bodies.push(f.error_body);
                }
            }
            for message in request.messages {
                outbox_command_ids.push(request.command_id.clone());
                all_messages.push(message);
            }
        }
        let mut updated: Vec<Updated> = Vec::new();
        if !ok_ids.is_empty() {
            updated.extend(
                diesel::sql_query(
                    "UPDATE payment_link_commands AS c SET status = 'succeeded', attempts = c.attempts + u.attempts, \
                         link_id = u.link_id, payment_link = u.payment_link, provider_response = u.response, \
                         event_exchange = u.ev_exchange, event_routing_key = u.ev_key, \
                         event_properties = u.ev_properties, \
                         error_kind = NULL, error_message = NULL, http_status = NULL, error_body = NULL, \
                         lease_owner = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now() \
                     FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[], $5::text[], \
                             $6::text[], $7::text[], $8::jsonb[]) \
                         AS u(command_id, attempts, link_id, payment_link, response, \
                             ev_exchange, ev_key, ev_properties) \
                     WHERE c.command_id = u.command_id AND c.lease_owner = $9 AND c.status = 'processing' \
                     RETURNING c.command_id, c.created_at",
                )
                .bind::<Array<Text>, _>(ok_ids)
                .bind::<Array<Integer>, _>(ok_attempts)
                .bind::<Array<Nullable<BigInt>>, _>(ok_link_ids)
                .bind::<Array<Text>, _>(ok_links)
                .bind::<Array<Text>, _>(ok_bodies)
                .bind::<Array<Text>, _>(ev_exchanges)
                .bind::<Array<Text>, _>(ev_keys)
                .bind::<Array<Jsonb>, _>(ev_properties)
                .bind::<Text, _>(&owner)
                .load::<Updated>(conn)
                .await?,
            );
        }
        if !bad_ids.is_empty() {
            updated.extend(
                diesel::sql_query(
                    "UPDATE payment_link_commands AS c SET status = 'failed', attempts = c.attempts + u.attempts, \
                         error_kind = u.kind, error_message = u.message, http_status = u.status, error_body = u.body, \
                         lease_owner = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now() \
                     FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::text[]) \
                         AS u(command_id, attempts, kind, message, status, body) \
                     WHERE c.command_id = u.command_id AND c.lease_owner = $7 AND c.status = 'processing' \
                     RETURNING c.command_id, c.created_at",
                )
                .bind::<Array<Text>, _>(bad_ids)
                .bind::<Array<Integer>, _>(bad_attempts)
                .bind::<Array<Text>, _>(bad_kinds)
                .bind::<Array<Text>, _>(bad_messages)
                .bind::<Array<Nullable<Integer>>, _>(bad_statuses)
                .bind::<Array<Nullable<Text>>, _>(bad_bodies)
                .bind::<Text, _>(&owner)
                .load::<Updated>(conn)
                .await?,
            );
        }
        let mut recorded: std::collections::HashMap<String, (Vec<i64>, DateTime<Utc>)> = updated
            .into_iter()
            .map(|u| (u.command_id, (Vec::new(), u.created_at)))
            .collect();
        let held: Vec<String> = recorded.keys().cloned().collect();
        if !held.is_empty() && !all_messages.is_empty() {
            let (message_ids, kinds, exchanges, keys, properties, bodies, due) = columns(all_messages);
            let inserted: Vec<Inserted> = diesel::sql_query(
                "INSERT INTO outbox (command_id, message_id, kind, exchange, routing_key, properties, body, next_attempt_at) \
                 SELECT m.command_id, m.message_id, m.kind, m.exchange, m.routing_key, m.properties, m.body, m.next_attempt_at \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::bytea[], $8::timestamptz[]) \
                     WITH ORDINALITY AS m(command_id, message_id, kind, exchange, routing_key, properties, body, next_attempt_at, ord) \
                 WHERE m.command_id = ANY($9) \
                 ORDER BY m.ord \
                 RETURNING id, command_id",
            )
            .bind::<Array<Text>, _>(outbox_command_ids)
            .bind::<Array<Text>, _>(message_ids)
            .bind::<Array<Text>, _>(kinds)
            .bind::<Array<Text>, _>(exchanges)
            .bind::<Array<Text>, _>(keys)
            .bind::<Array<Jsonb>, _>(properties)
            .bind::<Array<Bytea>, _>(bodies)
            .bind::<Array<Timestamptz>, _>(due)
            .bind::<Array<Text>, _>(held)
            .load(conn)
            .await?;
            for row in inserted {
                if let Some((ids, _)) = recorded.get_mut(&row.command_id) {
                    ids.push(row.id);
                }
            }
            // Ids come from a sequence in insertion order: sorted, they line up with the messages.
            for (ids, _) in recorded.values_mut() {
                ids.sort_unstable();
            }
        }
        Ok(recorded)
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
