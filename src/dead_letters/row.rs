//! The row for one dead letter: who made it and why (the worker's signed headers, the broker's
//! `x-death` mark, or neither: `foreign`), the ids in its body, and the message itself, each in a
//! form PostgreSQL can hold whatever a publisher put in it, with what was changed to store it
//! said. Anyone may publish into the dead-letter exchange, so nothing here trusts the message.

use super::store::{self, Kind};
use crate::broker::messages::{properties_from_json, properties_to_json};
use crate::config::Settings;
use crate::headers::{self, read_int, read_text};
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::FieldTable;

/// Most bytes kept of a free-text field (description, e-mail, error) in its own column; the
/// message itself is kept whole.
const FIELD_LIMIT: usize = 4096;

/// What a dead letter's row is made from: a delivery's message, apart from the channel it came on.
pub struct Letter {
    /// Its properties and headers.
    pub properties: BasicProperties,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its body.
    pub data: Vec<u8>,
}

impl Letter {
    /// The message of `delivery`.
    pub fn of(delivery: &Delivery) -> Self {
        Self {
            properties: delivery.properties.clone(),
            routing_key: delivery.routing_key.to_string(),
            data: delivery.data.clone(),
        }
    }
}

/// Who made a dead letter, and what it says went wrong.
struct Origin<'a> {
    /// The worker (its mark verified): its headers are believed.
    by_worker: bool,
    /// The broker, from the command queue: the reason is its `x-death` entry's.
    by_broker_from_commands: bool,
    /// The properties believed: all of them for the worker's own, without unsigned counters
    /// otherwise (borrowed where nothing was removed).
    properties: std::borrow::Cow<'a, BasicProperties>,
    kind: Kind,
    error_message: String,
}

impl<'a> Origin<'a> {
    fn of(settings: &Settings, marks: &crate::marks::Marks, letter: &'a Letter) -> Self {
        let death = headers::last_death(&letter.properties);
        // Dead-lettered by the broker from the command queue (expired, delivery limit,
        // rejected, maxlen): the reason is the broker's, whatever x-error-* or
        // x-dead-letter-id headers the command's publisher put on it; its counters only where
        // the worker signed them.
        let by_broker_from_commands = death
            .as_ref()
            .is_some_and(|(_, queue)| *queue == settings.broker.command_queue);
        let by_worker = !by_broker_from_commands && marks.dead_letter_is_ours(&letter.properties);
        let properties = if by_worker {
            std::borrow::Cow::Borrowed(&letter.properties)
        } else {
            marks.verified_counters(&letter.properties)
        };
        let text = |name: &str| read_text(&properties, name).map(|t| column_text(&t));
        let (kind, error_message) = if by_worker {
            (
                // A kind this version does not make (a newer version's) is stored as unknown;
                // the message still says what the dead letter said.
                text(headers::ERROR_KIND)
                    .and_then(|k| Kind::parse(&k))
                    .unwrap_or(Kind::Unknown),
                text(headers::ERROR_MESSAGE).unwrap_or_default(),
            )
        } else if by_broker_from_commands {
            broker_reason(death.as_ref())
        } else {
            let claimed = match (text(headers::ERROR_KIND), text(headers::ERROR_MESSAGE)) {
                (None, None) => "nothing".to_owned(),
                (kind, message) => format!(
                    "{}: {}",
                    kind.unwrap_or_else(|| "no kind".into()),
                    message.unwrap_or_default()
                ),
            };
            (
                Kind::Foreign,
                column_text(&format!(
                    "not made by this worker (no valid mark, and not dead-lettered by the broker \
                     from the command queue); it claims {claimed}"
                )),
            )
        };
        Self {
            by_worker,
            by_broker_from_commands,
            properties,
            kind,
            error_message,
        }
    }
}

