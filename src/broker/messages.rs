//! The messages the worker publishes: the two events of the contract and dead letters. Built
//! here, in one place, so the outbox, the relay and a republish all send the same bytes.

use crate::command::Envelope;
use crate::errors::Failure;
use crate::headers::{self, text};
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

/// `type` of the event that carries a new link.
pub const CREATED: &str = "payment-link.created";
/// `type` of the event that reports a command that ended without a link.
pub const FAILED: &str = "payment-link.failed";
/// AMQP delivery mode that makes the broker write the message to disk.
pub const PERSISTENT: u8 = 2;

/// Namespace of the event ids, so that an event id is a pure function of the command id.
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x8f1e_6c2a_4d7b_4a51_9b3e_2f60_a1c4_d9e7);

/// A message ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundMessage {
    /// Exchange to publish to (empty: the default exchange).
    pub exchange: String,
    /// Routing key (a queue name on the default exchange).
    pub routing_key: String,
    /// AMQP properties and headers.
    pub properties: BasicProperties,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl OutboundMessage {
    /// The message id, for logs and the outbox.
    pub fn message_id(&self) -> &str {
        self.properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            .unwrap_or("")
    }
}

/// The event id of a command's event of one type: the same on every publish.
pub fn event_id(event_type: &str, command_id: &str) -> String {
    uuid::Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{event_type}/{command_id}").as_bytes(),
    )
    .to_string()
}

/// Where events go and what they say about themselves.
#[derive(Clone, Debug)]
pub struct EventTarget {
    /// Exchange the events go to.
    pub exchange: String,
    /// Routing key of `payment-link.created`.
    pub created_routing_key: String,
    /// Routing key of `payment-link.failed`.
    pub failed_routing_key: String,
    /// CloudEvents `source`.
    pub source: String,
}

impl EventTarget {
    /// The target the settings name.
    pub fn new(settings: &crate::config::Settings) -> Self {
        Self {
            exchange: settings.broker.event_exchange.clone(),
            created_routing_key: settings.broker.created_routing_key.clone(),
            failed_routing_key: settings.broker.failed_routing_key.clone(),
            source: settings.events.source.clone(),
        }
    }
}

