//! Step 2, validate: the wire command (AMQP properties and JSON body) is parsed once into a
//! [`Command`] that cannot hold an invalid value. Everything after this module trusts the type;
//! everything this module refuses is dead-lettered with the reason it gives.

use crate::amount::Amount;
use crate::headers::{self, excerpt, read_int};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// How much of an offending value a validation message quotes.
const QUOTE_LIMIT: usize = 60;

/// Why a message is not a valid command. The text goes into the `x-error-message` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(message: impl Into<String>) -> ValidationError {
    ValidationError(message.into())
}

/// Every problem a message has, not only the first, so one dead letter tells the sender all it
/// must fix. Bounded: a command has a handful of fields and each message quotes at most
/// [`QUOTE_LIMIT`] characters of the offending value.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// The value when `checked` passed; otherwise notes why.
    fn take<T>(&mut self, checked: Result<T, ValidationError>) -> Option<T> {
        checked.map_err(|e| self.0.push(e.0)).ok()
    }

    /// Notes a problem.
    fn push(&mut self, message: String) {
        self.0.push(message);
    }

    /// Notes a problem when `bad`.
    fn check(&mut self, bad: bool, message: impl FnOnce() -> String) {
        if bad {
            self.0.push(message());
        }
    }

    /// All problems as one message, or `Ok` when there were none.
    fn into_result(self) -> Result<(), ValidationError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(ValidationError(self.0.concat())),
            n => Err(ValidationError(format!(
                "{n} problems: {}",
                self.0.join("; ")
            ))),
        }
    }
}

/// The command id: the AMQP `message_id`, the idempotency key of everything downstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandId(String);

impl CommandId {
    /// Accepts any non-blank id of printable characters (AMQP limits it to 255 bytes).
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.trim().is_empty() {
            return Err(invalid("message_id (the command id) is empty"));
        }
        if raw.chars().any(char::is_control) {
            return Err(invalid(
                "message_id (the command id) contains control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A well-formed email address (the provider sends the link there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    /// A deliberately plain check: one `@`, a non-empty local part, a dotted domain, no spaces.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let bad = || {
            invalid(format!(
                "emailAddress is not a well-formed email address: {:?}",
                excerpt(raw, QUOTE_LIMIT)
            ))
        };
        if raw.len() > 254 || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = raw.split_once('@').ok_or_else(bad)?;
        let labels_ok = domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
        if local.is_empty()
            || local.len() > 64
            || domain.contains('@')
            || !domain.contains('.')
            || !labels_ok
        {
            return Err(bad());
        }
        Ok(Self(raw.to_owned()))
    }
    /// The address as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A valid "create payment link" command body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Which provider account the link is for.
    pub payment_provider_id: i64,
    /// The exact amount in major currency units.
    pub amount: Amount,
    /// Shown to the payer; never blank.
    pub description: String,
    /// Where the provider sends the link, if anywhere.
    pub email_address: Option<EmailAddress>,
    /// The invoice this link pays, if any.
    pub invoice_id: Option<i64>,
    /// The ad hoc invoice this link pays, if any.
    pub adhoc_invoice_id: Option<i64>,
    /// The customer, if known.
    pub customer_id: Option<i64>,
}

/// The command's fields as they stand on the wire: the one place that names them. Every field
/// is kept as raw JSON, so types are checked by us with messages that name the field, and numbers
/// keep their exact text; the provider request, the canonical form and the `send` tool serialize
/// the same struct.
#[derive(Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireCommand<'a> {
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// Which provider account the link is for (a positive integer).
    pub payment_provider_id: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// The amount, a JSON number in major currency units.
    pub amount_in_major_currency: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// Shown to the payer.
    pub description: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// Where the provider sends the link.
    pub email_address: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// The invoice this link pays.
    pub invoice_id: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// The ad hoc invoice this link pays.
    pub adhoc_invoice_id: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    /// The customer.
    pub customer_id: Option<&'a RawValue>,
}

/// A JSON value as raw JSON, to fill a [`WireCommand`].
pub fn raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("plain values serialize")
}

/// A JSON `null` counts as absent.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

fn required<'a>(field: &str, raw: Option<&'a RawValue>) -> Result<&'a RawValue, ValidationError> {
    present(raw).ok_or_else(|| invalid(format!("{field} is required")))
}

