//! The outbox: messages the relay guarantees. A failure's event and dead letter are written with
//! the outcome they report, published with a broker confirm, then marked sent; a created event
//! lands here only when the broker refused it (it is otherwise kept on the command's row).
//! Whatever is still unsent (a nack, an unroutable return, a crash, an outage) is picked up by
//! the relay.

use super::schema::outbox::dsl as o;
use super::{PgConn, StoreError};
use crate::broker::messages::OutboundMessage;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use std::time::Duration;

/// Kind of an outbox row that is an event.
pub const EVENT: &str = "event";
/// Kind of an outbox row that is a dead letter.
pub const DEAD_LETTER: &str = "dead-letter";

/// A row to insert; also what a stored row holds beside its id and the relay's bookkeeping.
#[derive(Clone, Debug, Insertable, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = super::schema::outbox)]
pub struct NewOutboxMessage {
    /// The command it is about.
    pub command_id: String,
    /// The message id it is published with (the event's id).
    pub message_id: String,
    /// The event's or dead letter's kind, for the relay's log and metrics.
    pub kind: String,
    /// The exchange to publish to.
    pub exchange: String,
    /// The routing key to publish with.
    pub routing_key: String,
    /// Its AMQP properties and headers, in the stored JSON form.
    pub properties: serde_json::Value,
    /// The message body.
    pub body: Vec<u8>,
    /// When the relay may next try to publish it.
    pub next_attempt_at: DateTime<Utc>,
}

impl NewOutboxMessage {
    /// Stores `message` for `command_id`; the relay leaves it alone for `grace`, the time the
    /// worker that wrote it needs to publish it itself. Refused when the stored form of its
    /// properties would not read back exactly: a row the relay could never publish is not written.
    pub fn new(
        command_id: &str,
        kind: &str,
        message: &OutboundMessage,
        grace: Duration,
    ) -> Result<Self, StoreError> {
        use crate::broker::messages::{properties_from_json, properties_to_json};
        let properties = properties_to_json(&message.properties);
        if properties_from_json(properties.clone()).ok().as_ref() != Some(&message.properties) {
            return Err(StoreError::Refused(format!(
                "the {kind} {} would not read back from its stored form",
                message.message_id()
            )));
        }
        Ok(Self {
            command_id: command_id.to_owned(),
            message_id: message.message_id().to_owned(),
            kind: kind.to_owned(),
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            properties,
            body: message.body.clone(),
            next_attempt_at: Utc::now() + grace,
        })
    }
}

/// A stored row: the message as it was written (read through `Deref`), with the relay's
/// bookkeeping.
#[derive(Clone, Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = super::schema::outbox)]
pub struct OutboxRecord {
    /// Its id in the outbox.
    pub id: i64,
    /// What was written.
    #[diesel(embed)]
    pub written: NewOutboxMessage,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Tries the relay made.
    pub publish_attempts: i32,
    /// Why the relay's last try failed, if it did.
    pub last_error: Option<String>,
    /// When the broker confirmed it; none while unsent.
    pub sent_at: Option<DateTime<Utc>>,
}

impl std::ops::Deref for OutboxRecord {
    type Target = NewOutboxMessage;
    fn deref(&self) -> &NewOutboxMessage {
        &self.written
    }
}

impl OutboxRecord {
    /// The message as it is to be published.
    pub fn message(&self) -> Result<OutboundMessage, serde_json::Error> {
        Ok(OutboundMessage {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            properties: crate::broker::messages::properties_from_json(self.properties.clone())?,
            body: self.body.clone(),
        })
    }
}

