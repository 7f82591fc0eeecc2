//! Guarantee: a bad message never reaches the provider and never stalls the queue: each one is
//! dead-lettered at once with kind `validation` and a message saying what is wrong, and the good
//! commands around it go through.

use crate::helpers::*;
use lapin::BasicProperties;
use std::collections::HashMap;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_command_is_dead_lettered_with_its_reason() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(1, "1.00", 1), "application/json"),
        )
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;

    let good = command_body("1.00", 1);
    let props = |id: &str| command_properties(id);
    let huge = format!(
        r#"{{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str)> = vec![
        ("not-json", props("bad-1"), b"hello".to_vec(), "not valid JSON"),
        ("not-utf8", props("bad-2"), vec![0x7b, 0xff, 0xfe, 0x7d], "not valid UTF-8"),
        ("array", props("bad-3"), b"[1,2,3]".to_vec(), "not a command object"),
        ("no-message-id", BasicProperties::default().with_content_type("application/json".into()), good.clone().into_bytes(), "message_id"),
        ("wrong-content-type", props("bad-5").with_content_type("text/plain".into()), good.clone().into_bytes(), "content_type must be application/json"),
        ("too-large", props("bad-6"), huge.into_bytes(), "broker.max_message_bytes"),
        ("missing-provider-id", props("bad-7"), br#"{"amountInMajorCurrency":1,"description":"d"}"#.to_vec(), "paymentProviderId is required"),
        ("string-amount", props("bad-8"), br#"{"paymentProviderId":1,"amountInMajorCurrency":"1.00","description":"d"}"#.to_vec(), "must be a JSON number"),
        ("negative-amount", props("bad-9"), br#"{"paymentProviderId":1,"amountInMajorCurrency":-5,"description":"d"}"#.to_vec(), "greater than zero"),
        ("too-precise", props("bad-10"), br#"{"paymentProviderId":1,"amountInMajorCurrency":0.12345,"description":"d"}"#.to_vec(), "at most 4 digits after"),
        ("absurd-amount", props("bad-11"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1e300,"description":"d"}"#.to_vec(), "at most 16 digits before"),
        ("blank-description", props("bad-12"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":" "}"#.to_vec(), "description must not be blank"),
        ("bad-email", props("bad-13"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"d","emailAddress":"x@"}"#.to_vec(), "emailAddress"),
        ("zero-id", props("bad-14"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"d","invoiceId":0}"#.to_vec(), "invoiceId must be a positive integer"),
    ];
    // Bad and good interleaved: the good ones must not wait behind the bad.
    for (i, (name, properties, body, _)) in cases.iter().enumerate() {
        env.publish_raw(with_header(properties.clone(), "x-test-case", name), body)
            .await;
        env.send(&format!("good-{i}"), &good).await;
    }

    let dead = env
        .messages(&env.dead_letter_queue(), cases.len(), WAIT)
        .await;
    let by_case: HashMap<String, _> = dead
        .iter()
        .map(|m| (m.header("x-test-case").unwrap(), m))
        .collect();
    for (name, _, body, expected) in &cases {
        let letter = by_case
            .get(*name)
            .unwrap_or_else(|| panic!("{name} was dead-lettered"));
        assert_eq!(
            letter.header("x-error-kind").as_deref(),
            Some("validation"),
            "{name}"
        );
        let message = letter.header("x-error-message").unwrap();
        assert!(
            message.contains(expected),
            "{name}: {message:?} should mention {expected:?}"
        );
        assert_eq!(&letter.body, body, "{name}: original body kept");
        assert_eq!(letter.header_int("x-attempts"), Some(0));
    }
    let created = env.messages(&events, cases.len(), WAIT).await;
    assert!(
        created
            .iter()
            .all(|e| e.routing_key == "payment-link.created"),
        "no failed events for invalid commands"
    );
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        cases.len(),
        "only good commands reached the provider"
    );
    eventually("the command queue to drain", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
    assert!(
        env.record("bad-7").await.is_none(),
        "invalid commands leave no record to block a corrected resend"
    );
}
