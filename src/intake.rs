//! What the worker accepts of a message's AMQP metadata, and what it carries of it when it
//! publishes a copy. Whoever may publish a command (or write to the dead-letter exchange) sets any
//! header: thousands of them, one near the frame size, tables nested deep, or `CC`/`BCC`, which
//! make the broker copy a message to queues of the publisher's choosing. So:
//! - [`Budget::check`] bounds the headers as a whole, in one linear pass that stops descending at
//!   [`MAX_DEPTH`], before anything else reads the message: a message over budget is dead-lettered
//!   at once, its reason naming the largest headers;
//! - [`carried`] is the only source of the headers of what the worker republishes (delayed
//!   copies, dead letters, replays): an explicit allow-list, each value bounded, so a copy never
//!   carries `CC`/`BCC` or a header nobody named, and always fits in a frame.

use crate::headers;
use crate::text::visible;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

/// Deepest nesting of tables and arrays a header may have; deeper is over budget.
pub const MAX_DEPTH: usize = 8;
/// Most bytes of one carried header's value: a trace context is far smaller.
pub const CARRIED_VALUE_BYTES: usize = 4096;
/// Most bytes of carried headers in all: with the worker's own marks and the properties, a copy
/// stays far below RabbitMQ's smallest frame size (128 KiB), however many names are configured.
pub const CARRIED_TOTAL_BYTES: usize = 32 * 1024;
/// Headers the worker carries from a command to its copies whatever the configuration: the W3C
/// trace context, the producer's publish time, and the worker's own counters.
pub const ALWAYS_CARRIED: [&str; 7] = [
    "traceparent",
    "tracestate",
    headers::PUBLISHED_AT_MS,
    headers::REPLAY_COUNT,
    headers::DELAY_ROUND,
    headers::ATTEMPTS,
    headers::EDITED_FROM,
];
/// Header names the broker routes by: never carried, whatever the configuration says.
pub const ROUTING: [&str; 2] = ["CC", "BCC"];
/// The most header names a refusal lists.
const NAMED: usize = 5;

/// The bound on a message's headers (`broker.max_headers`, `broker.max_header_bytes`).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Most headers.
    pub max_headers: usize,
    /// Most bytes of headers, names and values as the AMQP wire form encodes them.
    pub max_bytes: usize,
}

impl Budget {
    /// The budget the settings give.
    pub fn new(settings: &crate::config::BrokerSettings) -> Self {
        Self {
            max_headers: settings.max_headers,
            max_bytes: settings.max_header_bytes,
        }
    }

    /// `Err(why)` when the message's headers are over the budget, saying by how much and naming
    /// the largest. Linear in the headers' size, whatever their shape.
    pub fn check(&self, properties: &BasicProperties) -> Result<(), String> {
        let Some(headers) = properties.headers() else {
            return Ok(());
        };
        let mut sizes: Vec<(usize, &str, bool)> = Vec::with_capacity(headers.inner().len());
        let mut total = 0usize;
        let mut too_deep = false;
        for (name, value) in headers.inner() {
            let (size, deep) = encoded(value, 0);
            let size = size + 1 + name.as_str().len();
            total = total.saturating_add(size);
            too_deep |= deep;
            sizes.push((size, name.as_str(), deep));
        }
        let count = sizes.len();
        if count <= self.max_headers && total <= self.max_bytes && !too_deep {
            return Ok(());
        }
        // The largest first, then the too deep: what the publisher must change.
        sizes.sort_unstable_by(|a, b| b.2.cmp(&a.2).then(b.0.cmp(&a.0)));
        let named: Vec<String> = sizes
            .iter()
            .take(NAMED)
            .map(|(size, name, deep)| {
                let deep = if *deep { ", nested too deep" } else { "" };
                format!("{:?} ({size} bytes{deep})", shown(name))
            })
            .collect();
        let more = count.saturating_sub(NAMED);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Err(format!(
            "its headers are over the intake budget ({count} headers of {total} bytes{}; at most \
             {} headers of {} bytes, nested at most {MAX_DEPTH} deep: broker.max_headers, \
             broker.max_header_bytes); they were removed from the dead letter: {}{more}",
            if too_deep { ", nested too deep" } else { "" },
            self.max_headers,
            self.max_bytes,
            named.join(", "),
        ))
    }
}

/// The bytes a header table takes on the wire (names and values as AMQP encodes them; what lies
/// deeper than [`MAX_DEPTH`] is not counted): what a publisher can check against the budget.
pub fn header_bytes(headers: &FieldTable) -> usize {
    headers
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + encoded(value, 0).0)
        .sum()
}

/// A header name as a reason quotes it: bounded, every hidden character made visible.
fn shown(name: &str) -> String {
    headers::excerpt(&visible(name), 64)
}

/// The AMQP wire size of a value (its type byte included), and whether it nests deeper than
/// [`MAX_DEPTH`]; what lies below that depth is not visited, so the walk is bounded by the
/// message's size at any shape.
fn encoded(value: &AMQPValue, depth: usize) -> (usize, bool) {
    let payload = match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::Void => 0,
        AMQPValue::FieldArray(array) => {
            if depth >= MAX_DEPTH {
                return (1, true);
            }
            let mut size = 4;
            let mut deep = false;
            for item in array.as_slice() {
                let (s, d) = encoded(item, depth + 1);
                size += s;
                deep |= d;
            }
            return (1 + size, deep);
        }
        AMQPValue::FieldTable(table) => {
            if depth >= MAX_DEPTH {
                return (1, true);
            }
            let mut size = 4;
            let mut deep = false;
            for (name, item) in table.inner() {
                let (s, d) = encoded(item, depth + 1);
                size += 1 + name.as_str().len() + s;
                deep |= d;
            }
            return (1 + size, deep);
        }
    };
    (1 + payload, false)
}

