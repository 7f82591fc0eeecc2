//! Guarantees: an operator fixes a dead letter's data and sends it again as a new command (one
//! provider call, under a new Idempotency-Key; its event names the original); the original is
//! `edited` and points at its successor; an invalid edit is refused naming the field before
//! anything is sent; a second edit of the same letter, even at the same time, is refused; a viewer
//! cannot edit and sees the personal data of the audit's before/after masked.

use crate::console::{OPERATOR, RunningConsole, with_json};
use crate::helpers::*;
use crate::operations::{INGEST, stored};
use payment_link_worker::dead_letters::store::Filter;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const VIEWER: &str = "viewer-token-for-the-console-tests";

/// A command for invoice `invoice`, to be sent a link at `email`.
fn body(email: &str, invoice: i64) -> String {
    format!(
        r#"{{"paymentProviderId":1,"amountInMajorCurrency":25.50,"description":"Invoice {invoice}","emailAddress":"{email}","invoiceId":{invoice}}}"#
    )
}

async fn post(url: &str, token: &str, body: &Value) -> (u16, Value) {
    let request = with_json(reqwest::Client::new().post(url).bearer_auth(token), body);
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(url: &str, token: &str) -> Value {
    let answer = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    serde_json::from_str(&answer.text().await.unwrap()).unwrap()
}

/// The dead letter of `command_id`.
async fn letter_of(env: &TestEnv, command_id: &str) -> i64 {
    let mut conn = env.pool.get().await.unwrap();
    payment_link_worker::dead_letters::store::open_ids(
        &mut conn,
        &Filter {
            command_id: Some(command_id.into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap()[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_refused_for_its_address_is_edited_and_sent_once_as_a_new_command() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("bad.example"))
        .respond_with(ResponseTemplate::new(400).set_body_string("emailAddress is not deliverable"))
        .with_priority(1)
        .mount(&provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(77, "25.50", 1), "application/json"),
        )
        .with_priority(2)
        .mount(&provider)
        .await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    for (id, invoice) in [("edit-a", 1), ("edit-b", 2), ("edit-c", 3)] {
        env.send(id, &body("someone@bad.example", invoice)).await;
    }
    stored(&env, &Filter::default(), 3).await;
    env.messages(&events, 3, WAIT).await; // three failed events
    let console = RunningConsole::start(&env.settings).await;
    let api = format!("{}/api", console.base);
    let a = letter_of(&env, "edit-a").await;
    let fix = json!({ "fields": { "emailAddress": "someone@good.example" }, "reason": "typo in the domain" });

    // A viewer cannot edit; an invalid edit is refused naming the field, and nothing is sent.
    let (status, _) = post(&format!("{api}/dead-letters/{a}/edit"), VIEWER, &fix).await;
    assert_eq!(status, 403);
    for (bad, named) in [
        (
            json!({ "fields": { "emailAddress": "no-at-sign" }, "reason": "r" }),
            "emailAddress",
        ),
        (
            json!({ "fields": { "amountInMajorCurrency": "12" }, "reason": "r" }),
            "amountInMajorCurrency",
        ),
        (
            json!({ "fields": { "messageId": "other" }, "reason": "r" }),
            "messageId",
        ),
        (
            json!({ "fields": { "emailAddress": "a@b.example" }, "reason": " " }),
            "reason",
        ),
    ] {
        let (status, refused) = post(&format!("{api}/dead-letters/{a}/edit"), OPERATOR, &bad).await;
        assert_eq!(status, 422, "{bad}: {refused}");
        assert!(
            refused["error"].as_str().unwrap().contains(named),
            "{bad}: {refused}"
        );
    }
    let calls_before = provider.received_requests().await.unwrap().len();

    let (status, edited) = post(&format!("{api}/dead-letters/{a}/edit"), OPERATOR, &fix).await;
    assert_eq!(status, 202, "{edited}");
    assert_eq!(edited["commandId"], "edit-a~edit1");
    assert_eq!(edited["before"]["emailAddress"], "someone@bad.example");
    assert_eq!(edited["after"]["emailAddress"], "someone@good.example");
    let created = env.next_message(&events, WAIT).await;
    assert_eq!(
        created.header("cloudEvents:subject").as_deref(),
        Some("edit-a~edit1")
    );
    assert_eq!(created.header("x-edited-from").as_deref(), Some("edit-a"));
    assert_eq!(
        created.header("cloudEvents:type").as_deref(),
        Some("payment-link.created")
    );
    let calls: Vec<_> = provider.received_requests().await.unwrap()[calls_before..]
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        calls,
        ["edit-a~edit1"],
        "one provider call, under the new key"
    );

    // The original is edited, points at its successor, and says how that went.
    let detail = eventually("the edited copy's outcome is shown", WAIT, || async {
        let detail = get(&format!("{api}/dead-letters/{a}"), OPERATOR).await;
        (detail["edits"]["editedOutcome"] == "succeeded").then_some(detail)
    })
    .await;
    assert_eq!(detail["state"], "edited");
    assert_eq!(detail["edits"]["editedInto"], "edit-a~edit1");
    let (status, again) = post(&format!("{api}/dead-letters/{a}/edit"), OPERATOR, &fix).await;
    assert_eq!(status, 409, "a letter is edited once: {again}");

    // The audit keeps who, why, before and after; a viewer sees the address masked.
    let entry = |log: &Value| -> Value {
        log["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "edit")
            .cloned()
            .unwrap()
    };
    let seen = entry(&get(&format!("{api}/audit"), OPERATOR).await);
    assert_eq!(
        (seen["actor"].as_str(), seen["ids"][0].as_i64()),
        (Some("olga"), Some(a))
    );
    assert_eq!(seen["detail"]["reason"], "typo in the domain");
    assert_eq!(
        seen["detail"]["before"]["emailAddress"],
        "someone@bad.example"
    );
    let masked = entry(&get(&format!("{api}/audit"), VIEWER).await);
    assert_eq!(masked["detail"]["before"]["emailAddress"], "(masked)");
    assert_eq!(masked["detail"]["after"]["emailAddress"], "(masked)");

    // Two edits of the same letter at the same time: one is made, the other refused.
    let b = letter_of(&env, "edit-b").await;
    let url = format!("{api}/dead-letters/{b}/edit");
    let (first, second) = tokio::join!(post(&url, OPERATOR, &fix), post(&url, OPERATOR, &fix));
    let mut statuses = [first.0, second.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409], "{first:?} {second:?}");

    // The CLI's way.
    let c = letter_of(&env, "edit-c").await;
    let said = output(binary(&env).args([
        "dead-letters",
        "edit",
        &c.to_string(),
        "--set",
        "emailAddress=someone@good.example",
        "--set",
        "amountInMajorCurrency=25.5",
        "--reason",
        "typo",
        "--operator",
        "olga",
    ]));
    eprintln!("{said}");
    assert!(
        said.contains(&format!(
            "dead letter {c} edited: sent as command edit-c~edit1"
        )),
        "{said}"
    );
    assert!(said.contains(r#""amountInMajorCurrency":"25.5""#), "{said}");
    let third = env.messages(&events, 2, WAIT).await;
    assert!(
        third
            .iter()
            .any(|e| e.header("x-edited-from").as_deref() == Some("edit-c")),
        "the CLI's edit got its event too"
    );
    console.stop().await;
}
