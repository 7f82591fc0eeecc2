//! Guarantee: one trace runs from the invoicing system through the worker to the notifier. The
//! command's `traceparent` is the parent of the consumer span; the database, provider (HTTP
//! client) and publish (producer) spans are its children; the provider and the event receive the
//! same trace id. A command without trace context starts a new trace.
//!
//! A test binary of its own: it installs the process-wide subscriber, with spans recorded in
//! memory.

// A test or a benchmark fails loudly, and should, on what it did not expect.
#![allow(clippy::unwrap_used)]

#[path = "it/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "common/sandbox.rs"]
#[allow(dead_code)]
mod sandbox;

use helpers::*;
use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use payment_link_worker::config::{LogFormat, LogSettings};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn trace_id_of(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(1)
        .expect("traceparent has a trace id")
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_from_command_to_provider_to_event() {
    let exporter = InMemorySpanExporter::default();
    let provider_of_spans = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    payment_link_worker::telemetry::install(
        &LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
            summary_interval_ms: 30_000,
            progress_interval_ms: 0,
        },
        provider_of_spans.tracer("test"),
    );

    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    env.publish_raw(
        with_header(command_properties("traced"), "traceparent", traceparent),
        command_body("1.00", 1).as_bytes(),
    )
    .await;
    let event = env.next_message(&events, WAIT).await;
    env.send("untraced", &command_body("1.00", 1)).await;
    let untraced_event = env.next_message(&events, WAIT).await;
    worker.stop().await.unwrap();
    provider_of_spans.force_flush().unwrap();

    // The provider and the notifier see the command's trace.
    let expected = "0af7651916cd43dd8448eb211c80319c";
    let event_tp = event.header("traceparent").unwrap();
    assert_eq!(trace_id_of(&event_tp), expected);
    let requests = provider.received_requests().await.unwrap();
    for request in &requests[..2] {
        let tp = request
            .headers
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            trace_id_of(tp),
            expected,
            "each provider attempt carries the trace"
        );
    }

    let spans = exporter.get_finished_spans().unwrap();
    let trace = TraceId::from_hex(expected).unwrap();
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    let consumer = in_trace
        .iter()
        .find(|s| s.span_kind == SpanKind::Consumer)
        .expect("a consumer span in the command's trace");
    assert_eq!(
        consumer.name,
        format!("process {}", env.settings.broker.command_queue)
    );
    assert_eq!(
        consumer.parent_span_id.to_string(),
        "b7ad6b7169203331",
        "the command's span is the parent"
    );
    assert_eq!(
        attribute(consumer, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(consumer, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attribute(consumer, "messaging.message.id").as_deref(),
        Some("traced")
    );
    assert_eq!(
        attribute(consumer, "messaging.destination.name"),
        Some(env.settings.broker.command_queue.clone())
    );
    assert_eq!(
        attribute(consumer, "trace_id").as_deref(),
        Some(expected),
        "logs carry the trace id"
    );

    let children: Vec<&&SpanData> = in_trace
        .iter()
        .filter(|s| s.parent_span_id == consumer.span_context.span_id())
        .collect();
    let http: Vec<&&&SpanData> = children
        .iter()
        .filter(|s| s.span_kind == SpanKind::Client && s.name == "POST")
        .collect();
    assert_eq!(http.len(), 2, "one client span per attempt");
    let statuses: Vec<Option<String>> = http
        .iter()
        .map(|s| attribute(s, "http.response.status_code"))
        .collect();
    assert!(
        statuses.contains(&Some("503".into())) && statuses.contains(&Some("201".into())),
        "{statuses:?}"
    );
    let resends: Vec<Option<String>> = http
        .iter()
        .map(|s| attribute(s, "http.request.resend_count"))
        .collect();
    assert!(
        resends.contains(&Some("0".into())) && resends.contains(&Some("1".into())),
        "{resends:?}"
    );
    assert!(
        http.iter()
            .all(|s| attribute(s, "http.request.method").as_deref() == Some("POST"))
    );
    // The provider saw the client span's own id as parent.
    let provider_parents: Vec<String> = requests[..2]
        .iter()
        .map(|r| {
            r.headers
                .get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .split('-')
                .nth(2)
                .unwrap()
                .to_owned()
        })
        .collect();
    for span in &http {
        assert!(provider_parents.contains(&span.span_context.span_id().to_string()));
    }
    assert!(
        children.iter().any(|s| s.name == "claim the command"
            && attribute(s, "db.system.name").as_deref() == Some("postgresql")),
        "database spans"
    );
    let producer = children
        .iter()
        .find(|s| s.span_kind == SpanKind::Producer)
        .expect("a producer span for the event");
    assert_eq!(
        attribute(producer, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        attribute(producer, "messaging.destination.name"),
        Some(env.settings.broker.event_exchange.clone())
    );

    // Without trace context the command starts a trace of its own, which the event carries.
    let untraced_tp = untraced_event.header("traceparent").expect("a new trace");
    assert_ne!(trace_id_of(&untraced_tp), expected);
    assert!(spans.iter().any(|s| s.span_kind == SpanKind::Consumer
        && s.span_context.trace_id().to_string() == trace_id_of(&untraced_tp)
        && !s.parent_span_id.to_string().chars().any(|c| c != '0')));

    // The trace continues across a delayed redelivery: the context travels in the headers.
    let flaky = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&flaky)
        .await;
    answer_with_link(&flaky, 201, 2, "1.00", 1).await;
    let env = TestEnv::with(
        &flaky.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "30"),
            ("RETRY__DELAY_TIERS_MS", "200,200,200,200"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let delayed_parent = "00-1bf7651916cd43dd8448eb211c80319d-c7ad6b7169203332-01";
    env.publish_raw(
        with_header(command_properties("delayed"), "traceparent", delayed_parent),
        command_body("1.00", 1).as_bytes(),
    )
    .await;
    let event = env.next_message(&events, WAIT).await;
    worker.stop().await.unwrap();
    provider_of_spans.force_flush().unwrap();
    assert_eq!(
        trace_id_of(&event.header("traceparent").unwrap()),
        trace_id_of(delayed_parent)
    );
    let spans = exporter.get_finished_spans().unwrap();
    let rounds: Vec<&SpanData> = spans
        .iter()
        .filter(|s| {
            s.span_kind == SpanKind::Consumer
                && attribute(s, "messaging.message.id").as_deref() == Some("delayed")
        })
        .collect();
    assert!(
        rounds.len() >= 2,
        "the command came back from a delay queue ({} rounds)",
        rounds.len()
    );
    for round in rounds {
        assert_eq!(
            round.span_context.trace_id().to_string(),
            trace_id_of(delayed_parent)
        );
        assert_eq!(
            round.parent_span_id.to_string(),
            "c7ad6b7169203332",
            "every round continues the command's trace"
        );
    }
}
