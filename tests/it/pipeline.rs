//! The pipeline step driven directly, without a consumer: a context built by the test harness,
//! a delivery made by hand, and each fate checked as `process` returns it, then carried out by
//! `settle` against the real broker.

use crate::helpers::*;
use payment_link_worker::broker::messages::{CREATED, Original, event_id};
use payment_link_worker::errors::ErrorKind;
use payment_link_worker::pipeline::{self, Disposition, Fate};
use payment_link_worker::store::commands::{FAILED, SUCCEEDED};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn original<'a>(
    env: &'a TestEnv,
    properties: &'a lapin::BasicProperties,
    body: &'a [u8],
) -> Original<'a> {
    Original {
        exchange: &env.settings.broker.command_exchange,
        routing_key: &env.settings.broker.command_routing_key,
        properties,
        body,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_delivery_is_to_be_dead_lettered_and_settling_publishes_it() {
    let provider = MockServer::start().await;
    let env = TestEnv::new(&provider.uri()).await;
    let context = env.context().await;
    let properties = command_properties("direct-invalid");
    let delivery = original(&env, &properties, br#"{"paymentProviderId":0}"#);

    let fate = pipeline::process(&context, &delivery).await;
    let Fate::DeadLetter(failure) = &fate else {
        panic!("expected a dead letter, got {fate:?}")
    };
    assert_eq!(failure.kind, ErrorKind::Validation);
    assert!(
        failure.message.contains("paymentProviderId"),
        "{}",
        failure.message
    );
    assert_eq!(failure.attempts, 0);
    assert!(
        env.record("direct-invalid").await.is_none(),
        "nothing is recorded"
    );

    assert_eq!(
        pipeline::settle(&context, &delivery, fate).await,
        Disposition::Ack
    );
    let letter = env.next_message(&env.dead_letter_queue(), WAIT).await;
    assert_eq!(letter.message_id(), "direct-invalid");
    assert_eq!(letter.header("x-error-kind").as_deref(), Some("validation"));
    assert!(provider.received_requests().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_is_to_be_published_and_a_duplicate_gets_the_same_event_without_a_call() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 41, "41.00", 41).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let context = env.context().await;
    let properties = command_properties("direct-link");
    let body = command_body("41.00", 41);
    let delivery = original(&env, &properties, body.as_bytes());

    let first = pipeline::process(&context, &delivery).await;
    let Fate::Publish { command_id, event } = &first else {
        panic!("expected an event to publish, got {first:?}")
    };
    assert_eq!(command_id, "direct-link");
    assert_eq!(event.message_id(), event_id(CREATED, "direct-link"));
    assert_eq!(event.body, provider_answer(41, "41.00", 41).as_bytes());
    let record = env.record("direct-link").await.expect("recorded");
    assert_eq!((record.status.as_str(), record.attempts), (SUCCEEDED, 1));

    let again = pipeline::process(&context, &delivery).await;
    let Fate::Publish {
        event: repeated, ..
    } = &again
    else {
        panic!("expected the recorded event again, got {again:?}")
    };
    assert_eq!(repeated.message_id(), event.message_id());
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);

    assert_eq!(
        pipeline::settle(&context, &delivery, first).await,
        Disposition::Ack
    );
    let published = env.next_message(&events, WAIT).await;
    assert_eq!(published.message_id(), event_id(CREATED, "direct-link"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_command_id_is_to_be_dead_lettered_as_a_conflict() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 42, "42.00", 42).await;
    let env = TestEnv::new(&provider.uri()).await;
    let context = env.context().await;
    let properties = command_properties("direct-conflict");
    let body = command_body("42.00", 42);
    let first = pipeline::process(&context, &original(&env, &properties, body.as_bytes())).await;
    assert!(matches!(first, Fate::Publish { .. }), "{first:?}");

    let other = command_body("43.00", 42);
    let fate = pipeline::process(&context, &original(&env, &properties, other.as_bytes())).await;
    let Fate::DeadLetter(failure) = &fate else {
        panic!("expected a conflict, got {fate:?}")
    };
    assert_eq!(failure.kind, ErrorKind::IdempotencyConflict);
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_call_is_recorded_with_its_failed_event_and_dead_letter() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("{\"error\":\"bad amount\"}"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let context = env.context().await;
    let properties = command_properties("direct-rejected");
    let body = command_body("44.00", 44);
    let delivery = original(&env, &properties, body.as_bytes());

    let fate = pipeline::process(&context, &delivery).await;
    let Fate::PublishRecorded(rows) = &fate else {
        panic!("expected recorded rows to publish, got {fate:?}")
    };
    let exchanges: Vec<&str> = rows.iter().map(|(_, m)| m.exchange.as_str()).collect();
    assert_eq!(
        exchanges,
        [
            env.settings.broker.event_exchange.as_str(),
            env.settings.broker.dead_letter_exchange.as_str()
        ]
    );
    let record = env.record("direct-rejected").await.expect("recorded");
    assert_eq!(record.status, FAILED);
    assert_eq!(record.error_kind.as_deref(), Some("provider-rejected"));
    assert_eq!(record.attempts, 1);
    assert_eq!(env.outbox("direct-rejected").await.len(), 2);
    assert_eq!(
        pipeline::settle(&context, &delivery, fate).await,
        Disposition::Ack
    );
    let letter = env.next_message(&env.dead_letter_queue(), WAIT).await;
    assert_eq!(letter.header_int("x-error-status"), Some(400));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_down_past_the_budget_is_to_wait_in_the_first_delay_queue() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "200"),
            ("RETRY__DELAY_TIERS_MS", "60000"),
        ],
    )
    .await;
    let context = env.context().await;
    let properties = command_properties("direct-delayed");
    let body = command_body("45.00", 45);
    let delivery = original(&env, &properties, body.as_bytes());

    let fate = pipeline::process(&context, &delivery).await;
    let Fate::Delay(delay) = &fate else {
        panic!("expected a delay, got {fate:?}")
    };
    assert_eq!((delay.round, delay.delay_ms), (1, 60_000));
    let calls = provider.received_requests().await.unwrap().len() as i32;
    assert!(calls >= 1);
    assert_eq!(delay.attempts, calls);
    assert_eq!(
        pipeline::settle(&context, &delivery, fate).await,
        Disposition::Ack
    );
    let record = env.record("direct-delayed").await.expect("recorded");
    assert_eq!(record.attempts, calls, "the round's calls are on the row");
    assert_eq!(record.lease_owner, None, "the lease is given up");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_grace_period_the_command_is_given_back_and_its_lease_released() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 46, "46.00", 46).await;
    let env = TestEnv::new(&provider.uri()).await;
    let context = env.context().await;
    // The grace period is already over: the command is claimed, then given back without waiting
    // for the provider.
    context.abandon.cancel();
    let properties = command_properties("direct-abandoned");
    let body = command_body("46.00", 46);
    let delivery = original(&env, &properties, body.as_bytes());

    let fate = pipeline::process(&context, &delivery).await;
    assert!(matches!(fate, Fate::Requeue), "{fate:?}");
    assert_eq!(
        pipeline::settle(&context, &delivery, fate).await,
        Disposition::Requeue
    );
    let record = env.record("direct-abandoned").await.expect("claimed first");
    assert_eq!(
        record.lease_owner, None,
        "the lease is released: {record:?}"
    );
    assert_eq!(
        record.status, "processing",
        "no outcome was recorded: {record:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_of_an_outcome_whose_event_is_gone_is_done_without_a_call() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let context = env.context().await;
    let properties = command_properties("direct-done");
    let body = command_body("46.00", 46);
    let delivery = original(&env, &properties, body.as_bytes());
    let first = pipeline::process(&context, &delivery).await;
    assert!(matches!(first, Fate::PublishRecorded(_)), "{first:?}");
    // Its failed event no longer kept (removed by hand here): nothing is left to publish again.
    exec_admin(
        env.settings.database.url.expose(),
        "DELETE FROM outbox WHERE command_id = 'direct-done'",
    )
    .await;

    let fate = pipeline::process(&context, &delivery).await;
    assert!(matches!(fate, Fate::Done), "{fate:?}");
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
    assert_eq!(
        pipeline::settle(&context, &delivery, fate).await,
        Disposition::Ack
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_whose_provider_looks_down_waits_unclaimed_in_a_delay_queue() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "100"),
            ("RETRY__DELAY_TIERS_MS", "60000"),
            ("BREAKER__MIN_CALLS", "2"),
            ("BREAKER__PROBE_INTERVAL_MS", "60000"),
        ],
    )
    .await;
    let context = env.context().await;
    // Failures enough to open the provider's circuit.
    for i in 0..2 {
        let properties = command_properties(&format!("direct-opening-{i}"));
        let body = command_body("47.00", 47);
        let fate = pipeline::process(&context, &original(&env, &properties, body.as_bytes())).await;
        assert!(matches!(fate, Fate::Delay(_)), "{fate:?}");
    }
    let calls = provider.received_requests().await.unwrap().len();

    let properties = command_properties("direct-parked");
    let body = command_body("47.00", 47);
    let fate = pipeline::process(&context, &original(&env, &properties, body.as_bytes())).await;
    let Fate::Delay(delay) = &fate else {
        panic!("expected a delay, got {fate:?}")
    };
    assert_eq!((delay.round, delay.lease_token.as_deref()), (1, None));
    assert!(delay.last_error.contains("circuit"), "{}", delay.last_error);
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        calls,
        "no call"
    );
    assert!(env.record("direct-parked").await.is_none(), "not claimed");
}
