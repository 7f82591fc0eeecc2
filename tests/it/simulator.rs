//! Guarantee: the provider simulator behaves like the provider contract the worker relies on,
//! and the worker works end to end against it.

use crate::helpers::*;
use payment_link_worker::provider::sim::SimOptions;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn start_sim(fail_rate: f64) -> (String, CancellationToken) {
    start_simulator(SimOptions {
        token: TOKEN.into(),
        latency: Duration::ZERO,
        fail_rate,
        stall_rate: 0.0,
        ..SimOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn simulator_follows_the_provider_contract() {
    let (url, stop) = start_sim(0.0).await;
    let endpoint = format!("{url}/payment-provider-payment-link");
    let client = reqwest::Client::new();
    let body = command_body("9999999999999999.99", 12);
    let post = |token: Option<&str>, key: &str, body: String| {
        let mut request = client
            .post(&endpoint)
            .header("idempotency-key", key)
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(post(None, "k1", body.clone()).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("wrong"), "k1", body.clone())
            .await
            .unwrap()
            .status(),
        403
    );
    let invalid = post(Some(TOKEN), "k0", r#"{"paymentProviderId":1}"#.into())
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    assert!(
        invalid
            .text()
            .await
            .unwrap()
            .contains("amountInMajorCurrency is required")
    );

    let first = post(Some(TOKEN), "k1", body.clone()).await.unwrap();
    assert_eq!(first.status(), 201);
    let first = first.text().await.unwrap();
    assert!(
        first.contains(r#""amountInMajorCurrency":9999999999999999.99"#),
        "{first}"
    );
    assert!(
        first.contains(r#""paymentLink":"https://instantpaymentlink/sim-"#),
        "{first}"
    );
    let repeat = post(Some(TOKEN), "k1", body.clone()).await.unwrap();
    assert_eq!(repeat.status(), 200);
    assert_eq!(repeat.text().await.unwrap(), first, "same key, same link");
    let other = post(Some(TOKEN), "k2", body).await.unwrap();
    assert_eq!(other.status(), 201);
    assert_ne!(other.text().await.unwrap(), first, "new key, new link");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn simulator_fail_rate_answers_503() {
    let (url, stop) = start_sim(1.0).await;
    let response = reqwest::Client::new()
        .post(format!("{url}/payment-provider-payment-link"))
        .bearer_auth(TOKEN)
        .body(command_body("1.00", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_against_the_simulator() {
    let (url, stop) = start_sim(0.0).await;
    let env = TestEnv::new(&url).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("sim-1", &command_body("0.0001", 77)).await;
    let event = env.next_message(&events, WAIT).await;
    let body = String::from_utf8(event.body.clone()).unwrap();
    assert!(body.contains(r#""amountInMajorCurrency":0.0001"#), "{body}");
    assert_eq!(event.json()["invoiceId"], 77);
    stop.cancel();
}
