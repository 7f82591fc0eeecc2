//! Recording a command's outcome with what reports it: a success keeps its created event on the
//! row, a failure writes its failed event and dead letter to the outbox, in the same transaction.
//! One writer (through the [`Batcher`]) records the outcomes of every command that finished while
//! the previous transaction ran, in a few multi-row statements and a single commit; a command's
//! delivery is acked only after the transaction holding its outcome has committed.

use super::batch::{Batcher, Write};
use super::outbox::NewOutboxMessage;
use super::{PgConn, PgPool, StoreError};
use crate::broker::messages::OutboundMessage;
use crate::errors::Failure;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;

/// The link the provider made for a command, and the event that reports it.
#[derive(Clone, Debug)]
pub struct Success {
    /// Every provider call made for the command, this one included.
    pub attempts: i32,
    /// The link's id, when the provider gave one.
    pub link_id: Option<i64>,
    /// The link.
    pub payment_link: String,
    /// The provider's answer, verbatim: the created event's body.
    pub response_body: String,
    /// Kept on the command's row: published again from there if the command comes again.
    pub event: KeptEvent,
}

/// Where a created event went and its properties, as the command's row keeps them; its body is
/// the provider's answer, which the row keeps anyway.
#[derive(Clone, Debug)]
pub struct KeptEvent {
    /// Where it was published.
    pub exchange: String,
    /// With which routing key.
    pub routing_key: String,
    /// Its properties, in the stored JSON form, as text.
    pub properties: String,
}

impl KeptEvent {
    /// What to keep of `event`, a created event.
    pub fn new(event: &OutboundMessage) -> Self {
        Self {
            exchange: event.exchange.clone(),
            routing_key: event.routing_key.clone(),
            properties: crate::broker::messages::properties_to_json_text(&event.properties),
        }
    }
}

/// A command's outcome, as the outcome writer records it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The provider made the link.
    Succeeded(Success),
    /// The command ended without one.
    Failed(Failure),
}

/// What the outcome writer answers: the outbox ids (in the order of the messages) and when the
/// command was first seen, or `None` when this worker no longer held the command.
pub type Recorded = Option<(Vec<i64>, DateTime<Utc>)>;

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

/// One command's outcome and the outbox rows that report it.
#[derive(Clone, Debug)]
pub struct OutcomeRequest {
    /// The command.
    pub command_id: String,
    /// The token of the claim the outcome belongs to: only that claim may record it.
    pub lease_token: String,
    /// What became of it.
    pub outcome: Outcome,
    /// The failed event and dead letter of a failure (empty for a success).
    pub messages: Vec<NewOutboxMessage>,
}

/// The outcome writer, for the commands `owner` holds.
pub struct OutcomeWriter {
    owner: String,
}

/// The running outcome writer.
pub type Outcomes = Batcher<OutcomeWriter>;

impl OutcomeWriter {
    /// Starts the writer for the commands `owner` holds.
    pub fn start(pool: PgPool, owner: String) -> Outcomes {
        Batcher::start(pool, Self { owner })
    }
}

impl Write for OutcomeWriter {
    type Request = OutcomeRequest;
    type Reply = Recorded;
    const NAME: &'static str = "outcome writer";
    const MAX_BATCH: usize = 512;

