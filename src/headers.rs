//! Every AMQP header the worker reads or writes, by name, with the typed readers and the one
//! writer of text values. A header name appears as a string literal here and nowhere else in
//! `src/`, so renaming one (or finding who reads it) is a one-file change.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};

/// A deliberate replay increments it; a recorded failure is only attempted again when it grows.
pub const REPLAY_COUNT: &str = "x-replay-count";
/// On a command an operator edited from a dead letter, and on its events: the command id it was
/// edited from.
pub const EDITED_FROM: &str = "x-edited-from";
/// The delay tiers a command has already waited in.
pub const DELAY_ROUND: &str = "x-delay-round";
/// Provider calls made so far (on a dead letter or a delayed command).
pub const ATTEMPTS: &str = "x-attempts";
/// The last provider error a delayed command met.
pub const LAST_ERROR: &str = "x-last-error";
/// A dead letter's error kind (`ErrorKind::as_str`).
pub const ERROR_KIND: &str = "x-error-kind";
/// What went wrong, in words.
pub const ERROR_MESSAGE: &str = "x-error-message";
/// The provider's HTTP status, where there was one.
pub const ERROR_STATUS: &str = "x-error-status";
/// An excerpt of the provider's error body, where there was one.
pub const ERROR_BODY: &str = "x-error-body";
/// A dead letter's own id, set once when the worker dead-letters a command: the store keeps a
/// dead letter that reaches it twice (a republish by the relay, a redelivery) once.
pub const DEAD_LETTER_ID: &str = "x-dead-letter-id";
/// When the worker dead-lettered the command (RFC 3339).
pub const FAILED_AT: &str = "x-failed-at";
/// The exchange the command was first published to (where a replay sends it).
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// The routing key the command was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// The length of a command's body when its dead letter keeps only the start of it (the command
/// was over `broker.max_message_bytes`).
pub const ORIGINAL_BODY_BYTES: &str = "x-original-body-bytes";
/// The worker's signature over a command's counters (`x-replay-count`, `x-delay-round`,
/// `x-attempts`) on a copy it sent back to the command queue (see [`crate::marks`]).
pub const WORKER_MARK: &str = "x-worker-mark";
/// The worker's signature over a dead letter's id, kind, time and replay count.
pub const DEAD_LETTER_MARK: &str = "x-dead-letter-mark";
/// Added by the broker when it dead-letters a message itself (delivery limit, TTL).
pub const DEATH: &str = "x-death";
/// Returns of the message so far, added by a quorum queue on redelivery (on RabbitMQ 4.x only
/// failed returns: `basic.reject`, a closed channel; what the delivery limit counts).
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Every delivery of the message so far, failed or not, added by a quorum queue on RabbitMQ 4.x
/// beside [`DELIVERY_COUNT`]. Like it, it changes with each redelivery, so it is never part of a
/// message's identity.
pub const ACQUIRED_COUNT: &str = "x-acquired-count";
/// When the producer published the command, in milliseconds since the Unix epoch (the name
/// RabbitMQ's `rabbitmq_message_timestamp` plugin uses); preferred over the AMQP `timestamp`
/// property, which has whole seconds only, for the queue-wait figure.
pub const PUBLISHED_AT_MS: &str = "timestamp_in_ms";
/// An event's CloudEvents subject: the command id it reports.
pub const EVENT_SUBJECT: &str = "cloudEvents:subject";
/// Prefix of the broker's own `x-last-death-*` headers.
pub const LAST_DEATH_PREFIX: &str = "x-last-death-";

/// Headers the worker or the broker add when dead-lettering or delaying: never the name of a
/// publisher's header to carry (`broker.carried_headers`).
pub const ADDED_ON_FAILURE: [&str; 20] = [
    DEAD_LETTER_ID,
    WORKER_MARK,
    DEAD_LETTER_MARK,
    ORIGINAL_BODY_BYTES,
    ERROR_KIND,
    ERROR_MESSAGE,
    ERROR_STATUS,
    ERROR_BODY,
    ATTEMPTS,
    FAILED_AT,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    DELAY_ROUND,
    LAST_ERROR,
    DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    DELIVERY_COUNT,
    ACQUIRED_COUNT,
];

/// Most bytes of free text (an error message, a provider's error body) a header added by the
/// worker carries, whatever the input: a dead letter's headers stay far below the frame size.
pub const TEXT_LIMIT: usize = 1024;

