//! The store invariant, property-based against the real PostgreSQL: whatever the parser
//! accepts (arbitrary JSON fields, arbitrary strings, arbitrary AMQP properties and headers),
//! the store accepts, and a dead letter kept in the outbox reads back exactly as it was built.

use crate::helpers::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use payment_link_worker::broker::messages::{self, EventTarget, Original};
use payment_link_worker::command::Envelope;
use payment_link_worker::errors::{ErrorKind, Failure};
use payment_link_worker::store::claims::{ClaimWriter, Claims};
use payment_link_worker::store::outbox::{self, NewOutboxMessage};
use payment_link_worker::store::outcomes::{
    KeptEvent, Outcome, OutcomeRequest, OutcomeWriter, Outcomes, Success,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn header_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<String>().prop_map(|s| AMQPValue::LongString(LongString::from(s.into_bytes()))),
        ".{0,20}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<u64>().prop_map(AMQPValue::Timestamp),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop::collection::vec((".{0,8}", inner), 0..4).prop_map(|entries| {
            let mut table = FieldTable::default();
            for (name, value) in entries {
                table.insert(name.as_str().into(), value);
            }
            AMQPValue::FieldTable(table)
        })
    })
}

fn properties() -> impl Strategy<Value = BasicProperties> {
    (
        prop_oneof!["[a-zA-Z0-9._-]{1,20}", ".{0,30}"],
        prop::option::of(".{0,30}"),
        prop::collection::vec((".{0,12}", header_value()), 0..5),
    )
        .prop_map(|(message_id, correlation_id, headers)| {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                table.insert(name.as_str().into(), value);
            }
            let mut p = BasicProperties::default()
                .with_message_id(message_id.as_str().into())
                .with_content_type("application/json".into())
                .with_headers(table);
            if let Some(c) = correlation_id {
                p = p.with_correlation_id(c.as_str().into());
            }
            p
        })
}

fn body() -> impl Strategy<Value = String> {
    let amount = prop_oneof![
        3 => "[1-9][0-9]{0,11}(\\.[0-9]{1,4})?",
        1 => "[0-9]{1,18}(\\.[0-9]{1,6})?",
        1 => "-?[0-9]{1,3}(\\.[0-9]{1,3})?[eE][+-]?[0-9]{1,25}",
    ];
    let email = prop_oneof![3 => "[a-z.]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}", 1 => any::<String>()];
    let description = prop_oneof!["[^\\x00]{1,40}", any::<String>()];
    (
        amount,
        description,
        prop::option::of(email),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(amount, description, email, invoice)| {
            let mut body = format!(
                r#"{{"paymentProviderId":3,"amountInMajorCurrency":{amount},"description":{}"#,
                serde_json::to_string(&description).unwrap()
            );
            if let Some(email) = email {
                body.push_str(&format!(
                    r#","emailAddress":{}"#,
                    serde_json::to_string(&email).unwrap()
                ));
            }
            if let Some(invoice) = invoice {
                body.push_str(&format!(r#","invoiceId":{invoice}"#));
            }
            body.push('}');
            body
        })
}

/// Claims the accepted command and records an outcome (a link with its kept event, or a
/// failure with its dead letter in the outbox); every step must be accepted.
async fn store_accepts(
    env: &TestEnv,
    writers: &(Claims, Outcomes),
    properties: &BasicProperties,
    body: &[u8],
    succeed: bool,
) -> Result<(), TestCaseError> {
    let Ok(envelope) = Envelope::parse(properties, body, 1 << 20) else {
        return Ok(());
    };
    let id = envelope.command_id.as_str().to_owned();
    let claimed = writers.0.submit(envelope.clone()).await;
    let Ok(Some((0, lease_token))) = claimed else {
        return Err(TestCaseError::fail(format!("claim of {id:?}: {claimed:?}")));
    };
    let original = Original {
        exchange: "commands",
        routing_key: "create",
        properties,
        body,
    };
    let now = chrono::Utc::now();
    let (outcome, kept) = if succeed {
        let target = EventTarget::new(&env.settings);
        let answer = r#"{"paymentLink":"https://pay/x"}"#;
        let event = messages::created_event(&target, &envelope, answer, now, &[]);
        let success = Success {
            attempts: 1,
            link_id: None,
            payment_link: "https://pay/x".into(),
            response_body: answer.into(),
            event: KeptEvent::new(&event),
        };
        (Outcome::Succeeded(success), Vec::new())
    } else {
        let failure = Failure {
            kind: ErrorKind::ProviderRejected,
            message: "refused".into(),
            http_status: Some(400),
            error_body: None,
            attempts: 1,
        };
        let copies = payment_link_worker::intake::Copies {
            carried: Vec::new(),
            marks: payment_link_worker::marks::Marks::with_key(b"store-invariant"),
        };
        let letter = messages::dead_letter("dlx", &original, &failure, now, &copies);
        (Outcome::Failed(failure), vec![letter])
    };
    let rows = kept
        .iter()
        .map(|m| NewOutboxMessage::new(&id, outbox::DEAD_LETTER, m, Duration::ZERO))
        .collect::<Result<_, _>>()
        .map_err(|e| TestCaseError::fail(format!("{id:?}: {e}")))?;
    let request = OutcomeRequest {
        command_id: id.clone(),
        lease_token,
        outcome,
        messages: rows,
    };
    let recorded = writers.1.submit(request).await;
    prop_assert!(
        matches!(recorded, Ok(Some(_))),
        "outcome of {id:?}: {recorded:?}"
    );
    let event = env.recorded_event(&id).await;
    prop_assert!(
        !succeed || event.is_some(),
        "the kept event of {id:?} reads back"
    );
    for (row, letter) in env.outbox(&id).await.iter().zip(&kept) {
        let back = row
            .message()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            &back,
            letter,
            "the dead letter of {:?} reads back exactly",
            id
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn whatever_the_parser_accepts_the_store_accepts() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let owner = "plw-store-invariant".to_owned();
    let writers = (
        ClaimWriter::start(env.pool.clone(), owner.clone(), env.settings.lease()),
        OutcomeWriter::start(env.pool.clone(), owner),
    );
    let runtime = tokio::runtime::Handle::current();
    let case = AtomicUsize::new(0);
    let accepted = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    // The error (the failing input) is only unwrapped below, so its size does not matter.
    #[allow(clippy::result_large_err)]
    let result = tokio::task::block_in_place(|| {
        runner.run(
            &(properties(), body(), any::<bool>()),
            |(properties, body, succeed)| {
                // Unique command ids, whatever characters the strategy chose.
                let n = case.fetch_add(1, Ordering::Relaxed);
                let id = properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                let properties = properties.with_message_id(format!("{id}#{n}").as_str().into());
                if Envelope::parse(&properties, body.as_bytes(), 1 << 20).is_ok() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                runtime.block_on(store_accepts(
                    &env,
                    &writers,
                    &properties,
                    body.as_bytes(),
                    succeed,
                ))
            },
        )
    });
    result.unwrap();
    assert!(
        accepted.load(Ordering::Relaxed) >= 20,
        "the strategies reach the store often enough ({} accepted)",
        accepted.load(Ordering::Relaxed)
    );
}
