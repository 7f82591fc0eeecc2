//! Guarantees: transient provider failures are retried with backoff and end in one link;
//! permanent ones are not retried, are dead-lettered with the reason and reported by a
//! `payment-link.failed` event; only a deliberate replay attempts a recorded failure again.

use crate::helpers::*;
use payment_link_worker::broker::messages::FAILED;
use std::time::Duration;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn two_503s_then_201_make_one_link() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("busy"))
        .up_to_n_times(2)
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "12.34", 5).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("cmd-503", &command_body("12.34", 5)).await;

    let event = env.next_message(&events, WAIT).await;
    assert_eq!(event.routing_key, "payment-link.created");
    let requests = provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(
            request.headers.get("idempotency-key").unwrap(),
            "cmd-503",
            "every retry has the same key"
        );
    }
    let record = env.record("cmd-503").await.unwrap();
    assert_eq!((record.status.as_str(), record.attempts), ("succeeded", 3));
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_and_unauthorized_calls_are_dead_lettered_once_with_their_reason() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "cmd-400"))
        .respond_with(
            ResponseTemplate::new(400).set_body_string(r#"{"error":"description too long"}"#),
        )
        .mount(&provider)
        .await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "cmd-401"))
        .respond_with(ResponseTemplate::new(401).set_body_string("token expired"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    let body_400 = command_body("1.00", 400);
    env.send("cmd-400", &body_400).await;
    env.send("cmd-401", &command_body("1.00", 401)).await;

    let mut dead = env.messages(&env.dead_letter_queue(), 2, WAIT).await;
    dead.sort_by_key(|m| m.message_id());
    let (rejected, auth) = (&dead[0], &dead[1]);
    assert_eq!(rejected.message_id(), "cmd-400");
    assert_eq!(
        rejected.body,
        body_400.as_bytes(),
        "dead letter keeps the original body"
    );
    assert_eq!(
        rejected.routing_key, env.settings.broker.command_routing_key,
        "and the routing key"
    );
    assert_eq!(
        rejected.header("x-error-kind").as_deref(),
        Some("provider-rejected")
    );
    assert_eq!(rejected.header_int("x-error-status"), Some(400));
    assert_eq!(
        rejected.header("x-error-body").as_deref(),
        Some(r#"{"error":"description too long"}"#)
    );
    assert_eq!(rejected.header_int("x-attempts"), Some(1));
    assert!(rejected.header("x-error-message").unwrap().contains("400"));
    assert_eq!(
        rejected.header("x-original-exchange").as_deref(),
        Some(env.settings.broker.command_exchange.as_str())
    );
    assert_eq!(
        rejected.header("x-original-routing-key").as_deref(),
        Some("payment-link.create")
    );
    assert!(chrono::DateTime::parse_from_rfc3339(&rejected.header("x-failed-at").unwrap()).is_ok());
    assert_eq!(auth.message_id(), "cmd-401");
    assert_eq!(
        auth.header("x-error-kind").as_deref(),
        Some("provider-auth")
    );
    assert_eq!(auth.header_int("x-error-status"), Some(401));

    let mut failed = env.messages(&events, 2, WAIT).await;
    failed.sort_by_key(|m| m.json()["commandId"].as_str().unwrap().to_owned());
    let event = &failed[0];
    assert_eq!(event.routing_key, "payment-link.failed");
    assert_eq!(event.properties.kind().as_ref().unwrap().as_str(), FAILED);
    let body = event.json();
    assert_eq!(body["commandId"], "cmd-400");
    assert_eq!(body["errorKind"], "provider-rejected");
    assert_eq!(body["httpStatus"], 400);
    assert_eq!(body["invoiceId"], 400);
    assert_eq!(body["customerId"], 99);
    assert!(
        body.get("adhocInvoiceId").is_none(),
        "unknown ids are left out"
    );
    assert_eq!(failed[1].json()["errorKind"], "provider-auth");

    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "no retries of permanent failures"
    );
    let record = env.record("cmd-400").await.unwrap();
    assert_eq!(record.status, "failed");
    assert_eq!(record.error_kind.as_deref(), Some("provider-rejected"));
    assert_eq!(record.http_status, Some(400));

    // Dead-lettered exactly once: once every outbox row is marked sent, the relay has nothing
    // left to publish again, and no second copy of either dead letter or event is there.
    for id in ["cmd-400", "cmd-401"] {
        eventually(
            &format!("{id}'s outbox rows to be marked sent"),
            WAIT,
            || async {
                let rows = env.outbox(id).await;
                (rows.len() == 2 && rows.iter().all(|r| r.sent_at.is_some())).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "one dead letter each"
    );
    assert_eq!(env.queue_depth(&events).await, 0, "one failed event each");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_past_the_budget_end_as_retries_exhausted() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "0"))
        .mount(&provider)
        .await;
    let env = TestEnv::with(&provider.uri(), &[("RETRY__MAX_ELAPSED_MS", "600")]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("cmd-exhaust", &command_body("2.00", 6)).await;

    let dead = env.next_message(&env.dead_letter_queue(), WAIT).await;
    assert_eq!(
        dead.header("x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(dead.header_int("x-error-status"), Some(503));
    let calls = provider.received_requests().await.unwrap().len() as i64;
    assert!(calls >= 2, "it retried: {calls} calls");
    assert_eq!(dead.header_int("x-attempts"), Some(calls));
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(event.json()["errorKind"], "retries-exhausted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_call_is_retried() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(2, "5.00", 7), "application/json")
                .set_delay(Duration::from_secs(3)),
        )
        .up_to_n_times(1)
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 2, "5.00", 7).await;
    let env = TestEnv::with(&provider.uri(), &[("PROVIDER__TIMEOUT_MS", "300")]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("cmd-timeout", &command_body("5.00", 7)).await;

    let event = env.next_message(&events, WAIT).await;
    assert_eq!(event.routing_key, "payment-link.created");
    assert_eq!(env.record("cmd-timeout").await.unwrap().attempts, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_failure_is_retried_only_on_a_deliberate_replay() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("bad"))
        .up_to_n_times(1)
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 3, "4.00", 8).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    let body = command_body("4.00", 8);

    env.send("cmd-replay", &body).await;
    let failed = env.next_message(&events, WAIT).await;
    assert_eq!(failed.routing_key, "payment-link.failed");
    env.next_message(&env.dead_letter_queue(), WAIT).await;

    // A plain redelivery repeats the recorded outcome: same failed event, no call.
    env.send("cmd-replay", &body).await;
    let again = env.next_message(&events, WAIT).await;
    assert_eq!(again.message_id(), failed.message_id());
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);

    // A publisher's own replay count, without the worker's mark, is not believed: a plain
    // redelivery again.
    let forged = with_int_header(
        command_properties("cmd-replay"),
        "x-replay-count",
        2147483647,
    );
    env.publish_raw(forged, body.as_bytes()).await;
    let again = env.next_message(&events, WAIT).await;
    assert_eq!(again.message_id(), failed.message_id());
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);

    // A replay (replay count above the recorded one, signed as a replay signs it) tries again.
    let replay = env.signed_counters(with_int_header(
        command_properties("cmd-replay"),
        "x-replay-count",
        1,
    ));
    env.publish_raw(replay, body.as_bytes()).await;
    let created = env.next_message(&events, WAIT).await;
    assert_eq!(created.routing_key, "payment-link.created");
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
    let record = env.record("cmd-replay").await.unwrap();
    assert_eq!(
        (record.status.as_str(), record.replay_count, record.attempts),
        ("succeeded", 1, 2)
    );
    assert!(record.error_kind.is_none());
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "no second dead letter"
    );

    // Coming again now, it gets the link's event, not the older failed one still in the outbox.
    env.send("cmd-replay", &body).await;
    let latest = env.next_message(&events, WAIT).await;
    assert_eq!(latest.routing_key, "payment-link.created");
    assert_eq!(latest.message_id(), created.message_id());
    assert_eq!(provider.received_requests().await.unwrap().len(), 2);
}
