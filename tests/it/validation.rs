//! Guarantee: a bad message never reaches the provider and never stalls the queue: each one is
//! dead-lettered at once with kind `validation` and a message saying what is wrong, and the good
//! commands around it go through.

use crate::helpers::*;
use std::collections::HashMap;
use wiremock::MockServer;

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_command_is_dead_lettered_with_its_reason() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;

    let good = command_body("1.00", 1);
    let cases = bad_commands();
    // Bad and good interleaved: the good ones must not wait behind the bad.
    for (i, case) in cases.iter().enumerate() {
        let properties = with_header(case.properties.clone(), "x-test-case", case.name);
        env.publish_raw(properties, &case.body).await;
        env.send(&format!("good-{i}"), &good).await;
    }

    let dead = env
        .messages(&env.dead_letter_queue(), cases.len(), WAIT)
        .await;
    let by_case: HashMap<String, _> = dead
        .iter()
        .map(|m| (m.header("x-test-case").unwrap(), m))
        .collect();
    for BadCase {
        name,
        body,
        reason: expected,
        ..
    } in &cases
    {
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
        if body.len() > env.settings.broker.max_message_bytes {
            // Over the limit: its first bytes and its length.
            assert!(body.starts_with(&letter.body) && letter.body.len() < body.len());
            assert_eq!(
                letter.header_int("x-original-body-bytes"),
                Some(body.len() as i64),
                "{name}"
            );
        } else {
            assert_eq!(&letter.body, body, "{name}: original body kept");
        }
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