/// The headers a copy of `headers` carries: those in [`ALWAYS_CARRIED`] and `configured`
/// (`broker.carried_headers`), never [`ROUTING`] ones, each only while its value is a plain value
/// of at most [`CARRIED_VALUE_BYTES`] (no table or array), and the configured ones only while
/// they add up to at most [`CARRIED_TOTAL_BYTES`]: a copy that would not fit a frame loses
/// carried headers, never the message.
pub fn carried(headers: Option<&FieldTable>, configured: &[String]) -> FieldTable {
    let mut kept = FieldTable::default();
    let mut total = 0;
    for (name, value) in headers.iter().flat_map(|h| h.inner()) {
        let name_str = name.as_str();
        let always = ALWAYS_CARRIED.contains(&name_str);
        let named = always || configured.iter().any(|c| c == name_str);
        let plain = !matches!(value, AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_));
        let size = encoded(value, 0).0;
        if named
            && plain
            && !ROUTING.contains(&name_str)
            && size <= CARRIED_VALUE_BYTES
            && (always || total + size <= CARRIED_TOTAL_BYTES)
        {
            total += size;
            kept.insert(name.clone(), value.clone());
        }
    }
    kept
}

/// What the worker's copies carry (`broker.carried_headers`) and the marks it signs them with.
#[derive(Clone, Debug)]
pub struct Copies {
    /// The publisher's headers a copy carries beside [`ALWAYS_CARRIED`].
    pub carried: Vec<String>,
    /// The deployment's signature.
    pub marks: crate::marks::Marks,
}

/// Whether a name may be configured in `broker.carried_headers`: not a routing header, not one
/// of the worker's or the broker's own `x-` marks.
pub fn may_carry(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 bytes");
    }
    if ROUTING.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err("CC and BCC route a message to other queues and are never carried");
    }
    if headers::ADDED_ON_FAILURE.contains(&name) || name.starts_with(headers::LAST_DEATH_PREFIX) {
        return Err("is one of the worker's or the broker's own marks");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn with(headers: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(headers)
    }

    fn budget() -> Budget {
        Budget {
            max_headers: 4,
            max_bytes: 100,
        }
    }

    #[test]
    fn within_budget_passes_and_each_bound_is_said() {
        let mut h = FieldTable::default();
        h.insert("a".into(), headers::text("x"));
        assert_eq!(budget().check(&with(h.clone())), Ok(()));
        assert_eq!(budget().check(&BasicProperties::default()), Ok(()));

        let mut many = FieldTable::default();
        for i in 0..5 {
            many.insert(format!("h{i}").into(), AMQPValue::Boolean(true));
        }
        let why = budget().check(&with(many)).unwrap_err();
        assert!(why.contains("5 headers"), "{why}");
        assert!(why.contains("and 0 more") || why.contains("\"h"), "{why}");

        h.insert(
            "big\u{1b}[2J".into(),
            AMQPValue::LongString(LongString::from(vec![b'x'; 200])),
        );
        let why = budget().check(&with(h)).unwrap_err();
        assert!(why.contains("\"big⟨U+001B⟩[2J\" (213 bytes)"), "{why}");
    }

    #[test]
    fn nesting_deeper_than_the_bound_is_refused_without_walking_it() {
        let mut value = AMQPValue::Boolean(true);
        for _ in 0..1_000 {
            value = AMQPValue::FieldArray(FieldArray::from(vec![value]));
        }
        let mut h = FieldTable::default();
        h.insert("deep".into(), value);
        let big = Budget {
            max_headers: 10,
            max_bytes: 1 << 20,
        };
        let why = big.check(&with(h)).unwrap_err();
        assert!(why.contains("nested too deep"), "{why}");
    }

    #[test]
    fn copies_carry_only_named_plain_bounded_headers() {
        let mut h = FieldTable::default();
        h.insert("traceparent".into(), headers::text("00-abc-def-01"));
        h.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(vec![])));
        h.insert("BCC".into(), headers::text("q"));
        h.insert("x-tenant".into(), headers::text("t1"));
        h.insert("unknown".into(), headers::text("u"));
        h.insert(
            "x-big".into(),
            AMQPValue::LongString(LongString::from(vec![b'x'; CARRIED_VALUE_BYTES])),
        );
        let configured = vec!["x-tenant".to_owned(), "x-big".to_owned(), "BCC".to_owned()];
        let kept = carried(Some(&h), &configured);
        let names: Vec<&str> = kept.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["traceparent", "x-tenant"]);

        // However many names are configured, what they carry stays bounded in all.
        let mut many = FieldTable::default();
        let names: Vec<String> = (0..100).map(|i| format!("x-n{i}")).collect();
        for name in &names {
            many.insert(
                name.as_str().into(),
                AMQPValue::LongString(LongString::from(vec![b'v'; 4000])),
            );
        }
        let kept = carried(Some(&many), &names);
        assert!(header_bytes(&kept) <= CARRIED_TOTAL_BYTES + 100 * 8);
        assert!(!kept.inner().is_empty());
        assert!(may_carry("bcc").is_err());
        assert!(may_carry(headers::ERROR_KIND).is_err());
        assert!(may_carry("x-tenant").is_ok());
    }
}