    async fn write(
        &self,
        conn: &mut PgConn,
        requests: &[OutcomeRequest],
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut recorded = record_batch(conn, requests, &self.owner).await?;
        Ok(requests
            .iter()
            .map(|r| recorded.remove(&r.command_id))
            .collect())
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
    requests: &[OutcomeRequest],
    owner: &str,
) -> Result<std::collections::HashMap<String, (Vec<i64>, DateTime<Utc>)>, StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let (mut successes, mut failures) = (Successes::default(), Failures::default());
        let (mut outbox_command_ids, mut all_messages) = (Vec::new(), Vec::new());
        for request in requests {
            match &request.outcome {
                Outcome::Succeeded(s) => successes.push(request, s),
                Outcome::Failed(f) => failures.push(request, f),
            }
            for message in &request.messages {
                outbox_command_ids.push(request.command_id.clone());
                all_messages.push(message.clone());
            }
        }
        let mut updated = successes.record(conn, owner).await?;
        updated.extend(failures.record(conn, owner).await?);
        let mut recorded: std::collections::HashMap<String, (Vec<i64>, DateTime<Utc>)> = updated
            .into_iter()
            .map(|u| (u.command_id, (Vec::new(), u.created_at)))
            .collect();
        let held: Vec<String> = recorded.keys().cloned().collect();
        if !held.is_empty() && !all_messages.is_empty() {
            let inserted = insert_outbox(conn, outbox_command_ids, all_messages, held).await?;
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

/// The succeeded outcomes of a batch, as the columns of one `unnest`.
#[derive(Default)]
struct Successes {
    ids: Vec<String>,
    tokens: Vec<String>,
    attempts: Vec<i32>,
    link_ids: Vec<Option<i64>>,
    links: Vec<String>,
    bodies: Vec<String>,
    ev_exchanges: Vec<String>,
    ev_keys: Vec<String>,
    ev_properties: Vec<String>,
}

impl Successes {
    fn push(&mut self, request: &OutcomeRequest, s: &Success) {
        self.ids.push(request.command_id.clone());
        self.tokens.push(request.lease_token.clone());
        self.attempts.push(s.attempts);
        self.link_ids.push(s.link_id);
        self.links.push(s.payment_link.clone());
        self.bodies.push(s.response_body.clone());
        self.ev_exchanges.push(s.event.exchange.clone());
        self.ev_keys.push(s.event.routing_key.clone());
        self.ev_properties.push(s.event.properties.clone());
    }

    /// Marks the rows this owner still holds succeeded, with their link and event.
    async fn record(self, conn: &mut PgConn, owner: &str) -> Result<Vec<Updated>, StoreError> {
        if self.ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(diesel::sql_query(
            "UPDATE payment_link_commands AS c SET status = 'succeeded', attempts = u.attempts, \
                 link_id = u.link_id, payment_link = u.payment_link, provider_response = u.response, \
                 event_exchange = u.ev_exchange, event_routing_key = u.ev_key, \
                 event_properties = u.ev_properties::jsonb, \
                 error_kind = NULL, error_message = NULL, http_status = NULL, error_body = NULL, \
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, completed_at = now(), \
                 updated_at = now() \
             FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::text[], $10::text[]) \
                 AS u(command_id, attempts, link_id, payment_link, response, \
                     ev_exchange, ev_key, ev_properties, token) \
             WHERE c.command_id = u.command_id AND c.lease_owner = $9 AND c.status = 'processing' \
                 AND c.lease_token = u.token \
             RETURNING c.command_id, c.created_at",
        )
        .bind::<Array<Text>, _>(self.ids)
        .bind::<Array<Integer>, _>(self.attempts)
        .bind::<Array<Nullable<BigInt>>, _>(self.link_ids)
        .bind::<Array<Text>, _>(self.links)
        .bind::<Array<Text>, _>(self.bodies)
        .bind::<Array<Text>, _>(self.ev_exchanges)
        .bind::<Array<Text>, _>(self.ev_keys)
        .bind::<Array<Text>, _>(self.ev_properties)
        .bind::<Text, _>(owner)
        .bind::<Array<Text>, _>(self.tokens)
        .load::<Updated>(conn)
        .await?)
    }
}

/// The failed outcomes of a batch, as the columns of one `unnest`.
#[derive(Default)]
struct Failures {
    ids: Vec<String>,
    tokens: Vec<String>,
    attempts: Vec<i32>,
    kinds: Vec<String>,
    messages: Vec<String>,
    statuses: Vec<Option<i32>>,
    bodies: Vec<Option<String>>,
}

impl Failures {
    fn push(&mut self, request: &OutcomeRequest, f: &crate::errors::Failure) {
        self.ids.push(request.command_id.clone());
        self.tokens.push(request.lease_token.clone());
        self.attempts.push(f.attempts);
        self.kinds.push(f.kind.as_str().to_owned());
        self.messages.push(f.message.clone());
        self.statuses.push(f.http_status.map(i32::from));
        self.bodies.push(f.error_body.clone());
    }

    /// Marks the rows this owner still holds failed, with why.
    async fn record(self, conn: &mut PgConn, owner: &str) -> Result<Vec<Updated>, StoreError> {
        if self.ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(diesel::sql_query(
            "UPDATE payment_link_commands AS c SET status = 'failed', attempts = u.attempts, \
                 error_kind = u.kind, error_message = u.message, http_status = u.status, error_body = u.body, \
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, completed_at = now(), \
                 updated_at = now() \
             FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::text[], \
                     $8::text[]) \
                 AS u(command_id, attempts, kind, message, status, body, token) \
             WHERE c.command_id = u.command_id AND c.lease_owner = $7 AND c.status = 'processing' \
                 AND c.lease_token = u.token \
             RETURNING c.command_id, c.created_at",
        )
        .bind::<Array<Text>, _>(self.ids)
        .bind::<Array<Integer>, _>(self.attempts)
        .bind::<Array<Text>, _>(self.kinds)
        .bind::<Array<Text>, _>(self.messages)
        .bind::<Array<Nullable<Integer>>, _>(self.statuses)
        .bind::<Array<Nullable<Text>>, _>(self.bodies)
        .bind::<Text, _>(owner)
        .bind::<Array<Text>, _>(self.tokens)
        .load::<Updated>(conn)
        .await?)
    }
}

/// Writes the outbox rows of the commands still `held`, in the order given.
async fn insert_outbox(
    conn: &mut PgConn,
    command_ids: Vec<String>,
    messages: Vec<NewOutboxMessage>,
    held: Vec<String>,
) -> Result<Vec<Inserted>, StoreError> {
    let (message_ids, kinds, exchanges, keys, properties, bodies, due) = columns(messages);
    Ok(diesel::sql_query(
        "INSERT INTO outbox (command_id, message_id, kind, exchange, routing_key, properties, body, next_attempt_at) \
         SELECT m.command_id, m.message_id, m.kind, m.exchange, m.routing_key, m.properties, m.body, m.next_attempt_at \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::bytea[], $8::timestamptz[]) \
             WITH ORDINALITY AS m(command_id, message_id, kind, exchange, routing_key, properties, body, next_attempt_at, ord) \
         WHERE m.command_id = ANY($9) \
         ORDER BY m.ord \
         RETURNING id, command_id",
    )
    .bind::<Array<Text>, _>(command_ids)
    .bind::<Array<Text>, _>(message_ids)
    .bind::<Array<Text>, _>(kinds)
    .bind::<Array<Text>, _>(exchanges)
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Jsonb>, _>(properties)
    .bind::<Array<Bytea>, _>(bodies)
    .bind::<Array<Timestamptz>, _>(due)
    .bind::<Array<Text>, _>(held)
    .load(conn)
    .await?)
}