/// The newest event recorded for a command, to publish again when the command comes again.
pub async fn latest_event(
    conn: &mut PgConn,
    command_id: &str,
) -> Result<Option<OutboxRecord>, StoreError> {
    Ok(o::outbox
        .filter(o::command_id.eq(command_id))
        .filter(o::kind.eq(EVENT))
        .order(o::id.desc())
        .select(OutboxRecord::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Marks rows the broker confirmed.
pub async fn mark_sent(
    conn: &mut diesel_async::AsyncPgConnection,
    ids: &[i64],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::update(o::outbox.filter(o::id.eq_any(ids)))
        .set((
            o::sent_at.eq(Some(Utc::now())),
            o::publish_attempts.eq(o::publish_attempts + 1),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a failed publish and when the relay should try again: doubling from one second per
/// failed attempt, capped at `max_wait`.
pub async fn mark_failed(
    conn: &mut diesel_async::AsyncPgConnection,
    id: i64,
    earlier_attempts: i32,
    error: &str,
    max_wait: Duration,
) -> Result<(), StoreError> {
    diesel::update(o::outbox.find(id))
        .set((
            o::publish_attempts.eq(o::publish_attempts + 1),
            o::last_error.eq(error),
            o::next_attempt_at.eq(Utc::now() + retry_wait(earlier_attempts, max_wait)),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// How long the relay waits after a failed publish: doubling from one second per failed
/// attempt, capped at `max_wait`.
fn retry_wait(earlier_attempts: i32, max_wait: Duration) -> Duration {
    Duration::from_secs(1u64 << earlier_attempts.clamp(0, 20)).min(max_wait)
}

/// Stores a message the broker did not take (its first publish failed with `error`) so that
/// the relay publishes it: the attempt is counted and the relay waits as after any failure.
pub async fn hand_to_relay(
    conn: &mut PgConn,
    command_id: &str,
    kind: &str,
    message: &OutboundMessage,
    error: &str,
    max_wait: Duration,
) -> Result<(), StoreError> {
    let row = NewOutboxMessage::new(command_id, kind, message, retry_wait(0, max_wait))?;
    diesel::insert_into(o::outbox)
        .values((row, o::publish_attempts.eq(1), o::last_error.eq(error)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Claims up to `limit` due, unsent rows for this relay, in one short statement: each is made due
/// again only after `lease`, so other replicas' relays leave it alone while this one publishes it,
/// outside any transaction (and take it over if this one dies).
pub async fn claim_due(
    conn: &mut diesel_async::AsyncPgConnection,
    limit: i64,
    lease: Duration,
) -> Result<Vec<OutboxRecord>, StoreError> {
    Ok(diesel::sql_query(
        "UPDATE outbox SET next_attempt_at = now() + $2 * interval '1 millisecond' \
         WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= now() \
                      ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING *",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .bind::<diesel::sql_types::BigInt, _>(lease.as_millis() as i64)
    .load::<OutboxRecord>(conn)
    .await
    .map(|mut rows| {
        rows.sort_by_key(|r| r.id);
        rows
    })?)
}

/// Makes claimed rows this relay will not publish now due again at once.
pub async fn release(
    conn: &mut diesel_async::AsyncPgConnection,
    ids: &[i64],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::update(
        o::outbox
            .filter(o::id.eq_any(ids))
            .filter(o::sent_at.is_null()),
    )
    .set(o::next_attempt_at.eq(diesel::dsl::now))
    .execute(conn)
    .await?;
    Ok(())
}

/// How many rows wait to be published.
pub async fn unsent_count(conn: &mut PgConn) -> Result<i64, StoreError> {
    Ok(unsent(conn).await?.0)
}

/// How many rows the relay has still to send, and when the oldest of them was written.
pub async fn unsent(conn: &mut PgConn) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
    Ok(o::outbox
        .filter(o::sent_at.is_null())
        .select((diesel::dsl::count_star(), diesel::dsl::min(o::created_at)))
        .first(conn)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};

    fn message(value: AMQPValue) -> OutboundMessage {
        let mut headers = FieldTable::default();
        headers.insert("h".into(), value);
        OutboundMessage {
            exchange: "x".into(),
            routing_key: "k".into(),
            properties: BasicProperties::default()
                .with_message_id("m".into())
                .with_headers(headers),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_row_is_written_only_if_it_reads_back() {
        let ok = NewOutboxMessage::new(
            "c",
            DEAD_LETTER,
            &message(AMQPValue::Double(1.5)),
            Duration::ZERO,
        );
        assert!(ok.is_ok());
        let nan = NewOutboxMessage::new(
            "c",
            DEAD_LETTER,
            &message(AMQPValue::Double(f64::NAN)),
            Duration::ZERO,
        );
        assert!(matches!(nan, Err(StoreError::Refused(_))), "{nan:?}");
    }
}