/// Properties and CloudEvents headers (AMQP binding, binary mode) shared by both events.
fn event_properties(
    target: &EventTarget,
    event_type: &str,
    envelope: &Envelope,
    now: DateTime<Utc>,
    trace: &[(String, String)],
) -> BasicProperties {
    let id = event_id(event_type, envelope.command_id.as_str());
    let mut headers = FieldTable::default();
    headers.insert("cloudEvents:specversion".into(), text("1.0"));
    headers.insert("cloudEvents:id".into(), text(&id));
    headers.insert("cloudEvents:source".into(), text(&target.source));
    headers.insert("cloudEvents:type".into(), text(event_type));
    headers.insert(
        "cloudEvents:time".into(),
        text(&now.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    headers.insert(
        crate::headers::EVENT_SUBJECT.into(),
        text(envelope.command_id.as_str()),
    );
    for (name, value) in trace {
        headers.insert(name.as_str().into(), text(value));
    }
    if let Some(original) = &envelope.edited_from {
        headers.insert(crate::headers::EDITED_FROM.into(), text(original));
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_correlation_id(envelope.correlation_id.clone().into())
        .with_type(event_type.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// `payment-link.created`: the body is the provider's answer exactly as it came. `trace` is the
/// W3C trace context (header name, value) the notifier continues the trace from.
pub fn created_event(
    target: &EventTarget,
    envelope: &Envelope,
    provider_body: &str,
    now: DateTime<Utc>,
    trace: &[(String, String)],
) -> OutboundMessage {
    OutboundMessage {
        exchange: target.exchange.clone(),
        routing_key: target.created_routing_key.clone(),
        properties: event_properties(target, CREATED, envelope, now, trace),
        body: provider_body.as_bytes().to_vec(),
    }
}

/// Body of `payment-link.failed`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FailedBody<'a> {
    command_id: &'a str,
    error_kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invoice_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adhoc_invoice_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<i64>,
}

/// `payment-link.failed`, for a command that ended dead-lettered after reaching the provider.
pub fn failed_event(
    target: &EventTarget,
    envelope: &Envelope,
    failure: &Failure,
    now: DateTime<Utc>,
    trace: &[(String, String)],
) -> OutboundMessage {
    let cmd = &envelope.command;
    let body = serde_json::to_vec(&FailedBody {
        command_id: envelope.command_id.as_str(),
        error_kind: failure.kind.as_str(),
        message: &failure.message,
        http_status: failure.http_status,
        invoice_id: cmd.invoice_id,
        adhoc_invoice_id: cmd.adhoc_invoice_id,
        customer_id: cmd.customer_id,
    })
    .expect("plain fields serialize");
    OutboundMessage {
        exchange: target.exchange.clone(),
        routing_key: target.failed_routing_key.clone(),
        properties: event_properties(target, FAILED, envelope, now, trace),
        body,
    }
}

/// A delivery as the pipeline sees it: what it is parsed from and what a dead letter or a
/// delayed copy is made from.
#[derive(Clone, Copy, Debug)]
pub struct Original<'a> {
    /// Exchange the command was published to.
    pub exchange: &'a str,
    /// Routing key the command was published with.
    pub routing_key: &'a str,
    /// The command's properties and headers.
    pub properties: &'a BasicProperties,
    /// The command's body.
    pub body: &'a [u8],
}

/// A received message's properties, as the worker may publish them again. The broker refuses a
/// `user_id` other than the publisher's own, and a per-message TTL (`expiration`) would make a
/// dead letter or a delayed command vanish: both are left out.
pub fn republishable(p: &BasicProperties) -> BasicProperties {
    let properties = routed_elsewhere_removed(p);
    match p.reply_to() {
        Some(v) => properties.with_reply_to(v.clone()),
        None => properties,
    }
}

/// [`republishable`] without `reply_to` either: what a replay of a dead letter carries, since a
/// property that sends answers elsewhere was set by whoever published the command. Neither
/// copies the headers: each copy takes only those [`crate::intake::carried`] keeps.
pub fn routed_elsewhere_removed(p: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(v) = p.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        properties = properties.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        properties = properties.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = p.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    properties
}

/// A dead letter: the original body and properties, the headers a copy carries (`carried`, see
/// [`crate::intake::carried`]), plus `x-error-*` headers that say why. It keeps the original
/// routing key so a replay goes where the command went. Every header is bounded, so it always
/// fits in a frame.
pub fn dead_letter(
    dead_letter_exchange: &str,
    original: &Original<'_>,
    failure: &Failure,
    now: DateTime<Utc>,
    copies: &crate::intake::Copies,
) -> OutboundMessage {
    let mut headers =
        crate::intake::carried(original.properties.headers().as_ref(), &copies.carried);
    let id = uuid::Uuid::new_v4().to_string();
    headers.insert(headers::DEAD_LETTER_ID.into(), text(&id));
    headers.insert(headers::ERROR_KIND.into(), text(failure.kind.as_str()));
    let bounded = |t: &str| text(&headers::excerpt(t, headers::TEXT_LIMIT));
    headers.insert(headers::ERROR_MESSAGE.into(), bounded(&failure.message));
    if let Some(status) = failure.http_status {
        headers.insert(
            headers::ERROR_STATUS.into(),
            AMQPValue::LongInt(i32::from(status)),
        );
    }
    if let Some(body) = &failure.error_body {
        headers.insert(headers::ERROR_BODY.into(), bounded(body));
    }
    headers.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongInt(failure.attempts),
    );
    headers.insert(
        headers::FAILED_AT.into(),
        text(&now.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    headers.insert(headers::ORIGINAL_EXCHANGE.into(), text(original.exchange));
    headers.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text(original.routing_key),
    );
    let message_id = original.properties.message_id().as_ref();
    copies
        .marks
        .sign_dead_letter(&mut headers, message_id.map_or("", |m| m.as_str()));
    OutboundMessage {
        exchange: dead_letter_exchange.to_owned(),
        routing_key: original.routing_key.to_owned(),
        properties: republishable(original.properties)
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers),
        body: original.body.to_vec(),
    }
}

/// The command again, for a delay queue (through the delay exchange `exchange`, see
/// [`crate::broker::topology::delay_exchange`]): same body and properties, the headers a copy carries
/// (`carried`, see [`crate::intake::carried`]), with the round it is entering and the attempt
/// history so far.
pub fn delayed(
    exchange: &str,
    delay_queue: &str,
    original: &Original<'_>,
    round: usize,
    attempts: i32,
    last_error: &str,
    copies: &crate::intake::Copies,
) -> OutboundMessage {
    let mut headers =
        crate::intake::carried(original.properties.headers().as_ref(), &copies.carried);
    headers.insert(
        headers::DELAY_ROUND.into(),
        AMQPValue::LongInt(round as i32),
    );
    headers.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(attempts));
    let last_error = headers::excerpt(last_error, headers::TEXT_LIMIT);
    headers.insert(headers::LAST_ERROR.into(), text(&last_error));
    let message_id = original.properties.message_id().as_ref();
    copies
        .marks
        .sign_counters(&mut headers, message_id.map_or("", |m| m.as_str()));
    OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key: delay_queue.to_owned(),
        properties: republishable(original.properties)
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers),
        body: original.body.to_vec(),
    }
}

