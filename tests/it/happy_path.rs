//! Guarantee: a valid command produces exactly one provider call and one `payment-link.created`
//! event whose body is the provider's answer byte for byte, with the amount exact throughout.

use crate::helpers::*;
use bigdecimal::BigDecimal;
use payment_link_worker::broker::messages::CREATED;
use std::str::FromStr;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn created_event_carries_the_provider_answer_and_the_exact_amount() {
    let provider = MockServer::start().await;
    let amount = "9999999999999999.99";
    let answer = provider_answer(42, amount, 1001);
    Mock::given(method("POST"))
        .and(path("/payment-provider-payment-link"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(header("idempotency-key", "cmd-happy"))
        .respond_with(ResponseTemplate::new(201).set_body_raw(answer.clone(), "application/json"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let properties = with_header(command_properties("cmd-happy"), "traceparent", traceparent)
        .with_correlation_id("invoice-run-77".into());
    env.publish_raw(properties, command_body(amount, 1001).as_bytes())
        .await;

    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        String::from_utf8(event.body.clone()).unwrap(),
        answer,
        "event body is the provider's answer verbatim"
    );
    assert_eq!(event.routing_key, "payment-link.created");
    let p = &event.properties;
    assert_eq!(p.kind().as_ref().unwrap().as_str(), CREATED);
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(
        p.correlation_id().as_ref().unwrap().as_str(),
        "invoice-run-77"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert!(p.timestamp().is_some());
    let event_id = event.message_id();
    assert!(
        uuid::Uuid::parse_str(&event_id).is_ok(),
        "event id is a UUID: {event_id}"
    );
    assert_ne!(event_id, "cmd-happy");
    assert_eq!(
        event.header("cloudEvents:id").as_deref(),
        Some(event_id.as_str())
    );
    assert_eq!(event.header("cloudEvents:type").as_deref(), Some(CREATED));
    assert_eq!(
        event.header("cloudEvents:specversion").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        event.header("cloudEvents:source").as_deref(),
        Some("urn:payment-link-worker")
    );
    assert_eq!(
        event.header("cloudEvents:subject").as_deref(),
        Some("cmd-happy")
    );
    let time = event.header("cloudEvents:time").unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&time).is_ok(),
        "{time}"
    );
    let trace_id = |tp: &str| tp.split('-').nth(1).unwrap().to_owned();
    let event_tp = event
        .header("traceparent")
        .expect("event carries trace context");
    assert_eq!(
        trace_id(&event_tp),
        trace_id(traceparent),
        "the event continues the command's trace"
    );

    let requests = provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let sent = String::from_utf8(requests[0].body.clone()).unwrap();
    assert!(
        sent.contains(&format!("\"amountInMajorCurrency\":{amount}")),
        "provider got the exact amount: {sent}"
    );
    let provider_tp = requests[0]
        .headers
        .get("traceparent")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(
        trace_id(provider_tp),
        trace_id(traceparent),
        "the provider call continues the command's trace"
    );

    let record = env.record("cmd-happy").await.unwrap();
    assert_eq!(record.status, "succeeded");
    assert_eq!(
        record.amount_in_major_currency,
        BigDecimal::from_str(amount).unwrap()
    );
    assert_eq!(
        record.payment_link.as_deref(),
        Some("https://instantpaymentlink/ref-42")
    );
    assert_eq!(record.link_id, Some(42));
    assert_eq!(record.attempts, 1);
    assert_eq!(record.provider_response.as_deref(), Some(answer.as_str()));
    assert!(record.lease_owner.is_none());

    // The event is kept on the command's row (to publish again if the command comes again); it
    // went out at once, so nothing was left for the outbox relay.
    let kept = env
        .recorded_event("cmd-happy")
        .await
        .expect("the event is kept");
    assert_eq!(kept.message_id(), event_id);
    assert_eq!(kept.body, event.body);
    assert_eq!(kept.routing_key, event.routing_key);
    assert!(env.outbox("cmd-happy").await.is_empty());
    eventually("the command to be acked", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker.stop().await.expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn amount_keeps_its_scale_and_failed_event_carries_known_ids() {
    // 7.50 must reach the provider as 7.50, not 7.5 and never 7.4999…
    let provider = MockServer::start().await;
    answer_with_link(&provider, 200, 5, "7.50", 3).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("cmd-scale", &command_body("7.50", 3)).await;
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        event.json()["paymentLink"],
        "https://instantpaymentlink/ref-5"
    );
    let sent =
        String::from_utf8(provider.received_requests().await.unwrap()[0].body.clone()).unwrap();
    assert!(sent.contains("\"amountInMajorCurrency\":7.50,"), "{sent}");
    let record = env.record("cmd-scale").await.unwrap();
    assert_eq!(
        record.amount_in_major_currency,
        BigDecimal::from_str("7.5").unwrap()
    );
}