/// The body as stored: a letter over broker.max_message_bytes (anyone may write one into the
/// exchange) is kept as its start, like the worker's own dead letter of an oversized command,
/// and that is added to `changes`.
fn kept_body<'a>(body: &'a [u8], limit: usize, changes: &mut Option<String>) -> &'a [u8] {
    if body.len() <= limit {
        return body;
    }
    let prefix = crate::pipeline::fate::OVERSIZED_PREFIX;
    let cut = format!(
        "body of {} bytes, over broker.max_message_bytes: its first {prefix} kept",
        body.len()
    );
    *changes = Some(match changes.take() {
        Some(changes) => format!("{changes}; {cut}"),
        None => cut,
    });
    &body[..prefix]
}

/// The row for one dead letter: its error fields from the worker's signed headers (or the
/// broker's `x-death` mark), the ids in its body where it is JSON, and the message itself. A
/// letter with neither is `foreign`: what it claims is quoted, and its time is its ingestion's.
pub fn to_row(
    settings: &Settings,
    marks: &crate::marks::Marks,
    letter: &Letter,
) -> store::NewDeadLetter {
    let body = &letter.data;
    let origin = Origin::of(settings, marks, letter);
    let properties = &origin.properties;
    let text = |name: &str| read_text(properties, name).map(|t| column_text(&t));
    let int = |name: &str| read_int(properties, name).map(|v| v as i32);
    let json: serde_json::Value = (body.len() <= settings.broker.max_message_bytes)
        .then(|| serde_json::from_slice(body).ok())
        .flatten()
        .unwrap_or_default();
    let id = |field: &str| json.get(field).and_then(serde_json::Value::as_i64);
    let body_text = |field: &str| json.get(field).and_then(|v| v.as_str()).map(column_text);
    let budget = crate::intake::Budget::new(&settings.broker);
    let (stored, mut changes) = storable_properties(properties, budget);
    let kept_body = kept_body(body, settings.broker.max_message_bytes, &mut changes);
    let by_worker = origin.by_worker;
    store::NewDeadLetter {
        dedup_key: dedup_key(properties, letter.routing_key.as_str(), body, by_worker),
        command_id: properties
            .message_id()
            .as_ref()
            .map(|m| column_text(m.as_str()))
            .unwrap_or_default(),
        kind: origin.kind,
        error_message: origin.error_message,
        http_status: int(headers::ERROR_STATUS),
        attempts: int(headers::ATTEMPTS),
        error_body: text(headers::ERROR_BODY),
        // Only the worker's own time is believed: a forged one could pin a letter atop the list.
        failed_at: read_text(properties, headers::FAILED_AT)
            .filter(|_| by_worker)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc)),
        replay_count: int(headers::REPLAY_COUNT)
            .filter(|_| by_worker || origin.by_broker_from_commands)
            .unwrap_or(0),
        payment_provider_id: id("paymentProviderId"),
        invoice_id: id("invoiceId"),
        adhoc_invoice_id: id("adhocInvoiceId"),
        customer_id: id("customerId"),
        description: body_text("description"),
        email: body_text("emailAddress"),
        trace_id: read_text(properties, "traceparent")
            .and_then(|t| t.split('-').nth(1).map(column_text)),
        original_exchange: text(headers::ORIGINAL_EXCHANGE)
            .or_else(|| text("x-first-death-exchange"))
            .unwrap_or_else(|| settings.broker.command_exchange.clone()),
        original_routing_key: text(headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| column_text(letter.routing_key.as_str())),
        properties: stored,
        body: kept_body.to_vec(),
        stored_with_changes: changes,
    }
}

