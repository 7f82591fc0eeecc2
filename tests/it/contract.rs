//! Guarantee: the AsyncAPI document (`src/contract/asyncapi.json`) cannot drift from the code.
//! The messages the worker really consumes and publishes here (a command, both events, dead
//! letters of each origin) validate against the document's JSON Schemas, and wrong ones do not.

use crate::helpers::*;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const DOCUMENT: &str = include_str!("../../src/contract/asyncapi.json");

/// A validator for one of the document's component schemas, resolving its references.
fn schema(name: &str) -> jsonschema::Validator {
    let mut root: Value = serde_json::from_str(DOCUMENT).unwrap();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["$ref"] = json!(format!("#/components/schemas/{name}"));
    jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {name}: {e}"))
}

fn assert_valid(name: &str, instance: &Value) {
    let validator = schema(name);
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{name} rejects {instance}: {errors:?}");
}

/// AMQP headers as JSON, the way the document describes them.
fn headers_json(properties: &BasicProperties) -> Value {
    let mut map = serde_json::Map::new();
    for (name, value) in properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default()
    {
        let value = match value {
            AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::ShortString(s) => json!(s.as_str()),
            AMQPValue::LongInt(v) => json!(v),
            AMQPValue::LongLongInt(v) => json!(v),
            AMQPValue::ShortInt(v) => json!(v),
            AMQPValue::Boolean(v) => json!(v),
            _ => continue,
        };
        map.insert(name.to_string(), value);
    }
    Value::Object(map)
}

#[test]
fn the_document_is_asyncapi_3_and_its_references_resolve() {
    let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let resolve = |pointer: &str| doc.pointer(pointer.trim_start_matches('#')).is_some();
    let mut refs = Vec::new();
    fn collect(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    refs.push(r.clone());
                }
                map.values().for_each(|v| collect(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, refs)),
            _ => {}
        }
    }
    collect(&doc, &mut refs);
    assert!(refs.len() > 10);
    for r in refs {
        assert!(resolve(&r), "unresolved reference {r}");
    }
    for operation in doc["operations"].as_object().unwrap().values() {
        assert!(["send", "receive"].contains(&operation["action"].as_str().unwrap()));
    }
    // Each error kind of the code is in the document, and nothing else.
    let kinds: Vec<&str> = doc["components"]["schemas"]["ErrorKind"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let code: Vec<&str> = payment_link_worker::errors::ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(kinds, code);
}

#[test]
fn the_schemas_refuse_what_the_worker_refuses() {
    let command = schema("PaymentLinkCommand");
    for bad in [
        json!({"amountInMajorCurrency": 1, "description": "d"}),
        json!({"paymentProviderId": 0, "amountInMajorCurrency": 1, "description": "d"}),
        json!({"paymentProviderId": 1, "amountInMajorCurrency": "1", "description": "d"}),
        json!({"paymentProviderId": 1, "amountInMajorCurrency": -1, "description": "d"}),
        json!({"paymentProviderId": 1, "amountInMajorCurrency": 1, "description": "  "}),
        json!({"paymentProviderId": 1, "amountInMajorCurrency": 1, "description": "d", "emailAddress": "x@"}),
    ] {
        assert!(!command.is_valid(&bad), "{bad}");
    }
    assert!(
        !schema("PaymentLinkFailed")
            .is_valid(&json!({"commandId": "c", "errorKind": "validation", "message": "m"}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_consumed_and_published_match_the_document() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "contract-rejected"))
        .respond_with(ResponseTemplate::new(422).set_body_string("unprocessable"))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 3, "12.3400", 55).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;

    let command = command_body("12.3400", 55);
    let properties = with_header(
        command_properties("contract-ok"),
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    assert_valid(
        "PaymentLinkCommand",
        &serde_json::from_str(&command).unwrap(),
    );
    assert_valid("CommandHeaders", &headers_json(&properties));
    env.publish_raw(properties, command.as_bytes()).await;
    env.send("contract-rejected", &command_body("1.00", 56))
        .await;
    env.publish_raw(command_properties("contract-invalid"), b"{}")
        .await;

    let published = env.messages(&events, 2, WAIT).await;
    for event in &published {
        assert_valid("EventHeaders", &headers_json(&event.properties));
        match event.routing_key.as_str() {
            "payment-link.created" => assert_valid("PaymentLinkCreated", &event.json()),
            "payment-link.failed" => assert_valid("PaymentLinkFailed", &event.json()),
            other => panic!("unexpected routing key {other}"),
        }
    }
    let dead = env.messages(&env.dead_letter_queue(), 2, WAIT).await;
    let kinds: Vec<String> = dead
        .iter()
        .map(|d| d.header("x-error-kind").unwrap())
        .collect();
    assert!(
        kinds.contains(&"provider-rejected".into()) && kinds.contains(&"validation".into()),
        "{kinds:?}"
    );
    for letter in &dead {
        assert_valid("DeadLetterHeaders", &headers_json(&letter.properties));
    }
}