/// A text header value (AMQP long string).
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// A header as text, whichever string type the publisher used.
pub fn read_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A header as a non-negative integer, whichever integer type (or decimal text) the publisher
/// used; capped at `i32::MAX` so counters read from it cannot overflow.
pub fn read_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    let value = read_whole(properties, name)?;
    (value >= 0).then_some(value.min(i64::from(i32::MAX)))
}

/// A header as a whole number, unclamped (for times in milliseconds); `None` as for [`read_int`].
pub fn read_whole(properties: &BasicProperties, name: &str) -> Option<i64> {
    Some(match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        _ => return None,
    })
}

/// Whether the broker itself dead-lettered the message (it carries `x-death`).
pub fn has_death(properties: &BasicProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(DEATH))
}

/// The broker's newest `x-death` entry (it keeps the newest first): why it dead-lettered the
/// message (`rejected`, `expired`, `maxlen`, `delivery_limit`) and from which queue.
pub fn last_death(properties: &BasicProperties) -> Option<(String, String)> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get(DEATH)? else {
        return None;
    };
    let AMQPValue::FieldTable(newest) = deaths.as_slice().first()? else {
        return None;
    };
    let field = |name: &str| match newest.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((field("reason")?, field("queue").unwrap_or_default()))
}

/// The name of the first header whose name or value the stored form of a message (JSON in
/// PostgreSQL) cannot hold exactly: the NUL character in a name or a short string (long strings
/// holding it are stored as bytes), or a float that is not finite (JSON has no NaN).
pub fn first_unstorable(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    headers
        .inner()
        .iter()
        .find(|(k, v)| !storable(k.as_str(), v))
        .map(|(k, _)| k.as_str().to_owned())
}

/// Whether the stored form of a message can hold this header exactly (see [`first_unstorable`]).
pub fn storable(name: &str, value: &AMQPValue) -> bool {
    fn unstorable(v: &AMQPValue) -> bool {
        match v {
            AMQPValue::ShortString(s) => s.as_str().contains('\0'),
            AMQPValue::Float(f) => !f.is_finite(),
            AMQPValue::Double(f) => !f.is_finite(),
            AMQPValue::FieldTable(t) => t
                .inner()
                .iter()
                .any(|(k, v)| k.as_str().contains('\0') || unstorable(v)),
            AMQPValue::FieldArray(a) => a.as_slice().iter().any(unstorable),
            _ => false,
        }
    }
    !name.contains('\0') && !unstorable(value)
}

/// The start of `text`, at most `max` bytes cut on a character boundary, with `…` when cut: what
/// an error message, header or log line quotes of a value that may be of any size.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn excerpt_respects_characters_and_marks_the_cut() {
        assert_eq!(excerpt("héllo", 2), "h…");
        assert_eq!(excerpt("abc", 10), "abc");
        assert_eq!(excerpt("abc", 3), "abc");
    }

    #[test]
    fn values_json_cannot_hold_are_named() {
        let with = |name: &str, v: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert("fine".into(), text("a\u{0}b"));
            headers.insert(name.into(), v);
            BasicProperties::default().with_headers(headers)
        };
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::Double(f64::NAN));
        for (name, value) in [
            ("nan", AMQPValue::Double(f64::NAN)),
            ("inf", AMQPValue::Float(f32::INFINITY)),
            ("short", AMQPValue::ShortString("a\u{0}b".into())),
            ("nested", AMQPValue::FieldTable(nested)),
            ("n\u{0}ame", AMQPValue::Boolean(true)),
        ] {
            assert_eq!(first_unstorable(&with(name, value)).as_deref(), Some(name));
        }
        assert_eq!(first_unstorable(&with("ok", AMQPValue::Double(1.5))), None);
    }

    #[test]
    fn integers_are_read_from_any_integer_type_and_capped() {
        let mut headers = FieldTable::default();
        headers.insert("a".into(), AMQPValue::LongLongInt(i64::MAX));
        headers.insert("b".into(), text(" 7 "));
        headers.insert("c".into(), AMQPValue::ShortInt(-1));
        let p = BasicProperties::default().with_headers(headers);
        assert_eq!(read_int(&p, "a"), Some(i64::from(i32::MAX)));
        assert_eq!(read_int(&p, "b"), Some(7));
        assert_eq!(read_int(&p, "c"), None);
        assert_eq!(read_text(&p, "b").as_deref(), Some(" 7 "));
    }
}