/// The kind and message of a dead letter the broker made itself, from its newest `x-death`
/// entry's reason (an entry without one, or none: the delivery limit, as before reasons were
/// read).
fn broker_reason(death: Option<&(String, String)>) -> (Kind, String) {
    let (reason, queue) = death.map_or(("delivery_limit", ""), |(r, q)| (r.as_str(), q.as_str()));
    let queue = column_text(queue);
    let kind = Kind::from_broker_reason(reason);
    let why = match kind {
        Kind::Expired => format!("its time to live ran out in queue {queue:?}"),
        Kind::Rejected => format!("a consumer of queue {queue:?} rejected it without requeue"),
        Kind::Maxlen => format!("queue {queue:?} was at its length limit"),
        Kind::DeliveryLimit => "after broker.delivery_limit deliveries".to_owned(),
        _ => format!("for a reason it gave as {:?}", column_text(reason)),
    };
    (
        kind,
        format!(
            "dead-lettered by the broker: {why} ({})",
            column_text(reason)
        ),
    )
}

/// Text PostgreSQL can hold in a column: without NUL characters, bounded.
fn column_text(text: &str) -> String {
    headers::excerpt(&text.replace('\0', "\u{FFFD}"), FIELD_LIMIT)
}

/// A hash of the message as it reached the queue (without `x-delivery-count` and RabbitMQ 4.x's
/// `x-acquired-count`, which a redelivery from the dead-letter queue changes), after the worker's dead-letter id when it
/// carries one (`own`): a republish or a redelivery of one letter is stored once, while two
/// different letters that carry the same id (anyone may write one into the dead-letter exchange)
/// are both kept.
fn dedup_key(properties: &BasicProperties, routing_key: &str, body: &[u8], own: bool) -> String {
    let own = read_text(properties, headers::DEAD_LETTER_ID).filter(|_| own);
    let mut kept = FieldTable::default();
    for (name, value) in properties.headers().iter().flat_map(|h| h.inner()) {
        if name.as_str() != headers::DELIVERY_COUNT && name.as_str() != headers::ACQUIRED_COUNT {
            kept.insert(name.clone(), value.clone());
        }
    }
    let mut material = serde_json::to_vec(&properties.clone().with_headers(kept))
        .expect("AMQP properties serialize to JSON");
    material.extend_from_slice(routing_key.as_bytes());
    material.push(0);
    material.extend_from_slice(body);
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &material);
    match own {
        Some(id) => format!("id:{}:{hash}", headers::excerpt(&column_text(&id), 200)),
        None => format!("hash:{hash}"),
    }
}

/// The properties in the stored JSON form; when that form cannot hold them exactly (a header
/// that is not a finite number, a NUL character in a short string), or they are over the intake
/// budget (a letter the worker did not make can carry anything), what was changed to store them
/// is said in the second value. One pass over the headers, whatever their number.
fn storable_properties(
    properties: &BasicProperties,
    budget: crate::intake::Budget,
) -> (serde_json::Value, Option<String>) {
    let mut changes = Vec::new();
    let mut kept = properties.clone();
    if let Some(all) = properties.headers() {
        let over = budget.check(properties).err();
        let mut headers = FieldTable::default();
        let mut dropped = Vec::new();
        let mut dropped_count = 0usize;
        for (name, value) in all.inner() {
            // Over budget, only the marks the worker and the broker read stay.
            let mark = headers::ADDED_ON_FAILURE.contains(&name.as_str())
                || crate::intake::ALWAYS_CARRIED.contains(&name.as_str());
            if (over.is_none() || mark) && headers::storable(name.as_str(), value) {
                headers.insert(name.clone(), value.clone());
            } else if over.is_none() {
                dropped_count += 1;
                if dropped.len() < 5 {
                    dropped.push(format!(
                        "{:?}",
                        crate::text::visible(&column_text(name.as_str()))
                    ));
                }
            }
        }
        if dropped_count > 0 {
            let more = dropped_count - dropped.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            changes.push(format!(
                "header {}{more} dropped (JSON cannot hold its value)",
                dropped.join(", ")
            ));
        }
        if let Some(why) = over {
            changes.push(format!(
                "only the worker's and the broker's marks were kept: {}",
                why.replace(" they were removed from the dead letter:", " the largest:")
            ));
        }
        kept = kept.with_headers(headers);
    }
    let mut json = properties_to_json(&kept);
    let text = json.to_string();
    if text.contains("\\u0000") {
        json = serde_json::from_str(&text.replace("\\u0000", "\\ufffd"))
            .expect("replacing an escape keeps the JSON valid");
        changes.push("NUL characters in properties replaced by U+FFFD".into());
    }
    if changes.is_empty() && properties_from_json(json.clone()).ok().as_ref() != Some(properties) {
        changes.push("properties do not read back exactly from JSON".into());
    }
    (json, (!changes.is_empty()).then(|| changes.join("; ")))
}

