//! Guarantee: a command id reused for a different request is an idempotency conflict: it is
//! dead-lettered, and the earlier link is neither reused nor changed.

use crate::helpers::*;
use bigdecimal::BigDecimal;
use std::str::FromStr;
use wiremock::MockServer;

#[tokio::test(flavor = "multi_thread")]
async fn same_id_with_another_body_is_dead_lettered_as_a_conflict() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 6, "10.00", 30).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;

    env.send("cmd-conflict", &command_body("10.00", 30)).await;
    env.next_message(&events, WAIT).await;
    // Same values written differently are the same request, not a conflict.
    env.send("cmd-conflict", &command_body("10.0", 30)).await;
    let again = env.next_message(&events, WAIT).await;
    assert_eq!(again.routing_key, "payment-link.created");

    let other = command_body("11.00", 30);
    env.send("cmd-conflict", &other).await;
    let dead = env.next_message(&env.dead_letter_queue(), WAIT).await;
    assert_eq!(
        dead.header("x-error-kind").as_deref(),
        Some("idempotency-conflict")
    );
    assert!(
        dead.header("x-error-message")
            .unwrap()
            .contains("cmd-conflict")
    );
    assert_eq!(dead.body, other.as_bytes());

    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    let record = env.record("cmd-conflict").await.unwrap();
    assert_eq!(record.status, "succeeded");
    assert_eq!(
        record.amount_in_major_currency,
        BigDecimal::from_str("10").unwrap()
    );
    assert!(
        env.try_get(&events).await.is_none(),
        "a conflict publishes no event"
    );
}