fn positive_id(field: &str, raw: &RawValue) -> Result<i64, ValidationError> {
    match serde_json::from_str::<i64>(raw.get()) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(invalid(format!(
            "{field} must be a positive integer, got {}",
            excerpt(raw.get(), QUOTE_LIMIT)
        ))),
    }
}

fn optional_id(field: &str, raw: Option<&RawValue>) -> Result<Option<i64>, ValidationError> {
    present(raw).map(|r| positive_id(field, r)).transpose()
}

fn string(field: &str, raw: &RawValue) -> Result<String, ValidationError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
        invalid(format!(
            "{field} must be a string, got {}",
            excerpt(raw.get(), QUOTE_LIMIT)
        ))
    })
}

fn checked_description(description: String) -> Result<String, ValidationError> {
    if description.trim().is_empty() {
        return Err(invalid("description must not be blank"));
    }
    if description.contains('\0') {
        return Err(invalid(
            "description contains the NUL character (\\u0000), which PostgreSQL cannot store",
        ));
    }
    Ok(description)
}

impl Command {
    /// Parses and validates a JSON body; every field's problem is reported, not only the first.
    pub fn parse(body: &[u8]) -> Result<Self, ValidationError> {
        let mut problems = Problems::default();
        let command = Self::check(body, &mut problems);
        problems.into_result()?;
        command.ok_or_else(|| invalid("a field failed its check without saying why"))
    }

    /// The command, or `None` with each reason noted in `problems`.
    fn check(body: &[u8], problems: &mut Problems) -> Option<Self> {
        let text = problems.take(
            std::str::from_utf8(body).map_err(|e| invalid(format!("body is not valid UTF-8: {e}"))),
        )?;
        let wire: WireCommand<'_> = problems.take(serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                invalid(format!("body is not a command object: {e}"))
            } else {
                invalid(format!("body is not valid JSON: {e}"))
            }
        }))?;
        let payment_provider_id = problems.take(
            required("paymentProviderId", wire.payment_provider_id)
                .and_then(|r| positive_id("paymentProviderId", r)),
        );
        let amount = problems.take(
            required("amountInMajorCurrency", wire.amount_in_major_currency).and_then(|r| {
                Amount::from_json_number(r.get())
                    .map_err(|e| invalid(format!("amountInMajorCurrency {e}")))
            }),
        );
        let description = problems.take(
            required("description", wire.description)
                .and_then(|r| string("description", r))
                .and_then(checked_description),
        );
        let email_address = problems.take(
            present(wire.email_address)
                .map(|r| string("emailAddress", r).and_then(|s| EmailAddress::parse(&s)))
                .transpose(),
        );
        let invoice_id = problems.take(optional_id("invoiceId", wire.invoice_id));
        let adhoc_invoice_id = problems.take(optional_id("adhocInvoiceId", wire.adhoc_invoice_id));
        let customer_id = problems.take(optional_id("customerId", wire.customer_id));
        match (
            payment_provider_id,
            amount,
            description,
            email_address,
            invoice_id,
            adhoc_invoice_id,
            customer_id,
        ) {
            (Some(p), Some(a), Some(d), Some(e), Some(i), Some(h), Some(c)) => Some(Self {
                payment_provider_id: p,
                amount: a,
                description: d,
                email_address: e,
                invoice_id: i,
                adhoc_invoice_id: h,
                customer_id: c,
            }),
            _ => None,
        }
    }

    /// The provider request body: the command's fields, the amount as the sender wrote it.
    pub fn provider_request_json(&self) -> String {
        self.to_json(self.amount.to_json_number())
    }

    /// The request in canonical form (amount at the stored scale, so 10.0 and 10.00 agree):
    /// what decides whether a second command with the same id is the same request or a conflict.
    pub fn canonical_request_json(&self) -> String {
        self.to_json(self.amount.value().with_scale(4).to_plain_string())
    }

    fn to_json(&self, amount: String) -> String {
        let amount = RawValue::from_string(amount).expect("a plain decimal is a valid JSON number");
        let id = |id: Option<i64>| id.map(|id| raw(&id));
        let (provider, description) = (raw(&self.payment_provider_id), raw(&self.description));
        let email = self.email_address.as_ref().map(|e| raw(e.as_str()));
        let (invoice, adhoc, customer) = (
            id(self.invoice_id),
            id(self.adhoc_invoice_id),
            id(self.customer_id),
        );
        serde_json::to_string(&WireCommand {
            payment_provider_id: Some(&provider),
            amount_in_major_currency: Some(&amount),
            description: Some(&description),
            email_address: email.as_deref(),
            invoice_id: invoice.as_deref(),
            adhoc_invoice_id: adhoc.as_deref(),
            customer_id: customer.as_deref(),
        })
        .expect("serializing plain fields cannot fail")
    }
}