/// Most bytes of a refused letter's body its reduced form keeps.
const REDUCED_BODY: usize = 4096;

/// A letter the database refused, as it can always be stored: its ids and reason kept, its
/// properties and all but the start of its body left out, and why said in `stored_with_changes`.
pub fn reduced(row: store::NewDeadLetter, error: &str) -> store::NewDeadLetter {
    let body_len = row.body.len();
    let mut body = row.body;
    body.truncate(REDUCED_BODY);
    store::NewDeadLetter {
        properties: serde_json::json!({}),
        body,
        description: None,
        email: None,
        error_body: None,
        stored_with_changes: Some(column_text(&format!(
            "the database refused the letter as it was ({error}); stored without its properties, \
             with the first {} of its {body_len} body bytes",
            body_len.min(REDUCED_BODY)
        ))),
        ..row
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    #[test]
    fn a_redelivery_has_the_same_key_and_a_changed_message_another() {
        let with = |count: Option<i64>, body: &[u8]| {
            let mut headers = FieldTable::default();
            headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
            if let Some(count) = count {
                headers.insert(
                    headers::DELIVERY_COUNT.into(),
                    AMQPValue::LongLongInt(count),
                );
                headers.insert(
                    headers::ACQUIRED_COUNT.into(),
                    AMQPValue::LongLongInt(count + 2),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id("c-1".into())
                .with_headers(headers);
            dedup_key(&properties, "rk", body, false)
        };
        assert_eq!(with(None, b"{}"), with(Some(3), b"{}"));
        assert_ne!(with(None, b"{}"), with(None, b"{ }"));
        let own = BasicProperties::default().with_headers({
            let mut h = FieldTable::default();
            h.insert(headers::DEAD_LETTER_ID.into(), headers::text("abc"));
            h
        });
        let key = dedup_key(&own, "rk", b"x", true);
        assert!(key.starts_with("id:abc:"), "{key}");
        assert_eq!(
            key,
            dedup_key(&own, "rk", b"x", true),
            "a republish is the same"
        );
        assert_ne!(
            key,
            dedup_key(&own, "rk", b"y", true),
            "another letter, the same id"
        );
        assert!(dedup_key(&own, "rk", b"x", false).starts_with("hash:"));
    }

    #[test]
    fn headers_json_cannot_hold_are_dropped_and_said() {
        let mut h = FieldTable::default();
        h.insert("nan".into(), AMQPValue::Double(f64::NAN));
        h.insert("ok".into(), headers::text("fine"));
        let properties = BasicProperties::default()
            .with_message_id("a\0b".into())
            .with_headers(h);
        let budget = crate::intake::Budget {
            max_headers: 10,
            max_bytes: 1000,
        };
        let (json, changes) = storable_properties(&properties, budget);
        let changes = changes.unwrap();
        assert!(changes.contains("\"nan\" dropped"), "{changes}");
        assert!(changes.contains("NUL"), "{changes}");
        assert!(!json.to_string().contains("\\u0000"));
        let back = properties_from_json(json).unwrap();
        assert_eq!(read_text(&back, "ok").as_deref(), Some("fine"));
        let (_, none) = storable_properties(
            &BasicProperties::default().with_message_id("m".into()),
            budget,
        );
        assert_eq!(none, None);
    }
}