/// Properties as the outbox and the command row keep them: lapin's serde form, except that text
/// headers (every header of our events) are plain JSON strings under `text_headers` rather than
/// arrays of byte numbers, which made a stored event three times larger and slower to write.
/// Rows written in lapin's form alone still read back.
#[derive(Serialize, serde::Deserialize)]
struct StoredProperties {
    #[serde(flatten)]
    properties: BasicProperties,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    text_headers: Vec<(String, String)>,
}

/// Properties to the stored JSON form (see [`properties_from_json`]).
pub fn properties_to_json(properties: &BasicProperties) -> serde_json::Value {
    serde_json::to_value(stored(properties)).expect("AMQP properties serialize to JSON")
}

/// The stored JSON form as text, for a statement that casts it to `jsonb` itself: on the path
/// of every created link, this skips building a `serde_json::Value` tree only to write it out.
pub fn properties_to_json_text(properties: &BasicProperties) -> String {
    serde_json::to_string(&stored(properties)).expect("AMQP properties serialize to JSON")
}

fn stored(properties: &BasicProperties) -> StoredProperties {
    let mut other = FieldTable::default();
    let mut text_headers = Vec::new();
    for (name, value) in properties.headers().iter().flat_map(|h| h.inner()) {
        match value {
            // Text with a NUL stays in lapin's byte form: PostgreSQL's JSON cannot hold `\u0000`.
            AMQPValue::LongString(s)
                if std::str::from_utf8(s.as_bytes()).is_ok() && !s.as_bytes().contains(&0) =>
            {
                let text = String::from_utf8_lossy(s.as_bytes()).into_owned();
                text_headers.push((name.to_string(), text));
            }
            _ => {
                other.insert(name.clone(), value.clone());
            }
        }
    }
    let rest = match properties.headers() {
        Some(_) => properties.clone().with_headers(other),
        None => properties.clone(),
    };
    StoredProperties {
        properties: rest,
        text_headers,
    }
}

/// The stored JSON form back to properties.
pub fn properties_from_json(json: serde_json::Value) -> Result<BasicProperties, serde_json::Error> {
    let stored: StoredProperties = serde_json::from_value(json)?;
    if stored.text_headers.is_empty() {
        return Ok(stored.properties);
    }
    let mut headers = stored.properties.headers().clone().unwrap_or_default();
    for (name, value) in stored.text_headers {
        headers.insert(name.into(), text(&value));
    }
    Ok(stored.properties.with_headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_distinct_per_type() {
        assert_eq!(event_id(CREATED, "c-1"), event_id(CREATED, "c-1"));
        assert_ne!(event_id(CREATED, "c-1"), event_id(CREATED, "c-2"));
        assert_ne!(event_id(CREATED, "c-1"), event_id(FAILED, "c-1"));
    }

    #[test]
    fn properties_survive_the_outbox_round_trip() {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongLongInt(-5));
        headers.insert("s".into(), text("ünïcode"));
        headers.insert("b".into(), AMQPValue::Boolean(true));
        let props = BasicProperties::default()
            .with_message_id("m".into())
            .with_timestamp(7)
            .with_headers(headers);
        let json = properties_to_json(&props);
        assert_eq!(json["text_headers"][0], serde_json::json!(["s", "ünïcode"]));
        let back = properties_from_json(json).unwrap();
        assert_eq!(back, props);
        // Rows written before text headers were stored apart read back too.
        let old = serde_json::to_value(&props).unwrap();
        assert_eq!(properties_from_json(old).unwrap(), props);
    }
}