/// A delivery that passed every check, with what the rest of the pipeline needs from its envelope.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The command id (`message_id`).
    pub command_id: CommandId,
    /// The command's own correlation id, or its command id.
    pub correlation_id: String,
    /// How many times an operator has replayed this command (0 for a first delivery).
    pub replay_count: i32,
    /// How many delay tiers the command has already waited in.
    pub delay_round: usize,
    /// Provider calls made in earlier rounds (carried on a delayed copy).
    pub attempts: i32,
    /// The W3C trace context it came with (`traceparent`, `tracestate`), if any.
    pub trace: Vec<(String, String)>,
    /// The command id an operator edited this command from (`x-edited-from`), carried to its
    /// events; a value that could not be a command id (or is over 255 bytes) is ignored.
    pub edited_from: Option<String>,
    /// The validated body.
    pub command: Command,
    /// The provider request body.
    pub request_json: String,
    /// The idempotency comparison form of the request.
    pub canonical_request: String,
}

impl Envelope {
    /// Checks the envelope (size, message id, content type) and then the body.
    pub fn parse(
        properties: &BasicProperties,
        body: &[u8],
        max_bytes: usize,
    ) -> Result<Self, ValidationError> {
        if body.len() > max_bytes {
            return Err(invalid(format!(
                "message is {} bytes, more than the {max_bytes} allowed (broker.max_message_bytes)",
                body.len()
            )));
        }
        let mut problems = Problems::default();
        let command_id = problems.take(match properties.message_id() {
            Some(id) => CommandId::parse(id.as_str()),
            None => Err(invalid("message_id property (the command id) is missing")),
        });
        if let Some(content_type) = properties.content_type() {
            let essence = content_type.as_str().split(';').next().unwrap_or("").trim();
            problems.check(!essence.eq_ignore_ascii_case("application/json"), || {
                format!(
                    "content_type must be application/json, got {:?}",
                    excerpt(content_type.as_str(), QUOTE_LIMIT)
                )
            });
        }
        let correlation_id = properties.correlation_id().as_ref();
        problems.check(
            correlation_id.is_some_and(|c| c.as_str().contains('\0')),
            || "correlation_id contains the NUL character, which PostgreSQL cannot store".into(),
        );
        if let Some(name) = headers::first_unstorable(properties) {
            problems.push(format!(
                "header {:?} holds a value that cannot be stored (the NUL character in a short \
                 string or a name, or a float that is not finite)",
                excerpt(&name, QUOTE_LIMIT)
            ));
        }
        let command = Command::check(body, &mut problems);
        problems.into_result()?;
        let (Some(command_id), Some(command)) = (command_id, command) else {
            return Err(invalid("the envelope failed its check without saying why"));
        };
        let request_json = command.provider_request_json();
        let canonical_request = command.canonical_request_json();
        Ok(Self {
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| command_id.as_str().to_owned()),
            replay_count: read_int(properties, headers::REPLAY_COUNT).unwrap_or(0) as i32,
            delay_round: read_int(properties, headers::DELAY_ROUND).unwrap_or(0) as usize,
            attempts: read_int(properties, headers::ATTEMPTS).map_or(0, |a| a as i32),
            trace: crate::telemetry::carried(properties.headers().as_ref()),
            edited_from: headers::read_text(properties, headers::EDITED_FROM)
                .filter(|id| id.len() <= 255 && CommandId::parse(id).is_ok()),
            command_id,
            command,
            request_json,
            canonical_request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        Command::parse(body.as_bytes()).unwrap_err().0
    }

    #[test]
    fn parses_a_full_command_and_ignores_unknown_fields() {
        let c = Command::parse(
            br#"{"paymentProviderId":3,"amountInMajorCurrency":9999999999999999.99,"description":"Invoice 7",
                "emailAddress":"a.b@example.com","invoiceId":10,"adhocInvoiceId":null,"customerId":5,"extra":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(c.payment_provider_id, 3);
        assert_eq!(c.amount.to_json_number(), "9999999999999999.99");
        assert_eq!(c.email_address.unwrap().as_str(), "a.b@example.com");
        assert_eq!(
            (c.invoice_id, c.adhoc_invoice_id, c.customer_id),
            (Some(10), None, Some(5))
        );
    }

    #[test]
    fn every_problem_is_reported_in_one_bounded_message() {
        let props = BasicProperties::default().with_content_type("text/plain".into());
        let body = format!(
            r#"{{"paymentProviderId":0,"amountInMajorCurrency":"12","description":" ","emailAddress":"no","invoiceId":-{}}}"#,
            "9".repeat(10_000)
        );
        let message = Envelope::parse(&props, body.as_bytes(), 1 << 20)
            .unwrap_err()
            .0;
        assert!(message.starts_with("7 problems: "), "{message}");
        for field in [
            "message_id",
            "content_type",
            "paymentProviderId",
            "amountInMajorCurrency",
            "description",
            "emailAddress",
            "invoiceId",
        ] {
            assert!(message.contains(field), "{field} missing: {message}");
        }
        assert!(message.len() < 1024, "{} bytes: {message}", message.len());
        let one = err(r#"{"paymentProviderId":1,"amountInMajorCurrency":1}"#);
        assert_eq!(one, "description is required");
    }

    #[test]
    fn text_postgresql_cannot_store_is_refused_with_the_field() {
        let body = br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"a\u0000b"}"#;
        assert!(err(std::str::from_utf8(body).unwrap()).contains("description contains the NUL"));
        let props = BasicProperties::default()
            .with_message_id("m".into())
            .with_correlation_id("c\u{0}".into());
        let ok = br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"x"}"#;
        let refused = Envelope::parse(&props, ok, 1 << 20).unwrap_err().0;
        assert!(refused.contains("correlation_id"), "{refused}");
        let long = format!(
            r#"{{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"x","emailAddress":"{}"}}"#,
            "e".repeat(100_000)
        );
        assert!(err(&long).len() < 200, "the message quotes an excerpt");
    }

    #[test]
    fn provider_request_keeps_the_amount_text() {
        let c = Command::parse(
            br#"{"paymentProviderId":1,"amountInMajorCurrency":7.50,"description":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            c.provider_request_json(),
            r#"{"paymentProviderId":1,"amountInMajorCurrency":7.50,"description":"x"}"#
        );
    }

    #[test]
    fn canonical_form_ignores_how_the_amount_was_written() {
        let a = Command::parse(
            br#"{"paymentProviderId":1,"amountInMajorCurrency":10.0,"description":"x"}"#,
        )
        .unwrap();
        let b = Command::parse(
            br#"{"paymentProviderId":1,"amountInMajorCurrency":1e1,"description":"x"}"#,
        )
        .unwrap();
        let c = Command::parse(
            br#"{"paymentProviderId":1,"amountInMajorCurrency":10.01,"description":"x"}"#,
        )
        .unwrap();
        assert_eq!(a.canonical_request_json(), b.canonical_request_json());
        assert_ne!(a.canonical_request_json(), c.canonical_request_json());
        assert!(a.canonical_request_json().contains(":10.0000,"));
    }

    #[test]
    fn names_what_is_wrong() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "not a command object"),
            (
                r#"{"amountInMajorCurrency":1,"description":"x"}"#,
                "paymentProviderId is required",
            ),
            (
                r#"{"paymentProviderId":"1","amountInMajorCurrency":1,"description":"x"}"#,
                "paymentProviderId must be a positive integer",
            ),
            (
                r#"{"paymentProviderId":0,"amountInMajorCurrency":1,"description":"x"}"#,
                "paymentProviderId must be a positive integer",
            ),
            (
                r#"{"paymentProviderId":1.5,"amountInMajorCurrency":1,"description":"x"}"#,
                "paymentProviderId must be a positive integer",
            ),
            (
                r#"{"paymentProviderId":1,"description":"x"}"#,
                "amountInMajorCurrency is required",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":"1","description":"x"}"#,
                "amountInMajorCurrency must be a JSON number",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":-1,"description":"x"}"#,
                "greater than zero",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1.00001,"description":"x"}"#,
                "at most 4 digits after",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1}"#,
                "description is required",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"  "}"#,
                "description must not be blank",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":5}"#,
                "description must be a string",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"x","emailAddress":"nope"}"#,
                "emailAddress is not a well-formed",
            ),
            (
                r#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"x","customerId":-4}"#,
                "customerId must be a positive integer",
            ),
            (
                r#"{"paymentProviderId":1,"paymentProviderId":2,"amountInMajorCurrency":1,"description":"x"}"#,
                "duplicate field",
            ),
        ];
        for (body, expected) in cases {
            let message = err(body);
            assert!(message.contains(expected), "{body}: {message}");
        }
        let message = Command::parse(&[0x7b, 0xff, 0x7d]).unwrap_err().0;
        assert!(message.contains("UTF-8"), "{message}");
    }

    #[test]
    fn email_check() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a", "@b.co", "a@", "a@b", "a b@c.de", "a@b..c", "a@@b.c", "a@-b.c",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn envelope_checks_come_first() {
        let body = br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"x"}"#;
        let no_id = BasicProperties::default();
        assert!(
            Envelope::parse(&no_id, body, 1024)
                .unwrap_err()
                .0
                .contains("message_id")
        );
        let xml = BasicProperties::default()
            .with_message_id("c1".into())
            .with_content_type("text/xml".into());
        assert!(
            Envelope::parse(&xml, body, 1024)
                .unwrap_err()
                .0
                .contains("content_type")
        );
        let ok = BasicProperties::default()
            .with_message_id("c1".into())
            .with_content_type("application/json; charset=utf-8".into());
        assert!(Envelope::parse(&ok, body, 1024).is_ok());
        assert!(
            Envelope::parse(&ok, body, 10)
                .unwrap_err()
                .0
                .contains("broker.max_message_bytes")
        );
        let envelope = Envelope::parse(&ok, body, 1024).unwrap();
        assert_eq!(envelope.correlation_id, "c1");
        assert_eq!(envelope.replay_count, 0);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use bigdecimal::BigDecimal;
    use proptest::prelude::*;
    use std::str::FromStr;

    /// Arbitrary JSON documents, nested a few levels deep.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::hash_map(
                    prop_oneof![
                        Just("paymentProviderId".to_owned()),
                        Just("amountInMajorCurrency".to_owned()),
                        Just("description".to_owned()),
                        Just("emailAddress".to_owned()),
                        Just("invoiceId".to_owned()),
                        "[a-z]{1,8}",
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Command::parse(&bytes);
        }

        /// Numbers of any shape, exponents far beyond an i64 included: an answer, in time linear
        /// in the text, and an accepted amount fits NUMERIC(20,4) exactly.
        #[test]
        fn any_number_text_is_answered_and_accepted_amounts_fit(
            text in "-?[0-9]{1,40}(\\.[0-9]{1,40})?([eE][+-]?[0-9]{1,30})?"
        ) {
            if let Ok(amount) = Amount::from_json_number(&text) {
                let plain = amount.to_json_number();
                let (integer, fraction) = plain.split_once('.').unwrap_or((&plain, ""));
                prop_assert!(integer.trim_start_matches('0').len() <= 16, "{}", plain);
                prop_assert!(fraction.trim_end_matches('0').len() <= 4, "{}", plain);
                prop_assert_eq!(amount.value(), &BigDecimal::from_str(&text).unwrap());
            }
        }

        #[test]
        fn arbitrary_json_never_panics(value in json()) {
            let _ = Command::parse(value.to_string().as_bytes());
        }

        #[test]
        fn valid_commands_keep_their_amount_exactly(
            integer in 0u64..10_000_000_000_000_000,
            fraction in "[0-9]{0,4}",
            provider in 1i64..i64::MAX,
            invoice in prop::option::of(1i64..i64::MAX),
        ) {
            let text = if fraction.is_empty() { integer.to_string() } else { format!("{integer}.{fraction}") };
            let value = BigDecimal::from_str(&text).unwrap();
            prop_assume!(value > 0);
            let invoice_field = invoice.map(|i| format!(r#","invoiceId":{i}"#)).unwrap_or_default();
            let body = format!(r#"{{"paymentProviderId":{provider},"amountInMajorCurrency":{text},"description":"d"{invoice_field}}}"#);
            let command = Command::parse(body.as_bytes()).unwrap();
            prop_assert_eq!(command.amount.value(), &value);
            prop_assert_eq!(command.amount.to_json_number(), text.clone());
            prop_assert_eq!(command.invoice_id, invoice);
            let request = command.provider_request_json();
            let expected = format!(r#""amountInMajorCurrency":{text},"#);
            prop_assert!(request.contains(&expected));
            // Parsing the request again gives the same command.
            prop_assert_eq!(Command::parse(request.as_bytes()).unwrap(), command);
        }
    }
}
